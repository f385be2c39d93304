"""NVFP4 numerics: bytes against ModelOpt (the kit's reference), documented differences from compressed-tensors,
mutation sensitivity of those comparisons, golden bytes, the exact (power-of-two) policy and edge cases.

Random inputs are fresh on every run; every assertion message carries the seed that reproduces it
(set NVFP4KIT_TEST_SEED to replay one).
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from nvfp4kit import fp8, nvfp4
from nvfp4kit.nvfp4 import NVFP4FormatError

warnings.filterwarnings("ignore")
logging.getLogger("llmcompressor").setLevel(logging.ERROR)

from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor  # noqa: E402
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8  # noqa: E402
from compressed_tensors.quantization import preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize  # noqa: E402

ROWS, COLS = 256, 1024


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def fp8_sourced(shape, gen, tile_exponent_spread: int = 6) -> torch.Tensor:
    """E4M3 values x power-of-two 128x128 tile scales, dequantized to float32 (what the converter sees)."""
    tile_rows, tile_cols = math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)
    tile_gain = torch.exp2(torch.randint(-tile_exponent_spread, 1, (tile_rows, tile_cols), generator=gen).float())
    x = torch.randn(shape, generator=gen) * 0.02 * fp8.expand_block_scale(tile_gain, shape, (128, 128))
    weight, scale = fp8.quantize_fp8_blocks(x, (128, 128), torch.float8_e8m0fnu)
    return fp8.dequantize_fp8_blocks(weight, scale, (128, 128)) + 0.0  # + 0.0 turns -0 into +0


def make_input(case: str, gen: torch.Generator, shape=(ROWS, COLS)) -> torch.Tensor:
    if case == "normal":
        return torch.randn(shape, generator=gen)
    if case == "normal_bf16":
        return torch.randn(shape, generator=gen).to(torch.bfloat16)
    if case == "student_t":  # df = 3: heavy tails
        z = torch.randn(shape, generator=gen)
        return z / torch.sqrt((torch.randn((3, *shape), generator=gen) ** 2).mean(0))
    if case == "outliers":
        x = torch.randn(shape, generator=gen)
        idx = torch.randint(0, x.numel(), (8,), generator=gen)
        x.view(-1)[idx] *= 1000.0
        return x
    if case == "zero_blocks":
        x = torch.randn(shape, generator=gen)
        keep = torch.rand(shape[0], shape[1] // 16, generator=gen) > 0.2
        return (x.view(shape[0], -1, 16) * keep.unsqueeze(-1)).view(shape)
    if case == "tiny":  # rows of 1e-7..1e-5 next to one element of 1: subnormal block scales and the 2^-9 floor
        x = torch.randn(shape, generator=gen) * torch.pow(10.0, torch.empty(shape[0], 1).uniform_(-7, -5, generator=gen))
        x[0, 0] = 1.0
        return x
    if case == "fp8_sourced":
        return fp8_sourced(shape, gen)
    raise AssertionError(case)


INPUT_CASES = ["normal", "normal_bf16", "student_t", "outliers", "zero_blocks", "tiny", "fp8_sourced"]


def mxfp4_style(shape, gen, exponents=(-10, -2)) -> torch.Tensor:
    """E2M1 x 2^k per 1x32 block (V4's routed experts), FP8-cast with 128x128 UE8M0 tiles and decoded back."""
    rows, cols = shape
    codes = torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8)
    k = torch.randint(exponents[0], exponents[1] + 1, (rows, cols // 32), generator=gen).float()
    x = nvfp4.e2m1_to_float(codes) * torch.exp2(k).repeat_interleave(32, dim=1)
    weight, scale = fp8.quantize_fp8_blocks(x, (128, 128), torch.float8_e8m0fnu)
    decoded = fp8.dequantize_fp8_blocks(weight, scale, (128, 128))
    assert torch.equal(decoded, x), "the FP8 cast of MXFP4 data must be lossless (test precondition)"
    return decoded


# ---------------------------------------------------------------------------------------------------------------
# The reference libraries
# ---------------------------------------------------------------------------------------------------------------


def modelopt_quantize(x: torch.Tensor, global_amax: torch.Tensor):
    """ModelOpt's dynamic NVFP4QTensor path: (packed bytes, E4M3 block scales, scale_2)."""
    qtensor, block_scale, scale_2 = NVFP4QTensor.quantize(
        x.clone(), 16, weights_scaling_factor_2=global_amax.to(torch.float32) / 2688
    )
    return qtensor._quantized_data, block_scale, scale_2


def ours_quantize(x: torch.Tensor, global_amax: torch.Tensor) -> nvfp4.NVFP4Tensor:
    # Through the module attribute so that monkeypatched mutants take effect.
    return nvfp4.quantize_nvfp4(x, nvfp4.global_scale_from_amax(global_amax))


NVFP4A16 = preset_name_to_scheme("NVFP4A16", ["Linear"])


def compressed_tensors_quantize(x: torch.Tensor):
    """compressed-tensors as llm-compressor's data-free path feeds it: observe, qparams, compress.

    Returns (weight_packed, weight_scale, weight_global_scale): the global scale is the divisor 2688/amax.
    """
    from compressed_tensors.compressors import compress_module
    from llmcompressor.entrypoints.model_free.lifecycle import calibrate_weight, initialize_quantized_linear

    module = initialize_quantized_linear(x.clone(), NVFP4A16, "cpu")
    calibrate_weight(module)
    compress_module(module)
    state = module.state_dict()
    return state["weight_packed"], state["weight_scale"], state["weight_global_scale"].reshape(())


def byte_mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of differing bytes (float8 tensors compared by their bit patterns)."""
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return float((a != b).float().mean())


def modelopt_mismatch(x: torch.Tensor, global_amax: torch.Tensor) -> dict[str, float]:
    ours = ours_quantize(x, global_amax)
    packed, block_scale, scale_2 = modelopt_quantize(x, global_amax)
    return {
        "packed": byte_mismatch(ours.packed, packed),
        "block_scale": byte_mismatch(ours.block_scale, block_scale),
        "global_scale": float(ours.global_scale != scale_2.reshape(())),
    }


# ---------------------------------------------------------------------------------------------------------------
# Bit-exact against ModelOpt
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amax_factor", [1.0, 3.7, 0.5], ids=["own_amax", "joint_amax", "clipping_amax"])
@pytest.mark.parametrize("case", INPUT_CASES)
def test_bytes_equal_modelopt(case, amax_factor, seed, gen):
    """Same input and same global amax: identical packed bytes, block scales and global scale.

    joint_amax: the group's amax exceeds this tensor's (w1/w3 sharing); clipping_amax: a calibrated amax below the
    tensor's own, so the 448 block-scale cap is reached.
    """
    x = make_input(case, gen)
    mismatch = modelopt_mismatch(x, nvfp4.amax(x) * amax_factor)
    assert mismatch == {"packed": 0.0, "block_scale": 0.0, "global_scale": 0.0}, f"seed={seed}: {mismatch}"


def test_tiny_case_reaches_the_block_scale_floor(seed, gen):
    """The 'tiny' input must really produce clamped (2^-9) and subnormal E4M3 block scales, or it tests nothing."""
    x = make_input("tiny", gen)
    scales = ours_quantize(x, nvfp4.amax(x)).block_scale.to(torch.float32)
    assert bool((scales == 2.0**-9).any()), f"seed={seed}"
    assert bool(((scales > 2.0**-9) & (scales < 2.0**-6)).any()), f"seed={seed}: expected other subnormal scales"


# ---------------------------------------------------------------------------------------------------------------
# Mutation sensitivity: each plausible mistake must make the ModelOpt comparison fail
# ---------------------------------------------------------------------------------------------------------------


def stress_input(gen: torch.Generator) -> torch.Tensor:
    """Rows that together exercise every rule: exact rounding ties, the 2^-9 floor, the 448 cap, FP8-sourced values."""
    # Each tie row: one 16-block holds 6*s (block scale s, a power of two) and the seven E2M1 midpoints times s.
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    tie_block = torch.cat([torch.tensor([6.0]), midpoints, -midpoints, torch.tensor([0.0])])
    ties = (tie_block * 2.0**-4).repeat(16, COLS // 16)
    tiny = torch.randn(16, COLS, generator=gen) * 1e-7
    large = torch.randn(16, COLS, generator=gen) * 100
    return torch.cat([ties, tiny, large, fp8_sourced((96, COLS), gen)])


def swapped_nibbles(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.bitwise_or(codes[..., 1::2], codes[..., 0::2] << 4, out=out)


def reciprocal_global_scale(amax):
    return nvfp4.GLOBAL_SCALE_DIVISOR / torch.as_tensor(amax, dtype=torch.float32)


MUTATIONS = {
    "none": [],
    "high_nibble_first": [("pack_e2m1", swapped_nibbles)],
    # Every tie rounds up (away from zero) instead of to the even code.
    "ties_away_from_zero": [("_E2M1_ROUND_UP_TIES", nvfp4._E2M1_BOUNDS)],
    "no_2^-9_floor": [("BLOCK_SCALE_MIN", 0.0)],
    # No "no 448 cap" mutant: torch's E4M3 cast saturates, so dropping the cap changes nothing (see
    # test_e4m3_cast_saturates); the cap stays as a safeguard for casts that do not.
    "reciprocal_global_scale": [("global_scale_from_amax", reciprocal_global_scale)],
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_modelopt_comparison_detects_mutation(mutation, monkeypatch, seed, gen):
    x = stress_input(gen)
    # Global scale 2^-5 puts the tie rows' block scales at exactly 2 (so x / scale hits the midpoints) and the
    # large rows' block scales above the 448 cap.
    global_amax = torch.tensor(2688 * 2.0**-5)
    assert float(nvfp4.amax(x)) > 464 * 6 * 2.0**-5, "test precondition: the cap must be reached"
    for attribute, value in MUTATIONS[mutation]:
        monkeypatch.setattr(nvfp4, attribute, value)
    mismatch = modelopt_mismatch(x, global_amax)
    if mutation == "none":
        assert max(mismatch.values()) == 0.0, f"seed={seed}: {mismatch}"
    else:
        assert max(mismatch.values()) > 0.0, f"seed={seed}: mutation {mutation} went unnoticed"


def test_e4m3_cast_saturates():
    """Block scales above 448 (clipping global amax) come out as 448 with or without the library's explicit cap."""
    assert torch.tensor([460.0, 1000.0, 1e6]).to(torch.float8_e4m3fn).to(torch.float32).tolist() == [448.0] * 3


# ---------------------------------------------------------------------------------------------------------------
# compressed-tensors: where it agrees, where it differs (docs/numerics.md), and its decoder on our bytes
# ---------------------------------------------------------------------------------------------------------------


def with_power_of_two_global_amax(x: torch.Tensor) -> torch.Tensor:
    """Set one element to 2688 * 2^m >= amax(x), so both libraries' global scales are exactly 2^m."""
    m = math.ceil(math.log2(float(nvfp4.amax(x)) / 2688))
    x = x.clone()
    x[0, 0] = 2688 * 2.0**m
    return x


def with_awkward_global_amax(x: torch.Tensor) -> torch.Tensor:
    """Set one element to an amax A >= amax(x) at which compressed-tensors' global scale, 2688 * (1/A) rounded in
    x's dtype, is off the exact 2688/A (by > 1e-3 relative in bf16, by any amount in float32).

    Some amaxes give (nearly) the exact value and no disagreement at all; this keeps the disagreement tests from
    depending on the seed. A is an E4M3 value x 2^k, as FP8-sourced data's amax is (its rounding ties need it).
    """
    base = float(nvfp4.amax(x))
    e0 = math.floor(math.log2(base))
    candidates = sorted(m / 8 * 2.0**e for e in range(e0, e0 + 3) for m in range(8, 16) if m / 8 * 2.0**e >= base)
    for candidate in candidates:
        a = torch.tensor(candidate).to(x.dtype)
        ct_global = float(a.reciprocal() * 2688)
        exact = 1 / float(a.to(torch.float32) / 2688)
        if abs(ct_global - exact) / exact > (1e-3 if x.dtype == torch.bfloat16 else 0.0):
            x = x.clone()
            x[0, 0] = a
            return x
    raise AssertionError("no awkward amax found")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["normal", "student_t", "outliers", "fp8_sourced"])
def test_compressed_tensors_agrees_at_power_of_two_global_scale(case, dtype, seed, gen):
    x = with_power_of_two_global_amax(make_input(case, gen)).to(dtype)
    ours = ours_quantize(x, nvfp4.amax(x))
    packed, block_scale, global_scale = compressed_tensors_quantize(x)
    assert float(ours.global_scale) == 2.0 ** round(math.log2(float(ours.global_scale))), "precondition: 2^m"
    assert float(global_scale) == 1 / float(ours.global_scale), f"seed={seed}"
    assert byte_mismatch(ours.block_scale, block_scale) == 0.0, f"seed={seed}"
    assert byte_mismatch(ours.packed, packed) == 0.0, f"seed={seed}"


def test_compressed_tensors_global_scale_is_rounded_in_the_weight_dtype(seed, gen):
    """CT: weight_global_scale = 2688 * (1/amax) in bf16 for a bf16 weight, not the reciprocal of amax/2688."""
    x = with_awkward_global_amax(make_input("normal_bf16", gen))
    _, _, ct_global = compressed_tensors_quantize(x)
    amax_bf16 = x.abs().amax()
    assert float(ct_global) == float(amax_bf16.reciprocal() * 2688), f"seed={seed}"
    ours = ours_quantize(x, nvfp4.amax(x))
    assert float(ct_global) != 1 / float(ours.global_scale), f"seed={seed}: expected the bf16 rounding to show"


def test_compressed_tensors_block_scale_rule(seed, gen):
    """CT: block scale = e4m3(global_scale * (block_amax / 6)): the division in the weight's dtype (bf16), the
    product in float32."""
    x = with_awkward_global_amax(make_input("normal_bf16", gen))
    _, ct_scale, ct_global = compressed_tensors_quantize(x)
    block_amax = x.view(ROWS, -1, 16).abs().amax(-1)
    modelled = (ct_global * (block_amax / 6).to(torch.float32)).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert byte_mismatch(modelled, ct_scale) == 0.0, f"seed={seed}"
    ours = ours_quantize(x, nvfp4.amax(x))
    assert byte_mismatch(ours.block_scale, ct_scale) > 0.0, f"seed={seed}: expected differing block scales"


def test_compressed_tensors_zero_block_scale_is_one_eighth(seed, gen):
    x = with_power_of_two_global_amax(make_input("zero_blocks", gen))
    ours = ours_quantize(x, nvfp4.amax(x))
    packed, ct_scale, _ = compressed_tensors_quantize(x)
    zero_block = x.view(ROWS, -1, 16).abs().amax(-1) == 0
    assert bool(zero_block.any()), "test precondition"
    assert bool((ct_scale.to(torch.float32)[zero_block] == 0.125).all()), f"seed={seed}"
    assert bool((ours.block_scale.to(torch.float32)[zero_block] == 1.0).all()), f"seed={seed}"
    # Only the zero blocks' scales differ; their codes are 0 either way.
    assert torch.equal(ours.block_scale[~zero_block].view(torch.uint8), ct_scale[~zero_block].view(torch.uint8))
    assert torch.equal(ours.packed, packed), f"seed={seed}"


def test_compressed_tensors_has_no_block_scale_floor(seed, gen):
    """CT clamps block scales to [-448, 448] only: one that rounds to E4M3 zero becomes 0.125, where ours is 2^-9."""
    x = with_power_of_two_global_amax(make_input("tiny", gen))
    ours = ours_quantize(x, nvfp4.amax(x))
    _, ct_scale, _ = compressed_tensors_quantize(x)
    ct_scale, our_scale = ct_scale.to(torch.float32), ours.block_scale.to(torch.float32)
    assert bool(((ct_scale == 0.125) & (our_scale == 2.0**-9)).any()), f"seed={seed}"


def test_all_zero_tensor_in_each_library():
    x = torch.zeros(4, 64)
    packed, block_scale, scale_2 = modelopt_quantize(x, nvfp4.amax(x))
    assert bool(block_scale.to(torch.float32).isnan().all()) and bool((packed == 0x77).all()), "ModelOpt's bug"
    packed, block_scale, global_scale = compressed_tensors_quantize(x)
    assert bool((block_scale.to(torch.float32) == 0.125).all()) and bool((packed == 0).all())
    assert float(global_scale) == 1.0


@pytest.mark.parametrize("case", ["normal_bf16", "fp8_sourced"])
def test_compressed_tensors_differs_on_ordinary_input(case, seed, gen):
    """At an ordinary (non power-of-two) global amax the two libraries' bytes differ, with equal quality."""
    x = with_awkward_global_amax(make_input(case, gen))
    ours = ours_quantize(x, nvfp4.amax(x))
    packed, block_scale, global_scale = compressed_tensors_quantize(x)
    differing = byte_mismatch(ours.packed, packed)
    print(f"\n{case}: {100 * differing:.2f} % of packed bytes and "
          f"{100 * byte_mismatch(ours.block_scale, block_scale):.2f} % of block scales differ from compressed-tensors")
    assert differing > 0.0, f"seed={seed}: docs/numerics.md says these differ"
    ct_decoded = unpack_fp4_from_uint8(packed, *x.shape, dtype=torch.float32) * (
        block_scale.to(torch.float32) / global_scale
    ).repeat_interleave(16, dim=1)
    ours_sqnr = nvfp4.reconstruction_error(x, nvfp4.dequantize_nvfp4(ours))["sqnr_db"]
    ct_sqnr = nvfp4.reconstruction_error(x, ct_decoded)["sqnr_db"]
    assert abs(ours_sqnr - ct_sqnr) < 0.1, f"seed={seed}: SQNR {ours_sqnr:.3f} vs {ct_sqnr:.3f} dB"


def test_compressed_tensors_decompressor_reads_our_bytes_exactly(seed, gen):
    """NVFP4PackedCompressor.decompress (bf16 output) of an exact-rule tensor equals our decoding bit for bit."""
    x = mxfp4_style((128, 512), gen)
    (q,), rule = nvfp4.quantize_group([x], policy="auto")
    assert rule == "exact"
    state = {
        "weight_packed": q.packed,
        "weight_scale": q.block_scale,
        "weight_global_scale": (1 / q.global_scale).reshape(1),
    }
    decoded = NVFP4PackedCompressor.decompress(state, NVFP4A16)["weight"]
    ours = nvfp4.dequantize_nvfp4(q)
    assert torch.equal(decoded.to(torch.float32), ours), f"seed={seed}"


def test_compressed_tensors_dequantize_reads_our_bytes(seed, gen):
    """At a general global scale CT multiplies by scale / (1/gs), we by scale * gs: equal within float32 rounding."""
    x = make_input("normal", gen)
    q = ours_quantize(x, nvfp4.amax(x))
    values = unpack_fp4_from_uint8(q.packed, *x.shape, dtype=torch.float32)
    decoded = ct_dequantize(
        values, q.block_scale.to(torch.float32), args=NVFP4A16.weights,
        global_scale=(1 / q.global_scale).reshape(1), dtype=torch.float32,
    )
    torch.testing.assert_close(decoded, nvfp4.dequantize_nvfp4(q), rtol=3e-7, atol=0, msg=f"seed={seed}")


# ---------------------------------------------------------------------------------------------------------------
# Golden bytes and rounding
# ---------------------------------------------------------------------------------------------------------------


def test_packing_golden_bytes():
    elements = torch.tensor([0.5, 6, -1, 0, 1.5, -6, 3, -0.5] + [0.0] * 8).reshape(1, 16)
    q = nvfp4.quantize_nvfp4(elements, torch.tensor(1.0))
    assert float(q.block_scale) == 1.0
    golden = [0x71, 0x0A, 0xF3, 0x95]
    assert q.packed[0, :4].tolist() == golden
    assert pack_fp4_to_uint8(elements)[0, :4].tolist() == golden  # compressed-tensors' packer agrees
    assert torch.equal(nvfp4.dequantize_nvfp4(q), elements)


@pytest.mark.parametrize(
    "value, code",
    [(0.25, 0x0), (0.75, 0x2), (1.25, 0x2), (1.75, 0x4), (2.5, 0x4), (3.5, 0x6), (5.0, 0x6),
     (0.3, 0x1), (7.0, 0x7), (-1e-3, 0x8), (-2.5, 0xC), (-5.5, 0xF),
     (-0.25, 0x8), (-0.75, 0xA), (-1.25, 0xA), (-1.75, 0xC), (-3.5, 0xE), (-5.0, 0xE), (-6.0, 0xF), (-7.0, 0xF),
     (0.0, 0x0), (-0.0, 0x0), (-1e-45, 0x8), (6.0, 0x7), (-0.5, 0x9), (4.0, 0x6)],
)
def test_e2m1_rounding(value, code):
    y = torch.tensor([value])
    assert int(nvfp4.cast_to_e2m1(y)) == code
    assert int(NVFP4QTensor._cast_fp4(y.clone())) == code  # the reference rounds the same way


def float32_bit_sweep() -> torch.Tensor:
    """Every float32 sign/exponent/top-7-mantissa pattern, each with the low 16 bits 0, 1 and all ones: every
    value the cast's bit classes tell apart, every tie and its neighbours on both sides. NaN left out."""
    upper = torch.arange(1 << 16, dtype=torch.int32) << 16
    bits = (upper.unsqueeze(1) | torch.tensor([0, 1, 0xFFFF], dtype=torch.int32)).reshape(-1)
    y = bits.view(torch.float32)
    return y[~torch.isnan(y)]


@pytest.mark.parametrize("search", [True, False], ids=["search", "bit-class"])
def test_e2m1_rounding_of_every_float32_class(search):
    y = float32_bit_sweep()
    rounding = nvfp4._e2m1_intervals(nvfp4._E2M1_BOUNDS, nvfp4._E2M1_ROUND_UP_TIES)
    assert torch.equal(nvfp4._codes_by_interval(y, rounding, search), NVFP4QTensor._cast_fp4(y.clone()))


@pytest.mark.parametrize("search", [True, False], ids=["search", "bit-class"])
def test_exact_cast_flags_every_float32_off_the_grid(search):
    y = float32_bit_sweep()
    grid = nvfp4.e2m1_to_float(torch.arange(16, dtype=torch.uint8))
    on_grid = torch.isin(y, grid)
    exact = nvfp4._exact_e2m1_intervals(nvfp4._E2M1_BOUNDS, nvfp4._E2M1_ROUND_UP_TIES)
    codes = nvfp4._codes_by_interval(y, exact, search)
    assert torch.equal(codes < nvfp4._NOT_ON_GRID, on_grid)
    assert torch.equal(codes[on_grid], NVFP4QTensor._cast_fp4(y[on_grid].clone()))


def test_cast_exactly_accepts_the_grid_and_nothing_else():
    """Every E2M1 value (and -0.0) casts to its own code; any other float32 makes the exact cast refuse."""
    grid = nvfp4.e2m1_to_float(torch.arange(16, dtype=torch.uint8))
    values = torch.cat([grid, torch.tensor([-0.0])])
    assert torch.equal(nvfp4.cast_to_e2m1_exactly(values), nvfp4.cast_to_e2m1(values))
    neighbours = torch.cat([torch.nextafter(grid, torch.tensor(math.inf)), torch.nextafter(grid, torch.tensor(-math.inf))])
    for v in [*neighbours.tolist(), 0.25, 0.75, -5.0, 7.0, -1e-30, 1e-45]:
        assert nvfp4.cast_to_e2m1_exactly(torch.tensor([0.5, v])) is None, v


# ---------------------------------------------------------------------------------------------------------------
# The exact policy
# ---------------------------------------------------------------------------------------------------------------


def test_exact_policy_on_mxfp4_data(seed, gen):
    x = mxfp4_style((256, 1024), gen)
    x[3, 32:64] = 0.0  # an all-zero block must not break exactness
    (exact_q,), rule = nvfp4.quantize_group([x], policy="auto")
    assert rule == "exact", f"seed={seed}"
    assert torch.equal(nvfp4.dequantize_nvfp4(exact_q), x), f"seed={seed}"
    (reference_q,), rule = nvfp4.quantize_group([x], policy="reference")
    assert rule == "reference"
    exact_err = nvfp4.reconstruction_error(x, nvfp4.dequantize_nvfp4(exact_q))
    reference_err = nvfp4.reconstruction_error(x, nvfp4.dequantize_nvfp4(reference_q))
    print(f"\nMXFP4-style data: exact rule SQNR {exact_err['sqnr_db']} dB, "
          f"reference rule SQNR {reference_err['sqnr_db']:.2f} dB (rel. error {reference_err['rel_error']:.2e})")
    assert exact_err == {"sqnr_db": math.inf, "rel_error": 0.0}
    assert math.isfinite(reference_err["sqnr_db"]), f"seed={seed}: the reference rule is not lossless here"


@pytest.mark.parametrize("span, expected_rule", [(17, "exact"), (18, "reference")])
def test_exact_policy_binade_limit(span, expected_rule, seed, gen):
    """Block exponents spanning 17 powers of two fit E4M3's 2^-9..2^8 scales; 18 do not."""
    codes = torch.randint(0, 16, (32, 256), generator=gen, dtype=torch.uint8)
    codes[:, ::16] = 0x7  # every block's amax is 6, so its exponent is exactly its k
    x = nvfp4.e2m1_to_float(codes)
    x[5, 16:32] *= 2.0**-span
    _, rule = nvfp4.quantize_group([x], policy="auto")
    assert rule == expected_rule, f"seed={seed}"


def test_exact_policy_falls_back_on_random_data(seed, gen):
    _, rule = nvfp4.quantize_group([make_input("normal", gen)], policy="auto")
    assert rule == "reference", f"seed={seed}"


def test_group_shares_one_global_scale(seed, gen):
    w1, w3 = mxfp4_style((128, 256), gen), mxfp4_style((128, 256), gen, exponents=(-6, 1))
    (q1, q3), rule = nvfp4.quantize_group([w1, w3], policy="auto")
    assert rule == "exact" and torch.equal(q1.global_scale, q3.global_scale), f"seed={seed}"
    assert torch.equal(nvfp4.dequantize_nvfp4(q1), w1) and torch.equal(nvfp4.dequantize_nvfp4(q3), w3)

    w1, w3 = make_input("normal", gen), 5 * make_input("normal", gen)
    (q1, q3), rule = nvfp4.quantize_group([w1, w3], policy="auto")
    assert rule == "reference"
    joint = torch.maximum(nvfp4.amax(w1), nvfp4.amax(w3))
    assert torch.equal(q1.global_scale, joint / 2688) and torch.equal(q3.global_scale, joint / 2688)


# ---------------------------------------------------------------------------------------------------------------
# Edge cases, chunking, memory, error measure
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["reference", "auto"])
def test_all_zero_tensor(policy):
    x = torch.zeros(32, 64)
    (q,), _ = nvfp4.quantize_group([x], policy=policy)
    assert bool(torch.isfinite(q.block_scale.to(torch.float32)).all()) and bool(torch.isfinite(q.global_scale))
    assert bool((q.packed == 0).all())
    assert torch.equal(nvfp4.dequantize_nvfp4(q), x)


