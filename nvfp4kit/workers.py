"""Path A's pool of worker processes: one per GPU, each writing whole output shards.

Why plain child processes (``python -m nvfp4kit.workers``) rather than :mod:`multiprocessing`:

- **Start-up never blocks.** The job (the plan and every source tensor's location: megabytes on V4 Pro) goes to a
  file in the state folder, not down a pipe that the parent would block on until each child had imported torch.
  All workers import at once; the parent reads events from the first moment.
- **Signals have one owner.** Each worker runs in a process group of its own, so a Ctrl-C in the terminal reaches
  only the parent, never a worker still importing torch (which would print a traceback); the parent then stops
  every worker with SIGTERM, and each removes its unfinished ``.partial`` file. A signal sent to one worker
  directly stops that worker, and the parent reports the run as interrupted (exit 130), never as done.
- **No orphans.** A worker asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), reads its next
  shard from its stdin (end of file: the parent is gone, or no shard is left) and checks that its parent is
  still the one that started it before it renames a finished shard into place.

The protocol: the parent writes one shard name per line to a worker's stdin, one at a time, when the worker is
idle; the worker answers on its stdout, one JSON event per line: ``progress`` (source bytes done), ``shard``
(the finished shard's manifest entry), ``error`` (a message for the user) and last ``exit`` with the reason
(``done`` or ``interrupted``). A worker whose output ends without ``exit: done`` failed, whatever its exit code.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pickle
import selectors
import signal
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from . import stop_signals
from .errors import KitError

JOB_FILE = "job.pickle"  # in the state folder: what every worker needs, written once per run
STOP_GRACE_SECONDS = 60  # a stopped worker's time to remove its partial file before SIGKILL
INTERRUPTED_EXIT = 130  # a worker's exit code after a signal it caught
_PR_SET_PDEATHSIG = 1


class WorkerFailed(KitError, RuntimeError):
    """A worker stopped without finishing its shards (an error of its own, or it died)."""


class WorkerInterrupted(KeyboardInterrupt):
    """A worker was stopped by a signal: the run ends as interrupted (exit 130), resumable."""


@dataclass
class _Worker:
    k: int
    proc: subprocess.Popen
    buffer: bytes = b""
    shard: str | None = None  # the shard it is writing
    exit_reason: str | None = None
    errors: list[str] = field(default_factory=list)


def run_pool(job: object, shard_names: list[str], workers: int, state_dir: str,
             on_progress: Callable[[int], None], on_shard: Callable[[dict], None], log) -> None:
    """Write ``shard_names`` with ``workers`` processes; returns when every shard is written and reported through
    ``on_shard``. Raises :class:`WorkerInterrupted` or :class:`WorkerFailed` otherwise, after stopping every worker.
    """
    job_path = os.path.join(state_dir, JOB_FILE)
    tmp = job_path + ".partial"
    with open(tmp, "wb") as f:
        pickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, job_path)
    todo = deque(shard_names)
    pool: list[_Worker] = []
    sel = selectors.DefaultSelector()
    try:
        for k in range(workers):
            w = _Worker(k, _start(job_path, k))
            pool.append(w)
            sel.register(w.proc.stdout, selectors.EVENT_READ, w)
            log.info("worker %d started (pid %d)", k, w.proc.pid)
            _assign(w, todo)
        running = len(pool)
        with stop_signals.deferred() as stop_requested:  # raised here, not inside a lock of on_progress's
            while running:
                if stop_requested():
                    raise KeyboardInterrupt
                for key, _ in sel.select(timeout=0.2):
                    w = key.data
                    chunk = os.read(w.proc.stdout.fileno(), 1 << 16)
                    if not chunk:
                        sel.unregister(w.proc.stdout)
                        running -= 1
                        _check_exit(w)
                        continue
                    w.buffer += chunk
                    *lines, w.buffer = w.buffer.split(b"\n")
                    for line in lines:
                        _handle(w, json.loads(line), todo, on_progress, on_shard)
        if todo:
            raise WorkerFailed(f"{len(todo)} shards were never written (every worker exited)")
    finally:
        sel.close()
        _stop(pool, os.path.dirname(state_dir))


def _start(job_path: str, k: int) -> subprocess.Popen:
    kit_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (kit_root, env.get("PYTHONPATH")) if p)
    # process_group=0: a process group of its own, out of reach of the terminal's Ctrl-C (see the module doc).
    return subprocess.Popen([sys.executable, "-m", "nvfp4kit.workers", job_path, str(k), str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, process_group=0)


def _assign(w: _Worker, todo: deque) -> None:
    """The next shard to an idle worker; none left: close its stdin, and it exits once done."""
    if w.proc.stdin is None or w.proc.stdin.closed:
        return
    try:
        if todo:
            w.shard = todo.popleft()
            w.proc.stdin.write(w.shard.encode() + b"\n")
            w.proc.stdin.flush()
        else:
            w.shard = None
            w.proc.stdin.close()
    except BrokenPipeError:  # it died; its end of output says how
        pass


def _handle(w: _Worker, event: dict, todo: deque, on_progress, on_shard) -> None:
    kind = event["kind"]
    if kind == "progress":
        on_progress(event["n"])
    elif kind == "shard":
        on_shard({**event["entry"], "worker": w.k})
        _assign(w, todo)
    elif kind == "error":
        raise WorkerFailed(event["message"])
    elif kind == "exit":
        w.exit_reason = event["reason"]


def _check_exit(w: _Worker) -> None:
    """A worker's output ended: it must have said ``exit: done`` and exited 0."""
    code = w.proc.wait()
    if w.exit_reason == "done" and code == 0:
        return
    doing = f" while writing {w.shard}" if w.shard else ""
    if w.exit_reason == "interrupted" or code < 0 or code == INTERRUPTED_EXIT:
        how = f"by {signal.Signals(-code).name}" if code < 0 else "by a signal"
        raise WorkerInterrupted(f"worker {w.k} (pid {w.proc.pid}) was stopped {how}{doing}")
    raise WorkerFailed(f"worker {w.k} (pid {w.proc.pid}) exited with code {code}{doing}")


