"""Warm the page cache with the first source bytes while the converter starts.

Starting Path A costs seconds before its first read (``import torch``, CUDA initialisation): on a small checkpoint
that is a large share of the run. Path A reads the source shards in name order, front to back, so a background
thread reads their first bytes meanwhile (and drops them: the page cache keeps them for the real read). The
thread really reads: ``POSIX_FADV_WILLNEED`` is capped by the kernel at the device's readahead window. This module
imports nothing heavy, so it runs before torch is imported.
"""

from __future__ import annotations

import os
import threading

READAHEAD_BYTES = 8 * 10**9  # about what a fast disk reads while torch imports and CUDA starts
READ_SIZE = 16 * 2**20


def read_ahead(src: str, nbytes: int = READAHEAD_BYTES) -> threading.Thread | None:
    """Read the first ``nbytes`` of the source shards, in the order Path A reads them, in a background thread.
    Harmless if the source is not a checkpoint folder."""
    if not os.path.isdir(src):
        return None
    files = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))

    def read() -> None:
        buffer = bytearray(READ_SIZE)
        left = nbytes
        for name in files:
            try:
                fd = os.open(os.path.join(src, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                offset = 0
                while left > 0 and (n := os.preadv(fd, [memoryview(buffer)[: min(READ_SIZE, left)]], offset)) > 0:
                    offset += n
                    left -= n
            except OSError:
                pass
            finally:
                os.close(fd)
            if left <= 0:
                return

    thread = threading.Thread(target=read, name="readahead", daemon=True)
    thread.start()
    return thread


def read_ahead_from_argv(argv: list[str]) -> threading.Thread | None:
    """:func:`read_ahead` for the ``--src`` of a converter command line (none for ``--dry-run`` or ``--help``)."""
    import argparse

    if "--dry-run" in argv or "-h" in argv or "--help" in argv:
        return None
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--src")
    src = early.parse_known_args(argv)[0].src
    return read_ahead(src) if src else None
