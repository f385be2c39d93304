"""DeepSeek V3 / R1 / V3.1 and V3.2 on the synthetic ``v3-tiny`` / ``v32-tiny`` checkpoints: the family is chosen
and confirmed, Path A converts them with the V3 rules (routed experts NVFP4 with ModelOpt's bytes, fused pairs
sharing one global scale, everything else bit for bit), verify passes, vLLM's own V3 / V3.2 loaders (trunk and
MTP) accept every tensor, and a model the kit has no family for is refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nvfp4kit.checkpoint import open_checkpoint
from nvfp4kit.convert import Settings, convert
from nvfp4kit.decode import dequantize, scale_block
from nvfp4kit.families import family_for, family_problems, structure_problems
from nvfp4kit.families.v3 import V3, V32
from nvfp4kit.families.v4 import V4
from nvfp4kit.hf_model import dequantized_source
from nvfp4kit.plan import Options, PlanError, build_plan
from nvfp4kit.report import checkpoint_facts
from nvfp4kit.safetensors_io import read_tensor
from nvfp4kit.fixtures.synthetic import generate, model_config
from nvfp4kit.verify import verify
from nvfp4kit.vllm_check import run_vllm_dry_loads
from test_vllm_dry_load import activation_scales_file, copy_checkpoint, edit_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("v3-tiny", "v32-tiny")
QKV_A = r"self_attn\.(q_a_proj|kv_a_proj_with_mqa)$"  # --quantize: the fused pair, with its partial 576-row block


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("v3src")
    out = {}
    for preset in PRESETS:
        out[preset] = str(base / preset)
        generate(out[preset], preset=preset, seed=0, jobs=2)
    return out


@pytest.fixture(scope="module")
def outputs(sources, tmp_path_factory) -> dict[tuple[str, str], str]:
    """(preset, kind) -> output: ``default`` (the CLI, default flags), ``modelopt`` (auto policy), ``qkv_a``
    (compressed-tensors with the fused q_a/kv_a pair quantized too)."""
    base = tmp_path_factory.mktemp("v3out")
    out = {}
    for preset, src in sources.items():
        dst = str(base / f"{preset}-default")
        proc = run("fp8_to_nvfp4_streaming.py", "--src", src, "--dst", dst, "--device", "cpu")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[preset, "default"] = dst
        out[preset, "modelopt"] = str(base / f"{preset}-modelopt")
        convert(src, out[preset, "modelopt"], Options(format="modelopt"), Settings())
    out["v3-tiny", "qkv_a"] = str(base / "v3-tiny-qkv_a")
    convert(sources["v3-tiny"], out["v3-tiny", "qkv_a"], Options(overrides=_quantize(QKV_A)), Settings())
    # W4A4: an input amax for every routed expert (--activation-scales)
    out["v32-tiny", "w4a4"] = str(base / "v32-tiny-w4a4")
    scales = activation_scales_file(sources["v32-tiny"], str(base / "act.json"))
    convert(sources["v32-tiny"], out["v32-tiny", "w4a4"], Options(), Settings(), activation_scales=scales)
    return out


def _quantize(pattern: str):
    from nvfp4kit.rules import Overrides

    return Overrides(quantize=(pattern,))


def load(folder: str, name: str) -> torch.Tensor:
    return read_tensor(open_checkpoint(folder).tensors[name])


def actions(folder: str) -> dict[str, str]:
    with open(os.path.join(folder, ".nvfp4kit", "plan.json")) as f:
        return json.load(f)["actions"]


# ------------------------------------------------------------------------------------------------------ family
def test_family_comes_from_config_and_is_confirmed_by_the_tensor_names(sources):
    assert family_for(model_config("v3-tiny")) is V3 and family_for(model_config("v32-tiny")) is V32
    assert family_for(model_config("tiny")) is V4
    assert family_for({"model_type": "deepseek_v3"}) is V3  # no architectures: model_type decides
    assert family_for({"architectures": ["LlamaForCausalLM"], "model_type": "deepseek_v3"}) is None
    v3_names = list(open_checkpoint(sources["v3-tiny"]).tensors)
    # a V3.2 config over V3 tensors (no indexer): refused, naming whose names they are
    [line] = family_problems(model_config("v32-tiny"), v3_names)
    assert "DeepSeek V3.2" in line and "DeepSeek V3's" in line
    # a V3 config over V3.2 tensors: the indexer is no V3 tensor
    ckpt = open_checkpoint(sources["v32-tiny"])
    ckpt.config.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
    with pytest.raises(PlanError) as e:
        build_plan(ckpt, Options())
    assert "self_attn.indexer.wq_b.weight: no rule of the DeepSeek V3 family knows this tensor" in str(e.value)


def test_structure_counts_the_mtp_layer_apart(sources):
    ckpt = open_checkpoint(sources["v3-tiny"])
    shapes = {n: t.shape for n, t in ckpt.tensors.items()}
    assert structure_problems(ckpt.config, shapes) == []
    fewer = dict(ckpt.config, num_nextn_predict_layers=0)
    assert any("num_nextn_predict_layers=0, but the tensors hold MTP blocks 0-0" in p
               for p in structure_problems(fewer, shapes))
    wider = dict(ckpt.config, moe_intermediate_size=256)
    assert any("has 128 rows, but config.json says moe_intermediate_size=256" in p
               for p in structure_problems(wider, shapes))


def test_inspect_reads_v3_with_its_own_rules(sources):
    facts = checkpoint_facts(open_checkpoint(sources["v32-tiny"]))
    assert facts["convertible"] and facts["family"] == "deepseek_v32"
    assert facts["counts"]["decoder_layers"] == 3 and facts["counts"]["mtp_blocks"] == 1
    assert facts["counts"]["routed_experts"] == 8 * 3  # layers 1, 2 and the MTP layer 3
    assert "other" not in facts["categories"]
    by_pattern = {p["pattern"]: p["actions"] for p in facts["patterns"]}
    assert by_pattern["model.layers.{L}.mlp.experts.{E}.gate_proj.weight"] == {"quantize": 24}
    assert by_pattern["model.layers.{L}.self_attn.indexer.wk.weight"] == {"keep_fp8": 4}


# ------------------------------------------------------------------------------------------------------ Path A
@pytest.mark.parametrize("preset", PRESETS)
def test_default_rules_routed_experts_nvfp4_the_rest_as_it_must_stay(preset, sources, outputs):
    acts = actions(outputs[preset, "default"])
    src = open_checkpoint(sources[preset])
    for module, action in acts.items():
        routed = ".mlp.experts." in module
        assert (action == "quantize") == routed, (module, action)
    for name in ("model.layers.3.eh_proj.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.mlp.gate.e_score_correction_bias", "lm_head.weight",
                 "model.layers.3.shared_head.head.weight", "model.embed_tokens.weight"):
        assert acts[name] == "keep" and src.tensors[name].dtype in ("BF16", "F32"), name
    if preset == "v32-tiny":
        assert acts["model.layers.0.self_attn.indexer.wk"] == "keep_fp8"
        assert acts["model.layers.0.self_attn.indexer.weights_proj.weight"] == "keep"
        assert src.tensors["model.layers.0.self_attn.indexer.k_norm.bias"].dtype == "F32"
    assert any(".experts." in n and n.startswith("model.layers.3.") and n.endswith(".weight_packed")
               for n in open_checkpoint(outputs[preset, "default"]).tensors), "the MTP layer's experts are NVFP4"


@pytest.mark.parametrize("preset", PRESETS)
def test_kept_tensors_are_bit_for_bit(preset, sources, outputs):
    src = open_checkpoint(sources[preset])
    out = outputs[preset, "default"]
    kept = 0
    for name, action in actions(out).items():
        if action == "keep":
            assert torch.equal(load(out, name).view(torch.uint8), read_tensor(src.tensors[name]).view(torch.uint8)), name
        elif action == "keep_fp8":
            assert torch.equal(load(out, name + ".weight").view(torch.uint8),
                               read_tensor(src.tensors[name + ".weight"]).view(torch.uint8)), name
            scale_inv = read_tensor(src.tensors[name + ".weight_scale_inv"])
            assert scale_inv.dtype == torch.float32 and torch.equal(load(out, name + ".weight_scale"), scale_inv), name
        kept += action != "quantize"
    assert kept >= 63  # every tensor but the 72 routed experts (V3: 32 FP8 modules + 31 other tensors)


@pytest.mark.parametrize("preset", PRESETS)
def test_gate_and_up_share_one_global_scale_also_across_source_shards(preset, sources, outputs):
    src = open_checkpoint(sources[preset])
    split = [n[: -len(".gate_proj.weight")] for n in src.tensors if n.endswith(".gate_proj.weight")
             and src.shard_of(n) != src.shard_of(n.replace(".gate_proj.", ".up_proj."))]
    assert split, "the generator must place some expert's gate_proj and up_proj in different shards"
    out = outputs[preset, "default"]
    experts = sorted({n.rsplit(".", 2)[0] for n in open_checkpoint(out).tensors
                      if ".experts." in n and n.endswith("weight_global_scale")})
    for expert in experts:
        assert torch.equal(load(out, f"{expert}.gate_proj.weight_global_scale"),
                           load(out, f"{expert}.up_proj.weight_global_scale")), expert
    assert set(split) <= set(experts) and len(experts) == 24


@pytest.mark.parametrize("preset", PRESETS)
def test_experts_are_not_mxfp4_origin_so_auto_gives_modelopts_bytes(preset, sources, outputs):
    """The auto policy finds no exact NVFP4 form for trained-like FP8 experts and falls back to the reference
    rule: the bytes are ModelOpt's own quantizer's, with the joint gate/up global scale."""
    import modelopt.torch.quantization.qtensor.nvfp4_tensor as qtensor  # the byte reference: required, never skipped
    out = outputs[preset, "modelopt"]
    with open(os.path.join(out, "conversion_report.json")) as f:
        assert {t["rule"] for t in json.load(f)["tensors"].values()} == {"reference"}
    source = dequantized_source(open_checkpoint(sources[preset]))
    checked = 0
    for layer in (1, 3):  # a trunk layer and the MTP layer
        for e in (0, 7):
            owner = f"model.layers.{layer}.mlp.experts.{e}"
            pair = [f"{owner}.gate_proj", f"{owner}.up_proj"]
            xs = [source(m + ".weight") for m in pair]
            joint = torch.stack([x.abs().amax() for x in xs]).amax()
            for m, x in zip(pair, xs):
                packed, block, scale_2 = qtensor.NVFP4QTensor.quantize(x.clone(), 16, weights_scaling_factor_2=joint / 2688)
                assert torch.equal(load(out, m + ".weight"), packed._quantized_data), m
                assert torch.equal(load(out, m + ".weight_scale").view(torch.uint8), block.view(torch.uint8)), m
                assert torch.equal(load(out, m + ".weight_scale_2"), scale_2.reshape(())), m
                checked += 1
    assert checked == 8


def test_modelopt_output_carries_the_hf_quant_config_vllm_requires(outputs):
    with open(os.path.join(outputs["v3-tiny", "modelopt"], "hf_quant_config.json")) as f:
        q = json.load(f)["quantization"]
    assert {"quant_algo", "group_size", "kv_cache_quant_algo", "exclude_modules"} <= set(q)
    layers = q["quantized_layers"]
    assert layers["model.layers.3.mlp.experts"] == {"quant_algo": "W4A16_NVFP4", "group_size": 16}  # MTP: runtime name
    assert layers["model.layers.0.self_attn.kv_a_proj_with_mqa"] == {"quant_algo": "FP8_PB_WO"}


def test_kv_a_proj_partial_block_decodes_and_quantizes_with_q_a(sources, outputs):
    """kv_a_proj_with_mqa has 576 rows: 4 full 128-blocks and one of 64. Its F32 multiplier scale decodes as an
    independent broadcast says, and quantized with q_a_proj (--quantize) the pair shares one global scale."""
    src = open_checkpoint(sources["v3-tiny"])
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa"
    w, s = (src.tensors[name + suffix] for suffix in (".weight", ".weight_scale_inv"))
    assert list(w.shape) == [576, 512] and list(s.shape) == [5, 4] and s.dtype == "F32"
    weight, scale = read_tensor(w), read_tensor(s)
    expected = weight.float() * scale.repeat_interleave(128, 0)[:576].repeat_interleave(128, 1)[:, :512]
    got = dequantize(weight, scale, scale_block(w.dtype, w.shape, s.dtype, s.shape, (128, 128), name), name)
    assert torch.equal(got, expected)
    out = outputs["v3-tiny", "qkv_a"]
    for layer in range(4):
        a = f"model.layers.{layer}.self_attn."
        assert torch.equal(load(out, a + "q_a_proj.weight_global_scale"),
                           load(out, a + "kv_a_proj_with_mqa.weight_global_scale")), layer
    results = {r.name: r for r in verify(out, sample=None, forward=False, vllm_generate=False, vllm_dry_load=False)}
    assert results["numeric"].status == "PASS" and results["static"].status == "PASS", results


def test_must_keep_modules_refuse_nvfp4(sources, tmp_path):
    dst = str(tmp_path / "out")
    proc = run("fp8_to_nvfp4_streaming.py", "--src", sources["v32-tiny"], "--dst", dst, "--quantize", r"indexer\.wk$")
    assert proc.returncode == 2 and "indexer.wk: --quantize asks for NVFP4 but it must stay as it is" in proc.stderr
    assert not os.path.exists(dst) or not any(f.endswith(".safetensors") for f in os.listdir(dst))


# ------------------------------------------------------------------------------------------------------ verify
@pytest.mark.parametrize("preset", PRESETS)
def test_verify_passes_with_the_one_block_forward(preset, sources, outputs):
    results = verify(outputs[preset, "default"], src=sources[preset], vllm_generate=False, vllm_dry_load=False)
    status = {r.name: r.status for r in results}
    assert status == dict.fromkeys(("static", "finite", "tensor_set", "model_config", "copies", "numeric",
                                    "block_forward"), "PASS"), [(r.name, r.problems[:3]) for r in results]
    forward = next(r for r in results if r.name == "block_forward")
    assert "layer 1 " in forward.evidence[0]  # the first MoE layer (first_k_dense_replace = 1)


MTP_SCALE = "model.layers.3.mlp.experts.5.up_proj.weight_scale"
WK_SCALE = "model.layers.0.self_attn.indexer.wk.weight_scale"


def test_vllm_dry_load_accepts_every_tensor_mtp_included(vllm_python, outputs, tmp_path):
    folders = {key: outputs[key] for key in outputs}
    # and two damaged copies, which must fail by name: an MTP expert's block scale gone; V3.2's indexer wk scale
    # in ModelOpt's 4-D form, which vLLM's wk loader cannot read
    damaged = {MTP_SCALE: copy_checkpoint(outputs["v3-tiny", "default"], str(tmp_path / "no-mtp-scale")),
               WK_SCALE: copy_checkpoint(outputs["v32-tiny", "default"], str(tmp_path / "wk-4d"))}
    edit_tensors(damaged[MTP_SCALE], lambda t: t.pop(MTP_SCALE))
    edit_tensors(damaged[WK_SCALE], lambda t: t.update({WK_SCALE: t[WK_SCALE].reshape(1, 1, 4, 1)}))
    results = run_vllm_dry_loads(list(folders.values()) + list(damaged.values()), python=vllm_python)
    named = {MTP_SCALE: "model.layers.3.mlp.experts.5.gate_proj/up_proj.weight_scale (vLLM would compute with",
             WK_SCALE: "model.layers.0.self_attn.indexer.wk.weight: vLLM's loader refused it"}
    for name, folder in damaged.items():
        r = results[os.path.abspath(folder)]
        assert not r.passed and any(named[name] in p for p in r.problems), (name, r.problems)
    for key, folder in folders.items():
        r = results[os.path.abspath(folder)]
        assert r.passed, (key, r.problems[:10], r.text[-3000:])
        assert r.report["tensors_loaded"] == len(open_checkpoint(folder).tensors), key
        assert r.schemes["model.layers.3.mlp.experts"].startswith("NVFP4"), key  # the MTP layer's experts
        assert r.schemes["model.layers.1.mlp.gate"] == "unquantized", key
    v32 = results[os.path.abspath(outputs["v32-tiny", "default"])]
    assert v32.report["quant_config_class"] == "CompressedTensorsConfig"
    assert v32.schemes["model.layers.0.self_attn.indexer.wk"] == "unquantized"  # dequantized by vLLM on load
    w4a4 = results[os.path.abspath(outputs["v32-tiny", "w4a4"])]
    assert w4a4.schemes["model.layers.3.mlp.experts"] == "NVFP4 W4A4"
    qkv = results[os.path.abspath(outputs["v3-tiny", "qkv_a"])]
    assert qkv.schemes["model.layers.0.self_attn.kv_a_proj_with_mqa"] == "NVFP4 weight-only"


# ------------------------------------------------------------------------------------------------------ refusals
def test_unknown_architecture_is_refused_with_one_line(sources, tmp_path):
    src = str(tmp_path / "kimi")
    generate(src, preset="v3-tiny", seed=1, jobs=2, n_routed_experts=2)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config.update(architectures=["KimiK2ForCausalLM"], model_type="kimi_k2")
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    dst = str(tmp_path / "out")
    proc = run("fp8_to_nvfp4_streaming.py", "--src", src, "--dst", dst)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "KimiK2ForCausalLM" in errors[0] and "the kit has no rules for this model" in errors[0]
    assert not os.path.exists(dst) or not any(f.endswith(".safetensors") for f in os.listdir(dst))
    inspected = run("inspect_model.py", src)
    assert inspected.returncode == 2 and "PROBLEMS (1)" in inspected.stdout and "KimiK2ForCausalLM" in inspected.stdout
    verified = run("verify_nvfp4.py", src, "--src", src, "--no-vllm-dry-load", "--json", str(tmp_path / "v.json"))
    assert verified.returncode == 1 and "Traceback" not in verified.stdout + verified.stderr
    with open(tmp_path / "v.json") as f:
        static = next(c for c in json.load(f)["checks"] if c["name"] == "static")
    assert any("KimiK2ForCausalLM" in p and "no rules for this model" in p for p in static["problems"])
    missing = run("verify_nvfp4.py", dst, "--src", src)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and len(missing.stderr.splitlines()) == 1


@pytest.mark.parametrize("options, text", [
    (Options(format="nvidia"), "--format nvidia: no engine loads DeepSeek V3 in this layout"),
    (Options(format="nvidia", engine="sglang"), "--engine sglang: the kit writes DeepSeek V3 for vllm only"),
])
def test_v4_only_layouts_are_refused(sources, options, text):
    with pytest.raises(PlanError) as e:
        build_plan(open_checkpoint(sources["v3-tiny"]), options, activation_amax={})
    assert any(text in p for p in e.value.problems), e.value.problems


def test_flags_that_leave_nothing_to_quantize_are_refused(sources, tmp_path):
    dst = str(tmp_path / "out")
    proc = run("fp8_to_nvfp4_streaming.py", "--src", sources["v3-tiny"], "--dst", dst, "--keep", r"\.experts\.")
    assert proc.returncode == 2 and "nothing to quantize" in proc.stderr
    assert not os.path.exists(dst) or not any(f.endswith(".safetensors") for f in os.listdir(dst))
