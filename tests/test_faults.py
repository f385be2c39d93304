"""Fault injection: killed runs, full disks and broken inputs lose nothing (issue 9).

Every run of the converter here is the real script in its own process group, on a small synthetic checkpoint (the
``tiny`` preset with 2 layers and 2 experts, split into several output shards). Faults are injected at named
points by ``tests/fault_hooks/sitecustomize.py`` (in the converter and in its spawned workers), or by signals
from outside at random times. After each fault, a rerun must produce exactly the bytes of an uninterrupted run,
and nothing in the source may change: an autouse fixture checksums every source folder before and after each
test.

CI runs a few well-chosen points; ``pytest tests/test_faults.py --soak N`` runs N kills per fault point and N
random-time kills (see docs/faults.md for the figures).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch
import xxhash

from nvfp4kit.card import CARD_NAME
from nvfp4kit.checkpoint import INDEX_NAME
from nvfp4kit.convert import LOCK_NAME, REPORT_NAME, STATE_DIR
from nvfp4kit.faults import ENV as FAULT_ENV, POINTS
from nvfp4kit.safetensors_io import read_header, read_tensor, save_file
from nvfp4kit.fixtures.synthetic import generate


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "fp8_to_nvfp4_streaming.py")
HOOKS = os.path.join(ROOT, "tests", "fault_hooks")
MINI = {"num_hidden_layers": 2, "n_routed_experts": 2}  # ~11 MB: a run costs little more than its start-up
SHARD_SIZE = 1_500_000  # 8 output shards
FLAGS = ("--device", "cpu", "--max-shard-size", str(SHARD_SIZE))
RESUME_HINT = "rerun the same command to resume"


# ---------------------------------------------------------------------------------------------------------------
# Running the converter
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    returncode: int
    stderr: str
    pgid: int

    @property
    def message(self) -> str:
        """What the user sees of the error: from the first ERROR line on (a plan error lists its problems)."""
        lines = self.stderr.splitlines()
        first = next((k for k, line in enumerate(lines) if " ERROR " in line), len(lines))
        return "\n".join(lines[first:])


def convert_cli(src: str, dst: str, *flags: str, workers: int = 1, fault: str | None = None,
                kill_after: float | None = None, timeout: float = 600) -> Run:
    """The script in a new session (its own process group); ``fault`` is a hook spec, ``kill_after`` seconds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HOOKS, ROOT]))
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    cmd = [sys.executable, SCRIPT, "--src", src, "--dst", dst, "--workers", str(workers), *FLAGS, *flags]
    # SIGINT at its default, as in a terminal: a shell that runs the suite in the background starts it ignored,
    # and Python then never turns it into KeyboardInterrupt.
    # Bytes, decoded here: text mode would turn each carriage return into a newline, and the piped-log test
    # could then never see one.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if kill_after is not None:
        try:
            proc.wait(kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=timeout)
    return Run(proc.returncode, stderr.decode("utf-8", "replace"), proc.pid)


def assert_group_gone(pgid: int, within: float = 30) -> None:
    """No process of the run is left (workers included): an interrupted run must not keep writing."""
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of the run are still alive: {subprocess.getoutput(f'pgrep -g {pgid} -a')}")


# ---------------------------------------------------------------------------------------------------------------
# Folders: checksums, outputs, temporary files
# ---------------------------------------------------------------------------------------------------------------
def checksums(folder: str) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones too), by relative path; folders as ``dir``."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = "dir"
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def output_files(dst: str) -> dict[str, str]:
    """What a user keeps, with checksums: everything but the kit's state, its lock, the timed report and the card
    (which names the output folder)."""
    return {name: digest for name, digest in checksums(dst).items()
            if name.split(os.sep)[0] not in (STATE_DIR, REPORT_NAME, CARD_NAME) and not name.startswith(LOCK_NAME)}


def temporary_files(dst: str) -> list[str]:
    return sorted(name for name in checksums(dst) if name.endswith(".partial"))


def assert_identical(reference: str, dst: str) -> None:
    """``dst`` holds exactly the files of the uninterrupted run ``reference``, byte for byte, and no temporary one."""
    reference, got = output_files(reference), output_files(dst)
    assert sorted(got) == sorted(reference), f"files differ: {sorted(set(got) ^ set(reference))}"
    assert [n for n in got if got[n] != reference[n]] == [], "these outputs differ from an uninterrupted run"
    assert temporary_files(dst) == []


def assert_nothing_half_done(dst: str) -> None:
    """No partial shard, no index, and each shard the manifest calls done is whole (its recorded hash).

    (A side file's ``.partial`` may stay after a failed copy: it is never read, and the rerun removes it.)
    """
    assert [name for name in temporary_files(dst) if name.endswith(".safetensors.partial")] == []
    assert not os.path.exists(os.path.join(dst, INDEX_NAME)), "a failed run must not look complete"
    for line in open(os.path.join(dst, STATE_DIR, "manifest.jsonl")) if manifest_names(dst) else []:
        entry = json.loads(line)
        with open(os.path.join(dst, entry["name"]), "rb") as f:
            assert xxhash.xxh3_128(f.read()).hexdigest() == entry["xxh3_128"], entry["name"]


