"""The destination's state: its lock, and what a rerun may keep.

``DST/.nvfp4kit/`` holds the plan and the fingerprint of the command (kit version, source, every flag that changes
output bytes), written before any shard; a rerun with other flags or a changed source is refused, naming what
changed, unless ``--restart``. It also holds the manifest (:mod:`nvfp4kit.manifest`): a rerun keeps the shards it
records that are still intact and removes every unfinished ``.partial`` file. The lock refuses a second run on one
destination while one runs; ranks of one job share it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .. import __version__
from ..checkpoint import INDEX_NAME, Checkpoint
from ..errors import ConvertError
from ..faults import fault_point
from ..manifest import intact_shards
from ..plan import ConversionPlan, ShardPlan, source_fingerprint
from ..ranks import Share
from ..write import atomic_write_json

log = logging.getLogger("nvfp4kit.convert")

STATE_DIR = ".nvfp4kit"
LOCK_NAME = ".nvfp4kit.lock"
SETUP_LOCK_NAME = LOCK_NAME + ".setup"

# Resume fingerprint fields -> the flag that sets them (what a refusal names).
_FLAGS = {"format": "--format", "engine": "--engine", "scale_policy": "--scale-policy", "joint_scale": "--joint-scale",
          "max_shard_size": "--max-shard-size", "activation_scales_sha256": "--activation-scales (the file's content)",
          "overrides": "--quantize/--keep"}


@contextmanager
def exclusive_lock(dst: str, share: Share = Share()) -> Iterator[None]:
    """Refuse a second run on ``dst`` while one runs: one process holds the destination's lock exclusively; ranks
    share it, each holding its own rank's lock exclusively (two processes of one rank are refused)."""
    locks = [(LOCK_NAME, fcntl.LOCK_EX if share.alone else fcntl.LOCK_SH)]
    if not share.alone:
        locks.append((f"{LOCK_NAME}.rank-{share.rank}", fcntl.LOCK_EX))
    fds = []
    try:
        for name, mode in locks:
            fds.append(os.open(os.path.join(dst, name), os.O_RDWR | os.O_CREAT, 0o644))
            try:
                fcntl.flock(fds[-1], mode | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConvertError(f"{dst} is locked by another conversion that is still running") from None
        yield
    finally:
        for fd in fds:
            os.close(fd)


@contextmanager
def setup_lock(dst: str) -> Iterator[None]:
    """Held while a process sets up or finishes (short): ranks do either one at a time."""
    fd = os.open(os.path.join(dst, SETUP_LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fingerprint(ckpt: Checkpoint, plan: ConversionPlan) -> dict:
    """What a rerun must match to resume: the kit's version, the source and its files, the byte-changing flags."""
    return {"kit_version": __version__, "source": ckpt.root, "source_fingerprint": source_fingerprint(ckpt),
            "options": plan.options.as_json()}


def prepare_state(dst: str, state: str, fingerprint: dict, plan: ConversionPlan, restart: bool, by_hash: bool,
                  mine: list[ShardPlan]) -> dict[str, dict]:
    """Write or check the fingerprint; return the manifest entries of this process's shards (``mine``) already
    done and still intact (checked by hash if ``by_hash``, else by size)."""
    fp_path = os.path.join(state, "fingerprint.json")
    if restart and os.path.isdir(state):
        log.info("--restart: discarding the previous run's state in %s", dst)
        _remove_outputs(dst, state)
    if os.path.exists(fp_path):
        with open(fp_path) as f:
            previous = json.load(f)
        if previous != fingerprint:
            changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
            if changed == ["source_fingerprint"]:
                raise ConvertError(
                    f"the source changed since the first run into {dst} (a shard's header, size or modification "
                    "time): pass --restart to convert it again from the start"
                )
            raise ConvertError(
                f"{dst} holds a conversion started with other flags: {changed_flags(previous, fingerprint)}; rerun "
                "the original command to resume it, or pass --restart to start over"
            )
    else:
        if os.path.isdir(state):  # a run killed before its fingerprint was written: it finished nothing
            shutil.rmtree(state)
        leftovers = [n for n in os.listdir(dst) if not n.startswith(LOCK_NAME)]
        if leftovers:
            raise ConvertError(
                f"{dst} is not empty and holds no conversion of this kit ({', '.join(sorted(leftovers)[:5])}...): "
                "choose an empty destination"
            )
        os.makedirs(state, exist_ok=True)
        atomic_write_json(os.path.join(state, "plan.json"), plan.to_json())
        fault_point("plan_written", fp_path)
        atomic_write_json(fp_path, fingerprint)
        log.info("new conversion; state in %s", state)
    # A destination with an index is complete only if it is this run's; a resume rewrites it at the end.
    if os.path.exists(os.path.join(dst, INDEX_NAME)):
        os.remove(os.path.join(dst, INDEX_NAME))
    started = time.time()
    intact = intact_shards(dst, state, [s.name for s in mine], by_hash=by_hash)
    if intact:
        nbytes = sum(e["size"] for e in intact.values())
        log.info("checked %d finished shards (%.2f GB) %s in %.1f s", len(intact), nbytes / 1e9,
                 "by hash" if by_hash else "by size", time.time() - started)
    # A killed run's unfinished files (this process's shards, side files): never trusted. Another rank's partial
    # shard may be in the middle of being written.
    others = {f".{s.name}.partial" for s in plan.shards} - {f".{s.name}.partial" for s in mine}
    for root, _, files in os.walk(dst):
        for name in files:
            if name.endswith(".partial") and not (root == dst and name in others):
                os.remove(os.path.join(root, name))
    return intact


def changed_flags(previous: dict, now: dict) -> str:
    """``--max-shard-size was 5000000, now 10000000``: what differs between two fingerprints, as the user set it."""
    changes = []
    if previous.get("kit_version") != now["kit_version"]:
        changes.append(f"kit version was {previous.get('kit_version')}, now {now['kit_version']}")
    if previous.get("source") != now["source"]:
        changes.append(f"--src was {previous.get('source')}, now {now['source']}")
    before, after = previous.get("options") or {}, now["options"]
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            changes.append(f"{_FLAGS.get(key, key)} was {json.dumps(before.get(key))}, now {json.dumps(after.get(key))}")
    return "; ".join(changes) or "the kit's record of them differs"


def _remove_outputs(dst: str, state: str) -> None:
    shutil.rmtree(state)
    for name in os.listdir(dst):
        if not name.startswith(LOCK_NAME):
            p = os.path.join(dst, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
