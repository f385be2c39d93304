"""inspect_model.py / nvfp4kit.report: facts checked against what the synthetic generator wrote, and every named
problem on a deliberately broken copy of the tiny checkpoint."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from nvfp4kit import safetensors_io
from nvfp4kit.checkpoint import INDEX_NAME, open_checkpoint
from nvfp4kit.plan import Options, build_plan
from nvfp4kit.report import EXIT_OK, EXIT_PROBLEMS, checkpoint_facts, format_indices, inspect_checkpoint, render_report
from nvfp4kit.rules import Overrides, collapse
from nvfp4kit.safetensors_io import read_header, read_tensor, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERT_W1 = "layers.3.ffn.experts.5.w1"  # a routed expert of a gate.bias layer


# --- helpers ------------------------------------------------------------------------------------------------------
def load_index(root: str) -> dict:
    with open(os.path.join(root, INDEX_NAME)) as f:
        return json.load(f)


def save_index(root: str, index: dict) -> None:
    with open(os.path.join(root, INDEX_NAME), "w") as f:
        json.dump(index, f)


def edit_shard(root: str, shard: str, edit) -> None:
    """Rewrite one shard with ``edit(tensors)`` applied to its tensors (a new file, never an in-place change)."""
    path = os.path.join(root, shard)
    infos, _ = read_header(path)
    tensors = {n: read_tensor(i) for n, i in infos.items()}
    edit(tensors)
    os.remove(path)
    save_file(tensors, path)


def shard_holding(root: str, name: str) -> str:
    return load_index(root)["weight_map"][name]


def drop_tensor(root: str, name: str) -> None:
    """Remove a tensor from its shard and from the index, keeping total_size true."""
    shard = shard_holding(root, name)
    edit_shard(root, shard, lambda t: t.pop(name))
    index = load_index(root)
    del index["weight_map"][name]
    index["metadata"]["total_size"] = open_checkpoint(root).total_bytes
    save_index(root, index)


@pytest.fixture
def broken(tiny_src, tmp_path):
    """A private copy of the tiny checkpoint to break."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_src, dst)
    return str(dst)


@pytest.fixture(scope="module")
def tiny_facts(tiny_src) -> dict:
    return checkpoint_facts(open_checkpoint(tiny_src), Options())


def pattern(facts: dict, name: str) -> dict:
    return next(p for p in facts["patterns"] if p["pattern"] == name)


# --- facts against the generator ---------------------------------------------------------------------------------
def test_counts_match_generator(tiny_facts, tiny_src, tiny_config):
    names = load_index(tiny_src)["weight_map"]
    L, E = tiny_config["num_hidden_layers"], tiny_config["n_routed_experts"]
    csa_layers = sum(1 for r in tiny_config["compress_ratios"][:L] if r == 4)
    blocks = L + 1  # decoder layers + the MTP block
    assert tiny_facts["source"]["tensors"] == len(names)
    assert tiny_facts["counts"] == {
        "decoder_layers": L,
        "mtp_blocks": 1,
        "routed_experts": blocks * E,
        "routed_experts_per_layer": [E],
        "shared_experts": blocks,
        "routers": blocks,
        "mtp_tensors": sum(n.startswith("mtp.") for n in names),
    }
    cats = {c: n["tensors"] for c, n in tiny_facts["categories"].items()}
    assert cats["routed_expert"] == blocks * E * 3 * 2  # w1, w2, w3 with a scale each
    assert cats["shared_expert"] == blocks * 3 * 2
    assert cats["indexer"] == csa_layers * 3  # wq_b + its scale, weights_proj
    assert cats["compressor"] == L * 4 + csa_layers * 4  # ape/wkv/wgate/norm, plus the indexer's own compressor
    assert cats["mhc"] == blocks * 6 + 2 * 3  # per block, plus hc_head_* at the top and in the MTP block
    assert sum(cats.values()) == len(names)
    assert sum(n["source_bytes"] for n in tiny_facts["categories"].values()) == tiny_facts["source"]["bytes"]