def manifest_names(dst: str) -> list[str]:
    path = os.path.join(dst, STATE_DIR, "manifest.jsonl")
    if not os.path.exists(path):
        return []
    names = []
    for line in open(path):
        try:
            names.append(json.loads(line)["name"])
        except (json.JSONDecodeError, KeyError):
            pass
    return names


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mini_src(tmp_path_factory) -> str:
    """A small synthetic V4 FP8 checkpoint: read-only, tests that break it copy it first (:func:`copy_of`)."""
    dst = str(tmp_path_factory.mktemp("faults") / "mini")
    generate(dst, preset="tiny", seed=0, **MINI)
    return dst


@pytest.fixture(scope="session")
def reference(mini_src, tmp_path_factory) -> str:
    """The output folder of an uninterrupted run."""
    dst = str(tmp_path_factory.mktemp("faults") / "reference")
    run = convert_cli(mini_src, dst)
    assert run.returncode == 0, run.stderr[-3000:]
    return dst


@pytest.fixture(autouse=True)
def unchanged(request):
    """``unchanged(folder)`` records checksums of a source now; each must be the same when the test ends.

    The shared source is watched for every test that uses it.
    """
    watched: dict[str, dict[str, str]] = {}

    def watch(folder: str) -> None:
        watched[folder] = checksums(folder)

    if "mini_src" in request.fixturenames:
        watch(request.getfixturevalue("mini_src"))
    yield watch
    for folder, before in watched.items():
        assert checksums(folder) == before, f"the converter modified its source {folder}"


@pytest.fixture
def copy_of(mini_src, tmp_path, unchanged):
    """``copy_of(break_it)``: a copy of the source, broken by ``break_it(folder)``, then watched."""

    def make(break_it=None) -> str:
        src = str(tmp_path / "src")
        shutil.copytree(mini_src, src)
        if break_it is not None:
            break_it(src)
        unchanged(src)
        return src

    return make


# ---------------------------------------------------------------------------------------------------------------
# Killed runs
# ---------------------------------------------------------------------------------------------------------------
# (point, n-th time it is reached, workers): one of each kind of place, in CI.
CI_KILLS = [
    ("plan_written", 1, 1),
    ("side_file", 2, 1),
    ("compute", 3, 2),
    ("tensor_written", 20, 1),
    ("shard_complete", 2, 1),
    ("shard_renamed", 3, 2),
    ("manifest", 2, 1),
    ("config", 1, 1),
    ("index", 1, 1),
    ("index_renamed", 1, 1),
]
# Points reached in the worker processes (the others in the converter's own process).
WORKER_POINTS = {"compute", "tensor_written", "shard_complete", "shard_renamed"}
# How often a run reaches each point (upper bounds for the soak's draws).
REACHED = {"plan_written": 1, "side_file": 8, "compute": 12, "tensor_written": 170, "shard_complete": 8,
           "shard_renamed": 8, "manifest": 8, "config": 1, "index": 1, "index_renamed": 1}


