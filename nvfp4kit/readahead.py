"""Warm the page cache with the first source bytes while the converter starts.

Starting Path A costs seconds before its first read (``import torch``, CUDA initialisation): on a small checkpoint
that is a large share of the run. Path A reads the source shards in name order, front to back, so the kernel can
fetch their first bytes meanwhile. This module imports nothing heavy, so it runs before torch is imported.
"""

from __future__ import annotations

import os
import threading

READAHEAD_BYTES = 4 * 10**9  # about what the disk reads while torch imports


def read_ahead(src: str, nbytes: int = READAHEAD_BYTES) -> threading.Thread | None:
    """Ask the kernel (``POSIX_FADV_WILLNEED``, in a background thread) to read the first ``nbytes`` of the source
    shards in the order Path A reads them. Harmless if the source is not a checkpoint folder."""
    if not hasattr(os, "posix_fadvise") or not os.path.isdir(src):
        return None
    files = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))

    def advise() -> None:
        left = nbytes
        for name in files:
            if left <= 0:
                return
            try:
                fd = os.open(os.path.join(src, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                os.posix_fadvise(fd, 0, min(size, left), os.POSIX_FADV_WILLNEED)
                left -= size
            except OSError:
                pass
            finally:
                os.close(fd)

    thread = threading.Thread(target=advise, name="readahead", daemon=True)
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
