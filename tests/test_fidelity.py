"""verify --fidelity: the whole model teacher-forced on text, source weights vs output weights, one block at a time.

Tiny synthetic checkpoint, CPU, a few dozen tokens. The synthetic model only tests the machinery: its random weights
say nothing about what NVFP4 costs a trained model (docs/fidelity.md).
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import sys

import pytest
import torch

from nvfp4kit.card import FIDELITY_BEGIN, split_front_matter
from nvfp4kit.checkpoint import open_checkpoint
from nvfp4kit.convert import Settings, convert
from nvfp4kit.fidelity import (
    MAX_LAYER_REL_ERROR,
    experts_forward,
    fake_quantize_activations,
    judge,
    measure_fidelity,
    one_block_model,
    token_sequences,
)
from nvfp4kit.hf_model import dequantized_source
from nvfp4kit.plan import Options

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_verify import swap_nibbles  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = 64


def fidelity(dst: str, src: str, mtp: bool = False) -> dict:
    return measure_fidelity(dst, src, tokens=TOKENS, mtp=mtp)


@pytest.fixture(scope="module")
def reference_out(tiny_src, tmp_path_factory) -> str:
    dst = str(tmp_path_factory.mktemp("fid_ref"))
    convert(tiny_src, dst, Options(scale_policy="reference"), Settings())
    return dst


def test_lossless_output_has_zero_kld_and_verify_writes_the_card(tiny_src, tiny_out, tmp_path, monkeypatch, capsys):
    """Every tensor of the default output is exact: identical logits, so KLD 0, top-1 1, equal perplexities."""
    out = str(tmp_path / "out")
    shutil.copytree(tiny_out, out)
    report = tmp_path / "verify.json"
    monkeypatch.setattr(sys, "argv", ["verify_nvfp4.py", out, "--src", tiny_src, "--fidelity", "--fidelity-tokens",
                                      str(TOKENS), "--no-forward", "--no-vllm-dry-load", "--json", str(report)])
    with pytest.raises(SystemExit) as exit_code:
        runpy.run_path(os.path.join(ROOT, "verify_nvfp4.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert exit_code.value.code == 0, printed
    check = {c["name"]: c for c in json.loads(report.read_text())["checks"]}["fidelity"]
    assert check["status"] == "PASS", check
    d = check["details"]
    assert d["tokens"] == TOKENS - 1  # one sequence of TOKENS tokens: every position but the last is scored
    assert d["kld_mean"] == 0.0 and d["kld_max"] == 0.0 and d["top1_agreement"] == 1.0
    assert d["ppl_source"] == d["ppl_output"] and d["ppl_source"] > 1
    assert [e["layer"] for e in d["per_layer"]] == list(range(5)) and all(e["rel_error"] == 0 for e in d["per_layer"])
    mtp = d["mtp"]
    assert mtp["measured"] and mtp["top1_agreement_source"] == mtp["top1_agreement_output"]
    assert 0 <= mtp["top1_agreement_source"] <= 1 and mtp["tokens"] == TOKENS - 2
    # The card now carries the figures, inside its marked section, and still parses.
    meta, body = split_front_matter(open(os.path.join(out, "README.md"), encoding="utf-8").read())
    assert meta["base_model_relation"] == "quantized"
    section = body[body.index(FIDELITY_BEGIN):]
    assert "`verify_nvfp4.py --fidelity`: PASS" in section and f"{TOKENS - 1} tokens" in section
    assert "| top-1 agreement | 1.0000 |" in section and "| KLD(source \\|\\| output), mean / max (nats) | 0 / 0 |" in section
    assert "Not measured yet" not in body


def test_reference_rule_has_kld_above_zero_and_passes(tiny_src, reference_out):
    m = fidelity(reference_out, tiny_src)
    f = m["figures"]
    assert f["kld_mean"] > 0 and f["kld_max"] >= f["kld_mean"] and f["top1_agreement"] < 1
    assert all(0 < e["rel_error"] <= MAX_LAYER_REL_ERROR for e in f["per_layer"])
    assert m["problems"] == [], m["problems"]  # rounding noise is within the bounds
    assert f["mtp"] == {"measured": False, "reason": "not requested"}


def test_swapped_nibbles_in_the_experts_of_one_layer_fail(tiny_src, tiny_out, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(tiny_out, bad)
    names = [n for n in open_checkpoint(bad).tensors if re.match(r"layers\.1\.ffn\.experts\.\d+\.w\d\.weight_packed$", n)]
    assert len(names) == 24
    for name in names:
        swap_nibbles(bad, name)
    m = fidelity(bad, tiny_src)
    f = m["figures"]
    assert f["per_layer"][0]["rel_error"] == 0 and f["per_layer"][1]["rel_error"] > MAX_LAYER_REL_ERROR
    assert m["problems"] and any("after blocks [1," in p for p in m["problems"]), m["problems"]
    assert judge(f) == m["problems"]


def test_w4a4_costs_more_than_the_same_weights_served_w4a16(tiny_src, tiny_out, tmp_path):
    """Path A --format nvidia --activation-scales F: the same NVFP4 weights as the default output (exact), with
    activations quantized as vLLM serves W4A4; the W4A16 output measures KLD 0, the W4A4 one more."""
    experts = sorted({n.rsplit(".", 1)[0] for n in open_checkpoint(tiny_src).tensors if ".experts." in n})
    act = tmp_path / "act.json"
    act.write_text(json.dumps({"input_amax": {m: 4.0 + i % 5 for i, m in enumerate(experts)}}))
    w4a4 = str(tmp_path / "w4a4")
    convert(tiny_src, w4a4, Options(format="nvidia"), Settings(), activation_scales=str(act))
    a4 = fidelity(w4a4, tiny_src)["figures"]
    a16 = fidelity(tiny_out, tiny_src)["figures"]
    assert a4["w4a4"] and not a16["w4a4"]
    assert a16["kld_mean"] == 0 and a4["kld_mean"] > a16["kld_mean"]
    assert a4["per_layer"][0]["rel_error"] > 0


def test_expert_loop_with_identity_equals_transformers(tiny_src):
    """The loop that W4A4 inserts activation quantization into is transformers' own when nothing is quantized."""
    src = open_checkpoint(tiny_src)
    model = one_block_model(src, 3, dequantized_source(src), {}, torch.float32)
    experts = model.model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(40, int(src.config["hidden_size"]), generator=gen)
    index = torch.stack([torch.randperm(experts.num_experts, generator=gen)[:2] for _ in range(40)])
    weights = torch.rand(40, 2, generator=gen)
    with torch.no_grad():
        assert torch.equal(experts_forward(experts, h, index, weights, lambda x, e, g: x), experts(h, index, weights))


