"""verify --fidelity on the V3 family (V3 / R1 / V3.1 / V3.2, Hugging Face names): the trunk block by block with
transformers' DeepseekV3/V32 one-layer models, hidden states [T, H], the MTP layer built from vLLM's definition.

Synthetic ``v3-tiny`` / ``v32-tiny``, CPU, few tokens: only the machinery is tested (random weights say nothing
about what NVFP4 costs a trained model, docs/fidelity.md).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys

import pytest

from nvfp4kit import fidelity as fidelity_module
from nvfp4kit.checkpoint import open_checkpoint
from nvfp4kit.convert import Settings, convert
from nvfp4kit.fidelity import MAX_LAYER_REL_ERROR, measure_fidelity
from nvfp4kit.fixtures.synthetic import generate
from nvfp4kit.plan import Options
from nvfp4kit.verify import INCOMPLETE, verdict, verify

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_verify import swap_nibbles  # noqa: E402

TOKENS = 32


@pytest.fixture(scope="module")
def v3(tmp_path_factory) -> dict[str, str]:
    """``src``: v3-tiny (3 layers, layer 0 dense, MTP layer 3); ``out``: Path A's default output of it."""
    base = tmp_path_factory.mktemp("fid_v3")
    src, out = str(base / "src"), str(base / "out")
    generate(src, preset="v3-tiny", seed=0)
    convert(src, out, Options(), Settings())
    return {"src": src, "out": out}


def check_figures(f: dict, layers: int) -> None:
    assert f["kld_mean"] >= 0 and math.isfinite(f["kld_mean"]) and f["finite"]
    assert 0 <= f["top1_agreement"] <= 1 and f["tokens"] == TOKENS - 1
    assert math.isfinite(f["ppl_source"]) and math.isfinite(f["ppl_output"]) and f["ppl_source"] > 1
    assert [e["layer"] for e in f["per_layer"]] == list(range(layers))
    assert f["per_layer"][0]["rel_error"] == 0  # layer 0 is dense, kept FP8: bit for bit the source's


def test_default_output_is_measured_with_its_mtp_layer(v3):
    m = measure_fidelity(v3["out"], v3["src"], tokens=TOKENS)
    f = m["figures"]
    check_figures(f, 3)
    assert m["problems"] == [], m["problems"]
    mtp = f["mtp"]
    assert mtp["measured"] and "V3" in mtp["how"] and mtp["tokens"] == TOKENS - 2
    assert all(0 <= mtp[f"top1_agreement_{s}"] <= 1 for s in ("source", "output"))


def test_reference_policy_has_kld_above_zero(v3, tmp_path):
    ref = str(tmp_path / "ref")
    convert(v3["src"], ref, Options(scale_policy="reference"), Settings())
    m = measure_fidelity(ref, v3["src"], tokens=TOKENS, mtp=False)
    f = m["figures"]
    assert f["kld_mean"] > 0 and f["top1_agreement"] < 1 and m["problems"] == [], m["problems"]
    assert all(e["rel_error"] <= MAX_LAYER_REL_ERROR for e in f["per_layer"])
    assert f["mtp"] == {"measured": False, "reason": "not requested"}


def test_swapped_nibbles_in_the_experts_of_one_layer_fail(v3, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(v3["out"], bad)
    names = [n for n in open_checkpoint(bad).tensors
             if re.match(r"model\.layers\.1\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight_packed$", n)]
    assert len(names) == 24
    for name in names:
        swap_nibbles(bad, name)
    results = verify(bad, v3["src"], forward=False, vllm_generate=False, vllm_dry_load=False, fidelity=True,
                     fidelity_tokens=TOKENS)
    check = {r.name: r for r in results}["fidelity"]
    assert check.status == "FAIL", check
    assert check.details["per_layer"][0]["rel_error"] == 0
    assert check.details["per_layer"][1]["rel_error"] > MAX_LAYER_REL_ERROR


def test_w4a4_output_quantizes_the_v3_experts_activations(v3, tmp_path):
    """ModelOpt W4A4 (input scales on every routed expert): served as vLLM serves it, the activations of the V3
    experts are quantized (serve_w4a4 reads V3's expert names), so it differs from the same weights W4A16."""
    experts = sorted({n.rsplit(".", 1)[0] for n in open_checkpoint(v3["src"]).tensors
                      if re.search(r"\.experts\.\d+\.\w+_proj\.weight$", n)})
    act = tmp_path / "act.json"
    act.write_text(json.dumps({"input_amax": {m: 4.0 + i % 5 for i, m in enumerate(experts)}}))
    out = str(tmp_path / "w4a4")
    convert(v3["src"], out, Options(format="modelopt"), Settings(), activation_scales=str(act))
    a4 = measure_fidelity(out, v3["src"], tokens=TOKENS, mtp=False)["figures"]
    a16 = measure_fidelity(out, v3["src"], tokens=TOKENS, mtp=False, quantize_activations=False)["figures"]
    assert a4["w4a4"] and not a16["w4a4"]
    assert a4["per_layer"][1]["rel_error"] != a16["per_layer"][1]["rel_error"]


def test_v32_is_measured(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    generate(src, preset="v32-tiny", seed=0)
    convert(src, out, Options(), Settings())
    m = measure_fidelity(out, src, tokens=TOKENS)
    check_figures(m["figures"], int(open_checkpoint(src).config["num_hidden_layers"]))
    assert m["figures"]["mtp"]["measured"]


def test_a_family_not_measured_is_not_run_and_the_result_incomplete(v3, monkeypatch):
    """A requested measurement that cannot run for a family says why in one line and never passes."""
    monkeypatch.setattr(fidelity_module, "MEASURED_FAMILIES", ("deepseek_v4",))
    results = verify(v3["out"], v3["src"], forward=False, vllm_generate=False, vllm_dry_load=False, fidelity=True,
                     fidelity_tokens=TOKENS)
    check = {r.name: r for r in results}["fidelity"]
    assert check.status == "NOT RUN" and check.evidence == ["fidelity is not measured for DeepSeek V3 (block_forward "
                                                            "still applies)"]
    assert verdict(results) == INCOMPLETE
    with pytest.raises(ValueError, match="not measured for DeepSeek V3"):
        measure_fidelity(v3["out"], v3["src"], tokens=TOKENS)
