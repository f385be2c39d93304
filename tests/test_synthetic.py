"""The synthetic V4 FP8 checkpoint matches the real layout (docs/v4-layout.md) name for name."""

from __future__ import annotations

import filecmp
import json
import math
import os
import re

import pytest
import torch

from nvfp4kit.checkpoint import INDEX_NAME, open_checkpoint
from nvfp4kit.fp8 import dequantize_fp8_blocks
from nvfp4kit.safetensors_io import read_tensor
from nvfp4kit.fixtures.synthetic import generate

# The per-layer table of docs/v4-layout.md §2.2, written out independently of the generator.
# {c} marks a tensor that exists for every routed expert.
COMMON = """
hc_attn_fn hc_attn_base hc_attn_scale hc_ffn_fn hc_ffn_base hc_ffn_scale
attn_norm.weight ffn_norm.weight attn.attn_sink attn.q_norm.weight attn.kv_norm.weight
attn.wq_a.weight attn.wq_a.scale attn.wq_b.weight attn.wq_b.scale attn.wkv.weight attn.wkv.scale
attn.wo_a.weight attn.wo_a.scale attn.wo_b.weight attn.wo_b.scale
ffn.gate.weight
ffn.shared_experts.w1.weight ffn.shared_experts.w1.scale ffn.shared_experts.w2.weight ffn.shared_experts.w2.scale
ffn.shared_experts.w3.weight ffn.shared_experts.w3.scale
""".split()
EXPERT = [f"ffn.experts.{{e}}.w{k}.{s}" for k in (1, 2, 3) for s in ("weight", "scale")]
COMPRESSOR = "attn.compressor.ape attn.compressor.wkv.weight attn.compressor.wgate.weight attn.compressor.norm.weight".split()
INDEXER = """
attn.indexer.wq_b.weight attn.indexer.wq_b.scale attn.indexer.weights_proj.weight attn.indexer.compressor.ape
attn.indexer.compressor.wkv.weight attn.indexer.compressor.wgate.weight attn.indexer.compressor.norm.weight
""".split()
MTP_EXTRA = """
e_proj.weight e_proj.scale h_proj.weight h_proj.scale enorm.weight hnorm.weight norm.weight
hc_head_fn hc_head_base hc_head_scale
""".split()
TOP_LEVEL = "embed.weight head.weight norm.weight hc_head_fn hc_head_base hc_head_scale".split()


def expected_names(cfg: dict) -> set[str]:
    """Every tensor name the layout doc prescribes for a config (its §2.1, §2.2 and §2.4)."""
    experts = [n.format(e=e) for e in range(cfg["n_routed_experts"]) for n in EXPERT]
    names = set(TOP_LEVEL)
    ratios = cfg["compress_ratios"]
    for n in range(cfg["num_hidden_layers"]):
        router = "ffn.gate.tid2eid" if n < cfg["num_hash_layers"] else "ffn.gate.bias"
        per_layer = COMMON + experts + COMPRESSOR + [router] + (INDEXER if ratios[n] == 4 else [])
        names |= {f"layers.{n}.{s}" for s in per_layer}
    names |= {f"mtp.0.{s}" for s in COMMON + experts + ["ffn.gate.bias"] + MTP_EXTRA}
    return names


def fp8_weights(ckpt) -> list[str]:
    return [n for n, t in ckpt.tensors.items() if t.dtype == "F8_E4M3"]


@pytest.fixture(scope="module")
def ckpt(tiny_src):
    return open_checkpoint(tiny_src)


def test_index_complete_and_total_size_right(tiny_src, ckpt):
    assert ckpt.problems == []
    with open(os.path.join(tiny_src, INDEX_NAME)) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(ckpt.tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in ckpt.tensors.values())
    assert len(ckpt.shards) == ckpt.config["num_hidden_layers"] + 3


def test_names_match_layout_doc(ckpt, tiny_config):
    assert set(ckpt.tensors) == expected_names(tiny_config)
    # the tiny preset exercises every layer kind of the doc's §2.4 table
    ratios, n_hash = tiny_config["compress_ratios"], tiny_config["num_hash_layers"]
    kinds = {(ratios[n], n < n_hash) for n in range(tiny_config["num_hidden_layers"])}
    assert kinds == {(128, True), (4, True), (128, False), (4, False)}
    assert ratios[-1] == 0 and len(ratios) == tiny_config["num_hidden_layers"] + 1


def test_counts_per_layer_follow_doc_formulas(ckpt, tiny_config):
    E = tiny_config["n_routed_experts"]
    counts: dict[str, int] = {}
    for name in ckpt.tensors:
        m = re.match(r"^(layers\.\d+|mtp\.0)\.", name)
        counts[m.group(1) if m else "top"] = counts.get(m.group(1) if m else "top", 0) + 1
    hca, csa, mtp = 33 + 6 * E, 40 + 6 * E, 39 + 6 * E  # 2337 / 2344 / 2343 at E = 384
    for n, r in enumerate(tiny_config["compress_ratios"][:-1]):
        assert counts[f"layers.{n}"] == (csa if r == 4 else hca)
    assert counts["mtp.0"] == mtp and counts["top"] == 6


