#!/usr/bin/env python3
"""One Path A worker under several variants in one call: which change makes a worker faster, on the same host.

    python bench/bench_variants.py --work /dev/shm/hot --layers 1 --experts 64 variants.json

``variants.json`` is a list of ``[name, {ENV: value}, [extra flags]]``; each variant converts the ``pro-layers``
source (generated once under WORK/src, as bench_hot.py does) with ``--workers 1`` and prints one JSON line: GB/s
of source end to end and steady, busy seconds per stage, and whether its shards hold the same bytes as the first
variant's that used the same ``--max-shard-size``. Put the baseline first and again last: the spread between the
two is the noise. Timings compare only within one call (one host). Run by hand on a GPU machine, never by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_hot import SCRIPT, pro_layers_source, summarize  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="scratch folder in memory (/dev/shm/...)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("variants", help="JSON file: [[name, {env}, [flags]], ...]")
    args = p.parse_args()
    with open(args.variants) as f:
        variants = json.load(f)
    src = pro_layers_source(args.work, args.layers, args.experts)
    first_shards: dict[tuple, dict] = {}  # by extra flags: a different shard size gives different files
    for name, env, flags in variants:
        dst = os.path.join(args.work, "out")
        shutil.rmtree(dst, ignore_errors=True)
        started = time.time()
        run = subprocess.run([sys.executable, SCRIPT, "--src", src, "--dst", dst, "--workers", "1", *flags],
                             env={**os.environ, **env}, capture_output=True, text=True)
        if run.returncode != 0:
            print(json.dumps({"variant": name, "failed": run.stderr[-1500:]}), flush=True)
            continue
        r = summarize(dst, time.time() - started)
        shards = r.pop("shards")
        r["same_bytes"] = first_shards.setdefault(tuple(flags), shards) == shards
        notes = [line for line in run.stderr.splitlines() if line.startswith("EXP ")]  # what a switch reports
        print(json.dumps({"variant": name, **r, **({"notes": notes[:8]} if notes else {})}), flush=True)
    shutil.rmtree(os.path.join(args.work, "out"), ignore_errors=True)


if __name__ == "__main__":
    main()
