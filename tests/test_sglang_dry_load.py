"""SGLang 0.5.23's own DeepSeek V4 loader, run dry on CPU: ``--engine sglang`` output loads cleanly, trunk and MTP
draft; the vLLM layouts are named unservable; each planted breach is named.

Needs the SGLang CPU virtualenv: the session builds it once with ``scripts/setup_sglang_cpu.sh`` (idempotent: a
rerun only checks a stamp); where it cannot be built these tests fail, with the reason.
``$NVFP4KIT_SGLANG_PYTHON`` points at an existing SGLang python instead.

All checkpoints go through one SGLang process (importing SGLang is most of a dry load's time).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from test_vllm_dry_load import activation_scales_file, copy_checkpoint, edit_tensors

from nvfp4kit.convert import ConvertError, Settings, convert
from nvfp4kit.mxfp4 import dequantize_mxfp4
from nvfp4kit.plan import Options, PlanError
from nvfp4kit.safetensors_io import read_header, read_tensor
from nvfp4kit.sglang_check import ENV_VAR, SGLangDryLoadResult, run_sglang_dry_load, run_sglang_dry_loads
from nvfp4kit.fixtures.synthetic import generate
from nvfp4kit.verify import all_passed, format_report, verify

SGLANG_VERSION_TESTED = "0.5.23"
HIDDEN = 512  # as the acceptance tests; the tiny preset's 448 loads too (no FP8_PB_WO width rule in SGLang)


# ----------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, str]:
    """The same tiny V4 (hidden 512) in both source forms: the FP8 repack and the original release (MXFP4)."""
    out = {}
    for form in ("fp8", "mxfp4"):
        dst = tmp_path_factory.mktemp(f"src_{form}")
        generate(str(dst), preset="tiny", seed=0, hidden_size=HIDDEN, form=form)
        out[form] = str(dst)
    return out


@pytest.fixture(scope="session")
def outputs(sources, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sglang_outputs")
    scales = activation_scales_file(sources["fp8"], str(root / "act.json"))
    jobs = {
        "sglang from fp8": (sources["fp8"], Options(format="nvidia", engine="sglang"), scales),
        "sglang from mxfp4": (sources["mxfp4"], Options(format="nvidia", engine="sglang"), scales),
        "nvidia for vllm": (sources["fp8"], Options(format="nvidia"), scales),
        "compressed-tensors": (sources["fp8"], Options(), None),
    }
    out = {}
    for tag, (src, options, act) in jobs.items():
        dst = str(root / re.sub(r"\W+", "_", tag))
        convert(src, dst, options, Settings(), activation_scales=act)
        out[tag] = dst
    return out


def stray_fp8_weight_scale(root: str) -> None:
    """A ModelOpt-style weight_scale next to the nvidia layout's FP8 .scale (SGLang only logs a warning)."""
    edit_tensors(root, lambda t: t.update({"layers.0.attn.wq_b.weight_scale": t["layers.0.attn.wq_b.scale"].float()}))


def missing_expert_weight_scale(root: str) -> None:
    edit_tensors(root, lambda t: t.pop("layers.3.ffn.experts.5.w2.weight_scale"))


def missing_expert_w1_input_scale(root: str) -> None:
    """Hidden from sentinels: SGLang lets w3's input scale write the whole expert row."""
    edit_tensors(root, lambda t: t.pop("layers.1.ffn.experts.6.w1.input_scale"))


# Each breach, planted in the --engine sglang output, and what the dry load's problems must name.
BREACHES = {
    "stray wq_b.weight_scale": (stray_fp8_weight_scale, ["layers.0.attn.wq_b.weight_scale"]),
    "missing expert w2.weight_scale": (missing_expert_weight_scale, ["layers.3.ffn.experts.5.w2.weight_scale"]),
    "missing expert w1.input_scale": (missing_expert_w1_input_scale, ["layers.1.ffn.experts.6.w1.input_scale"]),
}


@pytest.fixture(scope="session")
def breached(outputs, tmp_path_factory) -> str:
    """All three breaches in one copy (each one's finding names its own tensor; one load instead of three)."""
    dst = copy_checkpoint(outputs["sglang from fp8"], str(tmp_path_factory.mktemp("sglang_breached") / "out"))
    for plant, _ in BREACHES.values():
        plant(dst)
    return dst


