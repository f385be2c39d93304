"""Keep the disk reading the source while the converter starts, computes and writes.

Path A reads the source front to back and writes as it goes. Left alone, the disk does one thing at a time: only
reads while the converter starts (``import torch`` and CUDA initialisation take seconds, a large share of a small
run), then only writes while the converter works through what it already has. :class:`SourceReadAhead` reads in a
background thread, in the converter's read order, at most ``window`` bytes ahead of what has been written: the
disk reads and writes at once, and the converter's own reads come from the page cache. The thread really reads
(``POSIX_FADV_WILLNEED`` is capped by the kernel at the device's readahead window) into one reused buffer; the page
cache, not this process, holds what it read. This module imports nothing heavy, so it runs before torch is imported.
"""

from __future__ import annotations

import os
import threading

READAHEAD_BYTES = 8 * 10**9  # the window: about what a fast disk reads while torch imports and CUDA starts
READ_SIZE = 16 * 2**20

Range = tuple[str, int, int]  # file, first byte, end byte


class SourceReadAhead:
    """Reads byte ranges of the source in order in a background thread, at most ``window`` bytes ahead of the
    bytes reported by :meth:`advance`. Read errors are ignored: the converter's own read reports them."""

    def __init__(self, ranges: list[Range], window: int = READAHEAD_BYTES) -> None:
        self.window = window
        self._ranges = list(ranges)
        self._ahead = 0  # bytes read minus bytes advanced
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="readahead", daemon=True)
        self._thread.start()

    def follow(self, ranges: list[Range]) -> None:
        """Read ``ranges`` from now on, counted from zero (the converter's exact order, once it has a plan: a
        resumed run skips what is done). Ranges already read come from the page cache, at memory speed."""
        with self._changed:
            self._ranges, self._ahead = list(ranges), 0
            self._changed.notify()

    def advance(self, nbytes: int) -> None:
        """The converter has consumed ``nbytes`` more of the ranges."""
        with self._changed:
            self._ahead -= nbytes
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        # Bounded: a Ctrl-C landing inside this condition's lock in the main thread leaves it taken (see
        # nvfp4kit.stop_signals), and the thread, a daemon that only reads, would then never end.
        self._thread.join(timeout=5.0)

    def _next_read(self) -> tuple[str, int, int] | None:
        """The next (file, offset, size) to read, once the window allows it; None when closed or done."""
        with self._changed:
            while not self._closed and self._ranges and self._ahead >= self.window:
                self._changed.wait()
            if self._closed or not self._ranges:
                return None
            path, begin, end = self._ranges[0]
            size = min(READ_SIZE, end - begin)
            if begin + size >= end:
                self._ranges.pop(0)
            else:
                self._ranges[0] = (path, begin + size, end)
            self._ahead += size
            return path, begin, size

    def _run(self) -> None:
        buffer = bytearray(READ_SIZE)
        fds: dict[str, int] = {}
        try:
            while (read := self._next_read()) is not None:
                path, offset, size = read
                try:
                    if path not in fds:
                        fds[path] = os.open(path, os.O_RDONLY)
                    os.preadv(fds[path], [memoryview(buffer)[:size]], offset)
                except OSError:
                    pass
        finally:
            for fd in fds.values():
                os.close(fd)


def whole_shards(src: str) -> list[Range]:
    """Every ``*.safetensors`` file of ``src`` whole, in name order (the order Path A reads them)."""
    names = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    paths = [os.path.join(src, n) for n in names]
    return [(p, 0, os.path.getsize(p)) for p in paths if os.path.isfile(p)]


def read_ahead_from_argv(argv: list[str]) -> SourceReadAhead | None:
    """A :class:`SourceReadAhead` over the ``--src`` of a converter command line, whole shards in name order
    until the converter calls :meth:`~SourceReadAhead.follow` (none for ``--dry-run``, ``--help`` or no folder)."""
    import argparse

    if "--dry-run" in argv or "-h" in argv or "--help" in argv:
        return None
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--src")
    src = early.parse_known_args(argv)[0].src
    return SourceReadAhead(whole_shards(src)) if src and os.path.isdir(src) else None
