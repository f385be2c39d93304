"""Writing outputs so that a kill at any point leaves nothing to be trusted: the one shard writer of Path A and
Path B, and the small JSON files beside the shards.

:func:`write_shard` takes a shard's tensor specs (they make its header) and its tensors in file order, in
:class:`Piece` s. It writes ``.NAME.partial``: the calling thread takes each piece from the caller's iterator (Path
A computes there) and hands its bytes to :data:`WRITERS` threads that write them at their place in the file
(known from the header), and to one thread that hashes them in file order (:func:`nvfp4kit.manifest.new_hasher`);
one more thread asks for write-back every :data:`WRITEBACK_EVERY` bytes, so the disk writes while the caller
computes rather than all at the final fsync. Then it checks the size against the header, fsyncs, renames the file
to ``NAME`` and fsyncs the folder, and returns the manifest entry (name, size, hash) for the caller to record
with :func:`nvfp4kit.manifest.append_entry`. On any failure the partial file is removed and the error raised.

A shard is finished when its entry is recorded: a rerun trusts a shard only then
(:func:`nvfp4kit.manifest.intact_shards`), and removes a ``.partial`` left by a kill. The file I/O itself is
:class:`ShardFile`'s alone.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass

import numpy as np
import torch

from . import stop_signals
from .errors import KitError
from .faults import fault_point
from .manifest import HASH, new_hasher
from .safetensors_io import TensorSpec, encode_header, tensor_bytes

WRITERS = 8  # threads writing at their offsets (see ShardFile): into a mapped tmpfs file 1, 4, 8 threads copy 1.4, 3.8, 5.8 GB/s
WRITEBACK_EVERY = 128 * 2**20  # bytes written to a shard between two requests to flush it (a short final fsync)
_DONE = object()


class ShardWriteError(KitError, RuntimeError):
    """A shard's bytes disagree with its header (a bug of the writer): the partial file is removed."""


class ShardFile:
    """The file I/O of one shard being written, and nothing else. :meth:`write_at` may be called from several
    threads at once, for distinct ranges of the ``size`` bytes the file will hold.

    Where the filesystem can reserve the space (fallocate(2): ext4, xfs, tmpfs), the file is mapped and each piece
    copied in by numpy outside the interpreter lock, so the writer threads share no lock: ``pwrite`` takes the
    file's inode lock for each call, and 1, 4, 8 threads wrote 1.8, 2.5, 2.6 GB/s into one tmpfs file against 1.4,
    3.8, 5.8 GB/s mapped (bench/RESULTS.md). The reservation also makes a full disk fail here, in fallocate, never
    as a SIGBUS on a mapped page. Elsewhere (a filesystem without fallocate, where glibc's posix_fallocate would
    write zeros), or with ``NVFP4KIT_PWRITE=1`` (the tests compare both ways), it is ``pwrite``."""

    def __init__(self, path: str, size: int) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._map: mmap.mmap | None = None
        self._bytes: np.ndarray | None = None
        try:
            if size and os.environ.get("NVFP4KIT_PWRITE") != "1" and _reserve(self._fd, size):
                self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        except BaseException:
            os.close(self._fd)
            raise

    def write_at(self, offset: int, data) -> None:
        """Write all of ``data`` (any buffer) at ``offset``."""
        view = memoryview(data).cast("B")
        if self._bytes is not None:
            np.copyto(self._bytes[offset:offset + len(view)], np.frombuffer(view, dtype=np.uint8))
            return
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def flush(self) -> None:
        """Write back what is written so far (mapped pages too: they are the file's page cache; the data, not the
        file's times): the final :meth:`sync` stays short."""
        os.fdatasync(self._fd)

    def sync(self) -> None:
        """Every byte and the file's size durable."""
        os.fsync(self._fd)

    def close(self) -> None:
        if self._map is not None:
            self._bytes = None  # a map cannot close while an array still points into it
            self._map.close()
        os.close(self._fd)


