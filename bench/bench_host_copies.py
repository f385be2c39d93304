#!/usr/bin/env python3
"""The host's copy rates that bound one Path A worker: what each way of moving a byte costs on this machine.

    python bench/bench_host_copies.py [--mb 1024]

Prints one JSON line, GB/s for each: a host memcpy in one thread; pread of a file in /dev/shm into a pinned and
into a fresh pageable buffer; host-to-device from pinned and from pageable memory; device-to-host into pinned
memory (no wait) and with ``.cpu()`` (the driver's bounce buffer and fresh pages). Best of 3. Run by hand on a GPU
machine, never by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def best(fn, n: int, repeats: int = 3) -> float:
    """GB/s of ``n`` bytes for the fastest of ``repeats`` calls of ``fn``."""
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return round(n / min(seconds) / 1e9, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=1024)
    args = p.parse_args()
    n = args.mb * 2**20
    torch.set_num_threads(1)
    a = torch.ones(n, dtype=torch.uint8)
    b = torch.empty(n, dtype=torch.uint8)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    gpu = torch.ones(n, dtype=torch.uint8, device="cuda")
    path = "/dev/shm/nvfp4kit-copy-probe"
    with open(path, "wb") as f:
        f.write(a.numpy().tobytes())
    fd = os.open(path, os.O_RDONLY)

    def pread_into(buf: torch.Tensor) -> None:
        os.preadv(fd, [memoryview(buf.numpy())], 0)

    out = {
        "memcpy_1_thread": best(lambda: b.copy_(a), n),
        "pread_into_pinned": best(lambda: pread_into(pinned), n),
        "pread_into_fresh_pageable": best(lambda: pread_into(torch.empty(n, dtype=torch.uint8)), n),
        "h2d_from_pinned": best(lambda: gpu.copy_(pinned, non_blocking=True), n),
        "h2d_from_pageable": best(lambda: gpu.copy_(a), n),
        "d2h_into_pinned": best(lambda: pinned.copy_(gpu, non_blocking=True), n),
        "d2h_cpu_fresh_pageable": best(lambda: gpu.cpu(), n),
    }
    os.close(fd)
    os.unlink(path)
    print(json.dumps({"mb": args.mb, "gbps": out}), flush=True)


if __name__ == "__main__":
    main()
