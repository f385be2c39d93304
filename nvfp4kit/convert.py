"""Path A: stream an FP8 checkpoint into NVFP4, shard by shard, resumably.

The job, top to bottom (:func:`convert`):

1. refuse what cannot work (destination inside the source, a drifted resume, too little disk), plan from the
   index and headers (:mod:`nvfp4kit.plan`), take the destination lock;
2. write the plan and fingerprint to ``DST/.nvfp4kit/`` first; a rerun with other flags or a changed source is
   refused unless ``--restart``;
3. copy every non-tensor file of the source verbatim (config.json is rewritten at the end);
4. write each output shard that the manifest does not list as verified: to ``.NAME.partial``, flushed and
   renamed, then recorded in the manifest with its size and hash (:mod:`nvfp4kit.manifest`); N worker
   processes (:mod:`nvfp4kit.workers`) take shards one at a time, each on its own GPU (or the CPU); in a worker,
   reads of the next unit and writes of the last one overlap the compute;
5. last, config.json, the report, and the index: a destination with an index is complete.

Every output byte depends only on the plan, never on the worker count or the device.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import queue
import resource
import shutil
import signal
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import __version__
from .checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from .card import CARD_NAME, SOURCE_CARD_NAME, write_card
from .decode import dequantize as dequantize_source
from .fp8 import FP8FormatError, check_fp8_block
from .layouts import Layout, mxfp4_tensors
from .manifest import HASH, append_entry, file_digest, intact_shards, new_hasher, read_manifest
from .mxfp4 import MXFP4FormatError
from .nvfp4 import (NVFP4FormatError, NVFP4Tensor, ScaleRule, dequantize_nvfp4, quantize_group,
                    reconstruction_error)
from .plan import ConversionPlan, Options, Unit, build_plan, load_activation_amax, source_fingerprint
from .progress import DEFAULT_EVERY_SECONDS, Progress
from .ranks import Share
from .readahead import Range, SourceReadAhead
from .safetensors_io import TensorInfo, encode_header, read_into, tensor_bytes
from .write import fsync_dir
from .errors import KitError, few

log = logging.getLogger("nvfp4kit.convert")

STATE_DIR = ".nvfp4kit"
LOCK_NAME = ".nvfp4kit.lock"
SETUP_LOCK_NAME = LOCK_NAME + ".setup"
REPORT_NAME = "conversion_report.json"
COPY_CHUNK = 64 * 2**20  # bytes per read of a tensor copied as is (bounds memory for 1.85 GB embeddings)
WRITEBACK_EVERY = 128 * 2**20  # bytes written to a shard between two requests to flush it (a short final fsync)


class ConvertError(KitError, RuntimeError):
    """A refusal or failure with a message for the user; nothing half-written is left to be trusted."""


@dataclass
class Settings:
    """Flags that do not change output bytes."""

    workers: int = 1
    device: str = "cpu"
    restart: bool = False
    dry_run: bool = False
    verify_resume: bool = True
    progress_every: float = DEFAULT_EVERY_SECONDS  # seconds between two progress lines in a log (not a terminal)
    share: Share = Share()  # this process's share of the shards when launched as one rank of several
    first_gpu: int = 0  # worker k uses GPU first_gpu + k (ranks of one node split its GPUs)


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------
def convert(
    src: str,
    dst: str,
    options: Options,
    settings: Settings,
    activation_scales: str | None = None,
    read_ahead: SourceReadAhead | None = None,
) -> dict:
    """Convert ``src`` into ``dst``; returns the report (also written to ``dst/conversion_report.json``).

    ``read_ahead``, started before the converter's imports, is pointed at the shards to write and closed here.
    """
    try:
        return _convert(src, dst, options, settings, activation_scales, read_ahead)
    finally:
        if read_ahead is not None:
            read_ahead.close()


def _convert(src: str, dst: str, options: Options, settings: Settings, activation_scales: str | None,
             read_ahead: SourceReadAhead | None) -> dict:
    src, dst = os.path.realpath(src), os.path.realpath(dst)
    check_apart(src, dst)
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ConvertError(f"the destination {dst} is a file, not a folder: choose another --dst")
    ckpt = open_checkpoint(src)
    amax = load_activation_amax(activation_scales) if activation_scales else None
    if activation_scales:
        options = Options(**{**options.__dict__, "activation_scales_sha256": file_digest(activation_scales, "sha256")})
    plan = build_plan(ckpt, options, amax)
    log.info(
        "plan: %d tensors in %d shards (%.2f GB) -> %d units in %d shards (%.2f GB expected), format %s, %s",
        len(ckpt.tensors), len(ckpt.shards), plan.source_bytes / 1e9, len(plan.units), len(plan.shards),
        plan.output_bytes / 1e9, options.format, Layout(options.format, bool(amax)).scheme,
    )
    if settings.dry_run:
        from .report import checkpoint_facts, render_report  # the same report as inspect_model.py

        print(render_report(checkpoint_facts(ckpt, options, amax)))
        return {"dry_run": True, "expected_output_bytes": plan.output_bytes, "shards": len(plan.shards)}

    fingerprint = _fingerprint(ckpt, plan)
    share = settings.share
    if not share.alone and settings.restart:
        raise ConvertError("--restart with several ranks: remove the destination once, then launch the job again")
    mine = share.of(plan.shards)
    if not share.alone:
        log.info("%s (%d of %d shards)", share.describe(), len(mine), len(plan.shards))
    try:
        with _sigterm_as_interrupt():
            os.makedirs(dst, exist_ok=True)
            with exclusive_lock(dst, share):
                state = os.path.join(dst, STATE_DIR)
                with _setup_lock(dst):  # ranks set up one at a time: the first writes the plan, the others check it
                    done = _prepare_state(dst, state, fingerprint, plan, settings, mine)
                    copy_side_files(src, dst)
                todo = [s for s in mine if s.name not in done]
                _check_free_space(dst, sum(s.nbytes for s in todo))
                checked = "verified by hash" if settings.verify_resume else "checked by size only (--no-verify-resume)"
                if todo:
                    log.info("%d of %d shards to write (%d already done, %s)", len(todo), len(mine),
                             len(done), checked)
                else:
                    log.info("all %d shards already written, %s: nothing to convert", len(mine), checked)
                if read_ahead is not None:
                    read_ahead.follow(_read_order(ckpt, plan, todo))
                started = time.time()
                _write_shards(ckpt, plan, todo, dst, settings, read_ahead)
                with _setup_lock(dst):
                    report = _finish_if_complete(ckpt, plan, dst, share, time.time() - started)
    except OSError as e:
        raise _io_failure(dst, e) from e
    return report


def _finish_if_complete(ckpt: Checkpoint, plan: ConversionPlan, dst: str, share: Share, seconds: float) -> dict:
    """One process: finish. One rank of several: finish if every other rank's shards are recorded too (this is the
    last rank to finish); else leave that to the last one."""
    done = read_manifest(os.path.join(dst, STATE_DIR))
    if share.alone:
        return _finish(ckpt, plan, dst, done, seconds)
    waiting = [s.name for s in plan.shards if s.name not in done]
    if waiting:
        log.info("rank %d finished its share; %d shards of other ranks are not written yet (%s): the last rank to "
                 "finish writes the index", share.rank, len(waiting), few(waiting))
        return {"complete": False, "waiting_for": waiting}
    log.info("rank %d is the last to finish: writing config, card, report and index", share.rank)
    return _finish(ckpt, plan, dst, done, seconds)


def _io_failure(path: str, e: OSError) -> ConvertError:
    """An OS error while writing ``path`` (the destination or a shard in it), named, with what to do about it."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space there, then rerun the same command to resume"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "the destination is not writable: choose another --dst or fix its permissions"
    else:
        hint = "rerun the same command to resume once the cause is fixed"
    return ConvertError(f"cannot write {e.filename or path}: {e.strerror or e}; {hint}")