def test_shapes_and_dtypes(ckpt, tiny_config):
    c = tiny_config
    H, Q, D, nH = c["hidden_size"], c["q_lora_rank"], c["head_dim"], c["num_attention_heads"]
    G, R, I, E, hc = c["o_groups"], c["o_lora_rank"], c["moe_intermediate_size"], c["n_routed_experts"], c["hc_mult"]
    t = ckpt.tensors
    expect = {
        "embed.weight": ("BF16", (c["vocab_size"], H)),
        "hc_head_fn": ("F32", (hc, hc * H)),
        "hc_head_scale": ("F32", (1,)),
        "layers.0.hc_attn_fn": ("F32", ((2 + hc) * hc, hc * H)),
        "layers.0.hc_attn_scale": ("F32", (3,)),
        "layers.0.attn.attn_sink": ("F32", (nH,)),
        "layers.0.attn.wq_b.weight": ("F8_E4M3", (nH * D, Q)),
        "layers.0.attn.wo_a.weight": ("F8_E4M3", (G * R, nH * D // G)),
        "layers.0.attn.wq_a.scale": ("F8_E8M0", (math.ceil(Q / 128), math.ceil(H / 128))),
        "layers.0.attn.compressor.ape": ("F32", (128, D)),
        "layers.2.attn.compressor.ape": ("F32", (4, 2 * D)),
        "layers.2.attn.compressor.wkv.weight": ("BF16", (2 * D, H)),
        "layers.2.attn.indexer.compressor.ape": ("F32", (4, 2 * c["index_head_dim"])),
        "layers.0.ffn.gate.tid2eid": ("I64", (c["vocab_size"], c["num_experts_per_tok"])),
        "layers.3.ffn.gate.bias": ("F32", (E,)),
        "layers.3.ffn.experts.0.w2.weight": ("F8_E4M3", (H, I)),
        "layers.3.ffn.experts.0.w2.scale": ("F8_E8M0", (math.ceil(H / 128), math.ceil(I / 128))),
        "mtp.0.e_proj.weight": ("F8_E4M3", (H, H)),
    }
    for name, (dtype, shape) in expect.items():
        assert (t[name].dtype, t[name].shape) == (dtype, shape), name
    # vLLM's fused FP8 shards need these multiples of 128 (vllm-v4-contract.md §10); hidden is not, on purpose.
    assert Q % 128 == 0 and I % 128 == 0 and D in (128, 512) and c["index_head_dim"] == 128
    assert any(s % 128 for n in fp8_weights(ckpt) for s in t[n].shape), "no partial FP8 edge block"
    for n in fp8_weights(ckpt):
        assert t[n[: -len("weight")] + "scale"].dtype == "F8_E8M0"


def test_split_shard_cases_exist(ckpt):
    experts = {re.sub(r"\.w[13]\.weight$", "", n) for n in ckpt.tensors if re.search(r"experts\.\d+\.w1\.weight$", n)}
    assert any(ckpt.shard_of(e + ".w1.weight") != ckpt.shard_of(e + ".w3.weight") for e in experts)
    assert any(ckpt.shard_of(n) != ckpt.shard_of(n[: -len("weight")] + "scale") for n in fp8_weights(ckpt))
    assert ckpt.shard_of("embed.weight").startswith("model-00001-")
    last, second_last = ckpt.shards[-1], ckpt.shards[-2]
    assert {ckpt.shard_of(n) for n in ckpt.tensors if n.startswith("mtp.")} == {last}
    assert {ckpt.shard_of(n) for n in ("head.weight", "norm.weight", "hc_head_fn")} == {second_last}


def test_same_seed_same_bytes_other_seed_differs(tiny_src, tmp_path):
    """The fixture was drawn one tensor at a time; four at a time must give the same bytes."""
    generate(str(tmp_path / "again"), preset="tiny", seed=0, jobs=4)
    generate(str(tmp_path / "other"), preset="tiny", seed=1)
    assert sorted(os.listdir(tmp_path / "again")) == sorted(os.listdir(tiny_src))
    names = sorted(n for n in os.listdir(tiny_src) if os.path.isfile(os.path.join(tiny_src, n)))
    same, diff, errors = filecmp.cmpfiles(tiny_src, tmp_path / "again", names, shallow=False)
    assert (diff, errors, same) == ([], [], names)
    shards = [n for n in names if n.endswith(".safetensors")]
    _, changed, _ = filecmp.cmpfiles(tiny_src, tmp_path / "other", shards, shallow=False)
    assert changed == shards


def e2m1_times_power_of_two(blocks: torch.Tensor) -> bool:
    """Whether every row of ``blocks`` [n, 32] is E2M1 values times one power of two.

    The candidate power is 2^(floor(log2(amax)) - 2), which puts the largest magnitude in [4, 8): a genuine block
    q * 2^e with largest code q_max sits on the E2M1 grid at that power too (q_max 0.5..6 just scale up to 4 or 6).
    """
    amax = blocks.abs().amax(dim=1, keepdim=True)
    power = torch.exp2(torch.floor(torch.log2(amax.clamp(min=2.0**-126))) - 2)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    codes = (blocks / power).abs()
    return bool((codes.unsqueeze(-1) == grid).any(-1).all())


def test_experts_are_exact_mxfp4(ckpt):
    experts = [n for n in fp8_weights(ckpt) if re.search(r"\.experts\.\d+\.w[123]\.weight$", n)]
    assert experts
    for name in experts[::7] + [n for n in experts if n.startswith("mtp.")][:3]:
        weight = read_tensor(ckpt.tensors[name])
        scale = read_tensor(ckpt.tensors[name[: -len("weight")] + "scale"])
        value = dequantize_fp8_blocks(weight, scale, (128, 128), name)
        assert e2m1_times_power_of_two(value.reshape(-1, 32)), name
    # dense FP8 weights are not MXFP4: the property is not trivially true
    dense = read_tensor(ckpt.tensors["layers.0.attn.wq_a.weight"]).to(torch.float32)
    assert not e2m1_times_power_of_two(dense.reshape(-1, 32))


def test_weights_have_trained_statistics(ckpt):
    w = dequantize_fp8_blocks(
        read_tensor(ckpt.tensors["layers.0.attn.wq_b.weight"]), read_tensor(ckpt.tensors["layers.0.attn.wq_b.scale"]), (128, 128)
    )
    x = w.flatten()
    kurtosis = float(((x - x.mean()) ** 4).mean() / x.var() ** 2)
    assert kurtosis > 4.0  # heavier tails than a Gaussian (3) or uniform (1.8)
    row_rms = w.pow(2).mean(dim=1).sqrt()
    assert float(row_rms.max() / row_rms.min()) > 4.0  # per-output-channel spread
    assert float(x.abs().max() / x.std()) > 15.0  # outliers


def test_f32_scale_variant_holds_same_values(tiny_src, tmp_path):
    generate(str(tmp_path / "f32"), preset="tiny", seed=0, scale_dtype="f32", num_hidden_layers=1, n_routed_experts=2)
    generate(str(tmp_path / "e8m0"), preset="tiny", seed=0, num_hidden_layers=1, n_routed_experts=2)
    a, b = open_checkpoint(str(tmp_path / "f32")), open_checkpoint(str(tmp_path / "e8m0"))
    assert a.problems == [] and set(a.tensors) == set(b.tensors)
    for name in ("layers.0.attn.wq_a.scale", "layers.0.ffn.experts.1.w2.scale"):
        assert a.tensors[name].dtype == "F32"
        assert torch.equal(read_tensor(a.tensors[name]), read_tensor(b.tensors[name]).to(torch.float32))


def test_non_tensor_files_and_config(tiny_src, tiny_config):
    for rel in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "encoding/encoding_dsv4.py", "inference/README.md"):
        assert os.path.getsize(os.path.join(tiny_src, rel)) > 0, rel
    assert tiny_config["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    }
    assert "expert_dtype" not in tiny_config
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tiny_src, "tokenizer.json"))
    ids = tok.encode("héllo").ids
    assert ids and max(ids) < tiny_config["vocab_size"] and tok.decode(ids) == "héllo"


