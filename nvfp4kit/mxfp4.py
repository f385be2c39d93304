"""MXFP4 (OCP Microscaling FP4): how DeepSeek's original V4 releases store their routed experts.

A weight ``W`` [M, N] is two tensors:

* ``weight`` I8 [M, N/2]: two E2M1 codes per byte, element 2i in the low nibble, bit 3 of a nibble the sign,
  magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} -- the packing NVFP4 uses (:func:`nvfp4.unpack_e2m1`, one place for it);
* ``scale`` F8_E8M0 [M, N/32]: one power of two per 1x32 block along the input dimension, ``2^(byte - 127)``;
  the byte 0xFF is NaN.

    W[i, j] = e2m1(code[i, j]) * 2^(scale_byte[i, j // 32] - 127)

Decoding is exact in float32 (a power of two times an E2M1 value; 2^-127 times 0.5 is a float32 subnormal).
The FP8 repack holds the same values (``synthetic.make_expert`` is that cast), so both releases decode to the same
float32 numbers and Path A writes the same bytes from either.
"""

from __future__ import annotations

import torch

from .errors import KitError
from .nvfp4 import cast_to_e2m1_exactly, e2m1_to_float, pack_e2m1, unpack_e2m1
from .safetensors_io import DTYPE_NAMES

MX_BLOCK = 32  # elements per scale, along the input dimension
SCALE_BLOCK = (1, MX_BLOCK)  # the scale block as (rows, columns), the form the plan records for every source weight
WEIGHT_DTYPE = "I8"  # safetensors header dtypes of the two tensors
SCALE_DTYPE = "F8_E8M0"
E8M0_BIAS = 127
E8M0_NAN = 0xFF
EXPONENT_RANGE = (-E8M0_BIAS, 0xFE - E8M0_BIAS)  # powers of two an E8M0 byte holds: 2^-127 .. 2^127


class MXFP4FormatError(KitError, ValueError):
    """A source MXFP4 weight or scale that cannot be decoded; the message names the tensor."""