def vllm_style_fp4(x: torch.Tensor) -> torch.Tensor:
    """An independent E2M1 rounding, as vLLM's cast_to_fp4 writes it (interval by interval)."""
    s, a = torch.sign(x), x.abs()
    out = torch.full_like(a, 6.0)
    for lo, hi, v, lo_in, hi_in in ((0, .25, 0, 1, 1), (.25, .75, .5, 0, 0), (.75, 1.25, 1, 1, 1), (1.25, 1.75, 1.5, 0, 0),
                                    (1.75, 2.5, 2, 1, 1), (2.5, 3.5, 3, 0, 0), (3.5, 5, 4, 1, 1)):
        inside = ((a >= lo) if lo_in else (a > lo)) & ((a <= hi) if hi_in else (a < hi))
        out = torch.where(inside, torch.tensor(float(v)), out)
    return out * s


def test_activation_quantization_matches_vllms_reference(gen, seed):
    x = torch.randn(8, 64, generator=gen) * torch.exp(torch.randn(8, 1, generator=gen))
    amax = float(x.abs().max()) * 0.8  # some blocks saturate, as with a calibrated amax below a new input's
    g = torch.tensor(2688.0 / amax)
    blocks = x.view(8, 4, 16)
    scale = (g * blocks.abs().amax(-1, keepdim=True) / 6).clamp(max=448).to(torch.float8_e4m3fn).float()
    expected = (vllm_style_fp4((blocks * (1 / (scale * (1 / g)))).clamp(-6, 6)) * (scale / g)).view(8, 64)
    got = fake_quantize_activations(x, amax)
    assert torch.allclose(got, expected, rtol=1e-6, atol=0), f"seed {seed}"
    assert (got != x).any()
    # Values already on the grid of their block (power-of-two scales, global scale 1) come back unchanged.
    codes = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6] * 2)
    on_grid = torch.stack([codes * 2.0**k for k in range(-3, 5)])
    assert torch.equal(fake_quantize_activations(on_grid, 2688.0), on_grid)


def test_text_set_is_found_and_rendered_through_the_checkpoint(tiny_src, tmp_path):
    seqs = token_sequences(tiny_src, os.path.join(ROOT, "nvfp4kit", "data", "fidelity.jsonl"), 3000)
    assert sum(len(s) for s in seqs) == 3000 and len(seqs) >= 4
    # The synthetic checkpoint's encoder joins the contents; its tokenizer maps bytes to ids 2..257.
    assert all(int(s.min()) >= 2 and int(s.max()) < 258 for s in seqs)
    text = tmp_path / "plain.txt"
    text.write_text("first paragraph of text\n\nsecond one")
    assert [len(s) for s in token_sequences(tiny_src, str(text), 100)] == [23, 10]


def test_bfloat16_runs_as_on_a_gpu_and_mtp_in_a_model_shorter_than_its_hash_layers(tmp_path):
    """The dtype a GPU run uses (norms and mHC stay float32 in transformers, linears bfloat16), on a 2-layer model
    (fewer layers than ``num_hash_layers``, as the device's pro-layers checkpoints): a lossless output measures
    KLD 0, and the MTP block (learned router whatever its index) is measured."""
    import torch

    from nvfp4kit.convert import Settings, convert
    from nvfp4kit.fidelity import measure_fidelity
    from nvfp4kit.plan import Options
    from nvfp4kit.fixtures.synthetic import generate

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    generate(src, preset="tiny", seed=3, num_hidden_layers=2, n_routed_experts=4)
    convert(src, out, Options(), Settings())
    r = measure_fidelity(out, src, tokens=64, device="cpu", dtype=torch.bfloat16)
    assert r["problems"] == [] and r["figures"]["kld_mean"] == 0.0 and r["figures"]["top1_agreement"] == 1.0
    mtp = r["figures"]["mtp"]
    assert mtp["measured"] and mtp["top1_agreement_source"] == mtp["top1_agreement_output"]
