"""The host side of the DALI loader (`evit.data.dali`): what its pipelines are fed, batch by batch.

- `read_encoded`: one sample's encoded bytes and label; the only place that opens a sample's file.
- `TrainBatches`: the training pipeline's parallel external source, a batch callable that DALI calls in its
  spawned worker processes with the pass and the batch's number in it (DALI's ``BatchInfo``). It computes that
  batch from `evit.data.samplers.TrainSampler`'s order and per-sample seeds alone, so the process running the
  pipeline only receives finished batches: the encoded files, the labels, and every sample's draws as one dense
  array.
- `EvalSource`: the evaluation pipeline's source, reading a batch's files on threads of the training process
  (those of the pipeline's feeding thread, `evit.data.dali.Feeder`).
"""
from __future__ import annotations

import collections
import copy
import functools
import io
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from evit.data.dali_augment import RandAugmentSpec, crop_window
from evit.data.transforms import eval_geometry
from evit.errors import ImageError

PREFETCH_DEPTH = 2   # batches DALI reads ahead of the one it hands over


def image_size(encoded: bytes) -> tuple[int, int]:
    """(width, height) from an encoded image's header, without decoding it: a JPEG's frame header found by
    walking its markers (a tenth of the time PIL takes to open it), other formats (or a JPEG this walk does
    not follow) by PIL."""
    if encoded[:2] == b"\xff\xd8":
        i, n = 2, len(encoded)
        while i + 9 < n and encoded[i] == 0xFF:
            marker = encoded[i + 1]
            if marker == 0xFF:                               # fill byte
                i += 1
            elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):   # SOFn: precision, height, width
                return (encoded[i + 7] << 8) | encoded[i + 8], (encoded[i + 5] << 8) | encoded[i + 6]
            else:
                i += 2 + ((encoded[i + 2] << 8) | encoded[i + 3])
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as im:
        return im.size


def read_image(dataset, i: int) -> tuple[np.ndarray, int, tuple[int, int]]:
    """Item ``i`` of an `evit.data.seeding.SeededDataset` over an ``imagenet`` / ``folder`` set (its folder or its
    pack): its encoded bytes, its label and its (width, height) from the header. An unreadable image is the
    dataset's `ImageError` naming the file and its index (a file-system error stays itself)."""
    with dataset.naming_errors(dataset.raw_index(i)):
        encoded, label = dataset.encoded(i)
        return np.frombuffer(encoded, dtype=np.uint8), label, image_size(encoded)


def undecodable(dataset, indices: Sequence[int], error: Exception) -> ImageError:
    """What failed among the ``indices`` DALI may have been reading (DALI names no file when its decoder fails,
    and a worker's error reaches the training process as a RuntimeError): the first that cannot be read
    raises its error, else the first that PIL cannot decode either is the dataset's `ImageError`; else one
    `ImageError` naming them all."""
    from PIL import Image

    for i in indices:
        data, _, _ = read_image(dataset, i)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception as e:  # noqa: BLE001 - whatever PIL raises, the image is named
            return dataset.image_error(dataset.raw_index(i), e)
    if not indices:
        return ImageError(f"DALI cannot decode an image: {error}")
    first, last = (dataset.describe(dataset.raw_index(indices[k])) for k in (0, -1))
    cause = " ".join(f"{type(error).__name__}: {error}".split())
    return ImageError(f"cannot decode one of the {len(indices)} images DALI was reading, from {first} to {last}, "
                      f"though PIL decodes each: {cause}")