def decoded_shape(packed_shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """[M, N/2] (two codes per byte) -> [M, N]."""
    assert len(packed_shape) == 2, f"an MXFP4 weight is 2-D, got {list(packed_shape)}"
    return (int(packed_shape[0]), 2 * int(packed_shape[1]))


def check_layout(weight_dtype: str, weight_shape: tuple[int, ...] | torch.Size, scale_dtype: str,
                 scale_shape: tuple[int, ...] | torch.Size, name: str = "<tensor>") -> None:
    """Header-level preconditions (safetensors dtype names, shapes); raises :class:`MXFP4FormatError`.

    I8 weight [M, N/2] with N a multiple of 32, F8_E8M0 scale [M, N/32]: nothing else decodes as MXFP4.
    """
    if weight_dtype != WEIGHT_DTYPE:
        raise MXFP4FormatError(f"{name}: MXFP4 weight dtype {weight_dtype}, expected {WEIGHT_DTYPE} (two E2M1 codes per byte)")
    if len(weight_shape) != 2 or len(scale_shape) != 2:
        raise MXFP4FormatError(f"{name}: expected a 2-D I8 weight and a 2-D scale, got weight {list(weight_shape)} "
                               f"and scale {list(scale_shape)}")
    if scale_dtype != SCALE_DTYPE:
        raise MXFP4FormatError(f"{name}: I8 (MXFP4) weight with a {scale_dtype} scale; MXFP4 needs an {SCALE_DTYPE} "
                               f"scale per 1x{MX_BLOCK} block")
    rows, cols = decoded_shape(weight_shape)
    if cols % MX_BLOCK:
        raise MXFP4FormatError(f"{name}: input dimension {cols} (2 x {weight_shape[1]} packed bytes) is not a "
                               f"multiple of {MX_BLOCK}: no whole 1x{MX_BLOCK} MXFP4 blocks")
    expected = (rows, cols // MX_BLOCK)
    if tuple(scale_shape) != expected:
        raise MXFP4FormatError(f"{name}: MXFP4 scale shape {list(scale_shape)}, expected {list(expected)} "
                               f"(one per 1x{MX_BLOCK} block of the {rows} x {cols} weight)")


def check_mxfp4(weight: torch.Tensor, scale: torch.Tensor, name: str = "<tensor>") -> None:
    """:func:`check_layout` on the tensors, then their data: a NaN scale byte (0xFF) is refused."""
    check_layout(DTYPE_NAMES.get(weight.dtype, str(weight.dtype)), weight.shape,
                 DTYPE_NAMES.get(scale.dtype, str(scale.dtype)), scale.shape, name)
    if scale.numel() and int(scale.view(torch.uint8).max()) == E8M0_NAN:
        raise MXFP4FormatError(f"{name}: MXFP4 scale holds NaN (E8M0 byte 0xFF)")


def dequantize_mxfp4(weight: torch.Tensor, scale: torch.Tensor, name: str = "<tensor>") -> torch.Tensor:
    """float32 [M, N]: every E2M1 code times its block's power of two (exact)."""
    check_mxfp4(weight, scale, name)
    rows, cols = decoded_shape(weight.shape)
    values = e2m1_to_float(unpack_e2m1(weight.view(torch.uint8)))
    values.view(rows, cols // MX_BLOCK, MX_BLOCK).mul_(scale.to(torch.float32).unsqueeze(-1))
    return values.view(rows, cols)


def quantize_mxfp4(x: torch.Tensor, exponent: torch.Tensor, name: str = "<tensor>") -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x`` [M, N] with the given block exponents [M, N/32] (integers in [-127, 127]): (I8 weight, E8M0
    scale). The inverse of :func:`dequantize_mxfp4`, exact or refused: every ``x / 2^exponent`` must be an E2M1
    value (-0.0 keeps its sign, code 0x8), else :class:`MXFP4FormatError`."""
    if x.dim() != 2 or x.shape[1] % MX_BLOCK:
        raise MXFP4FormatError(f"{name}: MXFP4 needs a 2-D tensor whose input dimension is a multiple of {MX_BLOCK}, "
                               f"got {list(x.shape)}")
    rows, cols = x.shape
    if tuple(exponent.shape) != (rows, cols // MX_BLOCK):
        raise MXFP4FormatError(f"{name}: exponent shape {list(exponent.shape)}, expected {[rows, cols // MX_BLOCK]}")
    e = exponent.to(torch.float32)
    lo, hi = EXPONENT_RANGE
    if not bool(((e == e.round()) & (e >= lo) & (e <= hi)).all()):
        raise MXFP4FormatError(f"{name}: block exponents must be integers in [{lo}, {hi}] (E8M0)")
    y = x.to(torch.float32).view(rows, cols // MX_BLOCK, MX_BLOCK) / torch.exp2(e).unsqueeze(-1)
    codes = cast_to_e2m1_exactly(y.contiguous())
    if codes is None:
        raise MXFP4FormatError(f"{name}: values are not E2M1 x 2^exponent per 1x{MX_BLOCK} block: MXFP4 cannot hold "
                               "them exactly")
    codes |= torch.signbit(y).to(torch.uint8) << 3  # -0.0 keeps its sign (the NVFP4 cast writes it as code 0)
    weight = pack_e2m1(codes.view(rows, cols)).view(torch.int8)
    scale = (e.to(torch.int32) + E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)
    return weight, scale


def block_exponents(x: torch.Tensor) -> torch.Tensor:
    """OCP MX shared exponents of ``x`` [M, N]: ``floor(log2(block amax)) - 2`` per 1x32 block (2 = the exponent
    of E2M1's largest value, 6), clamped to E8M0's range; an all-zero block gets 0 (a scale of 1.0).

    For MXFP4-origin data (every block E2M1 x 2^k) this gives back exponents under which :func:`quantize_mxfp4`
    is exact: the largest code lands in [4, 6] and the others scale by a power of two onto the grid."""
    assert x.dim() == 2 and x.shape[1] % MX_BLOCK == 0, f"expected [M, N] with N a multiple of {MX_BLOCK}"
    amax = x.to(torch.float32).abs().view(x.shape[0], -1, MX_BLOCK).amax(dim=-1)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.zeros_like(amax))
    return e.clamp(*EXPONENT_RANGE).to(torch.int32)
