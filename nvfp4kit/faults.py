"""Named places where a test may stop a run: the fault points of tests/test_faults.py, called by the product code.

Each place the tests kill, interrupt or fail a run calls :func:`fault_point` with one of the names in
:data:`POINTS`. In a normal run that call does nothing (one test of a module global); only when the environment
variable ``NVFP4KIT_FAULT`` is set does the test hook (``tests/fault_hooks/sitecustomize.py``, loaded at start-up
in the converter and in each worker) install a handler with :func:`install`, which decides at which call and
with which action (kill, signal, I/O error) the fault fires. A point is a name here, not a function of the code
around it: moving or renaming that code cannot silently switch a kill test off.
"""

from __future__ import annotations

import os
from collections.abc import Callable

ENV = "NVFP4KIT_FAULT"  # the fault specification, POINT:N:ACTION (the hook's docstring): the switch

# Point -> where it is, in the order a run reaches them. "path" is what the call names (None: a data write).
POINTS: dict[str, str] = {
    "plan_written": "the state half set up: plan.json written, fingerprint.json not yet",
    "side_file": "a side file (tokenizer, encoding/, inference/ ...) copied to its .partial, not yet renamed",
    "compute": "a worker mid-unit: the unit read, its NVFP4 not yet computed",
    "tensor_written": "a worker mid-shard: one more output tensor about to be written, earlier ones maybe buffered",
    "shard_complete": "a whole .partial shard written and fsynced, not yet renamed",
    "shard_renamed": "a shard renamed into place, not yet recorded in the manifest",
    "manifest": "a finished shard's manifest line about to be appended (``data``: the line, for a torn write)",
    "config": "finishing: config.json written to its .partial, not yet renamed",
    "index": "finishing: the index written to its .partial, not yet renamed",
    "index_renamed": "complete: the index in place, the process still running",
}

Handler = Callable[[str, "str | None", "bytes | None"], None]
_handler: Handler | None = None  # set only by install(), which only a run with ENV set calls


def install(handler: Handler) -> None:
    """Route every :func:`fault_point` call to ``handler(point, path, data)``; refused unless ``NVFP4KIT_FAULT`` is
    set, so that no normal run can carry a fault."""
    global _handler
    if not os.environ.get(ENV):
        raise RuntimeError(f"fault handlers are installed only when {ENV} is set")
    _handler = handler


def fault_point(name: str, path: str | None = None, data: bytes | None = None) -> None:
    """The run reaches the point ``name`` (one of :data:`POINTS`); ``path`` is the file it is about to write or
    rename, ``data`` the bytes it is about to append. Does nothing unless a test installed a handler."""
    if _handler is None:
        return
    assert name in POINTS, f"unknown fault point {name}"
    _handler(name, path, data)
