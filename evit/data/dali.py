"""The NVIDIA DALI input pipeline of ``data.loader: dali`` (install with ``pip install .[dali]``).

Reads the ``imagenet`` and ``folder`` datasets, as folders or packed (each sample's bytes from the dataset's
``encoded(i)``: `evit.data.datasets`, `evit.data.packed`), and covers the ``deit`` augment of the
scratch and finetune recipes:

- **Training** (`DaliTrainLoader`): decode only the RandomResizedCrop window of each JPEG (an ROI decode: the
  "mixed" decoder, nvJPEG / the hardware decoder, on a GPU; libjpeg-turbo in DALI's CPU mode), resize it to
  ``model.img_size`` with ``train.interpolation``, flip, then timm's RandAugment (``train.aa``, e.g.
  ``rand-m9-mstd0.5-inc1``: timm's op set, ``n`` ops drawn with replacement, each applied with probability
  0.5 at magnitude ``m`` + N(0, mstd) clipped to [0, 10]), written as DALI ``@augmentation`` ops
  (`evit.data.dali_augment`). Batches come out as uint8 (N, 3, H, W) on the training device; normalization,
  random erasing and Mixup/CutMix follow on the device batch, as for the torch loader.
- **Evaluation** (`DaliEvalLoader`): resize the shorter side to ``floor(img_size / crop_pct)``, centre crop,
  normalize; the val set is sharded as `evit.data.samplers.ShardSampler` shards it.

Randomness. DALI's own random operators keep a state that depends on how many batches a pipeline has run, so
they are not used. Every random choice for a sample (its crop window, its flip, and RandAugment's ops,
magnitudes and signs) is drawn on the host from the sample's seed, which `evit.data.samplers.TrainSampler`
derives from (seed, epoch, position), and handed to DALI with the encoded image. The order is
`TrainSampler`'s, sharded by rank. So the batches are a function of (seed, epoch, position) alone, as with the
torch loader: the same seed gives the same batches, and a run resumed mid-epoch continues exactly.

Devices. With a CUDA training device DALI decodes and augments on that GPU; on a machine without one it runs
in DALI's CPU mode (``device_id=None``) on ``data.num_workers`` threads, and the trainer says so in its log.
On the host, the batch's files are read on ``data.num_workers`` threads and the draws made in the training
process (about 40 us per image).

Where it differs from timm's PIL transforms (measured in tests/test_dali.py, README "Input pipeline"): the
RandAugment ops' differences (`evit.data.dali_augment`); resizes use DALI's antialiased cubic filter, which does
not clip PIL's intermediate (between passes) values.
"""
from __future__ import annotations

import collections
import functools
import io
import math
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug.core import select, signed_bin
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from evit.errors import ConfigError, ImageError
from evit.data.dali_augment import NUM_MAGNITUDE_BINS, RandAugmentSpec, crop_window, rand_augment_ops
from evit.data.samplers import ShardSampler
from evit.data.transforms import eval_geometry


# --------------------------------------------------------------------------------------------- pipelines

INTERPOLATIONS = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR, "nearest": types.INTERP_NN}


@pipeline_def(enable_conditionals=True)
def train_pipeline(source, img_size: int, interpolation: str, names: Sequence[str], fill: Sequence[int],
                   num_layers: int, gpu: bool):
    """Training images as uint8 (3, img_size, img_size) and labels, from `TrainSource`'s batches."""
    jpegs, labels, start, shape, flip, ops, bins, signs = fn.external_source(
        source, num_outputs=8, batch=True, cycle="raise",
        dtype=[types.UINT8, types.INT64, types.INT32, types.INT32, types.INT32, types.INT32, types.INT32,
               types.INT32])
    images = fn.decoders.image_slice(jpegs, start, shape, device="mixed" if gpu else "cpu",
                                     output_type=types.RGB, normalized_anchor=False, normalized_shape=False,
                                     adjust_orientation=False)      # as PIL opens it (no EXIF rotation)
    images = fn.resize(images, size=[img_size, img_size], interp_type=INTERPOLATIONS[interpolation],
                       antialias=True)
    images = fn.flip(images, horizontal=flip)
    augs = rand_augment_ops(names, img_size, fill)
    for layer in range(num_layers):
        images = select(augs, ops[layer], images, magnitude_bin=signed_bin(bins[layer], signs[layer]),
                        num_magnitude_bins=NUM_MAGNITUDE_BINS)
    return fn.transpose(images, perm=[2, 0, 1]), labels


