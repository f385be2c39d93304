"""FP8 E4M3 weights with 2-D block scales: the source format of DeepSeek checkpoints.

A source weight ``W`` is ``float8_e4m3fn`` [M, N]; its companion scale ``S`` has shape
[ceil(M/bm), ceil(N/bn)] and is a *multiplier*: ``W_true[i, j] = W[i, j] * S[i // bm, j // bn]``.
Two scale dtypes occur:

* ``float8_e8m0fnu`` (UE8M0, a power of two; DeepSeek V4 ``.scale`` tensors),
* ``float32`` (DeepSeek V3 ``weight_scale_inv``: a multiplier despite its name).

Edge blocks are partial when M or N is not a multiple of the block (576 rows with 128-row blocks give 5 row
blocks, the last one 64 rows high).
"""

from __future__ import annotations

import math

import torch

from .errors import KitError

E4M3_NAN_BITS = 0x7F  # x1111111 (sign aside): E4M3FN's only NaN pattern; it has no Inf

SCALE_DTYPES = (torch.float8_e8m0fnu, torch.float32)
FP8_E4M3_MAX = 448.0


class FP8FormatError(KitError, ValueError):
    """A source FP8 weight or scale that cannot be decoded; the message names the tensor."""


def infer_block_size(
    weight_shape: tuple[int, ...] | torch.Size,
    scale_shape: tuple[int, ...] | torch.Size,
    configured: tuple[int, int] | None = None,
    name: str = "<tensor>",
) -> tuple[int, int]:
    """Block size (bm, bn) that maps ``weight_shape`` onto ``scale_shape``.

    ``configured`` (config.json ``weight_block_size``) is the only block size accepted when given: a scale that
    fits it not (say a [448, 128] weight with the scale of a [128, 448] one) is refused, though another block
    size might map the shapes. Without it, each dimension takes the one power of two b with
    ceil(dim / b) == scale_dim: for scale_dim >= 2 the interval [dim/s, dim/(s-1)) holds at most one power of two,
    and for scale_dim == 1 every b >= dim decodes the same, so the smallest is taken.
    """
    if len(weight_shape) != 2 or len(scale_shape) != 2:
        raise FP8FormatError(
            f"{name}: expected a 2-D weight and a 2-D scale, got weight {list(weight_shape)} and scale {list(scale_shape)}"
        )
    if configured is not None:
        expected = [math.ceil(d / b) for d, b in zip(weight_shape, configured)]
        if expected != list(scale_shape):
            raise FP8FormatError(
                f"{name}: scale shape {list(scale_shape)} does not fit weight shape {list(weight_shape)} in the "
                f"configured {configured[0]}x{configured[1]} blocks (expected {expected})"
            )
        return (int(configured[0]), int(configured[1]))
    block = []
    for dim, s in zip(weight_shape, scale_shape):
        fits = [1 << k for k in range(0, 31) if s >= 1 and math.ceil(dim / (1 << k)) == s]
        if not fits:
            raise FP8FormatError(
                f"{name}: scale shape {list(scale_shape)} fits no block size for weight shape {list(weight_shape)}"
            )
        block.append(fits[0])
    return (block[0], block[1])


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """The per-element float32 multiplier of a block scale, cropped to ``shape`` (handles partial edge blocks)."""
    bm, bn = block
    s = scale.to(torch.float32)
    return s.repeat_interleave(bm, dim=0)[: shape[0]].repeat_interleave(bn, dim=1)[:, : shape[1]]


def check_fp8_block(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], name: str) -> None:
    """Raise :class:`FP8FormatError` for a wrong dtype/shape, a NaN/Inf/zero-or-negative scale or an FP8 NaN byte."""
    if weight.dtype != torch.float8_e4m3fn:
        raise FP8FormatError(f"{name}: weight dtype {weight.dtype}, expected float8_e4m3fn")
    if scale.dtype not in SCALE_DTYPES:
        raise FP8FormatError(f"{name}: scale dtype {scale.dtype}, expected float8_e8m0fnu or float32")
    expected = tuple(math.ceil(d / b) for d, b in zip(weight.shape, block))
    if tuple(scale.shape) != expected:
        raise FP8FormatError(
            f"{name}: scale shape {list(scale.shape)} does not match weight {list(weight.shape)} with block {list(block)}"
        )
    if weight.numel() == 0:
        return
    s = scale.to(torch.float32)
    # One host sync for both tests (this runs once per tensor on a GPU). NaN makes the smallest scale NaN, which
    # fails "> 0". E4M3FN has no Inf; its NaN is the byte pattern x1111111 (0x7F / 0xFF), found with a max.
    smallest, largest, top_byte = torch.stack(
        [*torch.aminmax(s), (weight.view(torch.uint8) & E4M3_NAN_BITS).max().to(torch.float32)]
    ).tolist()
    if not (smallest > 0 and largest < math.inf):
        raise FP8FormatError(f"{name}: scale holds NaN, Inf, zero or negative values")
    if top_byte == E4M3_NAN_BITS:
        raise FP8FormatError(f"{name}: weight holds FP8 NaN bytes")


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], name: str = "<tensor>"
) -> torch.Tensor:
    """float32 ``weight * scale`` broadcast over (bm, bn) blocks. Exact when the scale is a power of two."""
    check_fp8_block(weight, scale, block, name)
    return _dequantize_unchecked(weight, scale, block)


def _dequantize_unchecked(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    assert weight.dtype == torch.float8_e4m3fn, "the float32 copy below is then a new tensor, safe to scale in place"
    M, N = weight.shape
    bm, bn = block
    sm, sn = scale.shape
    w = weight.to(torch.float32)
    s = scale.to(torch.float32)
    if M % bm == 0 and N % bn == 0:
        # In place and without materialising the expanded scale: one float32 tensor the size of the weight.
        w.view(sm, bm, sn, bn).mul_(s.view(sm, 1, sn, 1))
        return w
    return w.mul_(expand_block_scale(s, (M, N), block))


def quantize_fp8_blocks(
    x: torch.Tensor, block: tuple[int, int] = (128, 128), scale_dtype: torch.dtype = torch.float8_e8m0fnu
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode float ``x`` [M, N] as E4M3 with per-block scales (the inverse of :func:`dequantize_fp8_blocks`).

    UE8M0 scales are ``2^ceil(log2(block_amax / 448))`` as DeepSeek's ``scale_fmt: ue8m0`` does; float32 scales are
    ``block_amax / 448``. An all-zero block gets scale 1. Used by the synthetic checkpoint generator and tests.
    """
    assert x.dim() == 2, "expected a 2-D tensor"
    assert scale_dtype in SCALE_DTYPES
    M, N = x.shape
    bm, bn = block
    sm, sn = math.ceil(M / bm), math.ceil(N / bn)
    xf = x.to(torch.float32)
    padded = torch.zeros(sm * bm, sn * bn, dtype=torch.float32)
    padded[:M, :N] = xf.abs()
    amax = padded.view(sm, bm, sn, bn).amax(dim=(1, 3))
    if scale_dtype == torch.float8_e8m0fnu:
        exp = torch.ceil(torch.log2(amax / FP8_E4M3_MAX)).clamp(-127, 127)
        scale = torch.where(amax > 0, torch.exp2(exp), torch.ones_like(amax))
    else:
        scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    w = (xf / expand_block_scale(scale, (M, N), block)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return w, scale.to(scale_dtype)
