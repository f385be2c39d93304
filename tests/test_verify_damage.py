"""verify_nvfp4.py on damaged outputs: never a false PASS, never a traceback (issue 16, "No false success, ever").

One table of damages, each applied to a copy of a multi-shard Path A output of the tiny source, then the script run
in this process (a traceback would fail the test as an uncaught exception). Each row says which check must fail and
what its problem line must name, or, for a folder that cannot be read at all, the one error line (exit 2).
"""

from __future__ import annotations

import json
import logging
import math
import os
import runpy
import shutil
import sys

import pytest
import torch

from nvfp4kit.checkpoint import INDEX_NAME, open_checkpoint
from nvfp4kit.convert import REPORT_NAME, STATE_DIR, Settings, convert
from nvfp4kit.plan import Options
from nvfp4kit.safetensors_io import read_tensor, save_file, tensor_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERT = "layers.1.ffn.experts.2"
PATH_B_REPORT = "path_b_report.json"


# --- damage helpers: each rewrites one thing of the folder in place -------------------------------------------------
def rewrite(folder: str, tensor: str, edit) -> None:
    """Replace ``tensor``'s bytes by those of ``edit(value)`` (same dtype and shape)."""
    info = open_checkpoint(folder).tensors[tensor]
    value = read_tensor(info)
    new = edit(value.clone())
    assert new.dtype == value.dtype and new.shape == value.shape
    with open(info.file, "r+b") as f:
        f.seek(info.begin)
        f.write(tensor_bytes(new.contiguous()))


def flip_bit(folder: str, tensor: str, byte: int = 3, bit: int = 0) -> None:
    def edit(value: torch.Tensor) -> torch.Tensor:
        raw = value.reshape(-1).view(torch.uint8)
        raw[byte] ^= 1 << bit
        return value

    rewrite(folder, tensor, edit)


def set_nan(folder: str, tensor: str) -> None:
    rewrite(folder, tensor, lambda v: v.reshape(-1).index_fill(0, torch.tensor([7]), math.nan).reshape(v.shape))


def edit_json(path: str, edit) -> None:
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def drop_tensor(folder: str, tensor: str) -> None:
    """Rewrite the tensor's shard without it, index kept consistent: only the tensor goes missing."""
    ckpt = open_checkpoint(folder)
    shard = ckpt.tensors[tensor].file
    save_file({n: read_tensor(i) for n, i in ckpt.tensors.items() if i.file == shard and n != tensor}, shard)
    edit_json(os.path.join(folder, INDEX_NAME), lambda ix: (
        ix["weight_map"].pop(tensor),
        ix["metadata"].update(total_size=ix["metadata"]["total_size"] - ckpt.tensors[tensor].nbytes)))


def add_tensor(folder: str, tensor: str, value: torch.Tensor) -> None:
    ckpt = open_checkpoint(folder)
    shard = ckpt.tensors["embed.weight"].file
    tensors = {n: read_tensor(i) for n, i in ckpt.tensors.items() if i.file == shard}
    save_file(tensors | {tensor: value}, shard)
    edit_json(os.path.join(folder, INDEX_NAME), lambda ix: (
        ix["weight_map"].update({tensor: os.path.basename(shard)}),
        ix["metadata"].update(total_size=ix["metadata"]["total_size"] + value.numel() * value.element_size())))


def shard_holding(folder: str, tensor: str) -> str:
    return open_checkpoint(folder).tensors[tensor].file


def as_path_b(folder: str) -> None:
    """What Path B leaves: no .nvfp4kit/ (no plan, no fingerprint), its report under its own name."""
    shutil.rmtree(os.path.join(folder, STATE_DIR))
    os.rename(os.path.join(folder, REPORT_NAME), os.path.join(folder, PATH_B_REPORT))