@pipeline_def
def eval_pipeline(source, img_size: int, interpolation: str, mean: Sequence[float], std: Sequence[float],
                  gpu: bool):
    """Evaluation images, normalized float (3, img_size, img_size), and labels, from `EvalSource`'s batches."""
    jpegs, labels, size, start = fn.external_source(
        source, num_outputs=4, batch=True, cycle="raise", dtype=[types.UINT8, types.INT64, types.FLOAT, types.INT32])
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                               adjust_orientation=False)
    images = fn.resize(images, size=size, interp_type=INTERPOLATIONS[interpolation], antialias=True)
    images = fn.slice(images, start=start, shape=[img_size, img_size], axis_names="WH")
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                      mean=[255 * m for m in mean], std=[255 * s for s in std])
    return images, labels


# --------------------------------------------------------------------------------------------- sources


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
    pack): the encoded image, its label and its (width, height) from the header. An unreadable image is the
    dataset's `ImageError` naming the file and its index (a file-system error stays itself)."""
    with dataset.naming_errors(dataset.raw_index(i)):
        encoded, label = dataset.encoded(i)
        return np.frombuffer(encoded, dtype=np.uint8), label, image_size(encoded)


PREFETCH_DEPTH = 2   # batches DALI reads ahead of the one it hands over


class _Reader:
    """Reads a batch's files with `read_image` on ``threads`` threads (file reads release the GIL; on a
    network file system each read waits), and remembers the batches DALI may still be decoding."""

    def __init__(self, dataset, threads: int):
        self.dataset, self.threads, self.pool = dataset, threads, None
        self.in_flight = collections.deque(maxlen=PREFETCH_DEPTH + 1)

    def read(self, indices: Sequence[int]) -> list:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="evit-dali-read")
        self.in_flight.append(list(indices))
        return list(self.pool.map(functools.partial(read_image, self.dataset), indices))

    def undecodable(self, error: Exception) -> ImageError:
        """DALI's decoder names no file when one fails (its header parsed, its data corrupt): the first image
        in flight that PIL cannot decode either, as the dataset's `ImageError`; else one naming them all."""
        from PIL import Image

        items = [i for batch in self.in_flight for i in batch]
        for i in items:
            try:
                with Image.open(io.BytesIO(self.dataset.encoded(i)[0])) as img:
                    img.load()
            except Exception as e:  # noqa: BLE001 - whatever PIL raises, the image is named
                return self.dataset.image_error(self.dataset.raw_index(i), e)
        cause = " ".join(f"{type(error).__name__}: {error}".split())
        first, last = (self.dataset.describe(self.dataset.raw_index(i)) for i in (items[0], items[-1]))
        return ImageError(f"cannot decode one of the {len(items)} images DALI was reading, from {first} to {last}, "
                          f"though PIL decodes each: {cause}")


class TrainSource(_Reader):
    """The training pipeline's input: for each batch of ``(index, sample_seed)`` pairs (a `TrainSampler`
    under a `BatchSampler`) over ``dataset``, the encoded files, labels, and each sample's draws (crop window,
    flip, RandAugment ops / magnitude bins / signs) from ``random.Random(sample_seed)``, in timm's order."""

    def __init__(self, dataset, batches: Iterable, spec: RandAugmentSpec | None, threads: int = 1):
        super().__init__(dataset, threads)
        self.batches, self.spec = batches, spec

    def __iter__(self):
        self._it = None         # DALI restarts the source as a pass ends: read the sampler at the next one's start
        return self

    def __next__(self):
        if self._it is None:
            self._it = iter(self.batches)
        cols = [[] for _ in range(8)]
        pairs = next(self._it)
        for (_, seed), (data, label, size) in zip(pairs, self.read([i for i, _ in pairs])):
            rng = random.Random(seed)
            x, y, w, h = crop_window(rng, *size)
            flip = int(rng.random() < 0.5)
            ops, bins, signs = self.spec.draw(rng) if self.spec else ([], [], [])
            cols[0].append(data)
            cols[1].append(np.asarray(label, dtype=np.int64))
            for col, v in zip(cols[2:], ((x, y), (w, h), flip, ops, bins, signs)):
                col.append(np.asarray(v, dtype=np.int32))
        return cols


class EvalSource(_Reader):
    """The evaluation pipeline's input: ``indices`` of ``dataset`` in batches of ``batch`` (the last one
    shorter), with each image's resize and crop from `eval_geometry`."""

    def __init__(self, dataset, indices: Sequence[int], batch: int, img_size: int, crop_pct: float,
                 threads: int = 1):
        super().__init__(dataset, threads)
        self.indices, self.batch = list(indices), batch
        self.img_size, self.crop_pct = img_size, crop_pct

    def __iter__(self):
        self._pos = 0
        return self

    def __next__(self):
        chunk = self.indices[self._pos: self._pos + self.batch]
        if not chunk:
            raise StopIteration
        self._pos += len(chunk)
        cols = [[] for _ in range(4)]
        for data, label, (width, height) in self.read(chunk):
            size, start = eval_geometry(width, height, self.img_size, self.crop_pct)
            cols[0].append(data)
            cols[1].append(np.asarray(label, dtype=np.int64))
            cols[2].append(np.asarray(size, dtype=np.float32))
            cols[3].append(np.asarray(start, dtype=np.int32))
        return cols