def pytest_generate_tests(metafunc) -> None:
    soak = metafunc.config.getoption("--soak")
    rng = random.Random(9)
    if "kill_point" in metafunc.fixturenames:
        cases = CI_KILLS
        if soak:
            # With 2 workers each worker reaches a worker-side point about half as often, and a fault fires at the
            # N-th time one process reaches it: the busier worker reaches at least half, rounded up.
            cases = [(point, -(-n // 2) if w == 2 and point in WORKER_POINTS else n, w) for point in POINTS
                     for n in sorted(rng.sample(range(1, REACHED[point] + 1), min(soak, REACHED[point])))
                     for w in [1 + n % 2]]
        metafunc.parametrize("kill_point", cases, ids=[f"{p}-{n}-w{w}" for p, n, w in cases])
    if "random_kill" in metafunc.fixturenames:
        draws = [round(rng.uniform(0.05, 1.0), 3) for _ in range(soak or 2)]
        metafunc.parametrize("random_kill", draws, ids=[f"at{d:.0%}" for d in draws])


def resume_and_compare(src: str, dst: str, reference: str) -> Run:
    run = convert_cli(src, dst)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_identical(reference, dst)
    return run


def test_kill_at_a_fault_point_then_rerun_gives_identical_bytes(mini_src, reference, kill_point, tmp_path):
    point, n, workers = kill_point
    dst = str(tmp_path / "out")
    killed = convert_cli(mini_src, dst, workers=workers, fault=f"{point}:{n}:kill")
    # A point never reached means the hook no longer finds the step it names (renamed, moved): a test of nothing.
    assert killed.returncode != 0, f"{point} was reached fewer than {n} times: the fault never fired"
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert_group_gone(killed.pgid)
    if point != "index_renamed":
        assert not os.path.exists(os.path.join(dst, INDEX_NAME)), "a killed run must not look complete"
    resume_and_compare(mini_src, dst, reference)


@pytest.mark.parametrize("point, workers", [("shard_renamed", 1), ("compute", 2)])
def test_original_release_killed_and_resumed_gives_the_fp8_forms_bytes(mini_src, reference, point, workers,
                                                                        tmp_path):
    """The same model stored as DeepSeek's original release (MXFP4 experts): killed, rerun, and the output is the
    uninterrupted run's of the FP8 form, byte for byte."""
    src = str(tmp_path / "original")
    generate(src, preset="tiny", seed=0, form="mxfp4", **MINI)
    dst = str(tmp_path / "out")
    killed = convert_cli(src, dst, workers=workers, fault=f"{point}:3:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert_group_gone(killed.pgid)
    assert not os.path.exists(os.path.join(dst, INDEX_NAME))
    run = convert_cli(src, dst)
    assert run.returncode == 0, run.stderr[-3000:]
    # Same shards, index and config as from the FP8 form (the side files are the source's own: its README differs)
    same = [n for n in output_files(reference) if n.endswith(".safetensors") or n in (INDEX_NAME, "config.json")]
    assert {n: output_files(dst)[n] for n in same} == {n: output_files(reference)[n] for n in same}
    assert temporary_files(dst) == []


def test_torn_manifest_line_is_redone(mini_src, reference, tmp_path):
    dst = str(tmp_path / "out")
    killed = convert_cli(mini_src, dst, fault="manifest:3:torn")
    assert killed.returncode == -signal.SIGKILL
    assert len(manifest_names(dst)) == 2  # the third line is half a line
    resume_and_compare(mini_src, dst, reference)


def test_kill_at_a_random_time_then_rerun_gives_identical_bytes(mini_src, reference, random_kill, tmp_path):
    dst = str(tmp_path / "out")
    started = time.time()
    first = convert_cli(mini_src, dst)  # an uninterrupted run, to time this machine now
    assert first.returncode == 0, first.stderr[-3000:]
    elapsed = time.time() - started
    shutil.rmtree(dst)
    killed = convert_cli(mini_src, dst, workers=2, kill_after=random_kill * elapsed)
    assert killed.returncode in (0, -signal.SIGKILL), killed.stderr[-3000:]
    resume_and_compare(mini_src, dst, reference)


@pytest.mark.parametrize("action, workers", [("sigint", 1), ("sigterm", 1), ("sigint", 2), ("sigterm", 2)])
def test_interrupt_stops_cleanly_and_says_how_to_resume(mini_src, reference, action, workers, tmp_path):
    dst = str(tmp_path / "out")
    stopped = convert_cli(mini_src, dst, workers=workers, fault=f"tensor_written:20:{action}")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert RESUME_HINT in stopped.message
    assert "Traceback" not in stopped.stderr
    assert_group_gone(stopped.pgid)
    assert_nothing_half_done(dst)
    resume_and_compare(mini_src, dst, reference)


def test_a_stop_signal_ignored_before_stays_ignored_inside_deferred():
    """A run whose SIGINT was ignored (started in the background by a shell) is not stopped by one while shards
    are written: deferred() notes only the signals it would otherwise have raised."""
    from nvfp4kit import stop_signals

    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with stop_signals.deferred() as requested:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert not requested()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


# A stop signal landing at the worst bytecode: just after the main thread took a lock inside a Python-level
# ``Condition.__enter__`` (a queue's, a future's), as a SIGTERM from a dying parent once did in the shard writer.
# Run in a child: a hang is the failure.
_SIGNAL_INSIDE_A_LOCK = """
import os, signal, sys, threading, time
import torch
from nvfp4kit import manifest, write
from nvfp4kit.safetensors_io import TensorSpec
from nvfp4kit.stop_signals import interrupt

signal.signal(signal.SIGTERM, interrupt)  # as in a worker
armed = []
enter = threading.Condition.__enter__

def enter_then_signal(self):
    taken = enter(self)
    if armed and threading.current_thread() is threading.main_thread():
        armed.clear()
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs at the next bytecode: with the lock held
    return taken

threading.Condition.__enter__ = enter_then_signal
folder = sys.argv[2]
if sys.argv[1] == "writer":
    specs = [TensorSpec(f"t{k}", "U8", (1 << 16,)) for k in range(8)]

    def pieces():
        for k in range(8):
            if k == 3:
                armed.append(1)  # the next lock the main thread takes is the writers' queue's, in put()
            yield write.Piece([torch.full((1 << 16,), k, dtype=torch.uint8)])

    run = lambda: write.write_shard(folder, "s.safetensors", specs, pieces())
else:  # the resume check: the main thread waits on the hashing threads' futures
    entries = []
    for k in range(8):
        with open(os.path.join(folder, f"s{k}"), "wb") as f:
            f.write(os.urandom(1 << 20))
        entries.append({"name": f"s{k}", "size": 1 << 20, manifest.HASH: "0"})
    check = manifest.is_intact

    def slow_check(dst, entry, by_hash):
        armed.append(1)  # the main thread's next lock: a future's, while the shards after the first are hashed
        time.sleep(0.1 * (1 + int(entry["name"][1:])))  # each takes longer than the one before
        return check(dst, entry, by_hash)

    manifest.is_intact = slow_check
    run = lambda: manifest.intact_entries(folder, entries, by_hash=True, threads=2)
try:
    run()
    print("not stopped")
except KeyboardInterrupt:
    print("stopped", sorted(n for n in os.listdir(folder) if n.startswith(".")), threading.active_count())
"""


@pytest.mark.parametrize("where", ["writer", "resume_check"])
def test_a_stop_signal_inside_a_lock_stops_cleanly(tmp_path, where):
    """A stop signal never raises inside the locks of the shard writer's queues or the resume check's futures
    (nvfp4kit.stop_signals.deferred): raised there, the lock stayed taken and the cleanup waited on it forever."""
    run = subprocess.run([sys.executable, "-c", _SIGNAL_INSIDE_A_LOCK, where, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["stopped", "[]", "1"]  # no partial file, every thread joined


def test_a_deferred_stop_signal_is_noted_inside_and_raised_on_leaving():
    """Inside stop_signals.deferred() a signal only sets requested() (also in a nested block); on leaving, the
    handler in place before gets it (here the workers' interrupt: KeyboardInterrupt, and later signals ignored)."""
    from nvfp4kit import stop_signals

    previous = {sig: signal.getsignal(sig) for sig in stop_signals.STOP_SIGNALS}
    try:
        signal.signal(signal.SIGTERM, stop_signals.interrupt)
        with pytest.raises(KeyboardInterrupt):
            with stop_signals.deferred() as requested:
                assert not requested()
                with stop_signals.deferred() as inner:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.01)  # the handler has run: it only noted the signal
                    assert inner() and requested()
                assert requested()
        os.kill(os.getpid(), signal.SIGTERM)  # ignored now: the cleanup after a stop runs to its end
        time.sleep(0.01)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def worker_pids(stderr: str) -> list[int]:
    """The worker processes a run started (each in a process group of its own), from its log."""
    return [int(m) for m in re.findall(r"worker \d+ started \(pid (\d+)\)", stderr)]


def assert_processes_gone(pids: list[int], within: float = 30) -> None:
    deadline = time.time() + within
    alive = pids
    while alive and time.time() < deadline:
        alive = [p for p in alive if os.path.exists(f"/proc/{p}") and "zombie" not in _proc_state(p)]
        time.sleep(0.1)
    assert not alive, f"worker processes still alive: {subprocess.getoutput(f'ps -o pid,stat,args -p {alive[0]}')}"


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line for line in f if line.startswith("State:")).lower()
    except (OSError, StopIteration):
        return "zombie"


def signal_when(src: str, dst: str, pattern: str, delay: float, send, workers: int = 2) -> Run:
    """The converter with ``send(proc)`` called ``delay`` seconds after a stderr line matches ``pattern``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HOOKS, ROOT]))
    env.pop(FAULT_ENV, None)
    cmd = [sys.executable, SCRIPT, "--src", src, "--dst", dst, "--workers", str(workers), *FLAGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if re.search(pattern, line):
            time.sleep(delay)
            send(proc)
            break
    lines += proc.stderr.readlines()
    proc.wait(timeout=600)
    return Run(proc.returncode, "".join(lines), proc.pid)


@pytest.mark.parametrize("action", ["sigint-self", "sigterm-self"])
def test_a_signal_to_one_worker_fails_the_run(mini_src, reference, action, tmp_path):
    """The worker stops and drops its shard: the run must end interrupted (130), never 'done' over a missing shard."""
    dst = str(tmp_path / "out")
    stopped = convert_cli(mini_src, dst, workers=2, fault=f"tensor_written:20:{action}")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert RESUME_HINT in stopped.message and "worker" in stopped.message
    assert "Traceback" not in stopped.stderr and " done: " not in stopped.stderr
    assert_group_gone(stopped.pgid)
    assert_processes_gone(worker_pids(stopped.stderr))
    assert_nothing_half_done(dst)
    resume_and_compare(mini_src, dst, reference)


@pytest.mark.parametrize("delay", [0.0, 0.5, 1.5])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_group_while_workers_start(mini_src, reference, sig, delay, tmp_path):
    """Ctrl-C (or a scheduler's SIGTERM to the group) while the workers import torch: exit 130, no process left."""
    dst = str(tmp_path / "out")
    stopped = signal_when(mini_src, dst, r"worker 1 started", delay, lambda p: os.killpg(p.pid, sig))
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert RESUME_HINT in stopped.message
    assert "Traceback" not in stopped.stderr
    assert_group_gone(stopped.pgid)
    assert_processes_gone(worker_pids(stopped.stderr))
    assert_nothing_half_done(dst)
    resume_and_compare(mini_src, dst, reference)


@pytest.mark.parametrize("when", [r"worker 1 started", r"wrote model-00002"], ids=["starting", "mid-run"])
def test_the_parent_killed_outright_leaves_no_worker_behind(mini_src, reference, when, tmp_path):
    """kill -9 of the converter alone: its workers stop (they rename nothing more) instead of running on."""
    dst = str(tmp_path / "out")
    killed = signal_when(mini_src, dst, when, 0.2, lambda p: os.kill(p.pid, signal.SIGKILL))
    assert killed.returncode == -signal.SIGKILL
    assert_processes_gone(worker_pids(killed.stderr))
    shards = sorted(n for n in os.listdir(dst) if n.endswith(".safetensors"))
    time.sleep(1)
    assert sorted(n for n in os.listdir(dst) if n.endswith(".safetensors")) == shards
    assert not os.path.exists(os.path.join(dst, INDEX_NAME))
    resume_and_compare(mini_src, dst, reference)


def test_the_parent_stopped_by_sigterm_stops_its_workers(mini_src, reference, tmp_path):
    dst = str(tmp_path / "out")
    stopped = signal_when(mini_src, dst, r"wrote model-00001", 0.0, lambda p: os.kill(p.pid, signal.SIGTERM))
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert_processes_gone(worker_pids(stopped.stderr))
    assert_nothing_half_done(dst)
    resume_and_compare(mini_src, dst, reference)


# ---------------------------------------------------------------------------------------------------------------
# Several ranks into one destination (torchrun / Slurm)
# ---------------------------------------------------------------------------------------------------------------
def launch_ranks(src: str, dst: str, world: int, fault_rank: int | None = None, fault: str | None = None) -> list[Run]:
    """``world`` converters launched at once as ranks 0..world-1 (torchrun's variables), one worker each."""
    procs = []
    for r in range(world):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([HOOKS, ROOT]), RANK=str(r), WORLD_SIZE=str(world))
        env.pop(FAULT_ENV, None)
        if r == fault_rank:
            env[FAULT_ENV] = fault
        cmd = [sys.executable, SCRIPT, "--src", src, "--dst", dst, "--workers", "1", *FLAGS]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    errs = [p.communicate(timeout=600)[1] for p in procs]
    return [Run(p.returncode, err, p.pid) for p, err in zip(procs, errs)]


def test_three_ranks_write_the_files_of_one_process(mini_src, reference, tmp_path):
    dst = str(tmp_path / "out")
    runs = launch_ranks(mini_src, dst, 3)
    for r, run in enumerate(runs):
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"rank {r} of 3: output shards i with i mod 3 == {r}" in run.stderr
    assert sum("is the last to finish" in run.stderr for run in runs) >= 1
    assert_identical(reference, dst)


def test_a_killed_rank_is_resumed_by_relaunching_the_job(mini_src, reference, tmp_path):
    dst = str(tmp_path / "out")
    runs = launch_ranks(mini_src, dst, 3, fault_rank=1, fault="shard_renamed:1:kill")
    assert runs[1].returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(dst, INDEX_NAME))
    again = launch_ranks(mini_src, dst, 3)
    assert [run.returncode for run in again] == [0, 0, 0], again[1].stderr[-3000:]
    assert_identical(reference, dst)


def test_progress_in_a_piped_log_is_plain_lines(mini_src, tmp_path):
    """stderr to a pipe (``| tee``): no carriage return anywhere, and progress as log lines."""
    run = convert_cli(mini_src, str(tmp_path / "out"), "--progress-every", "0")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\r" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if " progress: " in line]
    assert len(lines) >= 2 and re.search(r"progress: 8/8 shards, [\d.]+/[\d.]+ GB \(100%\), [\d.]+ GB/s, ETA", lines[-1])


# ---------------------------------------------------------------------------------------------------------------
# Full disks and failing writes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("point, action, expected", [
    ("tensor_written", "enospc", ["model-00001-of-00008.safetensors", "No space left", "free"]),
    ("tensor_written", "eio", ["model-00001-of-00008.safetensors", "Input/output error"]),
    ("side_file", "enospc", ["tokenizer", "No space left", "free"]),
    ("manifest", "enospc", ["No space left", "free"]),
    ("index", "eio", [INDEX_NAME, "Input/output error"]),
])
def test_write_error_is_clear_and_a_rerun_completes(mini_src, reference, point, action, expected, tmp_path):
    dst = str(tmp_path / "out")
    failed = convert_cli(mini_src, dst, fault=f"{point}:1:{action}")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert len(failed.message.splitlines()) == 1 and "Traceback" not in failed.stderr
    for fragment in expected + [dst, RESUME_HINT]:
        assert fragment in failed.message
    assert_nothing_half_done(dst)
    resume_and_compare(mini_src, dst, reference)


