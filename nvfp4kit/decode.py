"""Source forms: how a checkpoint stores a linear weight, and its float32 values. The one place that knows.

| form | weight (safetensors dtype) | scale companion | scale block |
|---|---|---|---|
| ``fp8`` | F8_E4M3 [M, N] | ``.scale`` F8_E8M0 (V4) or F32 (``.weight_scale_inv``, V3) [ceil(M/bm), ceil(N/bn)] | bm x bn (128x128) |
| ``mxfp4`` | I8 [M, N/2], two E2M1 codes per byte | ``.scale`` F8_E8M0 [M, N/32] | 1x32 |

The FP8 repack of DeepSeek V4 stores every linear as ``fp8``; DeepSeek's original releases store the routed
experts (trunk and MTP) as ``mxfp4`` and every other linear as ``fp8``. Any other dtype (BF16, F32, ...) is not a
scaled linear and is read as stored. The form follows from the weight's dtype alone. The plan records each scaled
weight's block (:func:`scale_block`, headers only); the converter, verify and the reference model get values
through :func:`dequantize`, so nothing else needs to know how a source stores them. Decoders: :mod:`nvfp4kit.fp8`,
:mod:`nvfp4kit.mxfp4`, each with its preconditions and named errors.
"""

from __future__ import annotations

import torch

from . import mxfp4
from .fp8 import FP8FormatError, check_fp8_block, dequantize_fp8_blocks, infer_block_size
from .mxfp4 import MXFP4FormatError

FP8, MXFP4 = "fp8", "mxfp4"
FORMS = {"F8_E4M3": FP8, mxfp4.WEIGHT_DTYPE: MXFP4}  # weight dtype -> form
FORM_TEXT = {
    FP8: "FP8 E4M3 + block scale",
    MXFP4: f"MXFP4: I8 (two E2M1 codes per byte) + {mxfp4.SCALE_DTYPE} scale per 1x{mxfp4.MX_BLOCK} block",
}
SOURCE_FORMAT_ERRORS = (FP8FormatError, MXFP4FormatError)  # for ``except``: a source weight that cannot be decoded
_TORCH_FORMS = {torch.float8_e4m3fn: FP8, torch.int8: MXFP4}


def form_of(dtype: str) -> str | None:
    """The form of a weight stored as safetensors ``dtype``; None for a tensor that is no scaled linear."""
    return FORMS.get(dtype)


def decoded_shape(dtype: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the values a weight of ``dtype``/``shape`` decodes to (MXFP4 packs two per byte)."""
    return mxfp4.decoded_shape(shape) if form_of(dtype) == MXFP4 else tuple(shape)


def scale_block(weight_dtype: str, weight_shape: tuple[int, ...], scale_dtype: str, scale_shape: tuple[int, ...],
                configured: tuple[int, int] | None = None, name: str = "<tensor>") -> tuple[int, int]:
    """The (rows, columns) block each scale value covers, from the headers; raises a named format error.

    ``configured``: config.json ``weight_block_size`` (FP8 only; MXFP4's block is fixed by its format).
    """
    form = form_of(weight_dtype)
    if form == MXFP4:
        mxfp4.check_layout(weight_dtype, weight_shape, scale_dtype, scale_shape, name)
        return mxfp4.SCALE_BLOCK
    if form == FP8:
        return infer_block_size(weight_shape, scale_shape, configured, name)
    raise FP8FormatError(f"{name}: dtype {weight_dtype} is no scaled source weight (expected one of {sorted(FORMS)})")


def check(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], name: str = "<tensor>") -> None:
    """The data-level preconditions of :func:`dequantize` without decoding (a kept FP8 weight is written as is)."""
    if _TORCH_FORMS.get(weight.dtype) == MXFP4:
        _check_mxfp4_block(block, name)
        mxfp4.check_mxfp4(weight, scale, name)
    else:
        check_fp8_block(weight, scale, block, name)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], name: str = "<tensor>") -> torch.Tensor:
    """float32 values of a scaled source weight, whatever its form (exact for power-of-two scales)."""
    if _TORCH_FORMS.get(weight.dtype) == MXFP4:
        _check_mxfp4_block(block, name)
        return mxfp4.dequantize_mxfp4(weight, scale, name)
    return dequantize_fp8_blocks(weight, scale, block, name)


def _check_mxfp4_block(block: tuple[int, int], name: str) -> None:
    if tuple(block) != mxfp4.SCALE_BLOCK:
        raise MXFP4FormatError(f"{name}: MXFP4 weight planned with block {list(block)}, expected "
                               f"{list(mxfp4.SCALE_BLOCK)}")
