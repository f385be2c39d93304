"""Path B (quantize_llmcompressor.py) end to end on the tiny synthetic checkpoint, on CPU.

One llm-compressor run (4 samples of at most 16 tokens, output in 4 shards) is shared by the module; Path A runs
twice next to it (weight-only, and W4A4 with Path B's exported activation scales) so that the two paths can be
compared tensor by tensor. A second Path B run, killed in its output writing and rerun, must give the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from nvfp4kit import calibrate
from nvfp4kit.calibrate import (
    CalibrationSettings,
    PathBError,
    cast_fp32_norms,
    collect_activation_amax,
    cpu_budget_gb,
    layer_memory_estimate,
    quantize_with_llmcompressor,
    stage_bf16_checkpoint,
)
from nvfp4kit.calibration_data import CalibrationDataError, chat_renderer, deepseek_plain_format, load_rows, tokenized_dataset
from nvfp4kit.checkpoint import INDEX_NAME
from nvfp4kit.convert import STATE_DIR
from nvfp4kit.manifest import read_manifest
from nvfp4kit.checkpoint import open_checkpoint
from nvfp4kit.convert import Settings, convert
from nvfp4kit.nvfp4 import GLOBAL_SCALE_DIVISOR
from nvfp4kit.plan import Options, build_plan, load_activation_amax
from nvfp4kit.rules import Action, is_mtp
from nvfp4kit.safetensors_io import read_header, read_tensor, save_file

NVFP4 = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = Options(max_shard_size=8_000_000)  # the tiny output in 4 shards: a kill can fall between two of them


def write_jsonl(path: str, rows: int = 8) -> str:
    words = "the model calibrates every expert on tokens from prompts about code math and prose".split()
    with open(path, "w") as f:
        for i in range(rows):
            text = " ".join(words[(i + k) % len(words)] for k in range(12))
            f.write(json.dumps({"messages": [{"role": "user", "content": text},
                                             {"role": "assistant", "content": text[::-1]}]}) + "\n")
    return path


def tensors_of(folder: str) -> dict:
    ckpt = open_checkpoint(folder)
    assert not ckpt.problems, ckpt.problems
    return ckpt.tensors


@pytest.fixture(scope="module")
def runs(tiny_src, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("path_b")
    data = write_jsonl(str(root / "calib.jsonl"))
    act = str(root / "act.json")
    dst_b = str(root / "b")
    report = quantize_with_llmcompressor(tiny_src, dst_b, OPTIONS, small_run(data, str(root / "work"), act))
    convert(tiny_src, str(root / "a16"), Options(), Settings())
    convert(tiny_src, str(root / "a4"), Options(), Settings(), activation_scales=act)
    return {"b": dst_b, "a16": str(root / "a16"), "a4": str(root / "a4"), "act": act, "report": report, "data": data,
            "work": str(root / "work"), "plan": build_plan(open_checkpoint(tiny_src), Options())}


def small_run(data: str, work: str, act: str | None = None) -> CalibrationSettings:
    """The settings of every Path B run here (the kill test's driver builds the same)."""
    return CalibrationSettings(dataset=data, num_samples=4, max_seq_len=16, offload_dir=work,
                               export_activation_scales=act)


def quantized_modules(plan) -> list[str]:
    return sorted(m for m, a in plan.actions.items() if a == Action.QUANTIZE.value)


# --- end to end -----------------------------------------------------------------------------------------------------
def test_output_passes_verify(runs, tiny_src):
    from nvfp4kit.verify import all_passed, format_report, verify

    results = verify(runs["b"], src=tiny_src, vllm_generate=False)
    assert all_passed(results), format_report(runs["b"], results)
    assert not os.path.exists(runs["work"]), "the work folder is removed on success"


def test_w4a4_output_costs_more_fidelity_than_its_weights_served_w4a16(runs, tiny_src):
    """verify --fidelity on Path B's W4A4 output: with activations quantized as vLLM serves it, the KLD is larger
    than with the same weights served W4A16."""
    from nvfp4kit.fidelity import measure_fidelity

    a4 = measure_fidelity(runs["b"], tiny_src, tokens=64, mtp=False)["figures"]
    a16 = measure_fidelity(runs["b"], tiny_src, tokens=64, mtp=False, quantize_activations=False)["figures"]
    assert a4["w4a4"] and not a16["w4a4"]
    assert a4["kld_mean"] > a16["kld_mean"] > 0, (a4["kld_mean"], a16["kld_mean"])


def test_ignore_list_honoured_tensor_by_tensor(runs):
    """Every tensor the rule table does not quantize is byte-identical to Path A's; same names, dtypes, shapes."""
    b, a4 = tensors_of(runs["b"]), tensors_of(runs["a4"])
    assert set(b) == set(a4)
    quantized = set(quantized_modules(runs["plan"]))
    compared = 0
    for name, info in b.items():
        assert (info.dtype, info.shape) == (a4[name].dtype, a4[name].shape), name
        if name.rsplit(".", 1)[0] not in quantized:
            assert torch.equal(read_tensor(info).view(torch.uint8), read_tensor(a4[name]).view(torch.uint8)), name
            compared += 1
    assert compared > 100


def test_every_expert_has_a_positive_activation_scale(runs):
    b = tensors_of(runs["b"])
    quantized = quantized_modules(runs["plan"])
    assert any(is_mtp(m) for m in quantized) and len(quantized) == 6 * 8 * 3
    for m in quantized:
        assert all(f"{m}.{s}" in b for s in NVFP4), m
        igs = float(read_tensor(b[f"{m}.input_global_scale"]))
        assert math.isfinite(igs) and igs > 0, m
    for m in quantized:
        if m.endswith(".w1"):
            w3 = m[:-1] + "3"
            assert torch.equal(read_tensor(b[f"{m}.weight_global_scale"]), read_tensor(b[f"{w3}.weight_global_scale"]))
    # All-expert calibration reaches every trunk expert; only the MTP block (not built by transformers) falls back.
    fallbacks = runs["report"]["activation_scale_fallbacks"]
    assert fallbacks and all(is_mtp(m) for m in fallbacks)


def test_path_b_weights_are_llmcompressors_not_path_as(runs):
    """Trunk experts carry llm-compressor's quantization; the MTP experts Path A's own code."""
    b, a16 = tensors_of(runs["b"]), tensors_of(runs["a16"])
    trunk = [m for m in quantized_modules(runs["plan"]) if not is_mtp(m)]
    differing = sum(not torch.equal(read_tensor(b[f"{m}.weight_packed"]), read_tensor(a16[f"{m}.weight_packed"]))
                    for m in trunk)
    assert differing > 0  # compressed-tensors rounds differently from the kit's reference (nvfp4-facts.md)
    for m in quantized_modules(runs["plan"]):
        if is_mtp(m):
            assert torch.equal(read_tensor(b[f"{m}.weight_packed"]), read_tensor(a16[f"{m}.weight_packed"])), m


def test_exported_scales_give_path_a_w4a4(runs):
    """Path A + --activation-scales: weights equal Path A's weight-only output, activation scales equal Path B's."""
    amax = load_activation_amax(runs["act"])
    quantized = quantized_modules(runs["plan"])
    assert set(amax) == set(quantized)
    a16, a4, b = tensors_of(runs["a16"]), tensors_of(runs["a4"]), tensors_of(runs["b"])
    for m in quantized:
        for s in ("weight_packed", "weight_scale", "weight_global_scale"):
            assert torch.equal(read_tensor(a4[f"{m}.{s}"]).view(torch.uint8), read_tensor(a16[f"{m}.{s}"]).view(torch.uint8))
        assert f"{m}.input_global_scale" not in a16
        assert torch.equal(read_tensor(a4[f"{m}.input_global_scale"]), read_tensor(b[f"{m}.input_global_scale"])), m
    with open(runs["act"]) as f:
        assert set(json.load(f)["fallbacks"]) == set(runs["report"]["activation_scale_fallbacks"])


def test_refuses_a_non_empty_destination(runs, tiny_src):
    settings = CalibrationSettings(dataset="unused")
    with pytest.raises(PathBError, match="other settings .*--overwrite"):
        quantize_with_llmcompressor(tiny_src, runs["b"], OPTIONS, settings)


# --- resume: killed in the output writing, rerun with the same command -----------------------------------------------
KILLED_RUN = """
import os, signal, sys
from nvfp4kit import calibrate
sys.path.insert(0, "tests")
from test_path_b import OPTIONS, small_run

write_shard_tensors, calls = calibrate._shard_tensors, []

def killed_in_second_shard(*args, **kwargs):  # one tensor of the second output shard written, then a power cut
    calls.append(1)
    tensors = write_shard_tensors(*args, **kwargs)
    if len(calls) == 2:
        yield next(tensors)
        os.kill(os.getpid(), signal.SIGKILL)
    yield from tensors

calibrate._shard_tensors = killed_in_second_shard
src, dst, data, work = sys.argv[1:]
calibrate.quantize_with_llmcompressor(src, dst, OPTIONS, small_run(data, work))
"""


def test_killed_while_writing_resumes_to_the_same_bytes(runs, tiny_src, tmp_path, caplog):
    dst, work = str(tmp_path / "b"), str(tmp_path / "work")
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, tiny_src, dst, runs["data"], work], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]  # the kill point was reached
    shards = sorted(n for n in os.listdir(runs["b"]) if n.endswith(".safetensors"))
    assert len(shards) == 4
    assert os.path.exists(os.path.join(dst, f".{shards[1]}.partial")) and not os.path.exists(os.path.join(dst, INDEX_NAME))
    assert list(read_manifest(os.path.join(dst, STATE_DIR))) == [shards[0]] and shards[1] not in os.listdir(dst)
    first = os.stat(os.path.join(dst, shards[0])).st_mtime_ns

    caplog.set_level("INFO", logger="nvfp4kit.calibrate")
    quantize_with_llmcompressor(tiny_src, dst, OPTIONS, small_run(runs["data"], work))  # the same command

    assert "reusing the finished calibration" in caplog.text  # calibration not run again
    assert os.stat(os.path.join(dst, shards[0])).st_mtime_ns == first  # the recorded shard not written again
    assert not any(n.endswith(".partial") for n in os.listdir(dst))
    for name in shards + [INDEX_NAME, "config.json"]:
        with open(os.path.join(dst, name), "rb") as a, open(os.path.join(runs["b"], name), "rb") as b:
            assert a.read() == b.read(), f"{name} differs from the uninterrupted run's"
    assert not os.path.exists(work), "the work folder is removed on success"