def _stop(pool: list[_Worker], dst: str) -> None:
    """Every worker ends, on every path: SIGTERM to those still running (each removes its partial file), SIGKILL
    to any still alive after :data:`STOP_GRACE_SECONDS` (its partial file is removed here)."""
    for w in pool:
        for pipe in (w.proc.stdin, w.proc.stdout):
            try:
                pipe.close()  # a worker blocked writing events gets EPIPE instead of waiting forever
            except OSError:
                pass
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + STOP_GRACE_SECONDS
    for w in pool:
        try:
            w.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
            if w.shard:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(dst, f".{w.shard}.partial"))


# ---------------------------------------------------------------------------------------------------------------
# The worker's side
# ---------------------------------------------------------------------------------------------------------------
def _worker_main(job_path: str, k: int, parent: int) -> int:
    events = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints of any library go to stderr, never into the event stream

    def send(kind: str, **fields) -> None:
        events.write(json.dumps({"kind": kind, **fields}).encode() + b"\n")

    def parent_alive() -> bool:
        return os.getppid() == parent

    from .convert.shard import install_worker  # noqa: PLC0415

    reason = "interrupted"
    try:
        for sig in stop_signals.STOP_SIGNALS:
            signal.signal(sig, stop_signals.interrupt)
        _die_with_parent()
        if not parent_alive():
            return 1
        with open(job_path, "rb") as f:
            job = pickle.load(f)
        write_shard = install_worker(job, k, parent_alive)
        for line in sys.stdin:
            entry = write_shard(line.strip(), lambda n: send("progress", n=n))
            send("shard", entry=entry)
        reason = "done" if parent_alive() else "orphaned"
    except KeyboardInterrupt:
        pass
    except (KitError, OSError, ValueError) as e:
        reason = "error"
        _send_quietly(send, "error", message=str(e))
    except Exception:  # an unexpected bug: the traceback is what a maintainer needs
        reason = "error"
        _send_quietly(send, "error", message=f"worker {k} failed:\n{traceback.format_exc()}")
    finally:
        for sig in stop_signals.STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # cleanup is done; the last event must not be cut short
        _send_quietly(send, "exit", reason=reason)
    return 0 if reason == "done" else INTERRUPTED_EXIT if reason == "interrupted" else 1


def _send_quietly(send, kind: str, **fields) -> None:
    try:
        send(kind, **fields)
    except OSError:  # the parent closed its end: nobody is listening
        pass


def _die_with_parent() -> None:
    """SIGTERM (a clean stop) when the parent dies, even by SIGKILL (Linux; elsewhere stdin's end of file stops us
    before the next shard)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _main(argv: list[str]) -> int:
    try:
        return _worker_main(argv[0], int(argv[1]), int(argv[2]))
    except KeyboardInterrupt:  # SIGINT while torch imports, or during the last event: no traceback, no "exit: done"
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