def v3_style(folder: str) -> None:
    """A DeepSeek V3 / Hugging Face folder: model.layers.N.mlp.experts.E.gate_proj, F32 weight_scale_inv."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(64, 256, generator=gen).bfloat16(),
               "model.norm.weight": torch.ones(256, dtype=torch.bfloat16)}
    for p in ("gate_proj", "up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.0.{p}"
        tensors[name + ".weight"] = torch.randn(256, 256, generator=gen).to(torch.float8_e4m3fn)
        tensors[name + ".weight_scale_inv"] = torch.ones(2, 2)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 256,
                   "num_hidden_layers": 1, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                   "weight_block_size": [128, 128]}}, f)


def config_field(key: str, change):
    return lambda folder: edit_json(os.path.join(folder, "config.json"), lambda c: c.update({key: change(c[key])}))


def remove(*parts: str):
    def damage(folder: str) -> None:
        path = os.path.join(folder, *parts)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return damage


def both(*damages):
    def damage(folder: str) -> None:
        for d in damages:
            d(folder)
    return damage


FORWARD_LAYER_TENSOR = "layers.3.attn_norm.weight"  # layer 3: the tiny preset's first learned router, the forward's


def truncate_shard(folder: str) -> None:
    path = shard_holding(folder, FORWARD_LAYER_TENSOR)
    os.truncate(path, os.path.getsize(path) - 1000)


def write_text(name: str, text: str):
    def damage(folder: str) -> None:
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return damage


# --- the table ----------------------------------------------------------------------------------------------------
# (damage, --src given, expected exit code, the check that must not pass, text its problem lines (or the error line)
#  must contain). SRC stands for the source folder.
SRC_ARG = "SRC"
CASES = {
    "nan in layers.1.attn_norm": (lambda d: set_nan(d, "layers.1.attn_norm.weight"), True, 1, "finite",
                                  "layers.1.attn_norm.weight"),
    "bit flip in embed": (lambda d: flip_bit(d, "embed.weight"), True, 1, "copies", "embed.weight"),
    "bit flip in head": (lambda d: flip_bit(d, "head.weight"), True, 1, "copies", "head.weight"),
    "bit flip in a norm": (lambda d: flip_bit(d, "layers.2.ffn_norm.weight"), True, 1, "copies",
                           "layers.2.ffn_norm.weight"),
    "bit flip in the router": (lambda d: flip_bit(d, "layers.3.ffn.gate.weight"), True, 1, "copies",
                               "layers.3.ffn.gate.weight"),
    "bit flip in tid2eid": (lambda d: flip_bit(d, "layers.0.ffn.gate.tid2eid"), True, 1, "copies",
                            "layers.0.ffn.gate.tid2eid"),
    "bit flip in a kept FP8 scale": (lambda d: flip_bit(d, "layers.1.attn.wq_b.weight_scale", 0, 3), True, 1, "copies",
                                     "layers.1.attn.wq_b.weight_scale"),
    "config num_hidden_layers": (config_field("num_hidden_layers", lambda v: v + 1), True, 1, "model_config",
                                 "num_hidden_layers"),
    "config n_routed_experts": (config_field("n_routed_experts", lambda v: v * 2), True, 1, "model_config",
                                "n_routed_experts"),
    "config moe_intermediate_size": (config_field("moe_intermediate_size", lambda v: v // 2), True, 1, "model_config",
                                     "moe_intermediate_size"),
    "config architectures": (config_field("architectures", lambda v: ["DeepseekV3ForCausalLM"]), True, 1,
                             "model_config", "architectures"),
    "config hidden_size": (config_field("hidden_size", lambda v: v + 64), True, 1, "model_config", "hidden_size"),
    # Without --src: the source recorded in the report still finds the flipped nibble once .nvfp4kit/ is gone.
    "packed byte, .nvfp4kit gone": (both(remove(STATE_DIR), lambda d: flip_bit(d, f"{EXPERT}.w3.weight_packed")),
                                    False, 1, "numeric", f"{EXPERT}.w3"),
    # ... and with nothing recorded at all the numeric check cannot run: INCOMPLETE, not PASS.
    "packed byte, nothing recorded": (both(remove(STATE_DIR), remove(REPORT_NAME),
                                           lambda d: flip_bit(d, f"{EXPERT}.w3.weight_packed")),
                                      False, 1, "numeric", "NOT RUN"),
    "path B output, bit flip in embed": (both(as_path_b, lambda d: flip_bit(d, "embed.weight")), False, 1, "copies",
                                         "embed.weight"),
    "missing shard": (lambda d: os.remove(shard_holding(d, FORWARD_LAYER_TENSOR)), False, 1, "static",
                      "listed in the index but missing"),
    "truncated shard": (truncate_shard, False, 1, "static", "truncated shard"),
    "missing config": (remove("config.json"), False, 1, "static", "config.json missing"),
    "malformed config": (write_text("config.json", '{"hidden_size": 448,'), False, 1, "static", "config.json"),
    "missing companion, recorded source": (lambda d: drop_tensor(d, f"{EXPERT}.w1.weight_global_scale"), False, 1,
                                           "numeric", f"{EXPERT}.w1"),
    "missing companion, --src": (lambda d: drop_tensor(d, f"{EXPERT}.w1.weight_global_scale"), True, 1,
                                 "tensor_set", f"{EXPERT}.w1.weight_global_scale"),
    "missing copied tensor": (lambda d: drop_tensor(d, "layers.0.attn_norm.weight"), True, 1, "tensor_set",
                              "layers.0.attn_norm.weight: missing"),
    "extra tensor": (lambda d: add_tensor(d, "layers.0.attn.extra_bias", torch.zeros(8)), True, 1, "tensor_set",
                     "layers.0.attn.extra_bias"),
    "v3-style folder": (v3_style, False, 1, "static", "no NVFP4 tensor"),
    "not a checkpoint": (both(v3_style, remove("model.safetensors")), False, 2, None, "not a checkpoint"),
}
# Rows that also run the one-block forward, and its status: it built its inputs from the output's hidden_size, and
# it read the output's tensors without asking whether they exist (KeyError).
WITH_FORWARD = {"config hidden_size": "PASS", "missing shard": "FAIL", "truncated shard": "FAIL"}
# Rows that decode every NVFP4 module (the slow part; the others pass --sample 0): a missing companion crashed it.
FULL_NUMERIC = {c for c, row in CASES.items() if row[3] == "numeric"} | {"missing companion, --src"}


# --- running the script ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_out(tiny_src, tmp_path_factory) -> str:
    """Path A's default output of the tiny source in several shards (so that one shard can go missing). Read-only."""
    dst = str(tmp_path_factory.mktemp("sharded") / "out")
    convert(tiny_src, dst, Options(max_shard_size=8 * 10**6), Settings())
    assert len(open_checkpoint(dst).shards) >= 3
    return dst


