"""Fault injection for tests/test_faults.py, loaded by Python at start-up when this folder is on PYTHONPATH.

The converter runs its shards in worker processes (``python -m nvfp4kit.workers``); each of them starts a fresh
interpreter that imports this module too (PYTHONPATH and the environment are inherited), so one fault specification
reaches every process of a run; the product only names its points (:mod:`nvfp4kit.faults`), this hook acts:

    NVFP4KIT_FAULT=POINT:N:ACTION    e.g.  shard_renamed:2:kill   tensor_written:5:enospc   manifest:1:torn

POINT names a place in the product code (:data:`nvfp4kit.faults.POINTS`: the code calls
``fault_point(POINT)`` there); the fault fires at the N-th time *one process* reaches it. ACTION is one of:

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
import signal

ENV = "NVFP4KIT_FAULT"  # nvfp4kit.faults.ENV (the kit is imported only when it is set)


def _main_pid() -> int:
    """The converter's own process: a worker (``python -m nvfp4kit.workers JOB K PARENT``) names its parent."""
    import sys

    return int(sys.argv[3]) if sys.argv[0].endswith(os.path.join("nvfp4kit", "workers.py")) else os.getpid()


def _kill_group() -> None:
    """A power cut: SIGKILL to the converter's process group and to this process's own (a worker runs in a group of
    its own)."""
    os.killpg(os.getpgid(_main_pid()), signal.SIGKILL)
    os.killpg(os.getpgrp(), signal.SIGKILL)


# ACTION -> what it does, given the path the point names (None for a data write, as a real write error)
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


def _torn(path: str, data: bytes) -> None:
    """The first half of the manifest line, durably, then a power cut."""
    with open(path, "ab") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    _kill_group()


def install(spec: str) -> None:
    """Fire ``ACTION`` the ``N``-th time this process reaches ``POINT`` (one of :data:`nvfp4kit.faults.POINTS`)."""
    from nvfp4kit import faults

    point, nth, action = spec.split(":")
    if point not in faults.POINTS:
        raise ValueError(f"{ENV}: no fault point {point!r} (see nvfp4kit.faults.POINTS)")
    if action == "torn":
        assert point == "manifest", "a torn write is a manifest fault"
    calls = itertools.count(1)

    def handler(name: str, path: str | None, data: bytes | None) -> None:
        if name != point or next(calls) != int(nth):
            return
        if action == "torn":
            _torn(path, data)
        else:
            ACTIONS[action](path)

    faults.install(handler)


if os.environ.get(ENV):
    install(os.environ[ENV])
