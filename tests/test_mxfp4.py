"""DeepSeek's original V4 release form: MXFP4 routed experts (I8 + F8_E8M0 per 1x32 block), read directly.

The decoder against an independent decode written here; the encoder's exactness; the named refusals; the
generator's ``--form mxfp4`` (the same values as the FP8 form); Path A giving byte-identical output from either
form (1 and 3 workers, compressed-tensors and ModelOpt); inspect and ``--dry-run`` naming the form; inspect on
the full-size V4 Pro original layout (sparse files).
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nvfp4kit import decode, mxfp4
from nvfp4kit.checkpoint import INDEX_NAME, open_checkpoint
from nvfp4kit.convert import ConvertError, Settings, convert
from nvfp4kit.hf_model import dequantized_source
from nvfp4kit.plan import Options, PlanError, build_plan
from nvfp4kit.report import checkpoint_facts, render_report
from nvfp4kit.rules import Overrides
from nvfp4kit.safetensors_io import read_header, read_tensor, save_file
from nvfp4kit.fixtures.synthetic import checkpoint_recipes, generate, model_config, recipe_specs, write_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_SHARDS = 3 * 10**6  # several output shards, so that 3 workers share them out
MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX E2M1, written out here independently of the kit


# ------------------------------------------------------------------------------------------------ helpers
def independent_decode(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """OCP MXFP4 decode from the spec, in float64 and integer arithmetic: byte k of a row holds element 2k in bits
    0-3 and element 2k+1 in bits 4-7; bit 3 of a nibble is the sign; the E8M0 byte e means 2^(e-127)."""
    b = packed.view(torch.uint8).to(torch.int64)
    nibbles = torch.empty(b.shape[0], b.shape[1] * 2, dtype=torch.int64)
    nibbles[:, 0::2] = b % 16
    nibbles[:, 1::2] = b // 16
    magnitude = torch.tensor(MAGNITUDES, dtype=torch.float64)[nibbles % 8]
    signed = torch.where(nibbles >= 8, -magnitude, magnitude)  # -0.0 for code 8
    e = scale.view(torch.uint8).to(torch.int64) - 127
    return torch.ldexp(signed, e.repeat_interleave(32, dim=1)).to(torch.float32)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to the bit, signed zeros and infinities included."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def expert_weights(ckpt) -> list[str]:
    return sorted(n for n in ckpt.tensors if ".experts." in n and n.endswith(".weight"))


def checkpoint_files(folder: str) -> list[str]:
    """What must match between outputs: shards, index, configs (side files are the sources' own, copied)."""
    return sorted(f for f in os.listdir(folder)
                  if f.endswith(".safetensors") or f in (INDEX_NAME, "config.json", "hf_quant_config.json"))


def assert_identical(a: str, b: str) -> None:
    files = checkpoint_files(a)
    assert files == checkpoint_files(b) and any(f.endswith(".safetensors") for f in files)
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors, f"{a} vs {b}: files differ: {mismatch + errors}"


# ------------------------------------------------------------------------------------------------ decoder
def test_decoder_equals_an_independent_decode(gen, seed):
    rows, cols = 48, 256
    packed = torch.randint(-128, 128, (rows, cols // 2), dtype=torch.int8, generator=gen)
    scale_bytes = torch.randint(0, 255, (rows, cols // 32), dtype=torch.uint8, generator=gen)  # 0xFF (NaN) excluded
    scale_bytes[0, :4] = torch.tensor([0, 1, 253, 254], dtype=torch.uint8)  # 2^-127 (subnormal results) .. 2^127 (inf)
    scale = scale_bytes.view(torch.float8_e8m0fnu)
    ours = mxfp4.dequantize_mxfp4(packed, scale, "t")
    assert same_bits(ours, independent_decode(packed, scale)), f"seed {seed}"
    assert same_bits(decode.dequantize(packed, scale, (1, 32), "t"), ours)
    assert ours.dtype == torch.float32 and bool((ours[:, ::2] != 0).any())


def test_encoder_is_exact_and_refuses_what_it_cannot_hold(gen, seed):
    codes = torch.tensor(MAGNITUDES)[torch.randint(0, 8, (32, 128), generator=gen)]
    codes *= torch.where(torch.rand(32, 128, generator=gen) < 0.5, -1.0, 1.0)  # includes -0.0
    exponent = torch.randint(-127, 126, (32, 4), generator=gen).float()  # 6 x 2^126 would overflow float32
    exponent[0, 0], exponent[0, 1] = -127, 125
    x = codes * torch.exp2(exponent.to(torch.float64)).repeat_interleave(32, dim=1).to(torch.float32)
    weight, scale = mxfp4.quantize_mxfp4(x, exponent, "t")
    assert (weight.dtype, tuple(weight.shape), scale.dtype, tuple(scale.shape)) == (torch.int8, (32, 64), torch.float8_e8m0fnu, (32, 4))
    assert same_bits(mxfp4.dequantize_mxfp4(weight, scale), x), f"seed {seed}"
    assert same_bits(independent_decode(weight, scale), x)
    with pytest.raises(mxfp4.MXFP4FormatError, match="not E2M1"):
        mxfp4.quantize_mxfp4(x * 0.7, exponent, "t")
    with pytest.raises(mxfp4.MXFP4FormatError, match="integers in"):
        mxfp4.quantize_mxfp4(x, exponent + 0.5, "t")
    with pytest.raises(mxfp4.MXFP4FormatError, match="multiple of 32"):
        mxfp4.quantize_mxfp4(x[:, :48], exponent[:, :1], "t")


def _tensors(rows=4, cols=64, weight_dtype=torch.int8, scale_dtype=torch.float8_e8m0fnu, scale_cols=None):
    """A valid MXFP4 pair (all ones) unless an argument spoils it."""
    weight = torch.zeros(rows, cols // 2, dtype=weight_dtype)
    scale = torch.full((rows, scale_cols or cols // 32), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return weight, scale.to(scale_dtype)


@pytest.mark.parametrize("case, tensors, message", [
    ("F32 scale", _tensors(scale_dtype=torch.float32), "F32 scale"),
    ("scale shape", _tensors(scale_cols=3), r"scale shape \[4, 3\], expected \[4, 2\]"),
    ("in not a multiple of 32", _tensors(cols=48, scale_cols=1), "input dimension 48"),
    ("not I8", _tensors(weight_dtype=torch.uint8), "dtype U8"),
])
def test_layout_errors_are_named(case, tensors, message):
    with pytest.raises(mxfp4.MXFP4FormatError, match=message) as e:
        mxfp4.dequantize_mxfp4(*tensors, "layers.0.ffn.experts.3.w1")
    assert "layers.0.ffn.experts.3.w1" in str(e.value)


def test_nan_scale_is_refused_naming_the_tensor():
    weight, scale = _tensors()
    scale.view(torch.uint8)[2, 1] = 0xFF
    with pytest.raises(mxfp4.MXFP4FormatError, match=r"mtp\.0\.ffn\.experts\.1\.w2: MXFP4 scale holds NaN"):
        decode.dequantize(weight, scale, (1, 32), "mtp.0.ffn.experts.1.w2")
    with pytest.raises(mxfp4.MXFP4FormatError, match="block"):
        decode.dequantize(*_tensors(), (128, 128), "x")  # an I8 weight planned as FP8 128x128


# ------------------------------------------------------------------------------------------------ generator
@pytest.fixture(scope="module")
def tiny_mx_src(tmp_path_factory) -> str:
    """The tiny preset, seed 0, in the original release's form (the same model as conftest's ``tiny_src``)."""
    dst = tmp_path_factory.mktemp("tiny_mx_src")
    generate(str(dst), preset="tiny", seed=0, form="mxfp4", jobs=2)
    return str(dst)


def test_mxfp4_form_holds_the_same_values_as_the_fp8_form(tiny_src, tiny_mx_src):
    fp8, mx = open_checkpoint(tiny_src), open_checkpoint(tiny_mx_src)
    assert mx.problems == [] and set(mx.tensors) == set(fp8.tensors)
    assert mx.weight_map == fp8.weight_map  # same shards, deliberate misplacements included
    assert json.load(open(os.path.join(tiny_mx_src, "config.json"))) == json.load(open(os.path.join(tiny_src, "config.json")))
    experts = expert_weights(mx)
    assert any(n.startswith("mtp.") for n in experts)
    for name, info in mx.tensors.items():
        if ".experts." in name:
            continue  # the only tensors whose storage differs
        assert info.dtype == fp8.tensors[name].dtype and info.shape == fp8.tensors[name].shape, name
        assert torch.equal(read_tensor(info).view(torch.uint8), read_tensor(fp8.tensors[name]).view(torch.uint8)), name
    a, b = dequantized_source(fp8), dequantized_source(mx)
    for name in experts:
        scale = mx.tensors[name[: -len("weight")] + "scale"]
        out, in_ = fp8.tensors[name].shape
        assert (mx.tensors[name].dtype, mx.tensors[name].shape, scale.dtype, scale.shape) == ("I8", (out, in_ // 2), "F8_E8M0", (out, in_ // 32))
        assert same_bits(b(name), a(name)), name  # signed zeros included


def test_recipe_specs_are_what_the_generator_writes(tiny_src, tiny_mx_src):
    cfg = model_config("tiny")
    for src, form in ((tiny_src, "fp8"), (tiny_mx_src, "mxfp4")):
        headers = {n: (i.dtype, i.shape) for n, i in open_checkpoint(src).tensors.items()}
        specs = {s.name: (s.dtype, s.shape) for r in checkpoint_recipes(cfg) for s in recipe_specs(r, "ue8m0", form)}
        assert specs == headers, form


# ------------------------------------------------------------------------------------------------ Path A
@pytest.fixture(scope="module")
def outputs(tiny_src, tiny_mx_src, tmp_path_factory) -> dict[tuple[str, str, int], str]:
    """Path A (default flags but small shards) of both forms: (form, format, workers) -> output folder."""
    root = tmp_path_factory.mktemp("mx_out")
    jobs = [("fp8", "compressed-tensors", 1), ("mxfp4", "compressed-tensors", 1), ("mxfp4", "compressed-tensors", 3),
            ("fp8", "modelopt", 1), ("mxfp4", "modelopt", 3)]
    out = {}
    for form, fmt, workers in jobs:
        dst = str(root / f"{form}-{fmt}-{workers}")
        src = tiny_src if form == "fp8" else tiny_mx_src
        convert(src, dst, Options(format=fmt, max_shard_size=SMALL_SHARDS), Settings(workers=workers))
        out[(form, fmt, workers)] = dst
    return out


@pytest.mark.parametrize("fmt, workers", [("compressed-tensors", 1), ("compressed-tensors", 3), ("modelopt", 3)])
def test_both_forms_give_byte_identical_output(outputs, fmt, workers):
    assert_identical(outputs[("fp8", fmt, 1)], outputs[("mxfp4", fmt, workers)])


def test_experts_become_nvfp4_exactly_and_the_planned_size_is_exact(tiny_src, tiny_mx_src, outputs):
    dst = outputs[("mxfp4", "compressed-tensors", 1)]
    report = json.load(open(os.path.join(dst, "conversion_report.json")))
    experts = [m.removesuffix(".weight") for m in expert_weights(open_checkpoint(tiny_mx_src))]
    assert sorted(report["tensors"]) == sorted(experts)
    assert {st["rule"] for st in report["tensors"].values()} == {"exact"}
    written = open_checkpoint(dst)
    data_bytes = sum(i.nbytes for i in written.tensors.values())
    options = Options(max_shard_size=SMALL_SHARDS)
    planned = build_plan(open_checkpoint(tiny_mx_src), options)
    assert planned.output_bytes == data_bytes == written.index_total_size
    assert planned.output_bytes == build_plan(open_checkpoint(tiny_src), options).output_bytes
    assert [s.nbytes for s in planned.shards] == [
        sum(i.nbytes for i in read_header(os.path.join(dst, s.name))[0].values()) for s in planned.shards]


def copy_source(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def rewrite_tensor(root: str, name: str, edit) -> None:
    """Replace one tensor (dtype and shape may change); the index keeps pointing at the same shard."""
    index = json.load(open(os.path.join(root, INDEX_NAME)))
    path = os.path.join(root, index["weight_map"][name])
    infos, _ = read_header(path)
    tensors = {n: read_tensor(i) for n, i in infos.items()}
    tensors[name] = edit(tensors[name])
    save_file(tensors, path)
    index["metadata"]["total_size"] = sum(i.nbytes for n, i in open_checkpoint(root).tensors.items())
    json.dump(index, open(os.path.join(root, INDEX_NAME), "w"))


def test_keep_on_an_mxfp4_expert_is_refused_naming_it(tiny_mx_src):
    with pytest.raises(PlanError) as e:
        build_plan(open_checkpoint(tiny_mx_src), Options(overrides=Overrides(keep=(r"layers\.2\.ffn\.experts\.5\.",))))
    text = "\n".join(e.value.problems)
    assert "layers.2.ffn.experts.5.w1: stored as MXFP4" in text and "layers.2.ffn.experts.5.w2" in text


def test_mxfp4_expert_with_a_float32_scale_is_refused_naming_it(tiny_mx_src, tmp_path):
    src = copy_source(tiny_mx_src, str(tmp_path / "src"))
    rewrite_tensor(src, "layers.1.ffn.experts.0.w2.scale", lambda t: t.to(torch.float32))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "fp8_to_nvfp4_streaming.py"), "--src", src,
                           "--dst", str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "layers.1.ffn.experts.0.w2.weight: I8 (MXFP4) weight with a F32 scale" in proc.stderr
    assert not os.path.exists(tmp_path / "out") or not any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "out"))


def test_nan_mxfp4_scale_stops_the_run_naming_the_tensor(tiny_mx_src, tmp_path):
    src = copy_source(tiny_mx_src, str(tmp_path / "src"))
    name = "mtp.0.ffn.experts.3.w1.scale"

    def poison(t):
        t = t.clone()
        t.view(torch.uint8)[5, 0] = 0xFF
        return t

    rewrite_tensor(src, name, poison)
    dst = str(tmp_path / "out")
    with pytest.raises(ConvertError, match=r"mtp\.0\.ffn\.experts\.3\.w1\.weight: MXFP4 scale holds NaN"):
        convert(src, dst, Options(max_shard_size=SMALL_SHARDS), Settings())
    assert not os.path.exists(os.path.join(dst, INDEX_NAME))
    assert not [f for f in os.listdir(dst) if f.endswith(".partial")]


# ------------------------------------------------------------------------------------------------ inspect
def test_inspect_and_dry_run_name_the_mxfp4_form(tiny_src, tiny_mx_src, tmp_path):
    facts = checkpoint_facts(open_checkpoint(tiny_mx_src))
    assert facts["convertible"] and facts["source"]["form"] == "mxfp4"
    n_experts = len(expert_weights(open_checkpoint(tiny_mx_src)))
    assert facts["mxfp4"] == {"weights": n_experts, "scale_forms": {"UE8M0": n_experts}, "blocks": {"1x32": n_experts}}
    fp8_facts = checkpoint_facts(open_checkpoint(tiny_src))
    assert fp8_facts["source"]["form"] == "fp8" and fp8_facts["mxfp4"]["weights"] == 0
    assert facts["plan"]["output_bytes"] == fp8_facts["plan"]["output_bytes"]
    rows = [p for p in facts["patterns"] if p["category"] == "routed_expert"]
    assert rows and all(p["dtypes"] == {"I8": p["count"]} and p["blocks"] == {"1x32": p["count"]} for p in rows)
    text = render_report(facts)
    assert "routed experts MXFP4 (I8 + F8_E8M0 per 1x32 block)" in text
    assert f"MXFP4: {n_experts} weights in DeepSeek's original form" in text
    dst = str(tmp_path / "dry")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "fp8_to_nvfp4_streaming.py"), "--src", tiny_mx_src,
                           "--dst", dst, "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MXFP4: " in proc.stdout and f"({facts['plan']['output_bytes']:,} bytes)" in proc.stdout
    assert not os.path.exists(dst) or not os.listdir(dst)


def test_inspect_reads_the_full_size_v4_pro_original_layout(tmp_path):
    """DeepSeek-V4-Pro as released: 64 shards, 145,116 tensors, 864,704,792,696 bytes (sparse files here). Its
    speed is bench/bench_inspect.py's to measure, not a timed test's (it took 12 CPU seconds on a loaded CI core)."""
    cfg = model_config("pro-layers", num_hidden_layers=61, n_routed_experts=384)
    assert write_layout(str(tmp_path / "orig"), cfg, "mxfp4") == 864_704_792_696
    facts = checkpoint_facts(open_checkpoint(str(tmp_path / "orig")))
    render_report(facts)
    assert facts["convertible"], facts["problems"][:3]
    assert (facts["source"]["shards"], facts["source"]["tensors"]) == (64, 145_116)
    assert facts["mxfp4"]["weights"] == 62 * 384 * 3 and facts["mxfp4"]["blocks"] == {"1x32": 62 * 384 * 3}
    # The forecast is the repack's: the same model gives the same output (the tiny test shows the forecast exact).
    write_layout(str(tmp_path / "repack"), cfg, "fp8")
    assert facts["plan"]["output_bytes"] == build_plan(open_checkpoint(str(tmp_path / "repack")), Options()).output_bytes
