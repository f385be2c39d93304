"""Whole tensors read in bounded chunks (the 1.85 GB embedding never sits in memory whole), and check 2,
``finite``: no NaN or Inf in any floating-point output tensor."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch

from ..checkpoint import Checkpoint
from ..fp8 import E4M3_NAN_BITS
from ..mxfp4 import E8M0_NAN
from ..safetensors_io import DTYPES, TensorInfo
from .inventory import Inventory, layout_specs
from .results import CheckResult, crash_line, finding

E5M2_INF_BITS = 0x7C  # x1111100: Inf; x11111mm with mm != 0 is NaN
READ_CHUNK = 64 * 2**20  # bytes per read when scanning or comparing whole tensors (the embedding is 1.85 GB)


# ---------------------------------------------------------------------------------------------------------------
# Reading whole tensors in bounded chunks
# ---------------------------------------------------------------------------------------------------------------
def tensor_chunks(info: TensorInfo, chunk: int = READ_CHUNK) -> Iterator[bytes]:
    """The tensor's bytes, ``chunk`` at a time (a multiple of every element size), read with ``pread``."""
    assert chunk > 0 and chunk % 8 == 0
    fd = os.open(info.file, os.O_RDONLY)
    try:
        for start in range(0, info.nbytes, chunk):
            n = min(chunk, info.nbytes - start)
            data = os.pread(fd, n, info.begin + start)
            if len(data) != n:
                raise OSError(f"{info.file}: tensor {info.name}: file ended while reading (truncated shard?)")
            yield data
    finally:
        os.close(fd)


def nonfinite_count(raw: torch.Tensor, dtype: str) -> int:
    """NaN and Inf values among ``raw`` (uint8, whole elements) read as safetensors ``dtype``."""
    assert raw.dtype == torch.uint8
    if dtype == "F8_E4M3":
        return int(((raw & 0x7F) == E4M3_NAN_BITS).sum())
    if dtype == "F8_E5M2":
        return int(((raw & 0x7F) >= E5M2_INF_BITS).sum())
    if dtype == "F8_E8M0":
        return int((raw == E8M0_NAN).sum())
    return int((~torch.isfinite(raw.view(DTYPES[dtype]))).sum())


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0")


# ---------------------------------------------------------------------------------------------------------------
# Check 2: finite
# ---------------------------------------------------------------------------------------------------------------
def check_finite(ckpt: Checkpoint, inv: Inventory) -> CheckResult:
    """No NaN/Inf in any floating-point tensor; NVFP4 block scales are left to ``static``, which scans them."""
    block_scales = {layout_specs(inv, m, shape, False)[1].name for m, shape in inv.nvfp4.items()}
    problems, scanned, count = [], 0, 0
    for name, info in sorted(ckpt.tensors.items()):
        if info.dtype not in FLOAT_DTYPES or name in block_scales:
            continue
        try:
            bad = sum(nonfinite_count(torch.frombuffer(bytearray(data), dtype=torch.uint8), info.dtype)
                      for data in tensor_chunks(info))
        except Exception as e:  # an unreadable tensor is this tensor's finding
            problems.append(f"{name}: cannot be read: {crash_line(e)}")
            continue
        scanned += info.nbytes
        count += 1
        if bad:
            problems.append(f"{name}: {bad} NaN/Inf of {math.prod(info.shape)} values ({info.dtype})")
    return finding("finite", [f"{count} floating-point tensors ({scanned} bytes) scanned for NaN/Inf"], problems)