def test_in_features_not_multiple_of_16_names_the_tensor():
    name = "layers.3.ffn.experts.7.w2.weight"
    with pytest.raises(NVFP4FormatError, match=r"layers\.3\.ffn\.experts\.7\.w2\.weight.*40"):
        nvfp4.quantize_group([torch.zeros(8, 40)], names=[name])
    with pytest.raises(NVFP4FormatError, match=name.replace(".", r"\.")):
        nvfp4.quantize_nvfp4(torch.zeros(8, 40), torch.tensor(1.0), name=name)


def test_chunked_quantization_equals_one_pass(monkeypatch, seed, gen):
    """Row chunks (which bound memory) must not change a byte, including a ragged last chunk."""
    x = make_input("outliers", gen)
    gs = nvfp4.global_scale_from_amax(nvfp4.amax(x))
    one_pass = nvfp4.quantize_nvfp4(x, gs)
    monkeypatch.setattr(nvfp4, "_CHUNK_ELEMENTS", 7 * COLS)  # 7 rows a chunk: 256 = 36 * 7 + 4
    chunked = nvfp4.quantize_nvfp4(x, gs)
    assert torch.equal(chunked.packed, one_pass.packed), f"seed={seed}"
    assert torch.equal(chunked.block_scale.view(torch.uint8), one_pass.block_scale.view(torch.uint8))


