#!/usr/bin/env python3
"""How fast one process puts bytes into one file, by method and thread count: the shard writer's question.

    python bench/bench_write.py --dir /dev/shm/w --gb 4 --threads 1,2,4,8

Each run writes ``--gb`` GB into a fresh file in 32 MB pieces (the size of an expert pair's output at V4 Pro
dimensions), the pieces dealt round-robin to the threads, each writing at the piece's own offset:
- ``pwrite``: ``os.pwrite`` (the kernel takes the inode's lock for each call: one file's writes serialise);
- ``mmap``: the file reserved with ``posix_fallocate``, mapped shared, each piece copied in by numpy (outside the
  interpreter lock; page faults, not the inode lock); ``mmap-populate``: the same, the pages mapped up front.
Both end with ``fdatasync``. Printed: GB/s per method and thread count, as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import threading
import time

import numpy as np
import torch

PIECE = 32 << 20


def _run(threads: int, pieces: int, write) -> None:
    def work(k: int) -> None:
        for i in range(k, pieces, threads):
            write(i)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def bench_pwrite(path: str, size: int, threads: int, src: torch.Tensor) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    view = memoryview(src.numpy())
    t0 = time.perf_counter()
    _run(threads, size // PIECE, lambda i: os.pwrite(fd, view, i * PIECE))
    os.fdatasync(fd)
    dt = time.perf_counter() - t0
    os.close(fd)
    return dt


def bench_mmap(path: str, size: int, threads: int, src: torch.Tensor, populate: bool = False) -> float:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    os.posix_fallocate(fd, 0, size)
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    mm = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
    dst = np.frombuffer(mm, dtype=np.uint8)
    piece = src.numpy()

    def write(i: int) -> None:
        np.copyto(dst[i * PIECE:(i + 1) * PIECE], piece)

    _run(threads, size // PIECE, write)
    os.fdatasync(fd)
    dt = time.perf_counter() - t0
    del dst
    mm.close()
    os.close(fd)
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True)
    p.add_argument("--gb", type=float, default=4)
    p.add_argument("--threads", default="1,2,4,8")
    p.add_argument("--pinned", action="store_true", help="the source piece in pinned memory (as on a GPU)")
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    size = int(args.gb * 1e9) // PIECE * PIECE
    src = torch.randint(0, 255, (PIECE,), dtype=torch.uint8)
    if args.pinned and torch.cuda.is_available():
        src = src.pin_memory()
    path = os.path.join(args.dir, "bench_write.bin")
    for threads in (int(t) for t in args.threads.split(",")):
        for name, fn in (("pwrite", bench_pwrite), ("mmap", bench_mmap),
                         ("mmap-populate", lambda *a: bench_mmap(*a, populate=True))):
            dt = fn(path, size, threads, src)
            os.remove(path)
            print(json.dumps({"method": name, "threads": threads, "gb": size / 1e9, "seconds": round(dt, 3),
                              "gb_s": round(size / 1e9 / dt, 2)}), flush=True)


if __name__ == "__main__":
    main()