def test_expert_pattern_collapses_indices(tiny_facts, tiny_config):
    L, E = tiny_config["num_hidden_layers"], tiny_config["n_routed_experts"]
    row = pattern(tiny_facts, "layers.{L}.ffn.experts.{E}.w1.weight")
    assert row["count"] == L * E
    assert row["indices"] == {"L": list(range(L)), "E": list(range(E))}
    assert row["dtypes"] == {"F8_E4M3": L * E}
    assert row["shapes"] == {f"[{tiny_config['moe_intermediate_size']},{tiny_config['hidden_size']}]": L * E}
    assert row["scale_forms"] == {"UE8M0": L * E} and row["blocks"] == {"128x128": L * E}
    assert row["actions"] == {"quantize": L * E}
    # Only hash-routed layers have tid2eid; the others a bias.
    hashed = tiny_config["num_hash_layers"]
    assert pattern(tiny_facts, "layers.{L}.ffn.gate.tid2eid")["indices"] == {"L": list(range(hashed))}
    assert pattern(tiny_facts, "layers.{L}.ffn.gate.bias")["indices"] == {"L": list(range(hashed, L))}
    # No scale gets a row of its own: it is part of its weight's row.
    assert not [p for p in tiny_facts["patterns"] if p["pattern"].endswith(".scale")]


def test_fp8_scales_and_blocks(tiny_facts, tiny_src):
    scales = [n for n in load_index(tiny_src)["weight_map"] if n.endswith(".scale")]
    assert tiny_facts["fp8"]["weights"] == len(scales)
    assert tiny_facts["fp8"]["scale_forms"] == {"UE8M0": len(scales)}
    assert tiny_facts["fp8"]["blocks"] == {"128x128": len(scales)}  # partial edge blocks (448 = 3x128 + 64) included
    assert tiny_facts["fp8"]["configured_block"] == [128, 128]


def test_float32_scales_are_reported_as_multipliers(broken):
    """V3-style float32 scales in one shard: the same blocks, another scale form, still convertible."""
    shard = shard_holding(broken, "layers.3.attn.wq_a.weight")

    def widen(t):
        for n in [n for n in t if n.endswith(".scale")]:
            t[n] = t[n].to(torch.float32)

    edit_shard(broken, shard, widen)
    index = load_index(broken)
    index["metadata"]["total_size"] = open_checkpoint(broken).total_bytes
    save_index(broken, index)
    widened = [n for n, i in open_checkpoint(broken).tensors.items() if n.endswith(".scale") and i.dtype == "F32"]
    facts = checkpoint_facts(open_checkpoint(broken))
    assert facts["convertible"] and widened
    assert facts["fp8"]["scale_forms"]["F32 multiplier"] == len(widened)
    assert pattern(facts, "layers.{L}.attn.wq_a.weight")["scale_forms"]["F32 multiplier"] == 1


def expected_output_bytes(root: str) -> int:
    """compressed-tensors W4A16 by hand: routed experts -> packed FP4 + E4M3 group-16 scales + one f32 divisor;
    other FP8 weights keep their bytes with the scale widened to f32; everything else is copied."""
    ckpt = open_checkpoint(root)
    total = 0
    for name, t in ckpt.tensors.items():
        if name.endswith(".scale"):
            continue
        if t.dtype != "F8_E4M3":
            total += t.nbytes
        elif ".experts." in name:
            rows, cols = t.shape
            total += rows * cols // 2 + rows * cols // 16 + 4
        else:
            scale = ckpt.tensors[name[: -len(".weight")] + ".scale"]
            total += t.nbytes + 4 * math.prod(scale.shape)
    return total


def test_expected_output_size(tiny_facts, tiny_src):
    plan = tiny_facts["plan"]
    assert plan["built"] and plan["output_bytes"] == expected_output_bytes(tiny_src)
    assert sum(p["output_bytes"] for p in tiny_facts["patterns"]) == plan["output_bytes"]
    assert sum(plan["output_bytes_by_kind"].values()) == plan["output_bytes"]


def test_actions_are_the_converters(tiny_src, tiny_facts):
    """Every pattern's actions are exactly those of the modules build_plan decides on."""
    plan = build_plan(open_checkpoint(tiny_src), Options())
    by_pattern: dict[str, dict[str, int]] = {}
    for module, action in plan.actions.items():
        key = collapse(module + ".weight") if action != "keep" else collapse(module)
        by_pattern.setdefault(key, {}).setdefault(action, 0)
        by_pattern[key][action] += 1
    assert {p["pattern"]: p["actions"] for p in tiny_facts["patterns"]} == by_pattern


