#!/usr/bin/env python3
"""Path B: calibrate an FP8 DeepSeek V4, V3 / R1 / V3.1 or V3.2 checkpoint to NVFP4 W4A4 with llm-compressor
(compressed-tensors, vLLM).

    .venv/bin/python quantize_llmcompressor.py --src DeepSeek-V4-Pro-FP8 --dst OUT --num-samples 256 \\
        --max-seq-len 4096 --offload-dir /nvme/pathb --export-activation-scales act.json 2>&1 | tee path_b.log
    .venv/bin/python quantize_llmcompressor.py --src DeepSeek-R1 --dst R1-NVFP4 --offload-dir /nvme/pathb

Needs requirements-pathb.txt (scripts/bootstrap.sh .venv requirements-pathb.txt). Rerun the same command to resume:
the BF16 staging checkpoint and a finished calibration in --offload-dir are reused, the output's finished shards
kept; only a calibration cut short starts over. docs/path-b.md has the stages, disk and memory needs. Feed act.json
to fp8_to_nvfp4_streaming.py --activation-scales for a Path A W4A4.
"""

import argparse

from nvfp4kit.plain_log import no_bars_unless_a_terminal

no_bars_unless_a_terminal()  # before the libraries import tqdm

from nvfp4kit.calibrate import CalibrationSettings, quantize_with_llmcompressor  # noqa: E402
from nvfp4kit.calibration_data import DEFAULT_DATASET  # noqa: E402
from nvfp4kit.cli import (  # noqa: E402
    ArgumentParser, add_plan_flags, at_least, options_from_args, run_main, setup_logging)


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="source checkpoint folder (FP8 DeepSeek V4, V3, R1, V3.1 or V3.2)")
    p.add_argument("--dst", required=True,
                   help="output folder: empty, or this same command's unfinished output (resumed)")
    p.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="local JSONL/Parquet/Arrow file or folder, or a hub dataset name (default: %(default)s)")
    p.add_argument("--split", help="hub split (default: train_sft for ultrachat_200k, else train)")
    p.add_argument("--num-samples", type=at_least(1), default=256)
    p.add_argument("--max-seq-len", type=at_least(2, why=": a calibration sample needs a token and its successor"),
                   default=4096)
    p.add_argument("--seed", type=int, default=42, help="calibration sample shuffle seed")
    p.add_argument("--offload-dir", help="work folder on NVMe: BF16 staging checkpoint, disk offload, "
                                         "llm-compressor's save (default: DST.offload)")
    p.add_argument("--max-cpu-memory", type=at_least(0, float), metavar="GB",
                   help="model share kept in host memory, the rest offloaded to disk (default: physical memory "
                        "minus the activation cache, one layer and 10 GB; a cache that does not fit is refused)")
    p.add_argument("--keep-offload", action="store_true", help="keep the work folder after success")
    p.add_argument("--export-activation-scales", metavar="FILE",
                   help="write the calibrated per-module input amax for fp8_to_nvfp4_streaming.py --activation-scales")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --dst that holds anything but this same command's output")
    add_plan_flags(p)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    setup_logging(args.verbose)
    settings = CalibrationSettings(
        dataset=args.dataset, num_samples=args.num_samples, max_seq_len=args.max_seq_len, seed=args.seed,
        split=args.split, offload_dir=args.offload_dir, overwrite=args.overwrite, keep_offload=args.keep_offload,
        max_cpu_memory_gb=args.max_cpu_memory,
        export_activation_scales=args.export_activation_scales,
    )
    quantize_with_llmcompressor(args.src, args.dst, options_from_args(args), settings)
    return 0


if __name__ == "__main__":
    run_main(main)