def _mount_tmpfs(path: str, *options: str) -> bool:
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", path],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A size-limited filesystem (tmpfs), remountable to a larger size; skipped where mounting is not allowed."""
    path = str(tmp_path / "disk")
    if not _mount_tmpfs(path, "size=64k"):
        pytest.skip("cannot mount a size-limited filesystem here (needs root)")

    def resize(nbytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={nbytes}", path], check=True)

    yield path, resize
    subprocess.run(["umount", path], check=True)


def test_real_full_disk_fails_cleanly_and_resumes_after_space_is_freed(mini_src, reference, small_disk):
    disk, resize = small_disk
    dst = os.path.join(disk, "out")
    needed = sum(os.path.getsize(os.path.join(mini_src, n)) for n in os.listdir(mini_src)) // 2
    resize(needed)
    refused = convert_cli(mini_src, dst)  # the up-front check: too little space for the shards
    assert refused.returncode == 2
    assert "GB still to write but only" in refused.message and "free" in refused.message
    # Exactly the space the up-front check asks for: the shards fit, the side files copied first then do not.
    shards = sum(os.path.getsize(os.path.join(reference, n)) for n in os.listdir(reference) if n.endswith(".safetensors"))
    resize(shutil.disk_usage(disk).used + shards)
    full = convert_cli(mini_src, dst)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "No space left" in full.message and "free" in full.message and RESUME_HINT in full.message
    assert_nothing_half_done(dst)
    resize(64 * 2**20)
    resume_and_compare(mini_src, dst, reference)


# ---------------------------------------------------------------------------------------------------------------
# Broken inputs
# ---------------------------------------------------------------------------------------------------------------
def shard_path(src: str, tensor: str) -> str:
    index = json.load(open(os.path.join(src, INDEX_NAME)))
    return os.path.join(src, index["weight_map"][tensor])


def rewrite_shard(src: str, tensor: str, edit) -> None:
    """Rewrite the shard holding ``tensor`` with ``edit(tensors)`` applied (a dict of CPU tensors)."""
    path = shard_path(src, tensor)
    tensors = {name: read_tensor(info) for name, info in read_header(path)[0].items()}
    edit(tensors)
    save_file(tensors, path)


def edit_header(path: str, edit) -> None:
    """Apply ``edit(header)`` to a shard's JSON header, keeping its data bytes."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header, data = json.loads(f.read(length)), f.read()
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)


def truncate(src: str) -> None:
    path = shard_path(src, "layers.0.attn.wq_a.weight")
    os.truncate(path, os.path.getsize(path) // 2)


def corrupt_header(src: str) -> None:
    with open(shard_path(src, "embed.weight"), "r+b") as f:
        f.seek(9)
        f.write(b"\xff\xfe garbage")


def remove_shard(src: str) -> None:
    os.remove(shard_path(src, "layers.1.ffn.experts.0.w1.weight"))


def duplicate_tensor(src: str) -> None:
    embed = read_tensor(read_header(shard_path(src, "embed.weight"))[0]["embed.weight"])
    rewrite_shard(src, "layers.0.attn.wq_a.weight", lambda t: t.update({"embed.weight": embed}))


def drop_scale(src: str) -> None:
    rewrite_shard(src, "layers.0.attn.wq_a.scale", lambda t: t.pop("layers.0.attn.wq_a.scale"))


def reshape_scale(src: str) -> None:
    def edit(t):  # 3 rows of blocks for 256 rows: no block size gives that
        scale = t["layers.0.attn.wq_a.scale"]
        t["layers.0.attn.wq_a.scale"] = torch.cat([scale, scale[:1]])

    rewrite_shard(src, "layers.0.attn.wq_a.scale", edit)
    _fix_total_size(src)


def _fix_total_size(src: str) -> None:
    """Keep the index's total_size true, so that only the intended problem is reported."""
    path = os.path.join(src, INDEX_NAME)
    index = json.load(open(path))
    index["metadata"]["total_size"] = sum(
        info.nbytes for shard in set(index["weight_map"].values())
        for info in read_header(os.path.join(src, shard))[0].values())
    json.dump(index, open(path, "w"))


def poke(tensor: str, index: tuple, value):
    """A broken copy with one element of ``tensor`` set: raw bytes for FP8 types, a value otherwise."""

    def edit_tensors(t):
        target = t[tensor].view(torch.uint8) if isinstance(value, bytes) else t[tensor]
        target[index] = value[0] if isinstance(value, bytes) else value

    return lambda src: rewrite_shard(src, tensor, edit_tensors)


def unknown_dtype(src: str) -> None:
    edit_header(shard_path(src, "layers.0.attn.attn_sink"),
                lambda h: h["layers.0.attn.attn_sink"].update(dtype="F4_E2M1"))


def empty_index(src: str) -> None:
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(src, name))
    json.dump({"metadata": {"total_size": 0}, "weight_map": {}}, open(os.path.join(src, INDEX_NAME), "w"))