class TrainBatches:
    """The training pipeline's input, called by DALI (in a worker process) with ``BatchInfo(iteration,
    epoch_idx)``: batch ``iteration`` of DALI's pass ``epoch_idx`` is batch ``iteration`` of ``sampler`` (a
    `TrainSampler`, copied as it is set now) at epoch ``first_epoch + epoch_idx``, from sample ``start`` in
    the first pass and from the epoch's beginning in the next ones (`follows` says whether the sampler is set
    so). Returns the encoded files, the labels (N,) and each sample's draws (N, 5 + 3 layers): crop window
    (x, y, w, h), flip, and per RandAugment layer its op, magnitude bin and sign, from
    ``random.Random(sample_seed)`` in timm's order. A short last batch is dropped."""

    def __init__(self, dataset, sampler, batch_size: int, spec: RandAugmentSpec | None):
        self.dataset, self.sampler, self.batch_size, self.spec = dataset, copy.copy(sampler), batch_size, spec
        self.first_epoch, self.start = sampler.epoch, sampler.start
        self._order = (None, [])           # (pass, its (index, seed) pairs), in the worker

    def pass_of(self, epoch_idx: int):
        """The sampler's epoch and start in DALI's pass ``epoch_idx``."""
        return self.first_epoch + epoch_idx, self.start if epoch_idx == 0 else 0

    def follows(self, sampler, epoch_idx: int) -> bool:
        """Whether ``sampler`` is set as pass ``epoch_idx`` reads it."""
        return (sampler.epoch, sampler.start) == self.pass_of(epoch_idx)

    def pairs(self, epoch_idx: int, iteration: int) -> list[tuple[int, int]]:
        """Batch ``iteration``'s (index, sample seed) pairs in pass ``epoch_idx``; empty past its last full one."""
        if self._order[0] != epoch_idx:
            self.sampler.set_epoch(*self.pass_of(epoch_idx))
            self._order = (epoch_idx, list(self.sampler))
        batch = self._order[1][iteration * self.batch_size: (iteration + 1) * self.batch_size]
        return batch if len(batch) == self.batch_size else []

    def __call__(self, info):
        pairs = self.pairs(info.epoch_idx, info.iteration)
        if not pairs:
            raise StopIteration
        layers = self.spec.num_layers if self.spec else 0
        jpegs, labels, draws = [], np.empty(len(pairs), np.int64), np.empty((len(pairs), 5 + 3 * layers), np.int32)
        for k, (i, seed) in enumerate(pairs):
            data, labels[k], size = read_image(self.dataset, i)
            rng = random.Random(seed)
            window = crop_window(rng, *size)
            flip = rng.random() < 0.5
            ops, bins, signs = self.spec.draw(rng) if self.spec else ([], [], [])
            jpegs.append(data)
            draws[k] = [*window, flip, *ops, *bins, *signs]
        return jpegs, labels, draws

    def undecodable(self, error: Exception, epoch_idx: int, batches_done: int) -> ImageError:
        """The image DALI failed on, among the batches it may have been reading in pass ``epoch_idx``."""
        near = range(max(0, batches_done - 1), batches_done + 2 * PREFETCH_DEPTH + 2)   # the pipeline's and ours
        return undecodable(self.dataset, [i for it in near for i, _ in self.pairs(epoch_idx, it)], error)


class EvalSource:
    """The evaluation pipeline's input: ``indices`` of ``dataset`` in batches of ``batch`` (the last one
    shorter), with each image's resize and crop from `eval_geometry`; the files are read on ``threads`` threads
    (file reads release the GIL; on a network file system each read waits)."""

    def __init__(self, dataset, indices: Sequence[int], batch: int, img_size: int, crop_pct: float,
                 threads: int = 1):
        self.dataset, self.threads, self.pool = dataset, threads, None
        self.indices, self.batch = list(indices), batch
        self.img_size, self.crop_pct = img_size, crop_pct
        self.in_flight = collections.deque(maxlen=PREFETCH_DEPTH + 1)    # the batches DALI may be decoding

    def __iter__(self):
        self._pos = 0
        return self

    def __next__(self):
        chunk = self.indices[self._pos: self._pos + self.batch]
        if not chunk:
            raise StopIteration
        self._pos += len(chunk)
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="evit-dali-read")
        self.in_flight.append(chunk)
        cols = [[] for _ in range(4)]
        for data, label, (width, height) in self.pool.map(functools.partial(read_image, self.dataset), chunk):
            size, start = eval_geometry(width, height, self.img_size, self.crop_pct)
            cols[0].append(data)
            cols[1].append(np.asarray(label, dtype=np.int64))
            cols[2].append(np.asarray(size, dtype=np.float32))
            cols[3].append(np.asarray(start, dtype=np.int32))
        return cols

    def undecodable(self, error: Exception, *_) -> ImageError:
        return undecodable(self.dataset, [i for chunk in self.in_flight for i in chunk], error)