def test_global_scale_groups(tiny_facts, tiny_src, tiny_config):
    L, E = tiny_config["num_hidden_layers"], tiny_config["n_routed_experts"]
    groups = {tuple(g["members"]): g["groups"] for g in tiny_facts["plan"]["global_scale_groups"]}
    assert groups == {
        ("layers.{L}.ffn.experts.{E}.w1", "layers.{L}.ffn.experts.{E}.w3"): L * E,
        ("layers.{L}.ffn.experts.{E}.w2",): L * E,
        ("mtp.{M}.ffn.experts.{E}.w1", "mtp.{M}.ffn.experts.{E}.w3"): E,
        ("mtp.{M}.ffn.experts.{E}.w2",): E,
    }
    joint = checkpoint_facts(open_checkpoint(tiny_src), Options(joint_scale="gate-up-down"))
    assert {tuple(g["members"]): g["groups"] for g in joint["plan"]["global_scale_groups"]} == {
        ("layers.{L}.ffn.experts.{E}.w1", "layers.{L}.ffn.experts.{E}.w2", "layers.{L}.ffn.experts.{E}.w3"): L * E,
        ("mtp.{M}.ffn.experts.{E}.w1", "mtp.{M}.ffn.experts.{E}.w2", "mtp.{M}.ffn.experts.{E}.w3"): E,
    }


def test_planning_flags_change_the_answer(tiny_src, tiny_facts):
    ckpt = open_checkpoint(tiny_src)
    more = checkpoint_facts(ckpt, Options(overrides=Overrides(quantize=("shared_experts",))))
    assert pattern(more, "layers.{L}.ffn.shared_experts.w2.weight")["actions"] == {"quantize": 5}
    assert more["plan"]["output_bytes"] < tiny_facts["plan"]["output_bytes"]
    small = checkpoint_facts(ckpt, Options(max_shard_size=10**6))
    assert small["plan"]["output_shards"] > tiny_facts["plan"]["output_shards"]
    # A must-keep module cannot be quantized: the flag is a problem, named, and blocks conversion.
    refused = checkpoint_facts(ckpt, Options(overrides=Overrides(quantize=("wo_a",))))
    assert pattern(refused, "layers.{L}.attn.wo_a.weight")["actions"] == {"refused": 5}
    assert not refused["convertible"] and any("layers.0.attn.wo_a" in p for p in refused["problems"])


def test_report_text_is_readable(tiny_facts):
    text = render_report(tiny_facts)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 150
    expert = next(line for line in lines if line.startswith("layers.{L}.ffn.experts.{E}.w1.weight "))
    assert "L 0-4 E 0-7" in expert and "UE8M0 128x128" in expert and "NVFP4" in expert
    assert "layers.{L}.ffn.experts.{E}.w1 + w3" in text and "share one global scale (40 groups)" in text
    gb = tiny_facts["plan"]["output_bytes"] / 1e9
    assert f"expected output size: {gb:.2f} GB" in text
    assert lines[-1] == "RESULT: convertible (no problems found)"


