"""Path A's reads: each unit's source tensors into host buffers, by threads that run ahead of the compute.

A unit is read whole, except a copied tensor, read in :data:`COPY_CHUNK` pieces so that a 1.85 GB embedding is
never in memory whole (:func:`read_pieces`). :func:`read_in_order` reads a shard's pieces with :data:`READERS`
threads and hands them on in order; on a GPU the buffers are pinned and reused (:class:`PinnedPool`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress

import torch

from ..plan import Unit
from ..safetensors_io import TensorInfo, read_into

COPY_CHUNK = 64 * 2**20  # bytes per read of a tensor copied as is (bounds memory for 1.85 GB embeddings)
READERS = 2  # threads reading the source (pread releases the GIL): one thread reads 2.5-3 GB/s from the page cache
_DONE = object()


def read_pieces(unit: Unit, tensors: dict[str, TensorInfo]) -> list[tuple[Unit, int | None]]:
    """The pieces ``unit`` is read in: the whole unit (``None``), or each :data:`COPY_CHUNK` of a copied tensor (its
    first byte), so that a 1.85 GB embedding is never in memory whole."""
    if unit.kind != "copy":
        return [(unit, None)]
    info = tensors[unit.sources[0]]
    return [(unit, b) for b in (range(info.begin, info.end, COPY_CHUNK) if info.nbytes else [info.begin])]


def read_piece(unit: Unit, begin: int | None, tensors: dict[str, TensorInfo], pin: bool,
               alloc: Callable[[int], torch.Tensor] | None = None) -> tuple:
    """One item for :func:`nvfp4kit.convert.quantize.compute_unit`: the whole unit, or the copied tensor's chunk
    that starts at ``begin``.

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
    """A unit's items, one piece after another, in this thread (Path B's uncalibrated units)."""
    for _, begin in read_pieces(unit, tensors):
        yield read_piece(unit, begin, tensors, pin)


def read_in_order(pieces: list[tuple[Unit, int | None]], tensors: dict[str, TensorInfo], pin: bool,
                  pool: PinnedPool | None, spent: Callable[[str, float], None]) -> Iterator[tuple[tuple, list]]:
    """``(item, buffers)`` for each of ``pieces`` in order, read by :data:`READERS` threads (each every
    READERS-th piece) a little ahead of the consumer. ``buffers`` are the pool's buffers the item is read into:
    the consumer gives them back once nothing reads them any more. ``spent("read", t0)`` times each read.

    The readers stop and are joined when the consumer stops early (the generator is closed), and a reader's error
    is raised here."""
    failure: list[BaseException] = []
    stop = threading.Event()  # set when the consumer ends early: readers stop at their next piece
    reads = [queue.Queue(maxsize=2) for _ in range(READERS)]

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
                reads[k].put((item, held))
        except BaseException as e:  # raised in the consumer's thread
            failure.append(e)
        finally:
            reads[k].put(_DONE)

    readers = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(READERS)]
    for t in readers:
        t.start()
    try:
        for i in range(len(pieces)):
            got = reads[i % READERS].get()
            if got is _DONE or failure:
                break
            yield got
    finally:
        # Readers are drained while alive, never waited on by a sentinel alone: a signal landing inside a queue
        # operation of this thread can lose an item or a wake-up.
        stop.set()
        for q, t in zip(reads, readers):
            while t.is_alive():
                with suppress(queue.Empty):
                    q.get(timeout=0.1)
            t.join()
    if failure:
        raise failure[0]


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
