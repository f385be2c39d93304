#!/usr/bin/env python3
"""Path A from the page cache: per-worker throughput with no disk in the way, and the cost of a resume.

    python bench/bench_hot.py --work /dev/shm/hot --layers 2 --experts 64 --workers 1,2,4 --disk /tmp/cold \
        --json hot.json

1. Generates (or reuses) a ``pro-layers`` source under WORK/src (real V4 Pro shapes), in memory (/dev/shm).
2. Copy floor, hot: reads every source byte and writes as many bytes as Path A's output, both in WORK.
3. Path A end to end for each worker count (the real script; all workers on the visible GPUs): GB/s of source end
   to end and steady (source bytes / first shard start to last shard end), busy seconds per stage summed over
   the shards (which stage limits), peak RSS and GPU memory per worker; every count must write the same bytes.
4. Resume: the same command again on the complete output (nothing to do) with the hash check and without, against
   ``cat`` of the output; with ``--disk``, the output copied to that folder and the rerun timed cold (page cache
   dropped), against a cold ``cat``.
Run by hand on a GPU machine, never by CI.
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
SCRIPT = os.path.join(ROOT, "fp8_to_nvfp4_streaming.py")
sys.path.insert(0, ROOT)

from bench.bench_path_a import drop_cache  # noqa: E402
from nvfp4kit.manifest import read_manifest  # noqa: E402


def files_of(folder: str) -> list[str]:
    return sorted(os.path.join(r, n) for r, _, fs in os.walk(folder) for n in fs if ".nvfp4kit" not in r)


def cat_seconds(folder: str) -> float:
    t0 = time.time()
    for path in files_of(folder):
        with open(path, "rb") as f:
            while f.read(64 * 2**20):
                pass
    return time.time() - t0


def copy_floor(src: str, out_bytes: int, dst: str) -> float:
    """Read every source byte, write ``out_bytes`` (the output's size) in 1 GB files: the least Path A must do."""
    os.makedirs(dst, exist_ok=True)
    t0 = time.time()
    left, k = out_bytes, 0
    out = None
    for path in files_of(src):
        with open(path, "rb") as f:
            while chunk := f.read(64 * 2**20):
                if out is None:
                    out = open(os.path.join(dst, f"floor-{k}"), "wb")
                n = min(len(chunk), left)
                out.write(chunk[:n])
                left -= n
                if out.tell() >= 10**9:
                    out.close()
                    out, k = None, k + 1
    if out is not None:
        out.close()
    seconds = time.time() - t0
    shutil.rmtree(dst)
    return seconds


def pro_layers_source(work: str, layers: int, experts: int) -> str:
    """WORK/src: a ``pro-layers`` checkpoint (real V4 Pro shapes), generated unless one is there already."""
    src = os.path.join(work, "src")
    if not os.path.exists(os.path.join(src, "model.safetensors.index.json")):
        subprocess.run([sys.executable, "-m", "nvfp4kit.synthetic", "--dst", src, "--preset", "pro-layers", "--layers",
                        str(layers), "--experts", str(experts), "--jobs", str(os.cpu_count())], check=True, cwd=ROOT)
    return src


def convert(src: str, dst: str, *flags: str) -> tuple[float, str]:
    t0 = time.time()
    run = subprocess.run([sys.executable, SCRIPT, "--src", src, "--dst", dst, "--progress-every", "5", *flags],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"Path A failed:\n{run.stderr[-3000:]}")
    return time.time() - t0, run.stderr


def summarize(dst: str, seconds: float) -> dict:
    entries = list(read_manifest(os.path.join(dst, ".nvfp4kit")).values())
    source = sum(e["source_bytes"] for e in entries)
    span = max(e["started_at"] + e["seconds"] for e in entries) - min(e["started_at"] for e in entries)
    busy: dict[str, float] = {}
    for e in entries:
        for stage, s in e["busy_seconds"].items():
            busy[stage] = round(busy.get(stage, 0.0) + s, 2)
    return {"source_gb": source / 1e9, "seconds": round(seconds, 2), "end_to_end_gbps": round(source / seconds / 1e9, 2),
            "steady_seconds": round(span, 2), "steady_gbps": round(source / span / 1e9, 2), "busy_seconds": busy,
            "peak_rss_gb": round(max(e["peak_rss_bytes"] for e in entries) / 1e9, 2),
            "cuda_peak_gb": round(max(e["cuda_peak_bytes"] for e in entries) / 1e9, 2),
            "shards": {e["name"]: e["xxh3_128"] for e in entries}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="scratch folder in memory (/dev/shm/...)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--max-shard-size", default="1GB")
    p.add_argument("--disk", help="a folder on the disk: time a cold rerun there too")
    p.add_argument("--json")
    args = p.parse_args()
    src = pro_layers_source(args.work, args.layers, args.experts)
    results: dict = {"runs": {}}
    first = None
    for w in [int(x) for x in args.workers.split(",")]:
        dst = os.path.join(args.work, f"out-w{w}")
        shutil.rmtree(dst, ignore_errors=True)
        seconds, log = convert(src, dst, "--workers", str(w), "--max-shard-size", args.max_shard_size)
        r = summarize(dst, seconds)
        shards = r.pop("shards")
        r["same_bytes_as_first"] = first is None or shards == first[1]
        results["runs"][f"workers={w}"] = r
        print(f"workers={w}: {json.dumps(r)}", flush=True)
        if first is None:
            first = (dst, shards)
        else:
            shutil.rmtree(dst)
    out = first[0]
    out_bytes = sum(os.path.getsize(f) for f in files_of(out))
    results["copy_floor_hot_gbps"] = round(results["runs"][next(iter(results["runs"]))]["source_gb"]
                                           / copy_floor(src, out_bytes, os.path.join(args.work, "floor")), 2)
    flags = ("--workers", args.workers.split(",")[0], "--max-shard-size", args.max_shard_size)
    results["rerun_hot_seconds"] = round(convert(src, out, *flags)[0], 2)
    results["rerun_hot_no_verify_seconds"] = round(convert(src, out, *flags, "--no-verify-resume")[0], 2)
    results["cat_output_hot_seconds"] = round(cat_seconds(out), 2)
    results["output_gb"] = round(out_bytes / 1e9, 2)
    if args.disk:
        cold = os.path.join(args.disk, "out")
        shutil.rmtree(cold, ignore_errors=True)
        shutil.copytree(out, cold)
        # the fingerprint names the source: the copy resumes the same job
        drop_cache(cold)
        results["cat_output_cold_seconds"] = round(cat_seconds(cold), 2)
        drop_cache(cold)
        results["rerun_cold_seconds"] = round(convert(src, cold, *flags)[0], 2)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
