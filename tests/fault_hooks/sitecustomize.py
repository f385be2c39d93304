"""Fault injection for tests/test_faults.py, loaded by Python at start-up when this folder is on PYTHONPATH.

The converter runs its shards in worker processes (``python -m nvfp4kit.workers``); each of them starts a fresh
interpreter that imports this module too (PYTHONPATH and the environment are inherited), so one fault specification reaches every process
of a run without a line of test code in the product:

    NVFP4KIT_FAULT=POINT:N:ACTION    e.g.  shard_renamed:2:kill   tensor_written:5:enospc   manifest:1:torn

POINT names a place in nvfp4kit.convert (see :data:`POINTS`); the fault fires at the N-th time *one process*
reaches it. ACTION is one of:

- ``kill``: SIGKILL the run's process group and this process's own (workers run in groups of their own): a power
  cut, the OOM killer or ``kill -9`` of a job;
- ``sigint``: SIGINT to the converter's process group (Ctrl-C in a terminal), then carry on;
- ``sigterm``: SIGTERM to the converter's main process only (``kill PID``, a scheduler's stop), then carry on;
- ``sigint-self`` / ``sigterm-self``: the signal to this process only (one worker stopped from outside);
- ``enospc`` / ``eio``: raise ``OSError`` with that errno (a full disk, a failing disk);
- ``torn`` (``manifest`` only): write the first half of the manifest line, then SIGKILL the group.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import signal

ENV = "NVFP4KIT_FAULT"


def _main_pid() -> int:
    """The converter's own process: a worker (``python -m nvfp4kit.workers JOB K PARENT``) names its parent."""
    import sys

    return int(sys.argv[3]) if sys.argv[0].endswith(os.path.join("nvfp4kit", "workers.py")) else os.getpid()


def _kill_group() -> None:
    """A power cut: SIGKILL to the converter's process group and to this process's own (a worker runs in a group of
    its own)."""
    os.killpg(os.getpgid(_main_pid()), signal.SIGKILL)
    os.killpg(os.getpgrp(), signal.SIGKILL)


# ACTION -> what it does, given the path the patched call names (None for a data write, as a real write error)
ACTIONS = {
    "kill": lambda path: _kill_group(),
    "sigint": lambda path: os.killpg(os.getpgid(_main_pid()), signal.SIGINT),
    "sigterm": lambda path: os.kill(_main_pid(), signal.SIGTERM),
    "sigint-self": lambda path: os.kill(os.getpid(), signal.SIGINT),
    "sigterm-self": lambda path: os.kill(os.getpid(), signal.SIGTERM),
    "enospc": lambda path: _raise(errno.ENOSPC, path),
    "eio": lambda path: _raise(errno.EIO, path),
}


def _raise(code: int, path: str | None) -> None:
    raise OSError(code, os.strerror(code), path)


# POINT -> (attribute of nvfp4kit.convert or of os, path pattern its first argument must match or None, fire after
# the call instead of before it). Order follows a run.
POINTS: dict[str, tuple[str, str | None, bool]] = {
    "plan_written": ("atomic_write_json", r"fingerprint\.json$", False),  # state half set up: plan.json only
    "side_file": ("os.replace", r"/(tokenizer|encoding/|inference/).*\.partial$", False),  # a copy not yet renamed
    "compute": ("quantize_group", None, False),  # a worker mid-tensor: unit read, NVFP4 not yet written
    "tensor_written": ("tensor_bytes", None, False),  # a worker mid-shard: earlier tensors written, maybe buffered
    "shard_complete": ("os.replace", r"\.safetensors\.partial$", False),  # a whole .partial, fsynced, not renamed
    "shard_renamed": ("os.replace", r"\.safetensors\.partial$", True),  # between the rename and the manifest line
    "manifest": ("_append_manifest", None, False),  # the parent about to record a finished shard
    "config": ("os.replace", r"(?<!inference)/config\.json\.partial$", False),  # finishing: config.json replaced
    "index": ("os.replace", r"model\.safetensors\.index\.json\.partial$", False),  # the index written, not renamed
    "index_renamed": ("os.replace", r"model\.safetensors\.index\.json\.partial$", True),  # complete, still running
}


def _torn_manifest(original):
    def append(state: str, entry: dict, *_rank) -> None:
        import json

        line = json.dumps(entry) + "\n"
        with open(os.path.join(state, "manifest.jsonl"), "a") as f:
            f.write(line[: len(line) // 2])
            f.flush()
            os.fsync(f.fileno())
        _kill_group()

    return append


def install(spec: str) -> None:
    point, nth, action = spec.split(":")
    target, pattern, after = POINTS[point]
    nth = int(nth)
    import nvfp4kit.convert as convert

    owner, attr = (os, "replace") if target == "os.replace" else (convert, target)
    original = getattr(owner, attr)
    if action == "torn":
        assert point == "manifest", "a torn write is a manifest fault"
        fault = None
    else:
        fault = ACTIONS[action]
    calls = itertools.count(1)

    def patched(*args, **kwargs):
        if pattern is not None and not re.search(pattern, str(args[0])):
            return original(*args, **kwargs)
        fire = next(calls) == nth
        if fire and fault is None:
            return _torn_manifest(original)(*args, **kwargs)
        path = str(args[0]) if pattern is not None else None
        if fire and not after:
            fault(path)
        result = original(*args, **kwargs)
        if fire and after:
            fault(path)
        return result

    setattr(owner, attr, patched)


if os.environ.get(ENV):
    install(os.environ[ENV])