@pytest.fixture(scope="session")
def dry_loads(sglang_python, outputs, breached) -> dict[str, SGLangDryLoadResult]:
    tagged = {**outputs, "breached": breached}
    results = run_sglang_dry_loads(list(tagged.values()), python=sglang_python)
    return {tag: results[os.path.abspath(path)] for tag, path in tagged.items()}


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("output", ["sglang from fp8", "sglang from mxfp4"])
def test_engine_sglang_output_loads_cleanly_trunk_and_draft(dry_loads, output, tiny_config):
    result = dry_loads[output]
    assert result.passed, f"{output}:\n" + "\n".join(result.problems[:20])
    assert result.sglang_version == SGLANG_VERSION_TESTED
    trunk, draft = result.model("trunk"), result.model("draft")
    assert trunk["model_class"] == "DeepseekV4ForCausalLM" and draft["model_class"] == "DeepseekV4ForCausalLMNextN"
    assert trunk["quant_config_class"] == draft["quant_config_class"] == "HybridFp8NvFp4Config"
    assert set(trunk["expert_methods"].values()) == {"ModelOptNvFp4FusedMoEMethod"}
    assert set(draft["expert_methods"].values()) == {"Mxfp4FlashinferTrtllmMoEMethod"}
    assert not trunk["sglang_warnings"] and not draft["sglang_warnings"]
    with open(os.path.join(dry_loads[output].report["checkpoint"], "model.safetensors.index.json")) as f:
        names = json.load(f)["weight_map"]
    assert trunk["tensors_loaded"] == sum(not n.startswith("mtp.") for n in names)
    assert draft["tensors_loaded"] == sum(n.startswith("mtp.") for n in names)


def test_vllm_nvidia_output_is_named_unservable_draft_wrong(dry_loads):
    result = dry_loads["nvidia for vllm"]
    assert not result.passed
    assert result.problems[0].startswith(f"not servable by SGLang {SGLANG_VERSION_TESTED}: draft: mtp.0.ffn.experts")
    assert "--engine sglang" in result.problems[0]
    assert not result.model("trunk")["unreached_tensors"] and not result.model("trunk")["unwritten_parameters"]
    draft = result.model("draft")
    assert any("Some weights are not initialized" in w for w in draft["sglang_warnings"])
    text = "\n".join(result.problems)
    for name in ("mtp.0.ffn.experts.0.w1.weight_scale_2", "mtp.0.ffn.experts.7.w3.input_scale",
                 "model.decoder.mlp.experts.w13_weight_scale_inv"):
        assert name in text


def test_default_output_is_named_unservable_at_build(dry_loads):
    result = dry_loads["compressed-tensors"]
    assert not result.passed
    assert result.problems[0].startswith(f"not servable by SGLang {SGLANG_VERSION_TESTED}: trunk: SGLang cannot build")
    assert "wqkv_a" in result.problems[0]


@pytest.mark.parametrize("breach", list(BREACHES))
def test_each_planted_breach_is_named(dry_loads, breach):
    result = dry_loads["breached"]
    assert not result.passed
    text = "\n".join(result.problems)
    for name in BREACHES[breach][1]:
        assert name in text, f"{breach}: {name} not named in:\n{text}"


def test_missing_w1_input_scale_is_seen_only_by_counting_loader_calls(dry_loads):
    trunk = dry_loads["breached"].model("trunk")
    # w3's input scale filled the whole row: no sentinel is left for it, only the (expert 6, w1) call is missing.
    assert not any("w13_input_scale" in p for p in trunk["unwritten_parameters"])
    assert [p for p in trunk["missing_expert_calls"] if "w13_input_scale" in p] == [
        "model.layers.1.mlp.experts.w13_input_scale: expert 6 shard w1 received no loader call: missing "
        "layers.1.ffn.experts.6.w1.input_scale"
    ]
    assert not any("input_scale" in p for p in trunk["unreached_tensors"])