# --------------------------------------------------------------------------------------------- loaders


def pipeline_args(device: torch.device, num_workers: int) -> dict:
    """DALI's device and threads: the training GPU, or DALI's CPU mode (``device_id=None``) without one."""
    gpu = device.type == "cuda"
    index = (torch.cuda.current_device() if device.index is None else device.index) if gpu else None
    return dict(device_id=index, num_threads=max(1, num_workers), gpu=gpu)


class _Epochs:
    """Runs a pipeline one pass of its source per `epoch` call; the pipeline is built once, on first use, and
    reset for the next pass when the previous one ran to its end (otherwise, e.g. after a pass was left
    half-way, what it prefetched is dropped with it and a new one is built). An image DALI cannot decode is
    one `ImageError` naming it (`_Reader.undecodable`)."""

    def __init__(self, make_source: Callable, make_pipeline: Callable):
        self.make_source, self.make_pipeline = make_source, make_pipeline
        self.source, self.iterator, self.finished = None, None, False

    def epoch(self):
        if self.iterator is not None and self.finished:
            self.iterator.reset()
        else:
            self.source = self.make_source()
            pipe = self.make_pipeline(self.source)
            pipe.build()
            self.iterator = DALIGenericIterator([pipe], ["images", "labels"], prepare_first_batch=False,
                                                last_batch_policy=LastBatchPolicy.PARTIAL)
        self.finished = False
        try:
            for out in self.iterator:
                yield out[0]["images"], out[0]["labels"]
        except ImageError:
            raise
        except RuntimeError as e:
            raise self.source.undecodable(e) from e
        self.finished = True


class DaliTrainLoader:
    """Training batches ``(uint8 images (N, 3, S, S) on the device, int64 labels)`` from DALI.

    Each iteration is one pass of ``batch_sampler`` (a `BatchSampler` over `TrainSampler`, at the
    epoch and start set when the iteration begins: DALI starts reading a pass only then).
    """

    def __init__(self, cfg: dict, dataset, batch_sampler, device: torch.device):
        m, d, t = cfg["model"], cfg["data"], cfg["train"]
        if t["augment"] != "deit":
            raise ConfigError(f"train.augment: data.loader dali trains with the deit augment, not {t['augment']!r} "
                              "(it evaluates any run); use data.loader: torch")
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.spec = RandAugmentSpec(t["aa"]) if t["aa"] else None
        self.kwargs = dict(
            img_size=m["img_size"], interpolation=t["interpolation"], names=self.spec.names if self.spec else [],
            fill=[min(255, round(255 * x)) for x in d["mean"]],
            num_layers=self.spec.num_layers if self.spec else 0, batch_size=batch_sampler.batch_size,
            prefetch_queue_depth=PREFETCH_DEPTH, **pipeline_args(device, d["num_workers"]))
        self.num_threads = self.kwargs["num_threads"]
        self.epochs = _Epochs(lambda: TrainSource(self.dataset, self.batch_sampler, self.spec, self.num_threads),
                              lambda source: train_pipeline(source=source, **self.kwargs))

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        return self.epochs.epoch()


class DaliEvalLoader:
    """Evaluation batches ``(normalized float images (N, 3, S, S), int64 labels)``: rank ``rank``'s share
    of ``dataset`` as `ShardSampler` splits it."""

    def __init__(self, cfg: dict, dataset, rank: int, world_size: int, device: torch.device):
        m, d, ev, t = cfg["model"], cfg["data"], cfg["eval"], cfg["train"]
        self.dataset, self.batch = dataset, ev["batch_size"]
        self.indices = list(ShardSampler(len(dataset), world_size, rank))
        self.img_size, self.crop_pct = m["img_size"], ev["crop_pct"]
        interpolation = t["interpolation"] if t["interpolation"] != "random" else "bicubic"
        self.kwargs = dict(img_size=m["img_size"], interpolation=interpolation, mean=d["mean"], std=d["std"],
                           batch_size=self.batch, prefetch_queue_depth=PREFETCH_DEPTH,
                           **pipeline_args(device, d["num_workers"]))
        self.epochs = _Epochs(lambda: EvalSource(self.dataset, self.indices, self.batch, self.img_size,
                                                 self.crop_pct, self.kwargs["num_threads"]),
                              lambda source: eval_pipeline(source=source, **self.kwargs))

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch)

    def __iter__(self):
        return self.epochs.epoch()