# Bars that compressed-tensors draws with an explicit ``disable=``, once each at start-up: the environment cannot
# reach them. Every other bar (datasets, transformers, llm-compressor's per-layer Calibrating/Propagating, whose
# count grows with the model) must be gone from a piped log.
START_UP_BARS = (b"Dispatching model", b"Applying quantization config")


def test_the_command_piped_to_a_log_writes_the_same_bytes_with_plain_progress_lines(runs, tiny_src, tmp_path):
    """``quantize_llmcompressor.py ... 2>&1 | tee path_b.log``: the libraries' progress bars filled the log with
    carriage returns (26 bar lines on the tiny model); the kit's per-layer lines carry the progress."""
    dst = str(tmp_path / "out")
    run = subprocess.run([sys.executable, "quantize_llmcompressor.py", "--src", tiny_src, "--dst", dst, "--dataset",
                          runs["data"], "--num-samples", "4", "--max-seq-len", "16", "--max-shard-size", "8MB",
                          "--offload-dir", str(tmp_path / "work")],
                         cwd=REPO, capture_output=True, timeout=600)  # bytes: text mode turns CRs into newlines
    assert run.returncode == 0, run.stderr[-3000:]
    bars = [line for line in run.stderr.split(b"\n") if b"\r" in line]
    assert all(any(b in line for b in START_UP_BARS) for line in bars), bars
    assert len(bars) <= len(START_UP_BARS) * 2, bars  # (the model is dispatched twice: staging, then calibration)
    assert b"calibrated layer" in run.stderr
    for name in sorted(os.listdir(runs["b"])):
        if name.endswith(".safetensors"):
            with open(os.path.join(dst, name), "rb") as a, open(os.path.join(runs["b"], name), "rb") as b:
                assert a.read() == b.read(), f"{name}: the command's bytes differ from the same run in-process"


