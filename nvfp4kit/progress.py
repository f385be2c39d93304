"""Progress of a conversion, fit for where it is read: a live bar in a terminal, plain lines in a ``tee``d log.

When stderr is not a terminal (``2>&1 | tee path_a.log``, a batch job's log file) a bar's carriage-return
updates fill the file with half-lines; there, one log line every ``every`` seconds says how far the run is
(shards, GB of source, GB/s, ETA) and a last one says where it ended. In a terminal, tqdm's bar runs with the log
lines printed above it (never through it).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from datetime import timedelta

DEFAULT_EVERY_SECONDS = 30.0


class Progress:
    """Source bytes and shards done; :meth:`update` after each unit, :meth:`shard_done` after each shard."""

    def __init__(self, total_bytes: int, total_shards: int, log: logging.Logger,
                 every: float = DEFAULT_EVERY_SECONDS, tty: bool | None = None) -> None:
        self.total_bytes, self.total_shards = total_bytes, total_shards
        self.done_bytes, self.done_shards = 0, 0
        self._log, self._every = log, every
        self._started = self._last = time.monotonic()
        self._bar = None
        self._redirect = contextlib.nullcontext()
        if sys.stderr.isatty() if tty is None else tty:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="convert",
                             dynamic_ncols=True, smoothing=0.05, mininterval=1.0)
            self._redirect = logging_redirect_tqdm()

    def __enter__(self) -> Progress:
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._redirect.__exit__(*exc)
        if self._bar is not None:
            self._bar.close()
        elif self.done_bytes:
            self._log.info("%s", self.line())

    def update(self, source_bytes: int) -> None:
        self.done_bytes += source_bytes
        if self._bar is not None:
            self._bar.update(source_bytes)
        elif time.monotonic() - self._last >= self._every:
            self._last = time.monotonic()
            self._log.info("%s", self.line())

    def shard_done(self) -> None:
        self.done_shards += 1

    def line(self) -> str:
        """``progress: 3/11 shards, 12.34/71.50 GB (17%), 1.23 GB/s, ETA 0:00:48``"""
        seconds = max(time.monotonic() - self._started, 1e-9)
        rate = self.done_bytes / seconds
        left = self.total_bytes - self.done_bytes
        eta = str(timedelta(seconds=round(left / rate))) if rate > 0 else "unknown"
        return (f"progress: {self.done_shards}/{self.total_shards} shards, {self.done_bytes / 1e9:.2f}/"
                f"{self.total_bytes / 1e9:.2f} GB ({100 * self.done_bytes / max(self.total_bytes, 1):.0f}%), "
                f"{rate / 1e9:.2f} GB/s, ETA {eta}")