def _interrupt(signum, frame) -> None:
    """A stop signal as KeyboardInterrupt, once: further signals are ignored so that the cleanup runs to its end.

    (Ignored by a Python handler, not SIG_IGN: a signal already pending would otherwise raise "Signal 15 ignored
    due to race condition" in the middle of the cleanup.)
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore)
    raise KeyboardInterrupt


def _ignore(signum, frame) -> None:
    pass


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill PID``, a scheduler's stop) ends the job like Ctrl-C: workers stop, no partial file stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fingerprint(ckpt: Checkpoint, plan: ConversionPlan) -> dict:
    return {"kit_version": __version__, "source": ckpt.root, "source_fingerprint": source_fingerprint(ckpt),
            "options": plan.options.as_json()}


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
def _setup_lock(dst: str) -> Iterator[None]:
    """Held while a process sets up or finishes (short): ranks do either one at a time."""
    fd = os.open(os.path.join(dst, SETUP_LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _prepare_state(dst: str, state: str, fingerprint: dict, plan: ConversionPlan, settings: Settings,
                   mine: list) -> dict[str, dict]:
    """Write or check the fingerprint; return the manifest entries of this process's shards (``mine``) already
    done and still intact."""
    fp_path = os.path.join(state, "fingerprint.json")
    if settings.restart and os.path.isdir(state):
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
                f"{dst} holds a conversion started with other flags: {_changed_flags(previous, fingerprint)}; rerun "
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
        atomic_write_json(fp_path, fingerprint)
        log.info("new conversion; state in %s", state)
    # A destination with an index is complete only if it is this run's; a resume rewrites it at the end.
    if os.path.exists(os.path.join(dst, INDEX_NAME)):
        os.remove(os.path.join(dst, INDEX_NAME))
    started = time.time()
    intact = intact_shards(dst, state, [s.name for s in mine], by_hash=settings.verify_resume)
    if intact:
        nbytes = sum(e["size"] for e in intact.values())
        log.info("checked %d finished shards (%.2f GB) %s in %.1f s", len(intact), nbytes / 1e9,
                 "by hash" if settings.verify_resume else "by size", time.time() - started)
    # A killed run's unfinished files (this process's shards, side files): never trusted. Another rank's partial
    # shard may be in the middle of being written.
    others = {f".{s.name}.partial" for s in plan.shards} - {f".{s.name}.partial" for s in mine}
    for root, _, files in os.walk(dst):
        for name in files:
            if name.endswith(".partial") and not (root == dst and name in others):
                os.remove(os.path.join(root, name))
    return intact


# Resume fingerprint fields -> the flag that sets them (what a refusal names).
_FLAGS = {"format": "--format", "engine": "--engine", "scale_policy": "--scale-policy", "joint_scale": "--joint-scale",
          "max_shard_size": "--max-shard-size", "activation_scales_sha256": "--activation-scales (the file's content)",
          "overrides": "--quantize/--keep"}


def _changed_flags(previous: dict, now: dict) -> str:
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


def _append_manifest(state: str, entry: dict, rank: int | None = None) -> None:
    append_entry(state, entry, rank)  # (a named step: the fault tests stop a run right here)


def _check_free_space(dst: str, needed: int) -> None:
    free = shutil.disk_usage(dst).free
    if needed > free:
        raise ConvertError(f"{dst}: {needed / 1e9:.2f} GB still to write but only {free / 1e9:.2f} GB free")


def copy_side_files(src: str, dst: str) -> None:
    """Every non-tensor file and folder of the source, verbatim (config.json is rewritten in :func:`_finish`); the
    source's README.md is the source's card, kept as README.source.md (the output gets its own, :mod:`.card`)."""
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(root, src)
        for name in files:
            if rel == "." and (name.endswith(".safetensors") or name in (INDEX_NAME, "config.json")):
                continue
            s = os.path.join(root, name)
            d = os.path.join(dst, rel, SOURCE_CARD_NAME if rel == "." and name == CARD_NAME else name)
            if os.path.exists(d) and os.path.getsize(d) == os.path.getsize(s) and file_digest(d) == file_digest(s):
                continue
            os.makedirs(os.path.dirname(d), exist_ok=True)
            shutil.copy2(s, d + ".partial")
            os.replace(d + ".partial", d)


def _finish(ckpt: Checkpoint, plan: ConversionPlan, dst: str, done: dict[str, dict], seconds: float) -> dict:
    report = _summarize(ckpt, plan, done, seconds)
    finish_output(ckpt, plan, dst, done, report, REPORT_NAME)
    log.info(
        "done: %d tensors quantized, %d kept FP8, %d copied; %.2f GB -> %.2f GB (%.1f%%); %.1f s; "
        "SQNR mean %.2f dB, worst %.2f dB (%s); exact-policy tensors: %d; peak host memory per worker %.2f GB",
        report["quantized_tensors"], report["kept_fp8_tensors"], report["copied_tensors"], report["source_bytes"] / 1e9,
        report["output_bytes"] / 1e9, 100 * report["output_bytes"] / max(report["source_bytes"], 1), seconds,
        report["sqnr_db_mean"], report["sqnr_db_worst"], report["worst_tensor"], report["exact_tensors"],
        report["peak_rss_bytes_per_worker"] / 1e9,
    )
    return report


def finish_output(ckpt: Checkpoint, plan: ConversionPlan, dst: str, done: dict[str, dict], report: dict,
                  report_name: str) -> None:
    """The last step of Path A and Path B alike: config.json (the source's, with the output's quantization config
    in place of the FP8 one), hf_quant_config.json where the layout has one, the report, the model card, and last
    the index, whose presence means complete: only once every planned shard is recorded and on disk."""
    check_complete(plan, dst, done)
    config = dict(ckpt.config)
    config.pop("quantization_config", None)  # the source FP8 config never survives
    config["quantization_config"] = plan.quantization_config
    atomic_write_json(os.path.join(dst, "config.json"), config)
    if plan.hf_quant_config is not None:
        atomic_write_json(os.path.join(dst, "hf_quant_config.json"), plan.hf_quant_config)
    atomic_write_json(os.path.join(dst, report_name), report)
    write_card(dst, ckpt.root)  # README.md, a side file: no shard or index byte depends on it
    index = {"metadata": {"total_size": plan.output_bytes}, "weight_map": dict(sorted(plan.weight_map().items()))}
    atomic_write_json(os.path.join(dst, INDEX_NAME), index)  # last: its presence means complete


def check_apart(src: str, dst: str) -> None:
    """Source and destination (real paths) must not contain each other: a rerun would read its own output."""
    if dst == src or dst.startswith(src + os.sep):
        raise ConvertError(f"destination {dst} is inside the source {src}: choose a folder outside it")
    if src.startswith(dst + os.sep):
        raise ConvertError(f"the source {src} is inside the destination {dst}: choose another destination")


def check_complete(plan: ConversionPlan, dst: str, done: dict[str, dict]) -> None:
    """The run is done only when every planned shard is recorded and on disk at its recorded size: nothing else may
    write the index (whatever went wrong before, a missing shard must never look complete)."""
    missing = [s.name for s in plan.shards
               if s.name not in done or not os.path.isfile(os.path.join(dst, s.name))
               or os.path.getsize(os.path.join(dst, s.name)) != done[s.name]["size"]]
    if missing:
        raise ConvertError(f"{len(missing)} of {len(plan.shards)} planned shards are not written ({few(missing)}); "
                           "rerun the same command to resume")


def _summarize(ckpt: Checkpoint, plan: ConversionPlan, done: dict[str, dict], seconds: float) -> dict:
    tensors = {m: st for entry in done.values() for m, st in entry["tensors"].items()}
    finite = [st["sqnr_db"] for st in tensors.values() if math.isfinite(st["sqnr_db"])]
    worst = min(tensors, key=lambda m: tensors[m]["sqnr_db"], default=None)
    counts = {a: sum(1 for v in plan.actions.values() if v == a) for a in ("quantize", "keep_fp8", "keep")}
    return {
        "kit_version": __version__,
        "source": ckpt.root,
        "options": plan.options.as_json(),
        "quantized_tensors": counts["quantize"],
        "kept_fp8_tensors": counts["keep_fp8"],
        "copied_tensors": counts["keep"],
        "source_bytes": plan.source_bytes,
        "output_bytes": plan.output_bytes,
        "seconds_this_run": round(seconds, 3),
        "sqnr_db_mean": sum(finite) / len(finite) if finite else math.inf,
        "sqnr_db_worst": tensors[worst]["sqnr_db"] if worst else math.inf,
        "worst_tensor": worst,
        "exact_tensors": sum(1 for st in tensors.values() if st["rule"] == ScaleRule.EXACT),
        "peak_rss_bytes_per_worker": max((e.get("peak_rss_bytes", 0) for e in done.values()), default=0),
        "cuda_peak_bytes_per_worker": max((e.get("cuda_peak_bytes", 0) for e in done.values()), default=0),
        "tensors": dict(sorted(tensors.items())),
    }


def atomic_write_json(path: str, obj: object) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Shards: one worker in this process, or a pool of worker processes; a tqdm bar over source bytes here
# ---------------------------------------------------------------------------------------------------------------
def _read_order(ckpt: Checkpoint, plan: ConversionPlan, todo: list) -> list[Range]:
    """The source byte ranges the shards ``todo`` read, in order."""
    infos = [ckpt.tensors[name] for s in todo for i in s.units for name in plan.units[i].sources]
    return [(t.file, t.begin, t.end) for t in infos]


def _write_shards(ckpt: Checkpoint, plan: ConversionPlan, todo: list, dst: str, settings: Settings,
                  read_ahead: SourceReadAhead | None) -> None:
    """Write the shards ``todo``, each recorded in the manifest as it is done (the finish step reads it back)."""
    state = os.path.join(dst, STATE_DIR)
    total = sum(plan.units[i].source_bytes for s in todo for i in s.units)
    if not todo:
        return
    workers = max(1, min(settings.workers, len(todo)))
    job = _WorkerJob(ckpt.tensors, plan, dst, settings.device, max(1, (os.cpu_count() or 1) // workers),
                     settings.first_gpu)
    with Progress(total, len(todo), log, settings.progress_every) as bar:

        def progress(source_bytes: int) -> None:
            bar.update(source_bytes)
            if read_ahead is not None:
                read_ahead.advance(source_bytes)

        def record(entry: dict) -> None:
            _append_manifest(state, entry, None if settings.share.alone else settings.share.rank)
            bar.shard_done()
            log.info("wrote %s: %.2f GB in %.1f s (%.2f GB/s of source), worker %d, %d/%d shards", entry["name"],
                     entry["size"] / 1e9, entry["seconds"], entry["source_bytes"] / max(entry["seconds"], 1e-9) / 1e9,
                     entry["worker"], bar.done_shards, len(todo))

        if workers == 1:
            _write_here(job, todo, progress, record)
        else:
            _write_in_workers(job, todo, workers, progress, record)


def _write_here(job: _WorkerJob, todo: list, progress, record) -> None:
    """One worker: this process writes the shards itself, which saves a second ``import torch`` and a spawn
    (seconds: a large share of a small run)."""
    write = install_worker(job, 0, lambda: True)
    for shard in todo:
        record({**write(shard.name, progress), "worker": 0})


def _write_in_workers(job: _WorkerJob, todo: list, workers: int, progress, record) -> None:
    """Several workers: processes of :mod:`nvfp4kit.workers` that take shards one at a time, each on its own GPU
    (or sharing the CPU). A worker that stops for any other reason than having finished fails the run."""
    from .workers import WorkerFailed, run_pool

    try:
        run_pool(job, [s.name for s in todo], workers, os.path.join(job.dst, STATE_DIR), progress, record, log)
    except WorkerFailed as e:
        raise ConvertError(f"{e}; rerun the same command to resume once the cause is fixed") from None


@dataclass
class _WorkerJob:
    tensors: dict[str, TensorInfo]
    plan: ConversionPlan
    dst: str
    device: str
    threads: int  # torch CPU threads per worker: the cores shared out between workers
    first_gpu: int = 0  # worker k runs on GPU first_gpu + k
    _pool: PinnedPool | None = field(default=None, repr=False, compare=False)

    def pinned_pool(self) -> PinnedPool:
        """The worker's pinned read buffers, kept from shard to shard (made in the worker, never pickled)."""
        if self._pool is None:
            self._pool = PinnedPool()
        return self._pool

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}