def no_tensor_files(src: str) -> None:
    for name in os.listdir(src):
        if name.endswith(".safetensors") or name == INDEX_NAME:
            os.remove(os.path.join(src, name))


def edit_config(edit):
    def break_it(src: str) -> None:
        path = os.path.join(src, "config.json")
        config = json.load(open(path))
        edit(config)
        json.dump(config, open(path, "w"))

    return break_it


def no_config(src: str) -> None:
    os.remove(os.path.join(src, "config.json"))


def malformed_config(src: str) -> None:
    with open(os.path.join(src, "config.json"), "w") as f:
        f.write('{"num_hidden_layers": 2,')


def transposed_weight(src: str) -> None:
    """A [448, 128] weight header over a scale made for [128, 448]: the bytes fit 512x32 blocks, the config's not."""
    edit_header(shard_path(src, "layers.0.ffn.experts.0.w1.weight"),
                lambda h: h["layers.0.ffn.experts.0.w1.weight"].update(shape=[448, 128]))


def dspark_draft_block(src: str) -> None:
    """Tensors of a newer V4 revision's draft block (DSpark): no rule knows them, so they must not be copied."""
    def add(t):
        t["mtp.0.main_proj.weight"] = torch.zeros(448, 1344, dtype=torch.uint8).view(torch.float8_e4m3fn)
        t["mtp.0.main_proj.scale"] = torch.full((4, 11), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        t["mtp.0.main_norm.weight"] = torch.ones(448, dtype=torch.bfloat16)

    rewrite_shard(src, "embed.weight", add)
    index = json.load(open(os.path.join(src, INDEX_NAME)))
    shard = index["weight_map"]["embed.weight"]
    index["weight_map"].update({n: shard for n in ("mtp.0.main_proj.weight", "mtp.0.main_proj.scale",
                                                    "mtp.0.main_norm.weight")})
    json.dump(index, open(os.path.join(src, INDEX_NAME), "w"))
    _fix_total_size(src)


# Inputs that disagree with their own config.json: refused by inspect and by the converter alike.
CONFIG_CASES = {
    "config missing": (no_config, "config.json is missing"),
    "config malformed": (malformed_config, "config.json in "),
    "layers missing": (edit_config(lambda c: c.update(num_hidden_layers=3)),
                       "num_hidden_layers=3, but the tensors hold layers 0-1: 1 missing (from 2)"),
    "layers past the config": (edit_config(lambda c: c.update(num_hidden_layers=1)),
                               "num_hidden_layers=1, but the tensors hold layers 0-1: 1 past it (from 1)"),
    "unknown architecture": (edit_config(lambda c: c.update(architectures=["LlamaForCausalLM"])),
                             "is not DeepSeek V4"),
    "hidden size changed": (edit_config(lambda c: c.update(hidden_size=512)),
                            "embed.weight: shape [1024, 448], but config.json says vocab_size=1024, hidden_size=512"),
    "draft block of a newer revision": (dspark_draft_block, "mtp.{M}.main_proj.weight: no rule of the DeepSeek V4 "
                                                            "family knows this tensor"),
    "transposed weight": (transposed_weight, "layers.0.ffn.experts.0.w1.weight: scale shape [1, 4] does not fit "
                                             "weight shape [448, 128] in the configured 128x128 blocks"),
}
ONE_CAUSE = {"truncated shard", "missing shard", "config missing", "unknown architecture"}

BROKEN_INPUTS = {**CONFIG_CASES,
    "truncated shard": (truncate, "truncated shard?"),
    "corrupt header": (corrupt_header, "header is not valid JSON"),
    "missing shard": (remove_shard, "is listed in the index but missing"),
    "tensor in two shards": (duplicate_tensor, "tensor embed.weight is in two shards"),
    "weight without scale": (drop_scale, "FP8 weight layers.0.attn.wq_a.weight (model-00002-of-00005.safetensors) "
                                         "has no scale companion"),
    "scale of wrong shape": (reshape_scale, "layers.0.attn.wq_a.weight: scale shape [3, 4] does not fit "
                                            "weight shape [256, 448] in the configured 128x128 blocks"),
    "NaN in a kept FP8 weight": (poke("layers.0.attn.wq_a.weight", (0, 0), b"\x7f"),
                                 "layers.0.attn.wq_a.weight: weight holds FP8 NaN bytes"),
    "NaN in a quantized weight's scale": (poke("layers.0.ffn.experts.0.w1.scale", (0, 0), b"\xff"),
                                          "layers.0.ffn.experts.0.w1"),
    "Inf in a copied tensor": (poke("layers.0.attn_norm.weight", (3,), float("inf")),
                               "source tensor layers.0.attn_norm.weight holds NaN or Inf values"),
    "unknown dtype": (unknown_dtype, "tensor layers.0.attn.attn_sink: unknown dtype 'F4_E2M1'"),
    "empty index": (empty_index, "the checkpoint holds no tensors"),
    "no tensor files": (no_tensor_files, "not a checkpoint"),
}


@pytest.mark.parametrize("case", list(BROKEN_INPUTS))
def test_broken_input_is_refused_with_a_clear_message(copy_of, case, tmp_path):
    break_it, fragment = BROKEN_INPUTS[case]
    src = copy_of(break_it)
    dst = str(tmp_path / "out")
    run = convert_cli(src, dst)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert fragment in run.message
    if case in ONE_CAUSE:  # knock-on problems (every tensor of a missing shard, ...) are not listed
        assert len([line for line in run.message.splitlines() if line.startswith("  - ")]) <= 1, run.message
    if os.path.exists(dst):
        assert_nothing_half_done(dst)


@pytest.mark.parametrize("case", list(CONFIG_CASES) + ["truncated shard"])
def test_inspect_refuses_what_the_converter_refuses(copy_of, case):
    break_it, fragment = BROKEN_INPUTS[case]
    src = copy_of(break_it)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "inspect_model.py"), src], capture_output=True, text=True)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert fragment in run.stdout
    if case in ONE_CAUSE:
        assert "PROBLEMS (1)" in run.stdout, run.stdout[-3000:]


