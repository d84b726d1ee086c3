"""Which items a run reads, in which order, on which rank: `subset_indices` (a fixed subset), `TrainSampler`
(training: seeded order and per-sample seeds, resumable mid-epoch) and `ShardSampler` (exact evaluation shards).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler

from evit.data.seeding import mix_seed


def subset_indices(n: int, size: int | None) -> list[int] | None:
    """A fixed random subset (independent of the run seed) of ``size`` indices out of n, sorted; None = all."""
    if size is None or size >= n:
        return None
    g = torch.Generator().manual_seed(0)
    return sorted(torch.randperm(n, generator=g)[:size].tolist())


class TrainSampler(Sampler):
    """Per-rank training sampler yielding ``(index, sample_seed)``; everything is a function of (seed, epoch).

    - ``repeats == 1``: a permutation of the dataset, sharded ``rank::world_size`` and padded by wrapping so
      that every rank gets the same number of samples (DistributedSampler behaviour).
    - ``repeats > 1``: timm's `RepeatAugSampler` (DeiT's repeated augmentation), its epoch set to a hash of
      (seed, epoch) so the order depends on the seed too.

    ``set_epoch(epoch, start)`` skips the first ``start`` samples of this rank's shard (mid-epoch resume).
    A sample's seed depends on (seed, epoch, its position in the epoch's global sequence), not on ``start``,
    so an image gets the same augmentation whatever the number of processes.
    """

    def __init__(self, n: int, *, seed: int, world_size: int = 1, rank: int = 0, shuffle: bool = True,
                 repeats: int = 1):
        self.n, self.seed, self.world_size, self.rank = n, seed, world_size, rank
        self.shuffle, self.repeats = shuffle, repeats
        self.epoch, self.start = 0, 0
        if repeats > 1:
            from timm.data.distributed_sampler import RepeatAugSampler

            self._ra = RepeatAugSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle,
                                        num_repeats=repeats)
            self.num_samples = len(self._ra)
        else:
            self._ra = None
            self.num_samples = math.ceil(n / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start, "n": self.n,
                "world_size": self.world_size, "rank": self.rank, "repeats": self.repeats}

    def indices(self) -> list[int]:
        """This rank's full index list for the current epoch (before skipping ``start``)."""
        epoch_seed = mix_seed(self.seed, self.epoch, 0x5A3)
        if self._ra is not None:
            self._ra.set_epoch(epoch_seed)
            return list(iter(self._ra))
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.num_samples * self.world_size
        order += order[: total - len(order)] if total > len(order) else []
        return order[self.rank: total: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx = self.indices()
        base = mix_seed(self.seed, self.epoch)
        for pos in range(self.start, len(idx)):
            # position `pos` of this rank's shard is position rank + world_size * pos of the epoch's sequence
            yield idx[pos], mix_seed(base, self.rank + self.world_size * pos)

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Exact evaluation sharding: rank r gets indices r, r+W, r+2W, ... of range(n); no padding, so every
    image is seen exactly once over all ranks (shards differ in length by at most one)."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0):
        self.n, self.world_size, self.rank = n, world_size, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))