def run_verify(args: list[str], monkeypatch, capsys, caplog, forward: bool = False) -> tuple[int, str]:
    """verify_nvfp4.py in this process (no second torch import); its exit code and everything it printed."""
    monkeypatch.setattr(sys, "argv", ["verify_nvfp4.py", *args, "--no-vllm-dry-load"] + ([] if forward else ["--no-forward"]))
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_code:
        runpy.run_path(os.path.join(ROOT, "verify_nvfp4.py"), run_name="__main__")
    captured = capsys.readouterr()
    return exit_code.value.code, captured.out + captured.err + caplog.text


@pytest.mark.parametrize("case", sorted(CASES))
def test_damage_never_passes(case, sharded_out, tiny_src, tmp_path, monkeypatch, capsys, caplog):
    damage, with_src, code, check, text = CASES[case]
    bad = str(tmp_path / "out")
    shutil.copytree(sharded_out, bad)
    damage(bad)
    report = tmp_path / "verify.json"
    args = [bad, "--json", str(report)] + (["--src", tiny_src] if with_src else [])
    if case not in FULL_NUMERIC:
        args += ["--sample", "0"]
    code_got, out = run_verify(args, monkeypatch, capsys, caplog, forward=case in WITH_FORWARD)
    assert code_got == code, out
    assert "Traceback" not in out and "result: PASS" not in out, out
    if check is None:  # the folder cannot be read at all: one error line
        assert text in out, out
        return
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]}
    found = checks[check]
    if case in WITH_FORWARD:
        assert checks["block_forward"]["status"] == WITH_FORWARD[case], checks["block_forward"]
    if text == "NOT RUN":
        assert found["status"] == "NOT RUN" and found["evidence"], found
        assert "result: INCOMPLETE" in out, out
    else:
        assert found["status"] == "FAIL", found
        assert any(text in p for p in found["problems"]), found["problems"]
        assert "result: FAIL" in out, out


@pytest.mark.parametrize("records", ["everything", "plan gone", "as path B"])
def test_undamaged_output_passes(records, sharded_out, tmp_path, monkeypatch, capsys, caplog):
    """The same output without damage passes, with the source found from what the converter recorded."""
    good = str(tmp_path / "out")
    shutil.copytree(sharded_out, good)
    {"everything": lambda d: None, "plan gone": remove(STATE_DIR), "as path B": as_path_b}[records](good)
    report = tmp_path / "verify.json"
    code, out = run_verify([good, "--json", str(report)], monkeypatch, capsys, caplog)
    assert code == 0, out
    checks = {c["name"]: c["status"] for c in json.loads(report.read_text())["checks"]}
    assert {k: checks[k] for k in ("static", "finite", "tensor_set", "model_config", "copies", "numeric")} == dict.fromkeys(
        ("static", "finite", "tensor_set", "model_config", "copies", "numeric"), "PASS")
    assert "result: PASS" in out


def test_v3_style_source_fails_without_traceback(sharded_out, tmp_path, monkeypatch, capsys, caplog):
    v3 = str(tmp_path / "v3")
    os.makedirs(v3)
    v3_style(v3)
    report = tmp_path / "verify.json"
    code, out = run_verify([sharded_out, "--src", v3, "--json", str(report)], monkeypatch, capsys, caplog)
    assert code == 1 and "Traceback" not in out, out
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]}
    assert checks["tensor_set"]["status"] == "FAIL" and checks["model_config"]["status"] == "FAIL"
    assert any("architectures" in p for p in checks["model_config"]["problems"])
    assert checks["numeric"]["status"] == "FAIL"


def test_a_crashing_check_is_its_own_fail(sharded_out, tiny_src, monkeypatch):
    """An exception nobody foresaw inside one check is that check's FAIL with its text; the other checks still run."""
    import nvfp4kit.verify as verify_module
    import nvfp4kit.verify.run as verify_run

    def crash(*args, **kwargs):
        raise RuntimeError("unforeseen input")

    monkeypatch.setattr(verify_run, "check_model_config", crash)  # verify() looks it up in verify/run.py
    results = {r.name: r for r in verify_module.verify(sharded_out, src=tiny_src, sample=0, forward=False,
                                                       vllm_generate=False, vllm_dry_load=False)}
    assert results["model_config"].status == "FAIL"
    assert results["model_config"].problems == ["check stopped by RuntimeError: unforeseen input"]
    assert all(results[n].status == "PASS" for n in ("static", "finite", "tensor_set", "copies", "numeric"))
    assert verify_module.verdict(list(results.values())) == "FAIL"