def install_worker(job: _WorkerJob, k: int, parent_alive: Callable[[], bool]) -> Callable[[str, Callable], dict]:
    """Set up worker ``k``'s process (threads, device); returns ``write(shard_name, progress) -> manifest entry``.

    ``parent_alive`` is asked before a finished shard is renamed into place: a worker whose parent is gone stops
    there (its partial file removed) instead of renaming into a destination a rerun may already own.
    """
    torch.set_num_threads(job.threads)
    device = _worker_device(job.device, job.first_gpu + k)
    shards = {s.name: s for s in job.plan.shards}

    def write(name: str, progress: Callable[[int], None]) -> dict:
        try:
            return _write_one_shard(job, shards[name], device, progress, parent_alive)
        except (FP8FormatError, NVFP4FormatError) as e:
            raise ConvertError(str(e)) from e

    return write


def _worker_device(device: str, k: int) -> torch.device:
    if device == "cuda":
        return torch.device("cuda", k % torch.cuda.device_count())
    return torch.device(device)


# ---------------------------------------------------------------------------------------------------------------
# One shard: reader threads -> compute -> writer threads (+ hasher, flusher)
# ---------------------------------------------------------------------------------------------------------------
_DONE = object()
READERS = 2  # threads reading the source (pread releases the GIL): one thread reads 2.5-3 GB/s from the page cache
WRITERS = 2  # threads writing outputs at their offsets (pwrite): one thread writes 1.6-2 GB/s into tmpfs