def test_reads_no_tensor_data(tiny_src, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(safetensors_io, "read_into", refuse)
    monkeypatch.setattr(safetensors_io, "read_tensor", refuse)
    assert checkpoint_facts(open_checkpoint(tiny_src))["convertible"]


def test_json_output_and_exit_code(tiny_src, tiny_facts, tmp_path):
    out = io.StringIO()
    path = tmp_path / "facts.json"
    assert inspect_checkpoint(tiny_src, Options(), str(path), out) == EXIT_OK
    assert json.loads(path.read_text()) == json.loads(json.dumps(tiny_facts))
    assert out.getvalue() == render_report(tiny_facts)


def test_script_runs(tiny_src, tmp_path):
    run = subprocess.run([sys.executable, os.path.join(REPO, "inspect_model.py"), tiny_src, "--json",
                          str(tmp_path / "f.json"), "--joint-scale", "gate-up-down"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "w1 + w2 + w3" in run.stdout
    assert json.loads((tmp_path / "f.json").read_text())["plan"]["options"]["joint_scale"] == "gate-up-down"


def test_format_indices():
    hca = [0, 1] + list(range(3, 60, 2))
    assert format_indices(hca) == "0,1,3-59/2"
    assert format_indices(range(2, 61, 2)) == "2-60/2"
    assert format_indices([0, 1, 2, 7]) == "0-2,7"
    assert format_indices([4]) == "4" and format_indices([]) == ""


# --- broken copies: each problem is named, and blocks conversion -------------------------------------------------
def break_weight_without_scale(root):
    drop_tensor(root, EXPERT_W1 + ".scale")
    return [EXPERT_W1 + ".weight", "no scale"]


def break_scale_without_weight(root):
    drop_tensor(root, EXPERT_W1 + ".weight")
    return [EXPERT_W1 + ".scale", "has no weight"]


def break_scale_shape(root):
    name = "layers.2.attn.wq_b.scale"

    def grow(t):  # one extra row of scales: [17, 2] for [2048, 256] fits neither the configured block nor any other
        raw = t[name].view(torch.uint8)
        t[name] = torch.cat([raw, raw[:1]]).view(t[name].dtype)

    edit_shard(root, shard_holding(root, name), grow)
    index = load_index(root)
    index["metadata"]["total_size"] = open_checkpoint(root).total_bytes
    save_index(root, index)
    return ["layers.2.attn.wq_b", "does not fit weight shape [2048, 256] in the configured 128x128 blocks"]


def break_shard_missing(root):
    shard = shard_holding(root, "layers.1.attn.wq_a.weight")
    os.remove(os.path.join(root, shard))
    return [shard, "listed in the index but missing", "tensors, e.g. layers."]


def break_shard_unlisted(root):
    shutil.copy(os.path.join(root, shard_holding(root, "embed.weight")), os.path.join(root, "extra.safetensors"))
    return ["extra.safetensors", "not listed in the index"]


def break_tensor_not_in_index(root):
    index = load_index(root)
    shard = index["weight_map"].pop("layers.0.attn_norm.weight")
    save_index(root, index)
    return ["layers.0.attn_norm.weight", shard, "does not list it"]


def break_corrupt_header(root):
    shard = shard_holding(root, "layers.2.attn.wq_a.weight")
    with open(os.path.join(root, shard), "r+b") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        f.write(b"{garbage" + b"!" * (hlen - 8))
    return [shard, "not valid JSON"]


def break_truncated_shard(root):
    shard = shard_holding(root, "layers.4.attn.wq_a.weight")
    path = os.path.join(root, shard)
    os.truncate(path, os.path.getsize(path) - 100)
    return [shard, "truncated"]


def break_total_size(root):
    index = load_index(root)
    index["metadata"]["total_size"] += 1
    save_index(root, index)
    return ["total_size", "disagrees with the headers"]


BREAKAGES = [
    break_weight_without_scale,
    break_scale_without_weight,
    break_scale_shape,
    break_shard_missing,
    break_shard_unlisted,
    break_tensor_not_in_index,
    break_corrupt_header,
    break_truncated_shard,
    break_total_size,
]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__[len("break_"):])
def test_broken_copy_is_named_and_blocks(broken, breakage):
    words = breakage(broken)
    out = io.StringIO()
    assert inspect_checkpoint(broken, Options(), None, out) == EXIT_PROBLEMS
    facts = checkpoint_facts(open_checkpoint(broken))
    assert not facts["convertible"] and not facts["plan"]["built"]
    named = [p for p in facts["problems"] if all(w in p for w in words)]
    assert named, f"no problem names {words}: {facts['problems']}"
    text = out.getvalue()
    assert named[0] in text and "RESULT: NOT convertible" in text.splitlines()[-1]


def test_the_tiny_copy_itself_is_fine(broken):
    """The broken-copy tests start from a convertible copy: each problem comes from its breakage alone."""
    assert checkpoint_facts(open_checkpoint(broken))["problems"] == []


def test_not_a_checkpoint(tmp_path):
    out = io.StringIO()
    assert inspect_checkpoint(str(tmp_path), Options(), None, out) == EXIT_PROBLEMS
    assert "not a checkpoint" in out.getvalue()


def test_single_file_checkpoint(tiny_src, tiny_facts, tmp_path):
    """All tensors in one model.safetensors and no index: the same facts, apart from the files."""
    ckpt = open_checkpoint(tiny_src)
    save_file({n: read_tensor(i) for n, i in ckpt.tensors.items()}, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(tiny_src, "config.json"), tmp_path / "config.json")
    facts = checkpoint_facts(open_checkpoint(str(tmp_path)))
    assert facts["convertible"]
    assert facts["source"]["index"] is None and facts["source"]["shards"] == 1
    for key in ("patterns", "categories", "counts", "fp8"):
        assert facts[key] == tiny_facts[key]
    assert facts["plan"]["output_bytes"] == tiny_facts["plan"]["output_bytes"]
    assert "no index" in render_report(facts)