@pytest.mark.parametrize("form", ["fp8", "mxfp4"])
def test_mtp_experts_are_mxfp4_holding_the_source_values_exactly(sources, outputs, form):
    """I8 codes (element 2i in the low nibble) x E8M0 1x32 scales decode to the source expert bit for bit; the
    trunk's experts stay NVFP4."""
    from nvfp4kit.decode import dequantize as dequantize_source

    out = outputs[f"sglang from {form}"]
    tensors = read_header(os.path.join(out, "model-00001-of-00001.safetensors"))[0]
    src = {}
    for shard in sorted(f for f in os.listdir(sources[form]) if f.endswith(".safetensors")):
        src.update(read_header(os.path.join(sources[form], shard))[0])
    n_experts = 0
    for name in sorted(n for n in tensors if re.match(r"^mtp\.0\.ffn\.experts\.\d+\.w[123]\.weight$", n)):
        module = name.removesuffix(".weight")
        weight, scale = read_tensor(tensors[name]), read_tensor(tensors[module + ".scale"])
        assert weight.dtype == torch.int8 and scale.dtype == torch.float8_e8m0fnu
        assert scale.shape == (weight.shape[0], weight.shape[1] * 2 // 32)
        sw, ss = read_tensor(src[name]), read_tensor(src[module + ".scale"])
        block = (1, 32) if form == "mxfp4" else (128, 128)
        assert torch.equal(dequantize_mxfp4(weight, scale), dequantize_source(sw, ss, block, name))
        n_experts += 1
    assert n_experts == 3 * 8
    assert tensors["layers.0.ffn.experts.0.w1.weight"].dtype == "U8"
    assert "layers.0.ffn.experts.0.w1.weight_scale_2" in tensors
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["quantization_config"]["producer"]["engine"] == "sglang"


@pytest.mark.parametrize("form", ["fp8", "mxfp4"])
def test_engine_sglang_output_passes_verify(outputs, form):
    results = verify(outputs[f"sglang from {form}"], forward=form == "fp8", vllm_generate=False,
                     vllm_dry_load=False)
    assert all_passed(results), format_report(outputs[f"sglang from {form}"], results)


def test_engine_sglang_needs_activation_scales(sources, tmp_path):
    with pytest.raises(PlanError) as e:
        convert(sources["fp8"], str(tmp_path / "out"), Options(format="nvidia", engine="sglang"), Settings())
    assert "--engine sglang" in str(e.value) and "--activation-scales" in str(e.value)


def test_engine_sglang_refuses_other_formats(sources, tmp_path):
    scales = activation_scales_file(sources["fp8"], str(tmp_path / "act.json"))
    with pytest.raises(PlanError, match="--engine sglang writes the nvidia layout"):
        convert(sources["fp8"], str(tmp_path / "out"), Options(format="modelopt", engine="sglang"), Settings(),
                activation_scales=scales)


def test_an_expert_mxfp4_cannot_hold_is_refused_by_name(sources, tmp_path):
    src = copy_checkpoint(sources["fp8"], str(tmp_path / "src"))

    def off_grid(t):  # 1.125 x 2^k is an E4M3 value but no E2M1 one: not MXFP4-origin
        t["mtp.0.ffn.experts.2.w3.weight"] = torch.full_like(t["mtp.0.ffn.experts.2.w3.weight"].float(), 1.125).to(
            torch.float8_e4m3fn)
    edit_tensors(src, off_grid)
    scales = activation_scales_file(src, str(tmp_path / "act.json"))
    with pytest.raises(ConvertError) as e:
        convert(src, str(tmp_path / "out"), Options(format="nvidia", engine="sglang"), Settings(),
                activation_scales=scales)
    assert "mtp.0.ffn.experts.2.w3" in str(e.value) and "SGLANG_DSV4_FP4_EXPERTS=0" in str(e.value)


def test_default_options_json_has_no_engine_key():
    """The default's fingerprint and report stay what they were; the engine is part of them when it is sglang."""
    assert "engine" not in Options().as_json()
    assert Options(format="nvidia", engine="sglang").as_json()["engine"] == "sglang"


def test_missing_sglang_python_is_a_skip_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "no-such-python"))
    result = run_sglang_dry_load(str(tmp_path))
    assert result.skipped and not result.passed
    assert ENV_VAR in result.reason
