"""NVFP4: E2M1 values, one E4M3 scale per 16 elements, one float32 global scale per tensor.

Reference semantics (ModelOpt's dynamic ``NVFP4QTensor`` path, the kit's byte reference; all math in float32):

    global_scale  = amax / (6 * 448)                                  # ModelOpt ``weight_scale_2``, a multiplier
    block_scale   = e4m3(clamp(block_amax / fp32(6 * global_scale), 2^-9, 448)); an all-zero block gets 1.0
    code          = e2m1_round(x / (float(block_scale) * global_scale))   # nearest, ties to the even code
    x_decoded     = e2m1_value(code) * float(block_scale) * global_scale

compressed-tensors stores the reciprocal ``weight_global_scale = 1 / global_scale``. Codes are packed two per
byte, element 2i in the low nibble; bit 3 of a nibble is the sign (a negative value that rounds to zero is 0x8).

The ``exact`` rule (:func:`exact_block_exponents`) serves data that already is E2M1 x 2^k per block (V4's routed
experts, MXFP4 before the FP8 repack): power-of-two global and block scales reproduce it with no loss.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
GLOBAL_SCALE_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688
BLOCK_SCALE_MIN = 2.0**-9  # smallest E4M3 subnormal: no block scale underflows to 0
E4M3_POW2_EXPONENTS = (-9, 8)  # powers of two E4M3 holds exactly
ZERO_BLOCK_EXPONENT = -(2**30)  # marks an all-zero block in the exact rule

# Magnitude codes 0..7; codes 8..15 are the same values negated.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Rounding boundaries between consecutive magnitudes; a value exactly on a boundary goes to the even code, i.e. up
# at 0.75, 1.75 and 3.5 and down at 0.25, 1.25, 2.5 and 5. searchsorted counts the boundaries strictly below a
# value, so a round-up boundary is moved to the float32 just below it: no float32 lies in between.
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_ROUND_UP_TIES = (0.75, 1.75, 3.5)
_E2M1_SEARCH_BOUNDS = tuple(
    float(torch.nextafter(torch.tensor(b), torch.tensor(0.0))) if b in _E2M1_ROUND_UP_TIES else b for b in _E2M1_BOUNDS
)

# Rows per chunk: keeps float32 temporaries near 64 MB whatever the tensor size.
_CHUNK_ELEMENTS = 1 << 24


class NVFP4FormatError(ValueError):
    """A tensor that cannot be encoded as NVFP4; the message names the tensor."""


@dataclass
class NVFP4Tensor:
    """One quantized weight. ``global_scale`` is the multiplier (ModelOpt ``weight_scale_2``)."""

    packed: torch.Tensor  # uint8 [M, N/2]
    block_scale: torch.Tensor  # float8_e4m3fn [M, N/16]
    global_scale: torch.Tensor  # float32, 0-d

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], self.packed.shape[1] * 2)


def check_quantizable(shape: tuple[int, ...] | torch.Size, name: str = "<tensor>") -> None:
    """NVFP4 needs a 2-D weight whose in_features is a multiple of 16.

    No padding rule is offered: vLLM registers ``weight_packed`` [out, in/2] and ``weight_scale`` [out, in/16]
    from the layer's true in_features, so a padded tensor would not load. Every V4 weight satisfies this.
    """
    if len(shape) != 2:
        raise NVFP4FormatError(f"{name}: NVFP4 needs a 2-D weight, got shape {list(shape)}")
    if shape[1] % BLOCK != 0:
        raise NVFP4FormatError(
            f"{name}: in_features {shape[1]} is not a multiple of {BLOCK}; NVFP4 cannot hold it (no padding rule)"
        )


def global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """``amax / 2688`` in float32 (0-d). An all-zero tensor (amax 0) gets 1.0 so that no scale is NaN."""
    a = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    if not bool(torch.isfinite(a) & (a >= 0)):
        raise NVFP4FormatError(f"global amax must be finite and >= 0, got {float(a)}")
    return torch.where(a > 0, a / GLOBAL_SCALE_DIVISOR, torch.ones_like(a))


def amax(x: torch.Tensor) -> torch.Tensor:
    """Largest magnitude of ``x`` as a float32 0-d tensor."""
    return x.abs().amax().to(torch.float32) if x.numel() else torch.zeros((), dtype=torch.float32)


def reference_block_scales(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales of the reference rule (see the module docstring) for float ``x`` [M, N]."""
    M, N = x.shape
    block_amax = x.view(M, N // BLOCK, BLOCK).abs().amax(dim=-1).to(torch.float32)
    s = block_amax / (E2M1_MAX * global_scale.to(x.device, torch.float32))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s.clamp(BLOCK_SCALE_MIN, E4M3_MAX).to(torch.float8_e4m3fn)


def exact_block_exponents(x: torch.Tensor) -> torch.Tensor:
    """Per-block exponents e [M, N/16] (int32) of the ``exact`` rule: ``e = ceil(log2(block_amax / 6))``.

    2^e is the smallest power of two that brings every value of the block to at most 6; for E2M1 x 2^k data
    every value then lands on the E2M1 grid. All-zero blocks get :data:`ZERO_BLOCK_EXPONENT`. Whether the
    result is exact is not decided here: :func:`quantize_group` quantizes and compares.
    """
    M, N = x.shape
    v = x.view(M, N // BLOCK, BLOCK).abs().amax(dim=-1).to(torch.float32) / E2M1_MAX
    f, e = torch.frexp(v)  # v = f * 2^e with f in [0.5, 1)
    exponent = torch.where(f == 0.5, e - 1, e)  # exact powers of two keep their own exponent
    return torch.where(v > 0, exponent, torch.full_like(exponent, ZERO_BLOCK_EXPONENT)).to(torch.int32)


def split_exact_scales(
    exponents: list[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """Global scale 2^m and E4M3 block scales 2^(e - m) for a group of tensors' block exponents.

    m = max(e) - 8 puts the largest block at E4M3's top power of two (ModelOpt's MXFP4 cast does the same). If some
    non-zero block then falls below 2^-9 (the group spans more than 17 binades), returns None.
    """
    lo, hi = E4M3_POW2_EXPONENTS
    zero = ZERO_BLOCK_EXPONENT
    # Largest and smallest exponent of the non-zero blocks, fetched in one host sync.
    top, bottom = torch.stack(
        [torch.stack([e.max(), torch.where(e != zero, e, torch.full_like(e, 2**30)).min()]) for e in exponents]
    ).T.tolist()
    top, bottom = max(top), min(bottom)
    if top == zero:  # every block of the group is zero
        m = 0
    else:
        m = top - hi
        if bottom - m < lo:
            return None
    block_scales = []
    for e in exponents:
        rel = torch.where(e != ZERO_BLOCK_EXPONENT, e - m, torch.zeros_like(e))
        block_scales.append(torch.exp2(rel.to(torch.float32)).to(torch.float8_e4m3fn))
    return torch.tensor(2.0**m, dtype=torch.float32), block_scales


@functools.lru_cache(maxsize=None)
def _float32_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A small lookup table on ``device``, made once: a fresh host-to-GPU copy per call would stall the stream."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def cast_to_e2m1(y: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15) of float ``y``: nearest magnitude, ties to the even code, saturating at 6."""
    assert y.dtype == torch.float32, "the boundaries are float32 values"
    bounds = _float32_constant(_E2M1_SEARCH_BOUNDS, y.device)
    code = torch.searchsorted(bounds, y.abs(), out_int32=True).to(torch.uint8)
    return code | ((y < 0).to(torch.uint8) << 3)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes (uint8 0..15)."""
    table = _float32_constant(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), codes.device)
    return table[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte: element 2i in the low nibble, 2i+1 in the high nibble."""
    assert codes.shape[-1] % 2 == 0, "an even number of codes per row is needed"
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_e2m1`: uint8 [..., K] -> codes [..., 2K]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def quantize_nvfp4(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    block_scale: torch.Tensor | None = None,
    name: str = "<tensor>",
    exact: bool = False,
) -> NVFP4Tensor | None:
    """Quantize float ``x`` [M, N] with the given global scale (a multiplier, see :func:`global_scale_from_amax`).

    ``block_scale`` (E4M3 [M, N/16]) defaults to the reference rule. Works in row chunks so that float32
    temporaries stay bounded; the result is the same as one pass over the whole tensor. With ``exact=True``
    (power-of-two scales), returns None as soon as a chunk does not decode back to ``x`` bit for bit: the
    multipliers are powers of two, so ``x / multiplier`` is exact and must itself be an E2M1 value.
    """
    check_quantizable(x.shape, name)
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    gs = global_scale.to(x.device, torch.float32).reshape(())
    M, N = x.shape
    packed = torch.empty(M, N // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(M, N // BLOCK, dtype=torch.float8_e4m3fn, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // N)
    # In exact mode a first chunk of a few rows refuses most data that is not MXFP4-shaped almost for free.
    starts = [0, min(M, 16)] + list(range(min(M, 16) + step, M, step)) if exact else list(range(0, M, step))
    exact_so_far: torch.Tensor | None = None  # device bool, read once at the end
    for r, end in zip(starts, starts[1:] + [M]):
        if r >= end:
            continue
        xc = x[r:end]
        rows = xc.shape[0]
        sc = reference_block_scales(xc, gs) if block_scale is None else block_scale[r : r + rows]
        scales[r : r + rows] = sc
        y = xc.view(rows, N // BLOCK, BLOCK) / (sc.to(torch.float32) * gs).unsqueeze(-1)
        codes = cast_to_e2m1(y)
        if exact:
            holds = (e2m1_to_float(codes) == y).all()
            exact_so_far = holds if exact_so_far is None else exact_so_far & holds
            if r == 0 and not bool(holds):  # one host sync here, one at the end
                return None
        packed[r : r + rows] = pack_e2m1(codes.view(rows, N))
    if exact and not bool(exact_so_far):
        return None
    return NVFP4Tensor(packed=packed, block_scale=scales, global_scale=gs.clone())


def dequantize_nvfp4(t: NVFP4Tensor) -> torch.Tensor:
    """float32 [M, N]: ``e2m1 * float(block_scale) * global_scale``."""
    M, N = t.shape
    values = e2m1_to_float(unpack_e2m1(t.packed)).view(M, N // BLOCK, BLOCK)
    mult = t.block_scale.to(torch.float32) * t.global_scale.to(t.packed.device, torch.float32)
    return (values * mult.unsqueeze(-1)).view(M, N)


def quantize_group(
    tensors: list[torch.Tensor], policy: str = "reference", names: list[str] | None = None
) -> tuple[list[NVFP4Tensor], str]:
    """Quantize tensors that share one global scale (an expert's w1 and w3, which vLLM fuses into one GEMM).

    ``policy``: ``reference`` (global = joint amax / 2688, reference block rule) or ``auto`` (power-of-two scales
    when they reproduce every tensor of the group exactly, ``reference`` otherwise). Returns the tensors and the
    rule that was used (``exact`` or ``reference``).
    """
    if policy not in ("reference", "auto"):
        raise ValueError(f"unknown scale policy {policy!r}")
    names = names or [f"<tensor {i}>" for i in range(len(tensors))]
    for x, n in zip(tensors, names):
        check_quantizable(x.shape, n)
    if policy == "auto":
        exps = [exact_block_exponents(x) for x in tensors]
        split = split_exact_scales(exps)
        if split is not None:
            gs, block_scales = split
            out = []
            for x, bs, n in zip(tensors, block_scales, names):
                q = quantize_nvfp4(x, gs, bs, n, exact=True)
                if q is None:
                    break
                out.append(q)
            else:
                return out, "exact"
    joint = torch.stack([amax(x).to(tensors[0].device) for x in tensors]).amax()
    gs = global_scale_from_amax(joint)
    return [quantize_nvfp4(x, gs, name=n) for x, n in zip(tensors, names)], "reference"


def reconstruction_error(reference: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """SQNR in dB (``10 log10(sum ref^2 / sum err^2)``, inf when exact) and relative error ``||err|| / ||ref||``.

    Accumulates in float64 scalars only (no float64 copy of the tensor).
    """
    ref = reference.to(torch.float32)
    err = approx.to(torch.float32) - ref
    signal, noise = (v**2 for v in torch.stack([torch.linalg.vector_norm(ref), torch.linalg.vector_norm(err)]).double().tolist())
    if noise == 0.0:
        return {"sqnr_db": math.inf, "rel_error": 0.0}
    if signal == 0.0:
        return {"sqnr_db": -math.inf, "rel_error": math.inf}
    return {"sqnr_db": 10.0 * math.log10(signal / noise), "rel_error": math.sqrt(noise / signal)}
