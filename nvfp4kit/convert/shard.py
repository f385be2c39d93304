"""One worker writing one output shard: read -> quantize -> the shard writer, overlapped.

:func:`install_worker` sets up a worker (threads, device) and returns its ``write(shard_name, progress)``. A shard
is the plan's units in order: :func:`nvfp4kit.convert.read.read_in_order` reads their pieces ahead in threads,
this thread computes each (:func:`nvfp4kit.convert.quantize.compute_unit`), and
:func:`nvfp4kit.write.write_shard` writes, hashes, fsyncs and renames the shard; the manifest entry comes back
with where the time went.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..errors import ConvertError, io_failure
from ..fp8 import FP8FormatError
from ..layouts import Layout
from ..nvfp4 import NVFP4FormatError
from ..plan import ConversionPlan, ShardPlan
from ..safetensors_io import TensorInfo
from ..write import Piece, write_shard
from .quantize import compute_unit
from .read import PinnedPool, read_in_order, read_pieces


@dataclass
class WorkerJob:
    """What every worker needs (pickled once per run for a pool of worker processes)."""

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


def install_worker(job: WorkerJob, k: int, parent_alive: Callable[[], bool]) -> Callable[[str, Callable], dict]:
    """Set up worker ``k``'s process (threads, device); returns ``write(shard_name, progress) -> manifest entry``.

    ``parent_alive`` is asked before a finished shard is renamed into place: a worker whose parent is gone stops
    there (its partial file removed) instead of renaming into a destination a rerun may already own.
    """
    torch.set_num_threads(job.threads)
    device = _worker_device(job.device, job.first_gpu + k)
    shards = {s.name: s for s in job.plan.shards}

    def write(name: str, progress: Callable[[int], None]) -> dict:
        try:
            return write_one_shard(job, shards[name], device, progress, parent_alive)
        except (FP8FormatError, NVFP4FormatError) as e:
            raise ConvertError(str(e)) from e

    return write


def _worker_device(device: str, k: int) -> torch.device:
    if device == "cuda":
        return torch.device("cuda", k % torch.cuda.device_count())
    return torch.device(device)


def write_one_shard(job: WorkerJob, shard: ShardPlan, device: torch.device, progress: Callable[[int], None],
                    parent_alive: Callable[[], bool] = lambda: True) -> dict:
    """Write ``shard`` and return its manifest entry; ``progress(source_bytes)`` as each piece is written and
    hashed. The partial file is renamed into place only while ``parent_alive()``."""
    plan, tensors = job.plan, job.tensors
    units = [plan.units[i] for i in shard.units]
    layout = Layout(plan.options.format, w4a4=bool(plan.activation_amax))
    started = time.time()
    stats: dict[str, dict] = {}
    pin = device.type == "cuda"
    pool = job.pinned_pool() if pin else None
    # Seconds each stage worked, summed over its threads: where the time goes (in the manifest and the benchmark).
    busy = {"read": 0.0, "compute": 0.0, "write": 0.0, "hash": 0.0, "flush": 0.0}
    lock = threading.Lock()

    def spent(stage: str, t0: float) -> None:
        with lock:
            busy[stage] += time.perf_counter() - t0

    def computed() -> Iterator[Piece]:
        pieces = [p for u in units for p in read_pieces(u, tensors)]
        for item, buffers in read_in_order(pieces, tensors, pin, pool, spent):
            t0 = time.perf_counter()
            out, source_bytes = compute_unit(item, plan, layout, device, stats)
            spent("compute", t0)
            yield Piece(out, _when_written(pool, buffers, progress, source_bytes))

    try:
        entry = write_shard(job.dst, shard.name, [o for u in units for o in u.outputs], computed(),
                            {"format": "pt", "producer": f"nvfp4kit {__version__}"}, may_rename=parent_alive,
                            busy=busy)
    except OSError as e:
        raise io_failure(os.path.join(job.dst, shard.name), e) from e
    return {**entry, "seconds": time.time() - started, "started_at": started,
            "source_bytes": sum(u.source_bytes for u in units), "tensors": stats,
            "busy_seconds": {k: round(v, 3) for k, v in busy.items()},
            "peak_rss_bytes": peak_rss_bytes(),
            "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0}


def _when_written(pool: PinnedPool | None, buffers: list[torch.Tensor], progress: Callable[[int], None],
                  source_bytes: int) -> Callable[[], None]:
    """A piece's bytes are written and hashed: its read buffers go back to the pool, its source bytes count as
    done (a parent gone mid-run: the report of it fails here, and so does the shard)."""

    def done() -> None:
        if pool is not None and buffers:
            pool.give(buffers)
        progress(source_bytes)

    return done


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM, which starts afresh at exec. (``ru_maxrss`` does not: a
    converter started by a large process would report that process's peak.)"""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