def _reserve(fd: int, size: int) -> bool:
    """Reserve ``size`` bytes for ``fd`` with fallocate(2) itself; False where the filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fallocate(fd, 0, ctypes.c_int64(0), ctypes.c_int64(size)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


@dataclass
class Piece:
    """The next bytes of a shard: ``tensors`` (CPU) one after another, and ``done``, called once their bytes are
    written and hashed (their buffers may then be reused)."""

    tensors: list[torch.Tensor]
    done: Callable[[], None] | None = None


def partial_path(folder: str, name: str) -> str:
    """Where shard ``name`` is written before its rename: hidden, and never taken for a finished shard."""
    return os.path.join(folder, f".{name}.partial")


def write_shard(folder: str, name: str, specs: list[TensorSpec], pieces: Iterable[Piece],
                metadata: dict[str, str] | None = None, *, may_rename: Callable[[], bool] = lambda: True,
                busy: dict[str, float] | None = None) -> dict:
    """Write the safetensors file ``folder/name`` holding ``pieces`` laid out as ``specs``; returns its manifest
    entry ``{"name", "size", HASH}``.

    ``pieces`` yields the bytes of ``specs`` in order; it may be a generator (it runs in this thread, and is closed
    if the writing stops early) and may split a tensor over several pieces. ``may_rename()`` is asked before the
    finished file is renamed into place: if it says no (a worker whose parent is gone), the partial file is
    removed and KeyboardInterrupt raised. ``busy`` gets the seconds spent writing, hashing and flushing added.
    """
    assert specs and len({s.name for s in specs}) == len(specs), f"{name}: no tensors, or a name twice"
    final, partial = os.path.join(folder, name), partial_path(folder, name)
    header = encode_header(specs, metadata)
    expected = len(header) + sum(s.nbytes for s in specs)
    try:
        file = ShardFile(partial, expected)
        try:
            file.write_at(0, header)
            digest, size, seconds = _write_pieces(file, header, pieces)
            file.sync()
        finally:
            file.close()
        if size != expected or os.path.getsize(partial) != expected:
            raise ShardWriteError(f"{name}: wrote {size} bytes, its header says {expected}")
        if not may_rename():
            raise KeyboardInterrupt
    except BaseException:
        with suppress(FileNotFoundError):
            os.remove(partial)  # never leave a half-written shard behind
        raise
    fault_point("shard_complete", partial)
    os.replace(partial, final)
    fault_point("shard_renamed", final)
    fsync_dir(folder)  # the rename itself survives a power cut before the manifest records the shard
    if busy is not None:
        for stage, s in seconds.items():
            busy[stage] = busy.get(stage, 0.0) + s
    return {"name": name, "size": size, HASH: digest}


def _write_pieces(file: ShardFile, header: bytes, pieces: Iterable[Piece]) -> tuple[str, int, dict[str, float]]:
    """The pipeline behind :func:`write_shard`: pieces taken here, written by :data:`WRITERS` threads, hashed in
    file order by one, written back by one. Returns (hash, bytes written including the header, busy seconds)."""
    busy = {"write": 0.0, "hash": 0.0, "flush": 0.0}
    lock = threading.Lock()  # busy and the byte counts, shared by the threads
    failure: list[BaseException] = []
    closing = threading.Event()  # set once nothing more is queued: consumers end when their queue is empty
    writes: queue.Queue = queue.Queue(maxsize=4)
    hashes: queue.Queue = queue.Queue(maxsize=8)
    flushes: queue.Queue = queue.Queue(maxsize=1)
    h = new_hasher()
    h.update(header)
    written = {"bytes": len(header), "flushed": 0}

    def spent(stage: str, t0: float) -> None:
        with lock:
            busy[stage] += time.perf_counter() - t0

    def writer() -> None:
        try:
            for views, offset, release in _items(writes, closing):
                if not failure:
                    t0 = time.perf_counter()
                    for v in views:
                        file.write_at(offset, v)
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
            for _ in _items(writes, closing):  # drain so the producer never blocks
                pass

    def hasher() -> None:
        try:
            for views, release in _items(hashes, closing):
                t0 = time.perf_counter()
                for v in views:
                    h.update(v)
                spent("hash", t0)
                release.done()
        except BaseException as e:
            failure.append(e)
            for _ in _items(hashes, closing):  # drain so the producer never blocks
                pass

    def flusher() -> None:
        # (An fdatasync in a writer itself would stall it until the disk caught up.)
        for _ in _items(flushes, closing):
            t0 = time.perf_counter()
            try:
                file.flush()
            except OSError as e:
                failure.append(e)
            spent("flush", t0)

    writers = [threading.Thread(target=writer, daemon=True) for _ in range(WRITERS)]
    others = [threading.Thread(target=hasher, daemon=True), threading.Thread(target=flusher, daemon=True)]
    offset = len(header)
    items = iter(pieces)
    # A stop signal is raised here between two pieces, never inside a queue operation (nvfp4kit.stop_signals).
    with stop_signals.deferred() as stop_requested:
        for t in writers + others:
            t.start()
        try:
            for piece in items:
                if failure:
                    break
                if stop_requested():
                    raise KeyboardInterrupt
                views = []
                for t in piece.tensors:
                    fault_point("tensor_written")
                    views.append(tensor_bytes(t))
                release = _Release(piece.done, failure)
                writes.put((views, offset, release))
                hashes.put((views, release))  # in file order, as the hash needs them
                offset += sum(len(v) for v in views)
        finally:
            # Every thread is joined, also after an error or Ctrl-C: a thread still inside torch when the
            # interpreter exits can abort the process ("terminate called without an active exception"). Consumers
            # also stop on ``closing`` once their queue is empty, so that no step waits on a sentinel alone.
            try:
                close = getattr(items, "close", None)
                if close is not None:
                    close()  # a generator stopped early cleans up now (Path A's readers), not when collected
            finally:
                for _ in writers:
                    writes.put(_DONE)
                hashes.put(_DONE)
                closing.set()
                for t in writers + others[:1]:
                    t.join()
                while others[1].is_alive():  # it may have ended already (closing), a write-back request queued
                    with suppress(queue.Full):
                        flushes.put(_DONE, timeout=0.1)
                others[1].join()
    if failure:
        raise failure[0]
    return h.hexdigest(), offset, busy


class _Release:
    """Calls a piece's ``done`` once both its writer and the hasher are finished with its bytes."""

    def __init__(self, done: Callable[[], None] | None, failure: list[BaseException], users: int = 2) -> None:
        self._done, self._failure, self._users = done, failure, users
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last and self._done is not None:
            try:
                self._done()
            except BaseException as e:  # (e.g. the progress report to a parent that is gone)
                self._failure.append(e)


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


def atomic_write_json(path: str, obj: object, point: str | None = None) -> None:
    """``obj`` as JSON at ``path``, whole or not at all: written to ``path.partial``, fsynced, renamed. ``point``:
    the fault point (:mod:`nvfp4kit.faults`) between the write and the rename, for the files the tests stop at."""
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    if point is not None:
        fault_point(point, tmp)
    os.replace(tmp, path)


def fsync_dir(path: str) -> None:
    """Make the folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
