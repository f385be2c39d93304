"""Stop signals (SIGINT, SIGTERM) as KeyboardInterrupt: anywhere, once (:func:`interrupt`); and while shards are
written or checked, only where the code asks (:func:`deferred`: the shard pipeline between two pieces, the loop
over shards between two shards, the worker pool's event loop between two events, the resume check between two
waits).

Why defer them: Python runs a signal's handler between any two bytecodes of the main thread, so a
KeyboardInterrupt can land inside ``queue.Queue.put``, after ``Condition.__enter__`` (Python code) has taken the
queue's lock and before the ``with`` that releases it has begun. The lock then stays taken, every writer thread
waits on it, and the cleanup that joins them waits forever: a worker stopped by SIGTERM hung this way, its parent
already gone. Inside :func:`deferred` a signal is only noted; the code raises KeyboardInterrupt itself where no
lock is held, and its cleanup runs with every lock free.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def interrupt(signum: int, frame: object) -> None:
    """A stop signal as KeyboardInterrupt, once: further signals are ignored so that the cleanup runs to its end.

    (Ignored by a Python handler, not SIG_IGN: a signal already pending would otherwise raise "Signal 15 ignored
    due to race condition" in the middle of the cleanup.)
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, _ignore)
    raise KeyboardInterrupt


def _ignore(signum: int, frame: object) -> None:
    pass


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill PID``, a scheduler's stop) ends the job like Ctrl-C while the block runs: workers stop, no
    partial file stays. (Only the main thread can set handlers; elsewhere nothing changes.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Noted:
    """The handler inside :func:`deferred`: notes a signal. (A list, not an Event: a handler must take no lock that
    its own thread may hold.)"""

    def __init__(self) -> None:
        self.signals: list[int] = []

    def __call__(self, signum: int, frame: object) -> None:
        self.signals.append(signum)


@contextmanager
def deferred() -> Iterator[Callable[[], bool]]:
    """Within the block, stop signals are noted, not raised: the block asks the returned ``requested()`` at safe
    points and raises KeyboardInterrupt itself. On leaving, the handlers in place before come back and the first
    signal noted is raised again to them (KeyboardInterrupt from the usual handlers), so none is lost. A signal
    ignored before stays ignored. A block inside another shares its notes (the outer one raises on leaving).

    Off the main thread (where handlers cannot be set, and signals never land) ``requested()`` is always False.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    outer = next((h for h in previous.values() if isinstance(h, _Noted)), None)
    if outer is not None:
        yield lambda: bool(outer.signals)
        return
    noted = _Noted()
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:  # ignored stays ignored (a job a shell started in the background)
            signal.signal(sig, noted)
    try:
        yield lambda: bool(noted.signals)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if noted.signals:
            signal.raise_signal(noted.signals[0])