class _Release:
    """Gives an item's pool buffers back once both its writer and the hasher are done with its bytes."""

    def __init__(self, buffers: list[torch.Tensor], pool: PinnedPool | None, users: int = 2) -> None:
        self._buffers, self._pool, self._users = buffers, pool, users
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last and self._pool is not None and self._buffers:
            self._pool.give(self._buffers)


def _write_one_shard(job: _WorkerJob, shard, device: torch.device, progress,
                     parent_alive: Callable[[], bool] = lambda: True) -> dict:
    """One output shard: :data:`READERS` threads read the source pieces (each reader every READERS-th piece), this
    thread computes them in order, :data:`WRITERS` threads write each piece's outputs at its place in the file
    (known from the plan: ``pwrite``), one thread hashes the bytes in file order, one flushes. Then fsync, and the
    rename of ``.NAME.partial`` to NAME (never, if the worker's parent is gone)."""
    plan, tensors = job.plan, job.tensors
    units = [plan.units[i] for i in shard.units]
    specs = [o for u in units for o in u.outputs]
    final = os.path.join(job.dst, shard.name)
    partial = os.path.join(job.dst, f".{shard.name}.partial")
    layout = Layout(plan.options.format, w4a4=bool(plan.activation_amax))
    header = encode_header(specs, {"format": "pt", "producer": f"nvfp4kit {__version__}"})
    expected = len(header) + sum(s.nbytes for s in specs)
    started = time.time()
    stats: dict[str, dict] = {}
    pin = device.type == "cuda"
    pool = job.pinned_pool() if pin else None
    pieces = [p for u in units for p in read_pieces(u, tensors)]
    # Seconds each stage worked, summed over its threads: where the time goes (in the manifest and the benchmark).
    busy = {"read": 0.0, "compute": 0.0, "write": 0.0, "hash": 0.0, "flush": 0.0}
    lock = threading.Lock()  # busy and the byte counts, shared by the threads
    failure: list[BaseException] = []
    stop = threading.Event()  # set when the compute loop ends early: readers stop at their next piece
    closing = threading.Event()  # set once nothing more is queued: consumers end when their queue is empty
    reads = [queue.Queue(maxsize=2) for _ in range(READERS)]
    writes: queue.Queue = queue.Queue(maxsize=4)
    hashes: queue.Queue = queue.Queue(maxsize=8)
    flushes: queue.Queue = queue.Queue(maxsize=1)
    h = new_hasher()
    h.update(header)
    written = {"bytes": len(header), "flushed": 0}

    def spent(stage: str, t0: float) -> None:
        with lock:
            busy[stage] += time.perf_counter() - t0

    def reader(k: int) -> None:
        try:
            for unit, begin in pieces[k::READERS]:
                if stop.is_set():
                    break
                held: list[torch.Tensor] = []

                def take(nbytes: int) -> torch.Tensor:
                    held.append(pool.take(nbytes))
                    return held[-1]

                t0 = time.perf_counter()
                item = read_piece(unit, begin, tensors, pin, take if pool is not None else None)
                spent("read", t0)
                reads[k].put((item, _Release(held, pool)))
        except BaseException as e:  # handed to the compute loop, which raises it with the tensor's name
            failure.append(e)
        finally:
            reads[k].put(_DONE)

    def writer(fd: int) -> None:
        try:
            for views, offset, release in _items(writes, closing):
                if not failure:
                    t0 = time.perf_counter()
                    for v in views:
                        _pwrite_all(fd, v, offset)
                        offset += len(v)
                    spent("write", t0)
                release.done()
                with lock:
                    written["bytes"] += sum(len(v) for v in views)
                    flush = written["bytes"] - written["flushed"] >= WRITEBACK_EVERY
                    if flush:
                        written["flushed"] = written["bytes"]
                if flush:
                    with suppress(queue.Full):  # one request pending is enough: it flushes all there is
                        flushes.put_nowait(None)
        except BaseException as e:
            failure.append(e)
            for _ in _items(writes, closing):  # drain so the compute loop never blocks
                pass

    def hasher() -> None:
        try:
            for views, source_bytes, release in _items(hashes, closing):
                t0 = time.perf_counter()
                for v in views:
                    h.update(v)
                spent("hash", t0)
                release.done()
                progress(source_bytes)  # (a parent gone mid-run: the report of it fails here)
        except BaseException as e:
            failure.append(e)
            for _ in _items(hashes, closing):  # drain so the compute loop never blocks
                pass

    def flusher(fd: int) -> None:
        # Writes back what is written so far while the writers go on: the disk writes as we read and compute,
        # not all at the final fsync. (An fdatasync in a writer itself would stall it until the disk caught up.)
        for _ in _items(flushes, closing):
            t0 = time.perf_counter()
            try:
                os.fdatasync(fd)
            except OSError as e:
                failure.append(e)
            spent("flush", t0)

    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, header, 0)
            readers = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(READERS)]
            writers = [threading.Thread(target=writer, args=(fd,), daemon=True) for _ in range(WRITERS)]
            others = [threading.Thread(target=hasher, daemon=True),
                      threading.Thread(target=flusher, args=(fd,), daemon=True)]
            for t in readers + writers + others:
                t.start()
            try:
                offset = len(header)
                for i in range(len(pieces)):
                    got = reads[i % READERS].get()
                    if got is _DONE or failure:
                        break
                    item, release = got
                    t0 = time.perf_counter()
                    out, source_bytes = compute_unit(item, plan, layout, device, stats)
                    spent("compute", t0)
                    views = [tensor_bytes(t) for t in out]
                    writes.put((views, offset, release))
                    hashes.put((views, source_bytes, release))  # in file order, as the hash needs them
                    offset += sum(len(v) for v in views)
            finally:
                # Every thread is joined, also after an error or Ctrl-C: a thread still inside torch when the
                # interpreter exits can abort the process ("terminate called without an active exception").
                # No step waits on a sentinel alone: a signal landing inside a queue operation of this thread
                # can lose an item or a wake-up, so producers are drained while alive and consumers also stop
                # on ``closing`` once their queue is empty.
                stop.set()
                for q, t in zip(reads, readers):
                    while t.is_alive():
                        with suppress(queue.Empty):
                            q.get(timeout=0.1)
                    t.join()
                for _ in writers:
                    writes.put(_DONE)
                hashes.put(_DONE)
                closing.set()
                for t in writers + others[:1]:
                    t.join()
                flushes.put(_DONE)
                others[1].join()
            if failure:
                raise failure[0]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        if os.path.exists(partial):
            os.remove(partial)  # never leave a half-written shard behind
        if isinstance(e, OSError):
            raise _io_failure(final, e) from e
        raise
    size = written["bytes"]
    if size != expected or os.path.getsize(partial) != expected:
        os.remove(partial)
        raise ConvertError(f"{shard.name}: wrote {size} bytes, expected {expected}")
    if not parent_alive():  # an orphan: a rerun may own this destination now
        os.remove(partial)
        raise KeyboardInterrupt
    os.replace(partial, final)
    fsync_dir(job.dst)
    return {"name": shard.name, "size": size, HASH: h.hexdigest(), "seconds": time.time() - started,
            "started_at": started,
            "source_bytes": sum(u.source_bytes for u in units), "tensors": stats,
            "busy_seconds": {k: round(v, 3) for k, v in busy.items()},
            "peak_rss_bytes": peak_rss_bytes(),
            "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0}


def _items(q: queue.Queue, closing: threading.Event) -> Iterator:
    """A consumer thread's items: until ``_DONE``, or until ``closing`` is set and ``q`` is empty."""
    while True:
        try:
            item = q.get(timeout=0.1)
        except queue.Empty:
            if closing.is_set():
                return
            continue
        if item is _DONE:
            return
        yield item


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM, which starts afresh at exec. (``ru_maxrss`` does not: a
    converter started by a large process would report that process's peak.)"""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def read_pieces(unit: Unit, tensors: dict[str, TensorInfo]) -> list[tuple[Unit, int | None]]:
    """The pieces ``unit`` is read in: the whole unit (``None``), or each :data:`COPY_CHUNK` of a copied tensor (its
    first byte), so that a 1.85 GB embedding is never in memory whole."""
    if unit.kind != "copy":
        return [(unit, None)]
    info = tensors[unit.sources[0]]
    return [(unit, b) for b in (range(info.begin, info.end, COPY_CHUNK) if info.nbytes else [info.begin])]


def read_piece(unit: Unit, begin: int | None, tensors: dict[str, TensorInfo], pin: bool,
               alloc: Callable[[int], torch.Tensor] | None = None) -> tuple:
    """One item for :func:`compute_unit`: the whole unit, or the copied tensor's chunk that starts at ``begin``.

    ``alloc(nbytes)`` gives the uint8 buffer each tensor is read into (a :class:`PinnedPool`'s, reused); by default
    a new one, pinned if ``pin``.
    """
    alloc = alloc or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=pin))
    if unit.kind == "copy":
        info = tensors[unit.sources[0]]
        n = min(COPY_CHUNK, info.end - begin)
        chunk = alloc(n)[:n]
        read_into(TensorInfo(info.name, info.file, "U8", (n,), begin, begin + n), chunk)
        return ("copy", unit, (info.dtype, chunk))
    loaded = []
    for name in unit.sources:
        info = tensors[name]
        t = alloc(info.nbytes)[: info.nbytes].view(info.torch_dtype).view(info.shape)
        read_into(info, t)
        loaded.append(t)
    return (unit.kind, unit, loaded)