def _not_json(tmp_path) -> str:
    path = tmp_path / "act.json"
    path.write_text("input_amax: 1")
    return str(path)


def _a_file(tmp_path) -> str:
    path = tmp_path / "out"
    path.write_text("")
    return str(path)


# flags (a callable gets tmp_path) -> what the one line says. argparse's own errors have no log line around them.
FLAG_ERRORS = {
    "bad regex": (("--quantize", "experts.(w1"), "not a regular expression"),
    "no GPU": (("--device", "cuda"), "--device cuda: no CUDA GPU"),
    "no workers": (("--workers", "0"), "--workers must be at least 1"),
    "unknown flag": (("--bogus",), "unrecognized arguments: --bogus"),
    "missing activation scales": (("--activation-scales", "/nonexistent/act.json"), "--activation-scales"),
    "activation scales not JSON": (("--activation-scales", _not_json), "cannot read it"),
    "destination is a file": (("--dst", _a_file), "is a file, not a folder"),
    "nothing to quantize": (("--keep", ".*"), "nothing to quantize"),
    "shard size zero": (("--max-shard-size", "0"), "a shard size must be above zero"),
    "shard size not a size": (("--max-shard-size", "5 gigs"), "not a size"),
    "negative progress interval": (("--progress-every", "-1"), "-1 is below 0"),
}