# --- refusals before any work --------------------------------------------------------------------------------------
def test_an_encoder_without_encode_messages_is_one_line_naming_it(tiny_src, runs, tmp_path):
    """The checkpoint's encoding/encoding_dsv4.py lacks encode_messages: exit 2, one line naming the file, no work."""
    src = str(tmp_path / "src")
    shutil.copytree(tiny_src, src)
    encoder = os.path.join(src, "encoding", "encoding_dsv4.py")
    with open(encoder, "w") as f:
        f.write("def encode_message(message):\n    return message['content']\n")
    dst = str(tmp_path / "out")
    run = subprocess.run([sys.executable, "quantize_llmcompressor.py", "--src", src, "--dst", dst, "--dataset",
                          runs["data"], "--num-samples", "4", "--max-seq-len", "16"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert "ERROR" in last and encoder in last and "encode_messages" in last, last
    assert not os.path.exists(dst) and not os.path.exists(dst + ".offload")


PATH_B_FLAG_ERRORS = {
    "no samples": (["--num-samples", "0"], "--num-samples: 0 is below 1"),
    "negative samples": (["--num-samples", "-3"], "--num-samples: -3 is below 1"),
    "one-token samples": (["--max-seq-len", "1"], "--max-seq-len: 1 is below 2"),
    "negative host memory": (["--max-cpu-memory", "-1"], "--max-cpu-memory: -1 is below 0"),
}


@pytest.mark.parametrize("case", list(PATH_B_FLAG_ERRORS))
def test_flag_errors_are_one_line_before_any_work(tmp_path, case):
    """Was an AssertionError traceback deep in the memory estimate (--num-samples 0), or accepted and carried on
    to the dataset (--max-cpu-memory -1)."""
    flags, fragment = PATH_B_FLAG_ERRORS[case]
    dst = str(tmp_path / "out")
    run = subprocess.run([sys.executable, "quantize_llmcompressor.py", "--src", str(tmp_path), "--dst", dst, *flags],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], run.stderr
    assert not os.path.exists(dst)


def test_an_encoder_that_fails_to_load_names_its_file(tmp_path):
    encoder = tmp_path / "encoding" / "encoding_dsv4.py"
    encoder.parent.mkdir()
    encoder.write_text("import a_module_the_kit_does_not_have\n")
    with pytest.raises(CalibrationDataError, match=re.escape(str(encoder))):
        chat_renderer(object(), str(tmp_path))


def test_activation_cache_beyond_host_memory_is_refused_with_what_fits():
    """V4 Pro figures: 51.5 GB per layer, a cache of 512 x 4096 tokens on a 128 GB host."""
    samples, seq = 512, 4096
    cache = samples * seq * 4 * 7168 * 2 / 1e9
    estimate = {"layer_gb": 51.5, "activation_cache_gb": cache}
    with pytest.raises(PathBError) as e:
        cpu_budget_gb(estimate, 128.0, samples, seq)
    message = str(e.value)
    assert f"{cache:.1f} GB" in message and f"{cache + 51.5 + 10:.1f} GB needed" in message and "128.0 GB" in message
    n = int(re.search(r"--num-samples (\d+) \(", message).group(1))
    s = int(re.search(r"--max-seq-len (\d+) \(", message).group(1))
    # What it proposes fits, and one more does not: the figures are the limit, not a guess.
    assert cpu_budget_gb({**estimate, "activation_cache_gb": cache * n / samples}, 128.0, n, seq) >= 0
    assert cpu_budget_gb({**estimate, "activation_cache_gb": cache * s / seq}, 128.0, samples, s) >= 0
    with pytest.raises(PathBError):
        cpu_budget_gb({**estimate, "activation_cache_gb": cache * (n + 1) / samples}, 128.0, n + 1, seq)
    assert cpu_budget_gb(estimate, 256.0, samples, seq) == pytest.approx(256.0 - cache - 51.5 - 10)


def test_activation_cache_refusal_comes_before_any_work(tiny_src, runs, tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "host_memory_gb", lambda: 10.0)  # less than the headroom alone
    dst = str(tmp_path / "out")
    with pytest.raises(PathBError, match="not enough host memory"):
        quantize_with_llmcompressor(tiny_src, dst, OPTIONS, small_run(runs["data"], str(tmp_path / "work")))
    assert not os.path.exists(dst) and not os.path.exists(str(tmp_path / "work"))


# --- pieces -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def staging(tiny_src, tmp_path_factory) -> str:
    return stage_bf16_checkpoint(open_checkpoint(tiny_src), str(tmp_path_factory.mktemp("staging") / "s"))


def test_staging_is_bf16_without_mtp_or_scales_and_resumes(staging, tiny_src):
    src = open_checkpoint(tiny_src)
    staged = tensors_of(staging)
    assert not any(is_mtp(n) or n.endswith(".scale") for n in staged)
    for n, info in staged.items():
        assert info.dtype == ("BF16" if src.tensors[n].dtype == "F8_E4M3" else src.tensors[n].dtype), n
    before = {n: os.path.getmtime(os.path.join(staging, s)) for n, s in open_checkpoint(staging).weight_map.items()}
    stage_bf16_checkpoint(src, staging)  # a rerun skips finished shards
    assert before == {n: os.path.getmtime(os.path.join(staging, s)) for n, s in open_checkpoint(staging).weight_map.items()}


def test_fp32_norms_clash_with_bf16_layers_until_cast(staging):
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM.from_pretrained(staging, dtype=torch.bfloat16).eval()
    ids = torch.arange(2, 18).reshape(1, -1)
    with torch.no_grad(), pytest.raises(RuntimeError, match="dtype"):
        model(input_ids=ids)
    assert cast_fp32_norms(model, torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    # The per-layer memory estimate is what one decoder layer of the calibration model holds.
    estimate = layer_memory_estimate(open_checkpoint(staging), num_samples=4, max_seq_len=16)
    layer_bytes = max(sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers(False)))
                      for layer in model.model.layers)
    assert estimate["layer_gb"] == pytest.approx(layer_bytes / 1e9, rel=0.05)


def _fake_save(path: str, igs: dict[str, float], gs: dict[str, float] | None = None) -> dict:
    tensors = {}
    for m, value in igs.items():
        tensors[f"{m}.input_global_scale"] = torch.tensor([value])
        tensors[f"{m}.weight_global_scale"] = torch.tensor([(gs or {}).get(m, 100.0)])
        tensors[f"{m}.weight_packed"] = torch.zeros(1, 8, dtype=torch.uint8)
        tensors[f"{m}.weight_scale"] = torch.zeros(1, 1, dtype=torch.float8_e4m3fn)
    save_file(tensors, path)
    return read_header(path)[0]


def test_unreached_expert_takes_the_peer_maximum(tmp_path):
    modules = [f"layers.0.ffn.experts.{e}.w{k}" for e in range(3) for k in (1, 2, 3)]
    igs = {m: GLOBAL_SCALE_DIVISOR / (1.0 + int(m.split(".")[4])) for m in modules}  # amax 1, 2, 3 per expert
    igs["layers.0.ffn.experts.1.w2"] = 0.0  # never calibrated
    saved = _fake_save(str(tmp_path / "s.safetensors"), igs)
    mtp = ["mtp.0.ffn.experts.0.w2"]
    result = collect_activation_amax(saved, modules + mtp, "gate-up")
    assert result.input_amax["layers.0.ffn.experts.1.w2"] == pytest.approx(3.0)
    assert result.input_amax["layers.0.ffn.experts.2.w1"] == pytest.approx(3.0)
    assert result.input_amax["mtp.0.ffn.experts.0.w2"] == pytest.approx(3.0)
    assert set(result.fallbacks) == {"layers.0.ffn.experts.1.w2", "mtp.0.ffn.experts.0.w2"}


def test_unequal_gate_up_global_scales_are_refused(tmp_path):
    modules = ["layers.0.ffn.experts.0.w1", "layers.0.ffn.experts.0.w3"]
    saved = _fake_save(str(tmp_path / "s.safetensors"), {m: 10.0 for m in modules}, {modules[0]: 1.0, modules[1]: 2.0})
    with pytest.raises(PathBError, match="one global scale"):
        collect_activation_amax(saved, modules, "gate-up")


def test_missing_expert_tensors_are_refused(tmp_path):
    saved = _fake_save(str(tmp_path / "s.safetensors"), {"layers.0.ffn.experts.0.gate_proj": 10.0})
    with pytest.raises(PathBError, match="expert names on save"):
        collect_activation_amax(saved, ["layers.0.ffn.experts.0.w1"], "gate-up")


def test_calibration_data_is_seeded_rendered_and_cut(tiny_src, tmp_path):
    from transformers import AutoTokenizer

    data = write_jsonl(str(tmp_path / "d.jsonl"), rows=8)
    first = [r["messages"][0]["content"] for r in load_rows(data, 4, seed=1)]
    assert first == [r["messages"][0]["content"] for r in load_rows(data, 4, seed=1)]
    assert first != [r["messages"][0]["content"] for r in load_rows(data, 4, seed=2)]
    tokenizer = AutoTokenizer.from_pretrained(tiny_src)
    ds = tokenized_dataset(data, tokenizer, tiny_src, num_samples=4, max_seq_len=16, seed=1)
    assert len(ds) == 4 and all(0 < len(r["input_ids"]) <= 16 for r in ds)
    text = deepseek_plain_format([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                  {"role": "assistant", "content": "A"}])
    assert text == "<｜begin▁of▁sentence｜>S<｜User｜>U<｜Assistant｜></think>A<｜end▁of▁sentence｜>"


def test_shard_writer_records_what_is_on_disk_and_leaves_nothing_on_failure(tmp_path):
    """nvfp4kit.write: the entry's size and hash are the file's; a failure midway or a short shard leaves no file."""
    from nvfp4kit.manifest import HASH, file_digest
    from nvfp4kit.safetensors_io import spec_of
    from nvfp4kit.write import Piece, ShardWriteError, write_shard

    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(5, dtype=torch.bfloat16)}
    specs = [spec_of(n, t) for n, t in tensors.items()]
    entry = write_shard(str(tmp_path), "s.safetensors", specs, [Piece([tensors["a"]]), Piece([tensors["b"]])])
    path = str(tmp_path / "s.safetensors")
    assert entry == {"name": "s.safetensors", "size": os.path.getsize(path), HASH: file_digest(path)}
    assert all(torch.equal(read_tensor(info), tensors[n]) for n, info in read_header(path)[0].items())

    def failing():
        yield Piece([tensors["a"]])
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_shard(str(tmp_path), "t.safetensors", specs, failing())
    with pytest.raises(ShardWriteError, match="wrote"):
        write_shard(str(tmp_path), "u.safetensors", specs, [Piece([tensors["a"]])])
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]