def read_unit(unit: Unit, tensors: dict[str, TensorInfo], pin: bool) -> Iterator[tuple]:
    """A unit's items for :func:`compute_unit`, one piece after another."""
    for _, begin in read_pieces(unit, tensors):
        yield read_piece(unit, begin, tensors, pin)


class PinnedPool:
    """Pinned host buffers, reused: pinning a new buffer for every tensor (``cudaHostAlloc``) costs about as much as
    reading it. A buffer goes back with :meth:`give` once nothing reads it any more (after its unit is written:
    kept and copied tensors are written from it). At most a few units are in flight, so the pool stays small."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [k for k, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:  # the smallest that fits (by position: tensors compare elementwise, not by identity)
                return self._free.pop(min(fits, key=lambda k: self._free[k].numel()))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)

    def give(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            self._free += buffers


def compute_unit(item: tuple, plan: ConversionPlan, layout: Layout, device: torch.device, stats: dict) -> tuple[list, int]:
    """Output tensors (CPU, in the unit's output order) and the source bytes they account for."""
    kind, unit, data = item
    if kind == "copy":
        dtype, chunk = data
        if chunk.numel():
            _check_finite(unit.sources[0], dtype, chunk.to(device, non_blocking=True))
        return [chunk], chunk.numel()
    n = len(unit.modules)
    weights, scales = data[:n], data[n:]
    if kind == "fp8":
        block = plan.fp8_blocks[unit.sources[0]]
        check_fp8_block(weights[0].to(device, non_blocking=True), scales[0].to(device), block, unit.sources[0])
        return layout.fp8_tensors(weights[0], scales[0]), unit.source_bytes
    try:  # FP8 or MXFP4 (the original V4 releases' experts): float32 values either way, the quantizer is the same
        xs = [
            dequantize_source(w.to(device, non_blocking=True), s.to(device, non_blocking=True),
                              plan.fp8_blocks[name], name)
            for w, s, name in zip(weights, scales, unit.sources[:n])
        ]
    except MXFP4FormatError as e:  # e.g. a NaN scale byte: the run stops naming the tensor, as for FP8
        raise ConvertError(str(e)) from e
    if kind == "mxfp4":  # --engine sglang's MTP experts (layouts.writes_mxfp4): exact, or the run stops naming it
        try:
            out = mxfp4_tensors(xs[0].cpu(), unit.modules[0])
        except MXFP4FormatError as e:
            raise ConvertError(str(e)) from e
        stats[unit.modules[0]] = {"rule": ScaleRule.EXACT, "format": "MXFP4", "sqnr_db": math.inf, "rel_error": 0.0}
        return out, unit.source_bytes
    qs, rule = quantize_group(xs, plan.options.scale_policy, [m + ".weight" for m in unit.modules])
    out = []
    for module, x, q in zip(unit.modules, xs, qs):
        exact = rule is ScaleRule.EXACT
        err = {"sqnr_db": math.inf, "rel_error": 0.0} if exact else reconstruction_error(x, dequantize_nvfp4(q))
        stats[module] = {"rule": rule, "global_scale": float(q.global_scale), **err}
        cpu = NVFP4Tensor(q.packed.cpu(), q.block_scale.cpu(), q.global_scale.cpu())
        out += layout.nvfp4_tensors(cpu, plan.activation_amax.get(module))
    return out, unit.source_bytes


# Exponent bits of each float format, as the integer type of the same width: all ones means NaN or Inf.
_EXPONENT_MASKS = {"F64": (torch.int64, 0x7FF0000000000000), "F32": (torch.int32, 0x7F800000),
                   "F16": (torch.int16, 0x7C00), "BF16": (torch.int16, 0x7F80)}


def _check_finite(name: str, dtype: str, chunk: torch.Tensor) -> None:
    """NaN/Inf in a copied floating-point tensor is refused: it would be served as is.

    Tests the exponent bits with an integer max: several times faster than ``isfinite`` on CPU.
    """
    if dtype in _EXPONENT_MASKS:
        int_dtype, mask = _EXPONENT_MASKS[dtype]
        if int((chunk.view(int_dtype) & mask).max()) == mask:
            raise ConvertError(f"source tensor {name} holds NaN or Inf values")
