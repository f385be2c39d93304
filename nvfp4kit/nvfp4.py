"""NVFP4: E2M1 values, one E4M3 scale per 16 elements, one float32 global scale per tensor.

Reference semantics (ModelOpt's dynamic ``NVFP4QTensor`` path, the kit's byte reference; all math in float32):

    global_scale  = amax / (6 * 448)                                  # ModelOpt ``weight_scale_2``, a multiplier
    block_scale   = e4m3(clamp(block_amax / fp32(6 * global_scale), 2^-9, 448)); an all-zero block gets 1.0
    code          = e2m1_round(x / (float(block_scale) * global_scale))   # nearest, ties to the even code
    x_decoded     = e2m1_value(code) * float(block_scale) * global_scale

compressed-tensors stores the reciprocal ``weight_global_scale = 1 / global_scale``. Codes are packed two per
byte, element 2i in the low nibble; bit 3 of a nibble is the sign (a negative value that rounds to zero is 0x8).

The ``exact`` rule (:func:`exact_scales`) serves data that already is E2M1 x 2^k per block (V4's routed
experts, MXFP4 before the FP8 repack): power-of-two global and block scales reproduce it with no loss.
"""

from __future__ import annotations

import bisect
import functools
import math
from enum import Enum
import struct
from dataclasses import dataclass

import torch

from .errors import KitError

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
GLOBAL_SCALE_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688
BLOCK_SCALE_MIN = 2.0**-9  # smallest E4M3 subnormal: no block scale underflows to 0
E4M3_POW2_EXPONENTS = (-9, 8)  # powers of two E4M3 holds exactly

# Magnitude codes 0..7; codes 8..15 are the same values negated.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Rounding boundaries between consecutive magnitudes. A value exactly on a boundary goes to the even code: up (away
# from zero) at 0.75, 1.75 and 3.5, down at 0.25, 1.25, 2.5 and 5.
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_ROUND_UP_TIES = (0.75, 1.75, 3.5)


# Elements per chunk of rows. On the CPU, float32 temporaries near 4 MB whatever the tensor size: they stay in the
# cache and their memory is reused, not page-faulted afresh (15 % faster than 64 MB chunks); on a GPU, where each
# operation costs a kernel launch and some host time, a whole expert (22 M elements) in one chunk.
_CHUNK_ELEMENTS = 1 << 20
_GPU_CHUNK_ELEMENTS = 1 << 26


class NVFP4FormatError(KitError, ValueError):
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
    value = float(a)
    if not (0 <= value < math.inf):
        raise NVFP4FormatError(f"global amax must be finite and >= 0, got {value}")
    return a / GLOBAL_SCALE_DIVISOR if value > 0 else torch.ones_like(a)


def amax(x: torch.Tensor) -> torch.Tensor:
    """Largest magnitude of ``x`` as a float32 0-d tensor."""
    return x.abs().amax().to(torch.float32) if x.numel() else torch.zeros((), dtype=torch.float32)


def block_amax(x: torch.Tensor) -> torch.Tensor:
    """Largest magnitude of each 16-element block of float ``x`` [M, N]: float32 [M, N/16].

    A max-pool over ``|x|``: on a GPU about 1.6x as fast as a reduction over a last dimension of 16 (which runs far
    below memory bandwidth), on the CPU about as fast. Both rules and the tensor's amax start from it.
    """
    return torch.nn.functional.max_pool1d(x.abs().unsqueeze(0), BLOCK, BLOCK)[0].to(torch.float32)


