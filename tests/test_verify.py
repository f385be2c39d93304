"""verify_nvfp4: a good Path A output passes; each corruption fails the right check, naming the tensor.

Every corruption copies the converted tiny output and rewrites one thing in it.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from nvfp4kit.checkpoint import INDEX_NAME, open_checkpoint
from nvfp4kit.convert import Settings, convert
from nvfp4kit.plan import Options
from nvfp4kit.safetensors_io import read_tensor, save_file
from nvfp4kit.verify import verify
from nvfp4kit.verify.inventory import take_inventory
from nvfp4kit.verify.numeric import check_numeric
from nvfp4kit.verify.static import check_static

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERT = "layers.1.ffn.experts.2"


# --- corruption helpers ---------------------------------------------------------------------------------------
def copy_of(out: str, tmp_path) -> str:
    dst = str(tmp_path / "corrupt")
    shutil.copytree(out, dst)
    return dst


def overwrite_bytes(folder: str, tensor: str, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` inside ``tensor``'s bytes, in place."""
    info = open_checkpoint(folder).tensors[tensor]
    assert offset + len(data) <= info.nbytes
    with open(info.file, "r+b") as f:
        f.seek(info.begin + offset)
        f.write(data)


def swap_nibbles(folder: str, tensor: str) -> None:
    info = open_checkpoint(folder).tensors[tensor]
    packed = read_tensor(info)
    overwrite_bytes(folder, tensor, 0, bytes(((packed >> 4) | (packed << 4)).reshape(-1).tolist()))


def drop_tensor(folder: str, tensor: str) -> None:
    """Rewrite the tensor's shard without it and keep the index consistent (only the tensor itself goes missing)."""
    ckpt = open_checkpoint(folder)
    shard = ckpt.tensors[tensor].file
    kept = {n: read_tensor(i) for n, i in ckpt.tensors.items() if i.file == shard and n != tensor}
    save_file(kept, shard)
    edit_json(os.path.join(folder, INDEX_NAME), lambda ix: (
        ix["weight_map"].pop(tensor),
        ix["metadata"].update(total_size=ix["metadata"]["total_size"] - ckpt.tensors[tensor].nbytes)))


def edit_json(path: str, edit) -> None:
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def static_problems(folder: str) -> list[str]:
    result, _ = check_static(open_checkpoint(folder))
    assert not result.passed
    return result.problems


# --- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def w4a4_out(tiny_src, tiny_out, tmp_path_factory) -> str:
    """The tiny source converted W4A4 (compressed-tensors with input_global_scale on every NVFP4 module)."""
    folder = tmp_path_factory.mktemp("w4a4")
    modules = take_inventory(open_checkpoint(tiny_out)).nvfp4
    amax = folder / "amax.json"
    amax.write_text(json.dumps({"input_amax": {m: 2.0 + i % 7 for i, m in enumerate(modules)}}))
    dst = str(folder / "out")
    convert(tiny_src, dst, Options(), Settings(), activation_scales=str(amax))
    return dst


