#!/usr/bin/env python3
"""Path A: convert an FP8 block-scaled DeepSeek V4 checkpoint to NVFP4, weight-only, streaming and resumable.

    python fp8_to_nvfp4_streaming.py --src DeepSeek-V4-Pro-FP8 --dst OUT --workers 8 2>&1 | tee path_a.log

Rerun the same command after a crash to resume; --restart starts over; --dry-run prints the plan only.
Several processes (torchrun, Slurm: RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS) share one destination on a
shared filesystem, each converting its share of the shards; relaunch the same job to resume it.
"""

import argparse
import sys

from nvfp4kit.readahead import SourceReadAhead, read_ahead_from_argv

if __name__ == "__main__":
    read_ahead = read_ahead_from_argv(sys.argv[1:])  # source reads overlap the imports below (seconds), and more

import torch  # noqa: E402

from nvfp4kit.cli import (  # noqa: E402
    ArgumentParser, add_plan_flags, at_least, options_from_args, run_main, setup_logging)
from nvfp4kit.convert import Settings, convert  # noqa: E402
from nvfp4kit.progress import DEFAULT_EVERY_SECONDS  # noqa: E402
from nvfp4kit.ranks import local_gpu_slot, share_from_env  # noqa: E402


def main(read_ahead: SourceReadAhead | None = None) -> int:
    share = share_from_env()  # RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/SLURM_NTASKS: this process's share
    local_index, local_count = local_gpu_slot()
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="source checkpoint folder (FP8, DeepSeek names)")
    p.add_argument("--dst", required=True, help="output folder (created; must be outside the source)")
    p.add_argument("--workers", type=int, default=max(1, torch.cuda.device_count() // local_count),
                   help="worker processes, one per GPU (default: all GPUs, shared between the ranks of a node "
                        "(LOCAL_WORLD_SIZE), or 1 on CPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--activation-scales", metavar="FILE",
                   help="per-module input amax (quantize_llmcompressor.py --export-activation-scales): writes W4A4")
    add_plan_flags(p)
    p.add_argument("--restart", action="store_true", help="discard a previous run's output in --dst and start over")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the expected size; write nothing")
    p.add_argument("--no-verify-resume", action="store_true",
                   help="on resume, trust finished shards by size instead of re-hashing them")
    p.add_argument("--progress-every", type=at_least(0, float), default=DEFAULT_EVERY_SECONDS, metavar="SECONDS",
                   help="when stderr is not a terminal (a tee'd log), a progress line every SECONDS (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch here (use --device cpu, or check CUDA_VISIBLE_DEVICES)")
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    setup_logging(args.verbose)
    settings = Settings(workers=args.workers, device=args.device, restart=args.restart, dry_run=args.dry_run,
                        verify_resume=not args.no_verify_resume, progress_every=args.progress_every, share=share,
                        first_gpu=local_index * args.workers)
    convert(args.src, args.dst, options_from_args(args), settings, args.activation_scales, read_ahead)
    return 0


if __name__ == "__main__":
    run_main(lambda: main(read_ahead), teardown=False)