def reference_block_scales(block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales of the reference rule (see the module docstring) from :func:`block_amax`."""
    s = block_amax / (E2M1_MAX * global_scale.to(block_amax.device, torch.float32))
    return torch.where(s == 0, 1.0, s).clamp_(BLOCK_SCALE_MIN, E4M3_MAX).to(torch.float8_e4m3fn)


def group_amax(block_amaxes: list[torch.Tensor]) -> torch.Tensor:
    """Largest magnitude over a group of tensors, from their :func:`block_amax` (float32 0-d, on their device)."""
    maxima = [a.amax() if a.numel() else a.new_zeros(()) for a in block_amaxes]
    return maxima[0] if len(maxima) == 1 else torch.stack(maxima).amax()


def _round_up_to_power_of_two(v: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= v for positive normal float32 ``v``: adding an all-ones mantissa carries into the
    exponent unless v already is a power of two, and masking keeps the exponent alone."""
    return ((v.view(torch.int32) + 0x007FFFFF) & 0x7F800000).view(torch.float32)


def exact_scales(block_amaxes: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Global scale 2^m and E4M3 block scales 2^(e - m) of the ``exact`` rule for a group's :func:`block_amax`.

    e = ceil(log2(block_amax / 6)): 2^e is the smallest power of two that brings every value of the block to at
    most 6, so E2M1 x 2^k data lands on the E2M1 grid. m = max(e) - 8 puts the largest block at E4M3's top power of
    two (ModelOpt's MXFP4 cast does the same); all-zero blocks get 1. A group spanning more than 17 binades leaves
    some non-zero block below E4M3's 2^-9: its scale casts to 0, so the exactness check of :func:`quantize_nvfp4`
    refuses the group. Computed on the device without a host sync (this runs once per expert on a GPU).
    """
    largest = group_amax(block_amaxes)
    top = _round_up_to_power_of_two(largest / E2M1_MAX)  # 2^max(e)
    # 2^m = 2^max(e) / 2^8, or 1 for an all-zero group; 6 * 2^m is exact, and dividing by it equals dividing by 6
    # and then shifting the exponent.
    global_scale = torch.where(largest > 0, top * 2.0 ** -E4M3_POW2_EXPONENTS[1], 1.0)
    divisor = E2M1_MAX * global_scale
    block_scales = [
        torch.where(a > 0, _round_up_to_power_of_two(a / divisor), 1.0).to(torch.float8_e4m3fn) for a in block_amaxes
    ]
    return global_scale, block_scales


def _float32_below(v: float) -> float:
    """The largest float32 below ``v``."""
    return float(torch.nextafter(torch.tensor(v, dtype=torch.float32), torch.tensor(-math.inf)))


@functools.lru_cache(maxsize=None)
def _e2m1_intervals(
    bounds: tuple[float, ...], round_up_ties: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """The 15 float32 boundaries that split the reals into 16 intervals, one per E2M1 code, and each interval's
    code.

    ``searchsorted`` (left) puts y in interval i when ``bounds[i-1] < y <= bounds[i]``, so each boundary is placed
    where its tie must go: a round-up tie +b moves to the float32 just below b, a round-down tie -b to the one just
    below -b. The boundary at the largest negative float32 separates negatives that round to zero (code 0x8, as
    ModelOpt writes them) from +-0 (code 0x0).
    """
    negative = [-b if b in round_up_ties else _float32_below(-b) for b in reversed(bounds)]
    positive = [_float32_below(b) if b in round_up_ties else b for b in bounds]
    codes = [8 + m for m in range(len(bounds), -1, -1)] + list(range(len(bounds) + 1))
    return tuple(negative + [_float32_below(0.0)] + positive), tuple(codes)


_NOT_ON_GRID = 0x10  # the code flag of an interval that holds no E2M1 value


@functools.lru_cache(maxsize=None)
def _exact_e2m1_intervals(
    bounds: tuple[float, ...], round_up_ties: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """:func:`_e2m1_intervals` with each E2M1 value g split off into an interval of its own, (float32 below g, g].

    One search then tells both the code and whether the value is exactly on the E2M1 grid: the codes of the other
    intervals carry :data:`_NOT_ON_GRID`. (The boundary just below 0 is also the one that separates negatives
    rounding to zero, 0x8, from +-0, 0x0.)
    """
    rounding, codes = _e2m1_intervals(bounds, round_up_ties)
    grid = sorted({sign * v for v in E2M1_VALUES for sign in (1.0, -1.0)})  # 15 values: -0.0 == 0.0
    boundaries = sorted(set(rounding) | set(grid) | {_float32_below(g) for g in grid})
    flagged = []
    for i, right in enumerate(boundaries + [math.inf]):  # the interval (boundaries[i-1], right]
        on_grid = right in grid and i > 0 and boundaries[i - 1] == _float32_below(right)
        flagged.append(codes[bisect.bisect_left(rounding, right)] | (0 if on_grid else _NOT_ON_GRID))
    return tuple(boundaries), tuple(flagged)


# A float32's sign, exponent and top two mantissa bits (its "prefix") pin it to a 2-mantissa-bit grid that holds
# every rounding boundary and every E2M1 value, so one table lookup replaces the interval search.
_PREFIX_SHIFT = 21
_BELOW_PREFIX = (1 << _PREFIX_SHIFT) - 1  # the mantissa bits under the prefix
_PREFIX_CLASSES = 2 << (32 - _PREFIX_SHIFT)  # two per 11-bit prefix: nothing below it set, or something


@functools.lru_cache(maxsize=None)
def _prefix_table(intervals: tuple[tuple[float, ...], tuple[int, ...]]) -> tuple[int, ...]:
    """The code of every float32 class ``2 * prefix + (any bit below the prefix set)``.

    Each class lies inside one interval of ``intervals`` (boundaries, code of each interval (b[i-1], b[i]]): a class
    is a single value (nothing below the prefix) or the open range between two neighbours on the 2-bit grid, and
    every boundary is a grid value (a class of its own) or the float32 just below one (the largest member of the
    range below it). So any member stands for its class: the smallest magnitude is taken. NaN gets the last
    interval's code, where a sort puts it.
    """
    bounds, codes = intervals
    table = []
    for index in range(_PREFIX_CLASSES):
        bits = (index >> 1) << _PREFIX_SHIFT | (index & 1)
        v = struct.unpack("<f", struct.pack("<I", bits))[0]
        table.append(codes[-1] if math.isnan(v) else codes[bisect.bisect_left(bounds, v)])
    return tuple(table)


@functools.lru_cache(maxsize=None)
def _lookup_table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant on ``device``, made once: a fresh host-to-GPU copy per call would stall the stream."""
    return torch.tensor(values, dtype=dtype, device=device)


def _look_up(index: torch.Tensor, values: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``values[index]`` elementwise for an int32 ``index``.

    One gather (index_select takes int32: no int64 copy), except for float32 tables on the CPU, where index_select
    runs on one core (75 ms for 22 M elements on 16 cores, against 35 ms for indexing, measured).
    """
    table = _lookup_table(values, dtype, index.device)
    if index.device.type == "cpu" and dtype == torch.float32:
        return table[index]
    return table.index_select(0, index.reshape(-1)).view(index.shape)


def _codes_by_interval(
    y: torch.Tensor, intervals: tuple[tuple[float, ...], tuple[int, ...]], search: bool | None = None
) -> torch.Tensor:
    """The code of the interval each float32 value of ``y`` falls in, then one table lookup.

    Two ways to the interval, the same codes (both swept over every float32 class in the tests): ``search`` over
    the signed boundaries (one kernel, twice as fast on an H100) or the value's bit class (:func:`_prefix_table`:
    a shift, two masks, elementwise; three times as fast on the CPU, where the search is slow). By default, the
    search on a GPU. Either way far fewer passes than rounding the magnitude and then setting the sign bit.
    """
    assert y.dtype == torch.float32, "the boundaries and bit classes are float32"
    if search is None:
        search = y.device.type != "cpu"
    if search:
        bounds, table = intervals
        index = torch.searchsorted(_lookup_table(bounds, torch.float32, y.device), y, out_int32=True)
    else:
        bits = y.view(torch.int32)
        index = (bits >> (_PREFIX_SHIFT - 1)).bitwise_and_(_PREFIX_CLASSES - 2)  # 2 * prefix, sign bit included
        index |= (bits & _BELOW_PREFIX) != 0
        table = _prefix_table(intervals)
    return _look_up(index, table, torch.uint8)


def cast_to_e2m1(y: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15) of float32 ``y``: nearest value, ties to the even code, saturating at +-6."""
    return _codes_by_interval(y, _e2m1_intervals(_E2M1_BOUNDS, _E2M1_ROUND_UP_TIES))


def cast_to_e2m1_exactly(y: torch.Tensor) -> torch.Tensor | None:
    """E2M1 codes (uint8) of float32 ``y`` if every value of ``y`` is an E2M1 value, else None (one host sync)."""
    codes = _codes_by_interval(y, _exact_e2m1_intervals(_E2M1_BOUNDS, _E2M1_ROUND_UP_TIES))
    return codes if int(codes.max()) < _NOT_ON_GRID else None


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes (uint8 0..15)."""
    return _look_up(codes.to(torch.int32), E2M1_VALUES + tuple(-v for v in E2M1_VALUES), torch.float32)


def pack_e2m1(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Two codes per byte: element 2i in the low nibble, 2i+1 in the high nibble (into ``out`` if given)."""
    assert codes.shape[-1] % 2 == 0, "an even number of codes per row is needed"
    return torch.bitwise_or(codes[..., 0::2], codes[..., 1::2] << 4, out=out)


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
    if block_scale is None:
        block_scale = reference_block_scales(block_amax(x), gs)
    M, N = x.shape
    packed = torch.empty(M, N // 2, dtype=torch.uint8, device=x.device)
    multiplier = (block_scale.to(torch.float32) * gs).unsqueeze(-1)  # [M, N/16, 1]
    on_cpu = x.device.type == "cpu"
    step = max(1, (_CHUNK_ELEMENTS if on_cpu else _GPU_CHUNK_ELEMENTS) // N)
    starts = list(range(0, M, step))
    # A first chunk of a few rows refuses most data that is not MXFP4-shaped almost for free; on a GPU it costs a
    # host sync, worth it only when more chunks follow.
    if exact and (on_cpu or step < M):
        starts = [0] + list(range(min(M, 16), M, step))
    for r, end in zip(starts, starts[1:] + [M]):
        if r >= end:
            continue
        rows = end - r
        y = x[r:end].view(rows, N // BLOCK, BLOCK) / multiplier[r:end]
        # One host sync per chunk in exact mode (a GPU quantizes a whole expert in one chunk).
        codes = cast_to_e2m1_exactly(y) if exact else cast_to_e2m1(y)
        if codes is None:
            return None
        pack_e2m1(codes.view(rows, N), out=packed[r:end])
    return NVFP4Tensor(packed=packed, block_scale=block_scale, global_scale=gs.clone())


def dequantize_nvfp4(t: NVFP4Tensor) -> torch.Tensor:
    """float32 [M, N]: ``e2m1 * float(block_scale) * global_scale``."""
    M, N = t.shape
    values = e2m1_to_float(unpack_e2m1(t.packed)).view(M, N // BLOCK, BLOCK)
    mult = t.block_scale.to(torch.float32) * t.global_scale.to(t.packed.device, torch.float32)
    return (values * mult.unsqueeze(-1)).view(M, N)


class ScalePolicy(str, Enum):
    """``--scale-policy``: how the scales of a group are chosen."""

    AUTO = "auto"  # power-of-two scales where they hold every tensor of the group exactly, else REFERENCE's rule
    REFERENCE = "reference"  # ModelOpt's rule: global = joint amax / 2688, reference block scales


class ScaleRule(str, Enum):
    """The rule a group got (per tensor in the report; what verify holds it to)."""

    EXACT = "exact"  # decodes to the source bit for bit
    REFERENCE = "reference"  # ModelOpt's bytes, an SQNR bound


def quantize_group(
    tensors: list[torch.Tensor], policy: ScalePolicy | str = ScalePolicy.REFERENCE, names: list[str] | None = None
) -> tuple[list[NVFP4Tensor], ScaleRule]:
    """Quantize tensors that share one global scale (an expert's w1 and w3, which vLLM fuses into one GEMM).

    ``policy`` (:class:`ScalePolicy`): ``reference`` (global = joint amax / 2688, reference block rule) or ``auto``
    (power-of-two scales when they reproduce every tensor of the group exactly, ``reference`` otherwise). Returns the
    tensors and the :class:`ScaleRule` that was used.
    """
    policy = ScalePolicy(policy)  # ValueError for an unknown one
    names = names or [f"<tensor {i}>" for i in range(len(tensors))]
    for x, n in zip(tensors, names):
        check_quantizable(x.shape, n)
    tensors = [x.to(torch.float32) for x in tensors]
    amaxes = [block_amax(x) for x in tensors]
    if policy is ScalePolicy.AUTO:
        gs, block_scales = exact_scales(amaxes)
        out = []
        for x, bs, n in zip(tensors, block_scales, names):
            q = quantize_nvfp4(x, gs, bs, n, exact=True)
            if q is None:
                break
            out.append(q)
        else:
            return out, ScaleRule.EXACT
    gs = global_scale_from_amax(group_amax(amaxes))
    return ([quantize_nvfp4(x, gs, reference_block_scales(a, gs), n) for x, a, n in zip(tensors, amaxes, names)],
            ScaleRule.REFERENCE)


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
