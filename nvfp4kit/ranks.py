"""Several processes, on one node or many, converting into one destination on a shared filesystem.

A process launched by torchrun (``RANK``/``WORLD_SIZE``) or Slurm (``SLURM_PROCID``/``SLURM_NTASKS``) converts
its share of the planned output shards: shard i belongs to rank i mod WORLD_SIZE, with the node's GPUs as its
workers. No coordination service: the plan in ``DST/.nvfp4kit/`` (written by the first rank, checked by the
others) and the manifest (one file per rank) are the protocol; ranks set up and finish one at a time under a
file lock. The last rank to finish finds every shard recorded and writes config, card, report and index, so
the result is the same files, byte for byte, as one process writes. A killed rank is resumed by relaunching
the same job: every rank re-checks its own finished shards and writes the rest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Sequence, TypeVar

from .errors import KitError

T = TypeVar("T")
_LAUNCHERS = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))


class RankError(KitError, ValueError):
    """The launcher's rank variables make no sense."""


@dataclass(frozen=True)
class Share:
    """Rank ``rank`` of ``world`` processes; one process alone is rank 0 of 1 and owns every shard."""

    rank: int = 0
    world: int = 1

    @property
    def alone(self) -> bool:
        return self.world == 1

    def of(self, items: Sequence[T]) -> list[T]:
        """This rank's items: those at positions i with i mod world == rank."""
        return [x for i, x in enumerate(items) if i % self.world == self.rank]

    def describe(self) -> str:
        return "" if self.alone else f"rank {self.rank} of {self.world}: output shards i with i mod {self.world} == {self.rank}"


def share_from_env(env: Mapping[str, str] = os.environ) -> Share:
    """The launcher's rank (torchrun first, then Slurm); no such variables: the whole job."""
    for rank_key, world_key in _LAUNCHERS:
        if rank_key in env and world_key in env:
            try:
                rank, world = int(env[rank_key]), int(env[world_key])
            except ValueError:
                raise RankError(f"{rank_key}={env[rank_key]!r} / {world_key}={env[world_key]!r}: not integers") from None
            if not 0 <= rank < world:
                raise RankError(f"{rank_key}={rank} is not in [0, {world_key}={world})")
            return Share(rank, world)
    return Share()


def local_gpu_slot(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(this process's index among the processes of its node, how many there are): torchrun's ``LOCAL_RANK`` /
    ``LOCAL_WORLD_SIZE``, Slurm's ``SLURM_LOCALID`` / ``SLURM_NTASKS_PER_NODE``; (0, 1) otherwise. The node's
    GPUs are split between them."""
    for index_key, count_key in (("LOCAL_RANK", "LOCAL_WORLD_SIZE"), ("SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")):
        if index_key in env:
            try:
                return int(env[index_key]), max(1, int(env.get(count_key, "1").split("(")[0]))
            except ValueError:
                raise RankError(f"{index_key}={env[index_key]!r} / {count_key}: not integers") from None
    return 0, 1
