"""One unit's numerics: the source tensors read for a unit -> its output tensors, for Path A and Path B alike.

A unit is quantized to NVFP4 (modules that share a global scale together), kept as FP8 (checked), written as
MXFP4 (``--engine sglang``'s MTP experts), or copied (checked for NaN/Inf). Everything runs on the worker's
device; the outputs come back to the CPU in the unit's output order.
"""

from __future__ import annotations

import math

import torch

from ..decode import dequantize as dequantize_source
from ..errors import ConvertError
from ..faults import fault_point
from ..fp8 import check_fp8_block
from ..layouts import Layout, mxfp4_tensors
from ..mxfp4 import MXFP4FormatError
from ..nvfp4 import NVFP4Tensor, ScaleRule, dequantize_nvfp4, quantize_group, reconstruction_error
from ..plan import ConversionPlan


def compute_unit(item: tuple, plan: ConversionPlan, layout: Layout, device: torch.device, stats: dict) -> tuple[list, int]:
    """Output tensors (CPU, in the unit's output order, every copy landed) and the source bytes they account for;
    each module's rule and error into ``stats``."""
    kind, unit, data = item
    if kind == "copy":
        dtype, chunk = data
        if chunk.numel():
            check_finite(unit.sources[0], dtype, chunk.to(device, non_blocking=True))
        return [chunk], chunk.numel()
    n = len(unit.modules)
    weights, scales = data[:n], data[n:]
    if kind == "fp8":
        block = plan.fp8_blocks[unit.sources[0]]
        check_fp8_block(weights[0].to(device, non_blocking=True), scales[0].to(device), block, unit.sources[0])
        return layout.fp8_tensors(weights[0], scales[0]), unit.source_bytes
    try:  # FP8 or MXFP4 (the original V4 releases' experts): float32 values either way, the quantizer is the same
        xs = [
            dequantize_source(w.to(device, non_blocking=True), s.to(device, non_blocking=True),
                              plan.fp8_blocks[name], name)
            for w, s, name in zip(weights, scales, unit.sources[:n])
        ]
    except MXFP4FormatError as e:  # e.g. a NaN scale byte: the run stops naming the tensor, as for FP8
        raise ConvertError(str(e)) from e
    if kind == "mxfp4":  # --engine sglang's MTP experts (layouts.writes_mxfp4): exact, or the run stops naming it
        try:
            out = mxfp4_tensors(xs[0].cpu(), unit.modules[0])
        except MXFP4FormatError as e:
            raise ConvertError(str(e)) from e
        stats[unit.modules[0]] = {"rule": ScaleRule.EXACT, "format": "MXFP4", "sqnr_db": math.inf, "rel_error": 0.0}
        return out, unit.source_bytes
    fault_point("compute")
    qs, rule = quantize_group(xs, plan.options.scale_policy, [m + ".weight" for m in unit.modules])
    out = []
    for module, x, q in zip(unit.modules, xs, qs):
        exact = rule is ScaleRule.EXACT
        err = {"sqnr_db": math.inf, "rel_error": 0.0} if exact else reconstruction_error(x, dequantize_nvfp4(q))
        global_scale = q.global_scale.cpu()  # waited for: the layout divides by it on the CPU before the unit's sync
        stats[module] = {"rule": rule, "global_scale": float(global_scale), **err}
        host = NVFP4Tensor(to_host(q.packed), to_host(q.block_scale), global_scale)
        out += layout.nvfp4_tensors(host, plan.activation_amax.get(module))
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # every to_host copy of the unit has landed
    return out, unit.source_bytes


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU. From a GPU, a copy into pinned memory that is not waited for (the caller synchronizes
    once per unit): a DMA straight into memory the writer reads. ``.cpu()`` waits for each tensor and goes through
    the driver's bounce buffer into fresh pageable pages, 1.2-1.6 GB/s against 55 on an H100 host
    (bench/bench_host_copies.py); it took half the compute stage's time. torch's pinned-memory cache reuses the
    buffers once the writer drops the tensors."""
    if t.device.type != "cuda":
        return t
    return torch.empty_like(t, device="cpu", pin_memory=True).copy_(t, non_blocking=True)


# Exponent bits of each float format, as the integer type of the same width: all ones means NaN or Inf.
_EXPONENT_MASKS = {"F64": (torch.int64, 0x7FF0000000000000), "F32": (torch.int32, 0x7F800000),
                   "F16": (torch.int16, 0x7C00), "BF16": (torch.int16, 0x7F80)}


def check_finite(name: str, dtype: str, chunk: torch.Tensor) -> None:
    """NaN/Inf in a copied floating-point tensor is refused: it would be served as is.

    Tests the exponent bits with an integer max: several times faster than ``isfinite`` on CPU.
    """
    if dtype in _EXPONENT_MASKS:
        int_dtype, mask = _EXPONENT_MASKS[dtype]
        if int((chunk.view(int_dtype) & mask).max()) == mask:
            raise ConvertError(f"source tensor {name} holds NaN or Inf values")