@pytest.mark.parametrize("case", list(FLAG_ERRORS))
def test_every_flag_error_is_one_line_and_exit_2(mini_src, case, tmp_path):
    flags, fragment = FLAG_ERRORS[case]
    flags = [f(tmp_path) if callable(f) else f for f in flags]
    dst = flags[flags.index("--dst") + 1] if "--dst" in flags else str(tmp_path / "dst")
    flags = [f for k, f in enumerate(flags) if "--dst" not in (f, flags[k - 1] if k else None)]
    cmd = [sys.executable, SCRIPT, "--src", mini_src, "--dst", dst, "--device", "cpu", *flags]
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and fragment in errors[0], run.stderr[-3000:]
    assert not os.path.exists(os.path.join(dst, INDEX_NAME)) if os.path.isdir(dst) else True


def test_inspect_json_to_an_unwritable_path_is_one_line(mini_src):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "inspect_model.py"), mini_src, "--json",
                          "/nonexistent/facts.json"], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "/nonexistent/facts.json" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_a_resume_with_other_flags_names_the_flag_that_changed(mini_src, reference, tmp_path):
    dst = str(tmp_path / "out")
    shutil.copytree(reference, dst)
    run = subprocess.run([sys.executable, SCRIPT, "--src", mini_src, "--dst", dst, "--device", "cpu",
                          "--max-shard-size", "2MB", "--scale-policy", "reference"], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    message = Run(run.returncode, run.stderr, 0).message
    assert len(message.splitlines()) == 1, message
    assert f"--max-shard-size was {SHARD_SIZE}, now 2000000" in message
    assert '--scale-policy was "auto", now "reference"' in message and "--restart" in message
    assert output_files(dst) == output_files(reference)


def test_no_verify_resume_does_not_claim_verified(mini_src, reference, tmp_path):
    dst = str(tmp_path / "out")
    shutil.copytree(reference, dst)
    run = convert_cli(mini_src, dst, "--no-verify-resume")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "checked by size only" in run.stderr and "verified" not in run.stderr


# ---------------------------------------------------------------------------------------------------------------
# Destinations
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def readonly_dir(tmp_path):
    path = str(tmp_path / "readonly")
    if _mount_tmpfs(path, "ro", "size=64k"):
        yield path
        subprocess.run(["umount", path], check=True)
        return
    os.makedirs(path)
    os.chmod(path, 0o555)
    if os.access(path, os.W_OK):
        pytest.skip("cannot make a read-only folder here")
    yield path
    os.chmod(path, 0o755)


@pytest.mark.parametrize("inside", [False, True], ids=["dst-itself", "dst-below"])
def test_read_only_destination_is_refused(mini_src, readonly_dir, inside):
    dst = os.path.join(readonly_dir, "out") if inside else readonly_dir
    run = convert_cli(mini_src, dst)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "not writable" in run.message and readonly_dir in run.message
    assert "Traceback" not in run.stderr


def test_second_run_on_a_locked_destination_is_refused_and_the_first_is_untouched(mini_src, reference, tmp_path):
    dst = str(tmp_path / "out")
    killed = convert_cli(mini_src, dst, fault="shard_renamed:2:kill")
    assert killed.returncode == -signal.SIGKILL
    before = checksums(dst)
    fd = os.open(os.path.join(dst, LOCK_NAME), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a first run, still going
        second = convert_cli(mini_src, dst)
    finally:
        os.close(fd)
    assert second.returncode == 2
    assert "is locked by another conversion that is still running" in second.message
    assert checksums(dst) == before
    resume_and_compare(mini_src, dst, reference)


def test_source_changed_since_the_first_run_is_refused(copy_of, mini_src, tmp_path, unchanged):
    src = copy_of()
    dst = str(tmp_path / "out")
    killed = convert_cli(src, dst, fault="shard_renamed:2:kill")
    assert killed.returncode == -signal.SIGKILL
    shard = shard_path(src, "embed.weight")
    os.utime(shard, ns=(time.time_ns(), time.time_ns()))  # re-downloaded: same name, new file
    unchanged(src)
    before = checksums(dst)
    run = convert_cli(src, dst)
    assert run.returncode == 2
    assert "the source changed since the first run" in run.message and "--restart" in run.message
    assert checksums(dst) == before


def test_every_fault_point_stands_in_the_product_code_and_is_off_in_a_normal_run(monkeypatch):
    """Each name of nvfp4kit.faults.POINTS is called somewhere outside the registry; without NVFP4KIT_FAULT no
    handler can be installed, and a point does nothing."""
    from nvfp4kit import faults

    package = os.path.join(ROOT, "nvfp4kit")
    code = "".join(open(os.path.join(root, name)).read() for root, _, files in os.walk(package) for name in files
                   if name.endswith(".py") and name != "faults.py")
    assert [p for p in POINTS if f'"{p}"' not in code] == []
    monkeypatch.delenv(FAULT_ENV, raising=False)
    with pytest.raises(RuntimeError, match=FAULT_ENV):
        faults.install(lambda *args: None)
    faults.fault_point("compute")