def test_peak_memory_of_a_large_tensor():
    """7168 x 3072 float32 (88 MB in, 12 MB out): peak RSS stays within a few hundred MB of the input.

    Measured in a fresh process: the peak RSS (VmHWM) during the call minus the RSS before it. The peak is reset
    first (``/proc/self/clear_refs``), else the import's own peak would count against the call when the kernel has
    since reclaimed pages of it.
    """
    script = textwrap.dedent(
        """
        import torch
        from nvfp4kit import nvfp4

        def status_kb(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

        x = torch.randn(7168, 3072)
        gs = nvfp4.global_scale_from_amax(nvfp4.amax(x))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before_kb = status_kb("VmRSS")
        q = nvfp4.quantize_nvfp4(x, gs)
        print(status_kb("VmHWM") - before_kb)
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, check=True,
                          env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "2"})
    extra_mb = int(done.stdout.split()[-1]) / 1024
    print(f"\npeak extra memory quantizing 7168x3072 float32: {extra_mb:.0f} MB")
    assert extra_mb < 150  # measured 89 MB; a float64 copy of the input alone would add 176 MB


def test_reconstruction_error_values():
    ref = torch.tensor([3.0, 4.0])
    assert nvfp4.reconstruction_error(ref, ref.clone()) == {"sqnr_db": math.inf, "rel_error": 0.0}
    err = nvfp4.reconstruction_error(ref, torch.tensor([3.0, 4.5]))  # noise 0.25, signal 25
    assert err["sqnr_db"] == pytest.approx(20.0) and err["rel_error"] == pytest.approx(0.1)
    assert nvfp4.reconstruction_error(torch.zeros(2), ref)["sqnr_db"] == -math.inf
