#!/usr/bin/env python3
"""Inspect an FP8 DeepSeek V4 checkpoint before converting it: what it holds, what Path A will do, what blocks it.

    python inspect_model.py DeepSeek-V4-Pro-FP8 | tee inspect.log

Reads only the index and the safetensors headers (seconds, no GPU). Exit code 0: convertible; 2: problems listed
at the end of the report block the conversion.
"""

import argparse

from nvfp4kit.cli import ArgumentParser, add_plan_flags, options_from_args, run_main
from nvfp4kit.report import inspect_checkpoint


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="checkpoint folder (index + shards, or a single .safetensors file)")
    p.add_argument("--json", metavar="FILE", help="also write the facts as JSON (verify and the converter reuse it)")
    add_plan_flags(p)
    args = p.parse_args()
    return inspect_checkpoint(args.src, options_from_args(args), args.json)


if __name__ == "__main__":
    run_main(main)
