"""Path A's job, top to bottom: refusals, plan, state, side files, the shards (here or in a pool of workers), finish.

SIGTERM ends the job like Ctrl-C (:mod:`nvfp4kit.stop_signals`): workers stop, no partial file stays, and the run
exits as interrupted and resumable.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import stop_signals
from ..checkpoint import Checkpoint, open_checkpoint
from ..errors import ConvertError, few, io_failure
from ..layouts import Layout
from ..manifest import append_entry, file_digest, read_manifest
from ..plan import ConversionPlan, Options, ShardPlan, build_plan, load_activation_amax
from ..progress import DEFAULT_EVERY_SECONDS, Progress
from ..ranks import Share
from ..readahead import Range, SourceReadAhead
from .finish import copy_side_files, finish
from .resume import STATE_DIR, exclusive_lock, fingerprint, prepare_state, setup_lock
from .shard import WorkerJob, install_worker

log = logging.getLogger("nvfp4kit.convert")


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
        from ..report import checkpoint_facts, render_report  # the same report as inspect_model.py

        print(render_report(checkpoint_facts(ckpt, options, amax)))
        return {"dry_run": True, "expected_output_bytes": plan.output_bytes, "shards": len(plan.shards)}

    expected = fingerprint(ckpt, plan)
    share = settings.share
    if not share.alone and settings.restart:
        raise ConvertError("--restart with several ranks: remove the destination once, then launch the job again")
    mine = share.of(plan.shards)
    if not share.alone:
        log.info("%s (%d of %d shards)", share.describe(), len(mine), len(plan.shards))
    try:
        with stop_signals.sigterm_as_interrupt():
            os.makedirs(dst, exist_ok=True)
            with exclusive_lock(dst, share):
                state = os.path.join(dst, STATE_DIR)
                with setup_lock(dst):  # ranks set up one at a time: the first writes the plan, the others check it
                    done = prepare_state(dst, state, expected, plan, settings.restart, settings.verify_resume, mine)
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
                with setup_lock(dst):
                    report = _finish_if_complete(ckpt, plan, dst, share, time.time() - started)
    except OSError as e:
        raise io_failure(dst, e) from e
    return report


def check_apart(src: str, dst: str) -> None:
    """Source and destination (real paths) must not contain each other: a rerun would read its own output."""
    if dst == src or dst.startswith(src + os.sep):
        raise ConvertError(f"destination {dst} is inside the source {src}: choose a folder outside it")
    if src.startswith(dst + os.sep):
        raise ConvertError(f"the source {src} is inside the destination {dst}: choose another destination")


def _check_free_space(dst: str, needed: int) -> None:
    free = shutil.disk_usage(dst).free
    if needed > free:
        raise ConvertError(f"{dst}: {needed / 1e9:.2f} GB still to write but only {free / 1e9:.2f} GB free")


def _finish_if_complete(ckpt: Checkpoint, plan: ConversionPlan, dst: str, share: Share, seconds: float) -> dict:
    """One process: finish. One rank of several: finish if every other rank's shards are recorded too (this is the
    last rank to finish); else leave that to the last one."""
    done = read_manifest(os.path.join(dst, STATE_DIR))
    if share.alone:
        return finish(ckpt, plan, dst, done, seconds)
    waiting = [s.name for s in plan.shards if s.name not in done]
    if waiting:
        log.info("rank %d finished its share; %d shards of other ranks are not written yet (%s): the last rank to "
                 "finish writes the index", share.rank, len(waiting), few(waiting))
        return {"complete": False, "waiting_for": waiting}
    log.info("rank %d is the last to finish: writing config, card, report and index", share.rank)
    return finish(ckpt, plan, dst, done, seconds)


# ---------------------------------------------------------------------------------------------------------------
# Shards: one worker in this process, or a pool of worker processes; a progress bar over source bytes here
# ---------------------------------------------------------------------------------------------------------------
def _read_order(ckpt: Checkpoint, plan: ConversionPlan, todo: list[ShardPlan]) -> list[Range]:
    """The source byte ranges the shards ``todo`` read, in order."""
    infos = [ckpt.tensors[name] for s in todo for i in s.units for name in plan.units[i].sources]
    return [(t.file, t.begin, t.end) for t in infos]


def _write_shards(ckpt: Checkpoint, plan: ConversionPlan, todo: list[ShardPlan], dst: str, settings: Settings,
                  read_ahead: SourceReadAhead | None) -> None:
    """Write the shards ``todo``, each recorded in the manifest as it is done (the finish step reads it back)."""
    state = os.path.join(dst, STATE_DIR)
    total = sum(plan.units[i].source_bytes for s in todo for i in s.units)
    if not todo:
        return
    workers = max(1, min(settings.workers, len(todo)))
    job = WorkerJob(ckpt.tensors, plan, dst, settings.device, max(1, (os.cpu_count() or 1) // workers),
                    settings.first_gpu)
    with Progress(total, len(todo), log, settings.progress_every) as bar:

        def progress(source_bytes: int) -> None:
            bar.update(source_bytes)
            if read_ahead is not None:
                read_ahead.advance(source_bytes)

        def record(entry: dict) -> None:
            append_entry(state, entry, None if settings.share.alone else settings.share.rank)
            bar.shard_done()
            log.info("wrote %s: %.2f GB in %.1f s (%.2f GB/s of source), worker %d, %d/%d shards", entry["name"],
                     entry["size"] / 1e9, entry["seconds"], entry["source_bytes"] / max(entry["seconds"], 1e-9) / 1e9,
                     entry["worker"], bar.done_shards, len(todo))

        if workers == 1:
            _write_here(job, todo, progress, record)
        else:
            _write_in_workers(job, todo, workers, progress, record)


def _write_here(job: WorkerJob, todo: list[ShardPlan], progress: Callable[[int], None],
                record: Callable[[dict], None]) -> None:
    """One worker: this process writes the shards itself, which saves a second ``import torch`` and a spawn
    (seconds: a large share of a small run)."""
    write = install_worker(job, 0, lambda: True)
    with stop_signals.deferred() as stop_requested:  # raised between shards, or by the shard pipeline
        for shard in todo:
            if stop_requested():
                raise KeyboardInterrupt
            record({**write(shard.name, progress), "worker": 0})


def _write_in_workers(job: WorkerJob, todo: list[ShardPlan], workers: int, progress: Callable[[int], None],
                      record: Callable[[dict], None]) -> None:
    """Several workers: processes of :mod:`nvfp4kit.workers` that take shards one at a time, each on its own GPU
    (or sharing the CPU). A worker that stops for any other reason than having finished fails the run."""
    from ..workers import WorkerFailed, run_pool

    try:
        run_pool(job, [s.name for s in todo], workers, os.path.join(job.dst, STATE_DIR), progress, record, log)
    except WorkerFailed as e:
        raise ConvertError(f"{e}; rerun the same command to resume once the cause is fixed") from None
