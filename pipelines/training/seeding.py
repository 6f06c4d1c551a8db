"""Seeding that does not depend on the number of processes, workers or on resuming.

Every sample's augmentation is seeded by (seed, epoch, index) and every training step's randomness (dropout)
by (seed, epoch, step, rank); the samplers give the same global batches for any world size
(DistributedSampler's rank-strided split of one seeded permutation: global batch k is positions [kB, (k+1)B)
of it on 1 process or on many).

    loader = DataLoader(SeededDataset(dataset, seed), sampler=EpochSampler(dataset, world, rank, seed=seed))
    seed_everything(sample_seed(seed, epoch, step, rank))
"""
from __future__ import annotations

import hashlib
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same on every platform and process."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def seed_everything(seed: int) -> None:
    """torch, python and numpy RNGs of this process (timm's augmentations use all three)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class EpochSampler(DistributedSampler):
    """DistributedSampler yielding (index, epoch), so datasets can seed per sample even in persistent workers."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((index, self.epoch) for index in super().__iter__())


class SeededDataset(Dataset):
    """Wraps a dataset of (uint8 CHW image, label) whose transform draws random numbers: each item
    (index, epoch) is produced under RNGs seeded from (seed, epoch, index)."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        seed_everything(sample_seed(self.seed, epoch, index))
        return self.base[index]