# --- a good output ----------------------------------------------------------------------------------------------
def test_good_output_passes_every_check_that_runs(tiny_out, tmp_path, monkeypatch, capsys):
    report = tmp_path / "verify.json"
    monkeypatch.setattr(sys, "argv", ["verify_nvfp4.py", tiny_out, "--json", str(report)])
    with pytest.raises(SystemExit) as exit_code:  # the script in this process: no second torch import
        runpy.run_path(os.path.join(ROOT, "verify_nvfp4.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_code.value.code == 0, out
    written = json.loads(report.read_text())
    assert written["result"] == "PASS" and written["passed"] is True
    checks = {c["name"]: c for c in written["checks"]}
    for name in ("static", "finite", "tensor_set", "model_config", "copies", "numeric"):
        assert checks[name]["status"] == "PASS", checks[name]
    # The source the converter recorded; every NVFP4 module of a small checkpoint decoded, every other tensor
    # compared byte for byte.
    assert "144 of 144 NVFP4 modules compared" in checks["numeric"]["evidence"][0]
    assert checks["copies"]["evidence"] == [
        "120 copied tensors and 52 kept FP8 modules (weight and scale) compared byte for byte with the source"]
    assert "656 tensors expected by .nvfp4kit/plan.json" in checks["tensor_set"]["evidence"]
    assert checks["block_forward"]["status"] == "PASS"
    assert "relative error of the output 0.000e+00" in checks["block_forward"]["evidence"][0]  # exact policy
    assert checks["vllm_generate"]["status"] in ("SKIP", "PASS")
    assert "result: PASS" in out


def test_good_w4a4_output_passes_static(w4a4_out):
    result, inv = check_static(open_checkpoint(w4a4_out))
    assert result.passed, result.problems
    assert any("W4A4" in e for e in result.evidence)


# --- corruptions ------------------------------------------------------------------------------------------------
def test_swapped_nibbles_fail_numeric_by_name(tiny_src, tiny_out, tmp_path):
    bad = copy_of(tiny_out, tmp_path)
    swap_nibbles(bad, f"{EXPERT}.w3.weight_packed")
    results = {r.name: r for r in verify(bad, vllm_generate=False, forward=False)}
    assert results["static"].passed  # headers and scales cannot see nibble order
    numeric = results["numeric"]
    assert not numeric.passed
    assert len(numeric.problems) == 1 and numeric.problems[0].startswith(f"{EXPERT}.w3:")
    assert "exact rule" in numeric.problems[0]
    # Without the converter's per-tensor rules (a Path B output) the SQNR threshold alone catches it.
    ckpt = open_checkpoint(bad)
    numeric = check_numeric(ckpt, take_inventory(ckpt), open_checkpoint(tiny_src), rules={}, sample=None)
    assert [p.split(":")[0] for p in numeric.problems] == [f"{EXPERT}.w3"]
    assert "SQNR" in numeric.problems[0] and "< 15.0 dB" in numeric.problems[0]


def test_nan_scale_byte_fails_static(tiny_out, tmp_path):
    bad = copy_of(tiny_out, tmp_path)
    overwrite_bytes(bad, f"{EXPERT}.w2.weight_scale", 5, b"\x7f")
    problems = static_problems(bad)
    assert problems == [f"{EXPERT}.w2.weight_scale: 1 E4M3 NaN and 0 negative block scale bytes"]


def test_gate_up_global_scales_differing_fail_static(tiny_out, tmp_path):
    bad = copy_of(tiny_out, tmp_path)
    name = f"{EXPERT}.w3.weight_global_scale"
    value = float(read_tensor(open_checkpoint(bad).tensors[name]))
    overwrite_bytes(bad, name, 0, struct.pack("<f", value * 2))
    problems = static_problems(bad)
    assert len(problems) == 1 and problems[0].startswith(f"{EXPERT}.w13: global scales differ")
    assert f"{EXPERT}.w1.weight_global_scale" in problems[0] and name in problems[0]


def test_missing_activation_scale_in_w4a4_fails_static(w4a4_out, tmp_path):
    bad = copy_of(w4a4_out, tmp_path)
    drop_tensor(bad, f"{EXPERT}.w1.input_global_scale")
    assert static_problems(bad) == [f"{EXPERT}.w1.input_global_scale missing (the config says W4A4)"]


def test_index_entry_pointing_at_the_wrong_shard_fails_static(tiny_out, tmp_path):
    bad = copy_of(tiny_out, tmp_path)
    name = f"{EXPERT}.w2.weight_packed"
    wrong_shard = "model-00002-of-00002.safetensors"
    edit_json(os.path.join(bad, INDEX_NAME), lambda ix: ix["weight_map"].update({name: wrong_shard}))
    problems = static_problems(bad)
    assert any(name in p and wrong_shard in p for p in problems), problems


def test_stale_fp8_quantization_config_fails_static(tiny_src, tiny_out, tmp_path):
    bad = copy_of(tiny_out, tmp_path)
    with open(os.path.join(tiny_src, "config.json")) as f:
        source_qcfg = json.load(f)["quantization_config"]
    edit_json(os.path.join(bad, "config.json"), lambda c: c.update(quantization_config=source_qcfg))
    problems = static_problems(bad)
    assert len(problems) == 1 and "source FP8" in problems[0] and "layers.0.ffn.experts.0.w1" in problems[0]


def test_leftover_fp8_keys_in_the_new_config_fail_static(tiny_out, tmp_path):
    bad = copy_of(tiny_out, tmp_path)
    edit_json(os.path.join(bad, "config.json"), lambda c: c["quantization_config"].update(weight_block_size=[128, 128]))
    assert static_problems(bad) == [
        "quantization_config keeps source FP8 keys ['weight_block_size']: a stale FP8 config"]


def test_quantized_tensor_not_covered_by_the_config_fails_static(tiny_out, tmp_path):
    bad = copy_of(tiny_out, tmp_path)

    def drop_w2_target(c):
        group = c["quantization_config"]["config_groups"]["group_0"]
        group["targets"] = [t for t in group["targets"] if not t.endswith(r"w2$")]

    edit_json(os.path.join(bad, "config.json"), drop_w2_target)
    problems = static_problems(bad)
    w2_modules = [m for m in take_inventory(open_checkpoint(bad)).nvfp4 if m.endswith(".w2")]
    assert len(problems) == len(w2_modules) == 48
    assert all(".w2: NVFP4 tensors but the config gives it 0 groups" in p for p in problems)
    assert any(p.startswith(f"{EXPERT}.w2:") for p in problems)


def test_stray_activation_scale_on_a_weight_only_checkpoint_fails_static(tiny_out, tmp_path):
    bad = copy_of(tiny_out, tmp_path)
    ckpt = open_checkpoint(bad)
    shard = ckpt.tensors[f"{EXPERT}.w1.weight_packed"].file
    tensors = {n: read_tensor(i) for n, i in ckpt.tensors.items() if i.file == shard}
    tensors[f"{EXPERT}.w1.input_global_scale"] = torch.ones(1)
    save_file(tensors, shard)
    edit_json(os.path.join(bad, INDEX_NAME), lambda ix: (
        ix["weight_map"].update({f"{EXPERT}.w1.input_global_scale": os.path.basename(shard)}),
        ix["metadata"].update(total_size=ix["metadata"]["total_size"] + 4)))
    problems = static_problems(bad)
    assert len(problems) == 1 and problems[0].startswith(f"{EXPERT}.w1.input_global_scale: stray tensor")


VERIFY_FLAG_ERRORS = {
    "no data file": (["--fidelity", "--fidelity-data", "/nonexistent/text.jsonl"], "no such file"),
    "too few tokens": (["--fidelity", "--fidelity-tokens", "1"], "below 2"),
    "negative tokens": (["--fidelity", "--fidelity-tokens", "-5"], "below 2"),
    "tokens without --fidelity": (["--fidelity-tokens", "64"], "only apply with --fidelity"),
    "negative layer": (["--layer", "-1"], "-1 is below 0"),
    "no tensor parallelism": (["--tp", "0"], "0 is below 1"),
    "layer beyond the model": (["--layer", "5"], "--layer 5: the model's decoder layers are 0-4"),
}


@pytest.mark.parametrize("case", list(VERIFY_FLAG_ERRORS))
def test_flag_errors_are_one_line_before_any_check(tiny_out, case):
    """A flag verify cannot use is refused at once (exit 2, one error line), not after every other check as a
    FAIL or a crash inside one, nor silently replaced by the default (``--fidelity-tokens 0`` ran 2048 tokens)."""
    flags, fragment = VERIFY_FLAG_ERRORS[case]
    run = subprocess.run([sys.executable, os.path.join(ROOT, "verify_nvfp4.py"), tiny_out, *flags],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and fragment in errors[0], run.stderr
    assert run.stdout == ""  # no check ran


def test_a_piped_verify_log_has_no_carriage_return(tiny_out):
    """``verify_nvfp4.py OUT 2>&1 | tee verify.log``: the block forward's model load printed transformers' "Loading
    weights" bar, carriage returns and all, into the log."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "verify_nvfp4.py"), tiny_out, "--no-vllm-dry-load"],
                         capture_output=True)  # bytes: text mode would turn each carriage return into a newline
    assert run.returncode == 0, run.stdout[-3000:]
    assert b"[PASS] 7. block_forward" in run.stdout  # the step that loads a model ran
    assert b"\r" not in run.stdout and b"\r" not in run.stderr, run.stderr[-1000:]
