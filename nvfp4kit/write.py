"""One output shard from tensors in memory, written so that a kill at any point leaves nothing to be trusted.

:func:`write_shard` writes ``.NAME.partial`` (header, then each tensor's bytes in order), hashes the bytes as they
are written (:func:`nvfp4kit.manifest.new_hasher`), checks the size against the header, fsyncs, renames the file to
``NAME`` and fsyncs the folder; it returns the manifest entry (name, size, hash) for the caller to record with
:func:`nvfp4kit.manifest.append_entry`. A shard is finished when its entry is recorded: a rerun trusts a shard only
then (:func:`nvfp4kit.manifest.intact_entries`), and removes a ``.partial`` left by a kill.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import suppress

import torch

from .errors import KitError
from .manifest import HASH, new_hasher
from .safetensors_io import TensorSpec, encode_header, tensor_bytes


class ShardWriteError(KitError, RuntimeError):
    """A shard's bytes disagree with its header (a bug of the writer): the partial file is removed."""


def partial_path(folder: str, name: str) -> str:
    """Where shard ``name`` is written before its rename: hidden, and never taken for a finished shard."""
    return os.path.join(folder, f".{name}.partial")


def write_shard(folder: str, name: str, specs: list[TensorSpec], tensors: Iterable[torch.Tensor],
                metadata: dict[str, str] | None = None) -> dict:
    """Write the safetensors file ``folder/name`` holding ``tensors`` laid out as ``specs``; returns its manifest
    entry ``{"name", "size", HASH}``.

    ``tensors`` (CPU) yields the bytes of ``specs`` in order; it may be a generator (one tensor in memory at a time)
    and may split a tensor into several chunks. On any failure the partial file is removed and the error raised.
    """
    assert specs and len({s.name for s in specs}) == len(specs), f"{name}: no tensors, or a name twice"
    final, partial = os.path.join(folder, name), partial_path(folder, name)
    header = encode_header(specs, metadata)
    expected = len(header) + sum(s.nbytes for s in specs)
    h, size = new_hasher(), 0
    try:
        with open(partial, "wb") as f:
            for b in _chunks(header, tensors):
                f.write(b)
                h.update(b)
                size += len(b)
            if size != expected:
                raise ShardWriteError(f"{name}: wrote {size} bytes, its header says {expected}")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with suppress(FileNotFoundError):
            os.remove(partial)  # never leave a half-written shard behind
        raise
    os.replace(partial, final)
    fsync_dir(folder)  # the rename itself survives a power cut before the manifest records the shard
    return {"name": name, "size": size, HASH: h.hexdigest()}


def _chunks(header: bytes, tensors: Iterable[torch.Tensor]) -> Iterable[bytes | memoryview]:
    yield header
    for t in tensors:
        yield tensor_bytes(t)


def fsync_dir(path: str) -> None:
    """Make the folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