def test_writer_ends_when_a_write_back_request_comes_after_the_flusher_stopped(tmp_path, monkeypatch):
    """The write-back thread may stop (nothing queued, the pieces all handed out) while a writer still works; that
    writer's last request must not leave the writer waiting forever to queue its stop."""
    import threading
    import time

    from nvfp4kit import write
    from nvfp4kit.safetensors_io import spec_of

    monkeypatch.setattr(write, "WRITEBACK_EVERY", 1)  # every piece asks for a write-back
    slow = write.ShardFile.write_at

    def write_at(self, offset, data):
        if offset:  # the pieces, not the header: the flusher sees an empty queue and stops meanwhile
            time.sleep(0.5)
        slow(self, offset, data)

    monkeypatch.setattr(write.ShardFile, "write_at", write_at)
    tensors = {"a": torch.ones(4), "b": torch.zeros(4)}
    specs = [spec_of(n, t) for n, t in tensors.items()]
    result: list = []
    t = threading.Thread(target=lambda: result.append(write.write_shard(
        str(tmp_path), "s.safetensors", specs, [write.Piece([tensors["a"]]), write.Piece([tensors["b"]])])),
        daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "write_shard hung on a write-back request queued after its flusher stopped"
    assert result and result[0]["size"] == os.path.getsize(tmp_path / "s.safetensors")


def test_layer_progress_logs_every_layer_whatever_passes_the_pipeline_makes(caplog):
    """A layer is logged after 2 x samples calls, when a later layer runs, or when the pipeline ends: one pass per
    sample (no propagation pass), or a single layer, still log every layer once, in order."""
    import logging

    from nvfp4kit.calibrate import LayerProgress

    class Block(torch.nn.Module):
        def forward(self, x):
            return x + 1

    model = torch.nn.Sequential(Block(), Block(), Block())
    progress = LayerProgress(model, samples=4, layer_class="Block")
    with caplog.at_level(logging.INFO, logger="nvfp4kit"):
        for layer in model:  # the sequential pipeline: layer by layer, one pass per sample only
            for _ in range(4):
                layer(torch.zeros(1))
        progress.end()
    progress.close()
    assert [r["layer"] for r in progress.records] == [0, 1, 2]
    assert len([m for m in caplog.messages if m.startswith("calibrated layer")]) == 3
