"""The manifest: which output shards are finished, with their size and hash, so that a rerun trusts only those.

One JSON line per finished shard in ``DST/.nvfp4kit/manifest*.jsonl``, appended (and fsynced) right after the
shard was renamed into place. A process launched as one rank of several writes ``manifest.rank-R.jsonl`` of its
own (no two processes append to one file over a shared filesystem); readers take the union of every file. A line
cut short by a kill is ignored: that shard is simply written again.

Hash: XXH3-128 (xxhash), made for checking data, not for security: 10-30 GB/s on one core, so hashing never
limits a worker; SHA-256 (about 1 GB/s) did. Entries of older runs carry ``sha256`` and are checked with it.
On resume, finished shards are re-hashed by a pool of threads (both hashes release the GIL), at about the speed
the disk reads them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor, wait

import xxhash

from . import stop_signals
from .faults import fault_point

log = logging.getLogger("nvfp4kit.manifest")

HASH = "xxh3_128"
READ_SIZE = 16 * 2**20
VERIFY_THREADS = 8  # enough to keep an NVMe array busy; a page-cache hit runs at memory speed anyway


def new_hasher():
    """The hash every manifest entry written now carries (:data:`HASH`)."""
    return xxhash.xxh3_128()


def manifest_path(state: str, rank: int | None = None) -> str:
    return os.path.join(state, "manifest.jsonl" if rank is None else f"manifest.rank-{rank}.jsonl")


def read_manifest(state: str) -> dict[str, dict]:
    """Every recorded shard (name -> entry), from every manifest file in ``state``."""
    entries = {}
    for path in sorted(glob.glob(os.path.join(state, "manifest*.jsonl"))):
        with open(path) as f:
            for line in f:
                try:
                    e = json.loads(line)
                    entries[e["name"]] = e
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut short by a kill: that shard is simply redone
    return entries


def append_entry(state: str, entry: dict, rank: int | None = None) -> None:
    """Record one finished shard, durably, before anyone is told it is done. A line cut short by a kill is closed
    first, so that this entry starts a line of its own."""
    path, line = manifest_path(state, rank), json.dumps(entry).encode() + b"\n"
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        torn = False
        if f.tell():
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        fault_point("manifest", path, line)
        f.write((b"\n" if torn else b"") + line)
        f.flush()
        os.fsync(f.fileno())


def file_digest(path: str, algorithm: str = HASH) -> str:
    h = new_hasher() if algorithm == HASH else hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(READ_SIZE):
            h.update(chunk)
    return h.hexdigest()


def entry_digest(entry: dict) -> tuple[str, str]:
    """(algorithm, hex digest) an entry records: :data:`HASH`, or ``sha256`` for entries of older runs."""
    return (HASH, entry[HASH]) if HASH in entry else ("sha256", entry["sha256"])


def is_intact(dst: str, entry: dict, by_hash: bool) -> bool:
    """The shard ``entry`` names is on disk at its recorded size (and hash, if ``by_hash``)."""
    path = os.path.join(dst, entry["name"])
    if not os.path.isfile(path) or os.path.getsize(path) != entry["size"]:
        return False
    if not by_hash:
        return True
    algorithm, digest = entry_digest(entry)
    return file_digest(path, algorithm) == digest


def intact_entries(dst: str, entries: list[dict], by_hash: bool, threads: int = VERIFY_THREADS) -> list[bool]:
    """:func:`is_intact` for each entry, in parallel. A stop signal ends the wait (KeyboardInterrupt, raised
    here and not inside a future's lock: :func:`nvfp4kit.stop_signals.deferred`); shards not begun are dropped,
    those being read are finished first."""
    if not entries:
        return []
    pool = ThreadPoolExecutor(max_workers=max(1, min(threads, len(entries))))
    with stop_signals.deferred() as stop_requested, pool:  # the pool's own locks too (submit, shutdown)
        futures = [pool.submit(is_intact, dst, e, by_hash) for e in entries]
        pending = set(futures)
        while pending:
            if stop_requested():
                for f in futures:
                    f.cancel()
                raise KeyboardInterrupt
            pending = wait(pending, timeout=0.2).not_done
        return [f.result() for f in futures]


def intact_shards(folder: str, state: str, names, by_hash: bool) -> dict[str, dict]:
    """Manifest entries (in ``state``) of the shards ``names`` that are in ``folder`` intact (:func:`is_intact`);
    each recorded one that is not is named in a warning: it will be written again."""
    wanted = set(names)
    recorded = [e for e in read_manifest(state).values() if e["name"] in wanted]
    ok = intact_entries(folder, recorded, by_hash)
    for e, good in zip(recorded, ok):
        if not good:
            log.warning("shard %s is missing, truncated or corrupt: it will be written again", e["name"])
    return {e["name"]: e for e, good in zip(recorded, ok) if good}
