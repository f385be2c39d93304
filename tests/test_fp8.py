"""FP8 E4M3 weights with 2-D block scales: block-size inference, decoding against a naive loop, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from nvfp4kit import fp8
from nvfp4kit.fp8 import FP8FormatError

NAME = "layers.0.attn.wkv_a.weight"


def random_fp8(shape, gen) -> torch.Tensor:
    """Random E4M3 bytes without the NaN pattern (x1111111)."""
    raw = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x7E
    return raw.view(torch.float8_e4m3fn)


def random_scale(shape, dtype, gen) -> torch.Tensor:
    if dtype == torch.float8_e8m0fnu:
        return torch.exp2(torch.randint(-20, 5, shape, generator=gen).float()).to(dtype)
    return torch.rand(shape, generator=gen) * 1e-3 + 1e-5


def naive_dequantize(weight, scale, block) -> torch.Tensor:
    """One block at a time, straight from the definition W_true[i, j] = W[i, j] * S[i // bm, j // bn]."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    bm, bn = block
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            rows, cols = slice(bi * bm, (bi + 1) * bm), slice(bj * bn, (bj + 1) * bn)
            out[rows, cols] = weight[rows, cols].to(torch.float32) * scale[bi, bj].to(torch.float32)
    return out


# ---------------------------------------------------------------------------------------------------------------
# infer_block_size
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weight_shape, scale_shape, configured, expected",
    [
        ((7168, 2048), (56, 16), None, (128, 128)),
        ((576, 7168), (5, 56), None, (128, 128)),  # kv_a_proj_with_mqa: a 64-row edge block
        ((576, 7168), (5, 56), (128, 128), (128, 128)),
        ((100, 7168), (1, 56), None, (128, 128)),  # scale dim 1: any b >= 100 decodes alike; 128 is the smallest
        ((100, 7168), (1, 56), (256, 128), (256, 128)),  # ... and the configured value wins when it fits
    ],
)
def test_infer_block_size(weight_shape, scale_shape, configured, expected):
    assert fp8.infer_block_size(weight_shape, scale_shape, configured, name=NAME) == expected


@pytest.mark.parametrize(
    "weight_shape, scale_shape",
    [((576, 7168), (7, 56)), ((576, 7168), (5, 0)), ((576,), (5,)), ((4, 4), (9, 1))],
)
def test_infer_block_size_rejects_shapes_fitting_no_block(weight_shape, scale_shape):
    with pytest.raises(FP8FormatError, match=NAME.replace(".", r"\.")):
        fp8.infer_block_size(weight_shape, scale_shape, name=NAME)


@pytest.mark.parametrize(
    "weight_shape, scale_shape, configured",
    [((256, 256), (2, 2), (64, 64)),  # fits 128x128 blocks, but the config says 64x64
     ((448, 128), (1, 4), (128, 128))],  # the scale of a [128, 448] weight: fits 512x32 blocks, not the config's
)
def test_infer_block_size_holds_to_the_configured_block(weight_shape, scale_shape, configured):
    with pytest.raises(FP8FormatError, match=r"does not fit weight shape .* configured"):
        fp8.infer_block_size(weight_shape, scale_shape, configured, name=NAME)


# ---------------------------------------------------------------------------------------------------------------
# dequantize_fp8_blocks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.float32])
@pytest.mark.parametrize(
    "shape, block", [((256, 384), (128, 128)), ((576, 320), (128, 128)), ((200, 70), (64, 32))],
    ids=["whole_blocks", "edge_blocks", "edge_blocks_small"],
)
def test_dequantize_equals_naive_loop(shape, block, scale_dtype, seed, gen):
    weight = random_fp8(shape, gen)
    scale = random_scale(tuple(math.ceil(d / b) for d, b in zip(shape, block)), scale_dtype, gen)
    got = fp8.dequantize_fp8_blocks(weight, scale, block, name=NAME)
    assert torch.equal(got, naive_dequantize(weight, scale, block)), f"seed={seed}"


def test_edge_block_uses_its_own_scale():
    """576 rows in 128-row blocks: rows 512..575 belong to the fifth (partial) block and nowhere else."""
    weight = torch.ones(576, 256).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0]] * 4 + [[4.0, 8.0]])
    out = fp8.dequantize_fp8_blocks(weight, scale, (128, 128))
    assert bool((out[512:, :128] == 4.0).all()) and bool((out[512:, 128:] == 8.0).all())
    assert bool((out[384:512, :128] == 1.0).all()) and bool((out[384:512, 128:] == 2.0).all())


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, 0.0, -1.0])
def test_bad_scale_is_rejected_with_the_tensor_name(bad_value, gen):
    weight = random_fp8((256, 256), gen)
    scale = torch.ones(2, 2)
    scale[1, 0] = bad_value
    with pytest.raises(FP8FormatError, match=NAME.replace(".", r"\.")):
        fp8.dequantize_fp8_blocks(weight, scale, (128, 128), name=NAME)


def test_nan_ue8m0_scale_is_rejected(gen):
    scale = torch.ones(2, 2).to(torch.float8_e8m0fnu)
    scale.view(torch.uint8)[0, 1] = 0xFF  # the E8M0 NaN
    with pytest.raises(FP8FormatError, match=NAME.replace(".", r"\.")):
        fp8.dequantize_fp8_blocks(random_fp8((256, 256), gen), scale, (128, 128), name=NAME)


@pytest.mark.parametrize("nan_byte", [0x7F, 0xFF])
def test_fp8_nan_byte_is_rejected(nan_byte, gen):
    weight = random_fp8((256, 256), gen)
    weight.view(torch.uint8)[200, 17] = nan_byte
    with pytest.raises(FP8FormatError, match=rf"{NAME.replace('.', '[.]')}.*NaN"):
        fp8.dequantize_fp8_blocks(weight, torch.ones(2, 2), (128, 128), name=NAME)


def test_wrong_scale_shape_is_rejected(gen):
    with pytest.raises(FP8FormatError, match=NAME.replace(".", r"\.")):
        fp8.dequantize_fp8_blocks(random_fp8((256, 256), gen), torch.ones(2, 3), (128, 128), name=NAME)


# ---------------------------------------------------------------------------------------------------------------
# quantize_fp8_blocks round trip
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.float32])
@pytest.mark.parametrize("shape", [(256, 384), (576, 200)])
def test_quantize_round_trip(shape, scale_dtype, seed, gen):
    x = torch.randn(shape, generator=gen) * 0.05
    x[:128, :128] = 0.0  # an all-zero block gets scale 1
    weight, scale = fp8.quantize_fp8_blocks(x, (128, 128), scale_dtype)
    assert scale.dtype == scale_dtype and float(scale[0, 0].to(torch.float32)) == 1.0
    decoded = fp8.dequantize_fp8_blocks(weight, scale, (128, 128), name=NAME)
    # E4M3 keeps 3 mantissa bits: relative error at most 2^-4 for normal values; tiny ones are absolute.
    bound = 2.0**-4 * x.abs() + 2.0**-9 * scale.to(torch.float32).max()
    assert bool(((decoded - x).abs() <= bound).all()), f"seed={seed}"
    # Re-encoding decoded values is lossless: FP8 values x power-of-two scales are fixed points.
    if scale_dtype == torch.float8_e8m0fnu:
        weight2, scale2 = fp8.quantize_fp8_blocks(decoded, (128, 128), scale_dtype)
        assert torch.equal(fp8.dequantize_fp8_blocks(weight2, scale2, (128, 128)), decoded), f"seed={seed}"
