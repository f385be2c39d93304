"""Path B (quantize_llmcompressor.py) on DeepSeek V3 / R1 / V3.1 (``v3-tiny``) and V3.2 (``v32-tiny``), on CPU.

One command-line run per checkpoint (4 samples of at most 16 tokens, rendered with the tokenizer's chat template),
shared by the module: transformers' ``DeepseekV3ForCausalLM`` / ``DeepseekV32ForCausalLM`` calibrated by
llm-compressor's oneshot (W4A4) on the routed experts the V3 rule table quantizes; the MTP layer (layer
``num_hidden_layers``, which transformers does not build) written by Path A's code with the trunk's activation
scales. Path A's weight-only output of the same source is the reference for everything else.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from nvfp4kit.calibrate import REPORT_NAME
from nvfp4kit.calibration_data import chat_renderer
from nvfp4kit.checkpoint import open_checkpoint
from nvfp4kit.convert import Settings, convert
from nvfp4kit.families import family_for
from nvfp4kit.plan import Options, build_plan
from nvfp4kit.rules import Action
from nvfp4kit.safetensors_io import read_tensor
from nvfp4kit.fixtures.synthetic import generate
from nvfp4kit.verify import all_passed, format_report, verify
from nvfp4kit.vllm_check import run_vllm_dry_loads
from test_path_b import NVFP4, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("v3-tiny", "v32-tiny")
MTP_LAYER = 3  # num_hidden_layers of the tiny presets
# What the V3 family never makes NVFP4: router, eh_proj, norms, embeddings, heads, the V3.2 indexer's wk/weights_proj
NEVER_NVFP4 = re.compile(r"(mlp\.gate|eh_proj|norm|embed_tokens|lm_head|shared_head\.head|indexer\.(wk|weights_proj))$")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("path_b_v3")
    data = write_jsonl(str(base / "calib.jsonl"))
    out = {}
    for preset in PRESETS:
        src, dst, a16 = str(base / preset), str(base / f"{preset}-b"), str(base / f"{preset}-a16")
        generate(src, preset=preset, seed=0, jobs=2)
        proc = subprocess.run([sys.executable, "quantize_llmcompressor.py", "--src", src, "--dst", dst, "--dataset",
                               data, "--num-samples", "4", "--max-seq-len", "16"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        convert(src, a16, Options(), Settings())
        with open(os.path.join(dst, REPORT_NAME)) as f:
            report = json.load(f)
        out[preset] = {"src": src, "dst": dst, "a16": a16, "log": proc.stderr, "report": report, "data": data,
                       "plan": build_plan(open_checkpoint(src), Options())}
    return out


def quantized(plan) -> list[str]:
    return sorted(m for m, a in plan.actions.items() if a == Action.QUANTIZE.value)


def is_mtp(module: str) -> bool:
    return module.startswith(f"model.layers.{MTP_LAYER}.")


def tensors(folder: str) -> dict:
    ckpt = open_checkpoint(folder)
    assert not ckpt.problems, ckpt.problems
    return ckpt.tensors


@pytest.mark.parametrize("preset", PRESETS)
def test_calibration_chats_use_the_tokenizers_chat_template(preset, runs):
    """V3 checkpoints carry a chat template in tokenizer_config.json (no V4 encoder): Path B renders with it."""
    from transformers import AutoTokenizer

    src = runs[preset]["src"]
    assert not os.path.exists(os.path.join(src, "encoding"))
    assert "rendered with the tokenizer's chat template" in runs[preset]["log"]
    render, how = chat_renderer(AutoTokenizer.from_pretrained(src), src)
    text = render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                   {"role": "assistant", "content": "A"}])
    assert how == "the tokenizer's chat template"
    assert text == "<｜begin▁of▁sentence｜>S<｜User｜>U<｜Assistant｜>A<｜end▁of▁sentence｜>"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_routed_expert_is_w4a4_with_gate_and_up_sharing_one_global_scale(preset, runs):
    run = runs[preset]
    b = tensors(run["dst"])
    modules = quantized(run["plan"])
    assert modules and all(".mlp.experts." in m for m in modules)  # the V3 table's default: routed experts only
    assert any(is_mtp(m) for m in modules)
    for m in modules:
        assert all(f"{m}.{s}" in b for s in NVFP4), m
        igs = float(read_tensor(b[f"{m}.input_global_scale"]))
        assert math.isfinite(igs) and igs > 0, m
        if m.endswith(".gate_proj"):
            up = m.removesuffix("gate_proj") + "up_proj"
            gate_scale, up_scale = (read_tensor(b[f"{x}.weight_global_scale"]) for x in (m, up))
            assert torch.equal(gate_scale, up_scale), m
    # every trunk expert calibrated by llm-compressor; only the MTP layer (not built by transformers) falls back
    report = run["report"]
    assert report["modules_from_llmcompressor"] == sum(not is_mtp(m) for m in modules)
    assert set(report["activation_scale_fallbacks"]) == {m for m in modules if is_mtp(m)}
    assert all(not NEVER_NVFP4.search(n.rsplit(".", 1)[0]) for n in b if n.endswith(".weight_packed"))


@pytest.mark.parametrize("preset", PRESETS)
def test_trunk_experts_are_llmcompressors_the_rest_path_as_bytes(preset, runs):
    """Trunk experts carry llm-compressor's quantization; the MTP experts and every kept tensor equal Path A's."""
    run = runs[preset]
    b, a16 = tensors(run["dst"]), tensors(run["a16"])
    modules = set(quantized(run["plan"]))
    assert {n for n in b if not n.endswith(".input_global_scale")} == set(a16)
    differing = 0
    for name, info in a16.items():
        module = name.rsplit(".", 1)[0]
        same = torch.equal(read_tensor(b[name]).view(torch.uint8), read_tensor(info).view(torch.uint8))
        if module in modules and not is_mtp(module):
            differing += not same
        else:
            assert same, name
    assert differing > 0  # compressed-tensors rounds differently from the kit's reference


def test_verify_and_vllms_own_loaders_accept_every_tensor_mtp_included(vllm_python, runs):
    for preset in PRESETS:
        results = verify(runs[preset]["dst"], src=runs[preset]["src"], vllm_generate=False, vllm_dry_load=False)
        assert all_passed(results), format_report(runs[preset]["dst"], results)
        assert {r.name for r in results if r.status == "PASS"} >= {"static", "numeric", "block_forward", "copies"}
    loads = run_vllm_dry_loads([runs[p]["dst"] for p in PRESETS], python=vllm_python)
    for preset in PRESETS:
        r = loads[os.path.abspath(runs[preset]["dst"])]
        assert r.passed, (preset, r.problems[:10], r.text[-3000:])
        assert r.report["tensors_loaded"] == len(open_checkpoint(runs[preset]["dst"]).tensors), preset
        for layer in (1, 2, MTP_LAYER):  # the MoE layers and the MTP layer's experts
            assert r.schemes[f"model.layers.{layer}.mlp.experts"] == "NVFP4 W4A4", (preset, layer)
        assert r.schemes["model.layers.1.mlp.gate"] == "unquantized", preset
    v32 = loads[os.path.abspath(runs["v32-tiny"]["dst"])]
    assert family_for(open_checkpoint(runs["v32-tiny"]["src"]).config).name == "deepseek_v32"
    assert v32.schemes["model.layers.0.self_attn.indexer.wk"] == "unquantized"


def test_killed_while_writing_its_output_resumes_to_the_same_bytes(runs, tmp_path):
    """V3 through the one shard writer: SIGKILL between an output shard's rename and its manifest line, then the
    same command again, gives the uninterrupted run's files byte for byte."""
    from test_faults import HOOKS, output_files

    src, data = runs["v3-tiny"]["src"], runs["v3-tiny"]["data"]

    def path_b(dst: str, fault: str | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "NVFP4KIT_FAULT"}
        if fault:
            env.update(NVFP4KIT_FAULT=fault, PYTHONPATH=os.pathsep.join([HOOKS, REPO]))
        return subprocess.run([sys.executable, "quantize_llmcompressor.py", "--src", src, "--dst", dst, "--dataset",
                               data, "--num-samples", "4", "--max-seq-len", "16", "--max-shard-size", "300000"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                              start_new_session=True)  # the kill takes the run's process group, not pytest's

    ref, dst = str(tmp_path / "ref"), str(tmp_path / "out")
    done = path_b(ref)
    assert done.returncode == 0, done.stderr[-3000:]
    staged = len(re.findall(r" staged \S+ \(\d+/\d+ shards\)", done.stderr))  # staging shards use the writer too
    outputs = [n for n in os.listdir(ref) if n.endswith(".safetensors")]
    assert staged and len(outputs) >= 3, (staged, outputs)  # the kill lands mid-output

    killed = path_b(dst, fault=f"shard_renamed:{staged + 2}:kill")
    assert killed.returncode == -9, killed.stderr[-3000:]  # the kill point was reached
    assert not os.path.exists(os.path.join(dst, "model.safetensors.index.json"))
    resumed = path_b(dst)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    kept = lambda folder: {n: d for n, d in output_files(folder).items() if n != REPORT_NAME}  # (timings)
    assert kept(dst) == kept(ref)
