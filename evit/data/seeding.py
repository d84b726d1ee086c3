"""Seeds: `mix_seed` hashes (seed, epoch, position, ...) into one, `seed_all` seeds python/numpy/torch with it,
and `SeededDataset` transforms a raw dataset's items, reseeding before each training sample.

Determinism: training samples are drawn by `evit.data.samplers.TrainSampler`, which yields ``(index,
sample_seed)`` pairs. The order is a function of (seed, epoch) and the seed of each sample a function of (seed,
epoch, position), and `SeededDataset` reseeds python/numpy/torch before transforming a sample. So augmentation
does not depend on which worker loads a sample, on ``num_workers``, or on where an interrupted epoch was resumed.
"""
from __future__ import annotations

import contextlib
import random
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from evit.errors import ImageError

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that is a deterministic hash of integer parts (splitmix64 chain)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h >> 1


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (the CPU generator, and CUDA's once CUDA is initialized) from one integer.

    Cheaper than `torch.manual_seed` (~10 us vs ~300 us: with CUDA not initialized, as in DataLoader workers, it
    queues a lazy CUDA seeding with a formatted stack trace each call), which matters when seeding every sample.
    """
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


class SeededDataset(Dataset):
    """Applies ``transform`` to a raw dataset, optionally on a fixed subset of its indices.

    Indexed by an int (no reseeding: for deterministic evaluation transforms) or by ``(index, seed)`` from
    `TrainSampler`, in which case python/numpy/torch are seeded with ``seed`` before the transform runs.
    """

    def __init__(self, base: Dataset, transform: Callable | None, indices: Sequence[int] | None = None):
        self.base, self.transform = base, transform
        self.indices = None if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            i, seed = key
            seed_all(seed)
        else:
            i = key
        raw = self.raw_index(i)
        with self.naming_errors(raw):
            img, target = self.base[raw]
            if self.transform is not None:
                img = self.transform(img)
        return img, target

    def raw_index(self, i: int) -> int:
        """Item ``i``'s index in the base dataset."""
        return i if self.indices is None else self.indices[i]

    def encoded(self, i: int) -> tuple[bytes, int]:
        """Item ``i``'s encoded image and label, for a base that reads them (``encoded``: a folder dataset's
        `evit.data.datasets.ImageFolderDataset`, or its pack's `evit.data.packed.PackedDataset`)."""
        return self.base.encoded(self.raw_index(i))

    @contextlib.contextmanager
    def naming_errors(self, raw: int):
        """Whatever reading or augmenting item ``raw`` of the base raises becomes its `ImageError`, except a
        file-system error (errno set), which a retry may fix."""
        try:
            yield
        except OSError as e:
            if e.errno is not None:
                raise
            raise self.image_error(raw, e) from e
        except Exception as e:  # noqa: BLE001 - whatever the decoder or an augmentation raises, the image is named
            raise self.image_error(raw, e) from e

    def describe(self, raw: int) -> str:
        """Item ``raw`` of the base, named by the base (its file) if it can."""
        describe = getattr(self.base, "describe", None)
        return describe(raw) if describe else f"item {raw} of {type(self.base).__name__}"

    def image_error(self, raw: int, e: Exception) -> ImageError:
        what = self.describe(raw)
        cause = " ".join(f"{type(e).__name__}: {e}".split())
        return ImageError(f"cannot decode or augment the image {what}: {cause}")