def test_transformers_loads_every_key_and_gives_finite_logits(tiny_src, tiny_config):
    from nvfp4kit.hf_model import load_dequantized_hf_model

    # load_dequantized_hf_model raises on any missing, unexpected or mismatched key
    model = load_dequantized_hf_model(tiny_src)
    ckpt = open_checkpoint(tiny_src)
    params = dict(model.named_parameters())
    wq_a = dequantize_fp8_blocks(
        read_tensor(ckpt.tensors["layers.3.attn.wq_a.weight"]), read_tensor(ckpt.tensors["layers.3.attn.wq_a.scale"]), (128, 128)
    )
    assert torch.equal(params["model.layers.3.self_attn.q_a_proj.weight"], wq_a)
    ids = torch.randint(0, tiny_config["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 9, tiny_config["vocab_size"]) and bool(torch.isfinite(logits).all())
    assert float(logits.std()) > 0


def test_transformers_one_block_model_with_supplied_tensors(tiny_src):
    from nvfp4kit.hf_model import dequantized_source, load_dequantized_hf_model

    ckpt = open_checkpoint(tiny_src)
    read = dequantized_source(ckpt)
    zeroed = "layers.4.ffn.shared_experts.w2.weight"
    model = load_dequantized_hf_model(tiny_src, layers=[4], tensors=lambda n: read(n) * 0 if n == zeroed else read(n))
    assert len(model.model.layers) == 1 and model.config.layer_types == ["compressed_sparse_attention"]
    assert model.config.mlp_layer_types == ["moe"]
    assert not model.model.layers[0].mlp.shared_experts.down_proj.weight.any()
