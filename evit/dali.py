"""The NVIDIA DALI input pipeline of ``data.loader: dali`` (install with ``pip install .[dali]``).

Reads the ``imagenet`` and ``folder`` layouts (evit/data.py) and covers the ``deit`` augment of the scratch and
finetune recipes:

- **Training** (`DaliTrainLoader`): decode only the RandomResizedCrop window of each JPEG (an ROI decode: the
  "mixed" decoder, nvJPEG / the hardware decoder, on a GPU; libjpeg-turbo in DALI's CPU mode), resize it to
  ``model.img_size`` with ``train.interpolation``, flip, then timm's RandAugment (``train.aa``, e.g.
  ``rand-m9-mstd0.5-inc1``: timm's op set, ``n`` ops drawn with replacement, each applied with probability
  0.5 at magnitude ``m`` + N(0, mstd) clipped to [0, 10]), written as DALI ``@augmentation`` ops
  (`rand_augment_ops`). Batches come out as uint8 (N, 3, H, W) on the training device; normalization,
  random erasing and Mixup/CutMix follow on the device batch, as for the torch loader.
- **Evaluation** (`DaliEvalLoader`): resize the shorter side to ``floor(img_size / crop_pct)``, centre crop,
  normalize; the val set is sharded as `evit.data.ShardSampler` shards it.

Randomness. DALI's own random operators keep a state that depends on how many batches a pipeline has run, so
they are not used. Every random choice for a sample (its crop window, its flip, and RandAugment's ops,
magnitudes and signs) is drawn on the host from the sample's seed, which `evit.data.TrainSampler` derives
from (seed, epoch, position), and handed to DALI with the encoded image. The order is `TrainSampler`'s, sharded
by rank. So the batches are a function of (seed, epoch, position) alone, as with the torch loader: the same
seed gives the same batches, and a run resumed mid-epoch continues exactly.

Devices. With a CUDA training device DALI decodes and augments on that GPU; on a machine without one it runs
in DALI's CPU mode (``device_id=None``) on ``data.num_workers`` threads, and the trainer says so in its log.
On the host, the batch's files are read on ``data.num_workers`` threads and the draws made in the training
process (about 40 us per image).

Where it differs from timm's PIL transforms (measured in tests/test_dali.py, README "Input pipeline"): the
geometric RandAugment ops (Rotate, ShearX/Y, TranslateX/YRel) resample bilinearly (DALI's warp has no bicubic);
Equalize follows OpenCV's lookup table; magnitudes are quantized to `MAGNITUDE_STEP`; resizes use DALI's
antialiased cubic filter, which does not clip PIL's intermediate (between passes) values.
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
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as A
from nvidia.dali.auto_aug.core import _Augmentation, augmentation, select, signed_bin
from nvidia.dali.pipeline import do_not_convert
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from evit.errors import ConfigError
from evit.data import ShardSampler, eval_geometry
from evit.errors import ImageError

NUM_MAGNITUDE_BINS = 1001                           # magnitudes 0, 0.01, ..., 10 (timm's range)
MAGNITUDE_STEP = 10.0 / (NUM_MAGNITUDE_BINS - 1)
MAGNITUDES = np.linspace(0.0, 10.0, NUM_MAGNITUDE_BINS)
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)   # timm's RandomResizedCrop defaults


# --------------------------------------------------------------------------------------------- host draws


def crop_window(rng: random.Random, width: int, height: int, scale=RRC_SCALE, ratio=RRC_RATIO):
    """RandomResizedCrop's window ``(x, y, w, h)`` for a ``width`` x ``height`` image, drawn from ``rng``
    the way timm's ``RandomResizedCropAndInterpolation.get_params`` draws it (10 tries, then a centre crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class RandAugmentSpec:
    """timm's RandAugment for a spec such as ``rand-m9-mstd0.5-inc1`` (parsed by timm): the op names, the
    number of layers, and each op's probability and magnitude distribution. `draw` samples one image's ops."""

    def __init__(self, aa: str):
        from timm.data.auto_augment import rand_augment_transform

        if not aa.startswith("rand"):
            raise ConfigError(f"train.aa: the DALI loader implements timm's RandAugment (rand-...), not {aa!r}")
        ra = rand_augment_transform(aa, {})
        if ra.choice_weights is not None:
            raise ConfigError(f"train.aa: {aa!r}: weighted op choice (w) is not implemented by the DALI loader")
        self.names = [op.name for op in ra.ops]
        missing = [n for n in self.names if n not in OP_TABLE]
        if missing:
            raise ConfigError(f"train.aa: {aa!r} uses ops the DALI loader does not implement: {', '.join(missing)}")
        op = ra.ops[0]
        self.num_layers, self.prob, self.magnitude = ra.num_layers, op.prob, op.magnitude
        self.magnitude_std, self.magnitude_max = op.magnitude_std, op.magnitude_max or 10.0
        if self.magnitude_max > 10.0 or self.magnitude_std == float("inf"):
            raise ConfigError(f"train.aa: {aa!r}: mmax > 10 and mstd inf are not implemented by the DALI loader")

    @property
    def skip(self) -> int:
        """The op index that means "not applied" (the identity, appended after timm's ops)."""
        return len(self.names)

    def draw(self, rng: random.Random) -> tuple[list[int], list[int], list[int]]:
        """Per layer: the op index (`skip` when not applied), its magnitude bin and its sign (1 = negated)."""
        ops, bins, signs = [], [], []
        for _ in range(self.num_layers):
            op = rng.randrange(len(self.names))
            if self.prob < 1.0 and rng.random() > self.prob:
                ops.append(self.skip), bins.append(0), signs.append(0)
                continue
            m = rng.gauss(self.magnitude, self.magnitude_std) if self.magnitude_std > 0 else self.magnitude
            m = max(0.0, min(m, self.magnitude_max))
            ops.append(op)
            bins.append(int(round(m / MAGNITUDE_STEP)))
            signs.append(int(OP_TABLE[self.names[op]][1] and rng.random() > 0.5))
        return ops, bins, signs


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


# --------------------------------------------------------------------------------------------- RandAugment ops

# timm op name -> (magnitude in [0, 10] -> timm's parameter, randomly negated?), as timm's level functions
OP_TABLE: dict[str, tuple[Callable[[float], float] | None, bool]] = {
    "AutoContrast": (None, False),
    "Equalize": (None, False),
    "Invert": (None, False),
    "Rotate": (lambda m: m / 10 * 30.0, True),
    "PosterizeIncreasing": (lambda m: 4 - int(m / 10 * 4), False),
    "SolarizeIncreasing": (lambda m: 256 - int(m / 10 * 256), False),
    "SolarizeAdd": (lambda m: min(128, int(m / 10 * 110)), False),
    "ColorIncreasing": (lambda m: max(0.1, 1.0 + m / 10 * 0.9), True),
    "ContrastIncreasing": (lambda m: max(0.1, 1.0 + m / 10 * 0.9), True),
    "BrightnessIncreasing": (lambda m: max(0.1, 1.0 + m / 10 * 0.9), True),
    "SharpnessIncreasing": (lambda m: max(0.1, 1.0 + m / 10 * 0.9), True),
    "ShearX": (lambda m: m / 10 * 0.3, True),
    "ShearY": (lambda m: m / 10 * 0.3, True),
    "TranslateXRel": (lambda m: m / 10 * 0.45, True),
    "TranslateYRel": (lambda m: m / 10 * 0.45, True),
}


class _PlainParams(_Augmentation):
    """DALI's augmentation with its parameter table computed as plain Python: through DALI's autograph (which
    converts what a conditional pipeline calls), the 2,002 calls per op (`NUM_MAGNITUDE_BINS`, two signs) take
    seconds."""

    @do_not_convert
    def _map_mags_to_params(self, magnitudes):
        return super()._map_mags_to_params(magnitudes)


def _f32(x):
    return fn.cast(x, dtype=types.FLOAT)


def _u8(x):
    """Round a float image to uint8 (clipped)."""
    return fn.cast(dmath.clamp(dmath.floor(x + 0.5), 0, 255), dtype=types.UINT8)


def _blend(degenerate, img, factor):
    """PIL's ``Image.blend(degenerate, img, factor)`` (ImageEnhance): truncated to uint8 and clipped."""
    d = _f32(degenerate)
    return fn.cast(dmath.clamp(dmath.floor(d + factor * (_f32(img) - d)), 0, 255), dtype=types.UINT8)


def _gray(img):
    """PIL's "L" conversion of an RGB uint8 HWC image, (H, W, 1) int32: (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    weights = types.Constant(np.array([19595, 38470, 7471], dtype=np.int32))
    return (fn.reductions.sum(fn.cast(img, dtype=types.INT32) * weights, axis_names="C", keep_dims=True)
            + 0x8000) >> 16


def _where(cond, a, b):
    c = fn.cast(cond, dtype=types.INT32)
    return fn.cast(dmath.clamp(c * a + (1 - c) * b, 0, 255), dtype=types.UINT8)


def _auto_contrast(img, _):
    """PIL's ``ImageOps.autocontrast`` per channel (no cutoff): ``int((x - lo) * 255 / (hi - lo))``."""
    x = _f32(img)
    lo = fn.reductions.min(x, axis_names="HW", keep_dims=True)
    hi = fn.reductions.max(x, axis_names="HW", keep_dims=True)
    flat = _f32(hi <= lo)
    scale = (1 - flat) * 255.0 / (hi - lo + flat) + flat
    return fn.cast(dmath.clamp(dmath.floor((x - lo * (1 - flat)) * scale), 0, 255), dtype=types.UINT8)


def _rotate_matrix(img_size: int, degrees: float) -> tuple:
    """PIL's ``Image.rotate`` inverse matrix (about the centre, counter-clockwise) for a square image."""
    a = -math.radians(degrees)
    c, s = round(math.cos(a), 15), round(math.sin(a), 15)
    half = img_size / 2.0
    return (c, s, -c * half - s * half + half, -s, c, s * half - c * half + half)


@do_not_convert
def rand_augment_ops(names: Sequence[str], img_size: int, fill: Sequence[int]) -> list:
    """DALI ``@augmentation`` ops for timm's op ``names`` on square uint8 HWC images of side ``img_size``, then
    the identity (the "not applied" op). Parameters are timm's (`OP_TABLE`), precomputed for `MAGNITUDES` and
    indexed by each sample's magnitude bin and sign. Geometric ops map output to input pixels with PIL's
    matrices and fill with ``fill`` (timm: the mean colour)."""
    S = img_size
    fill_c = types.Constant(np.array(fill, dtype=np.float32))
    interior = np.zeros((S, S, 1), dtype=np.uint8)
    interior[1:-1, 1:-1] = 1                          # PIL's SMOOTH filter leaves the 1 px border as it was
    interior = types.Constant(interior)
    smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13

    def warp(img, matrix):
        out = fn.warp_affine(_f32(img) - fill_c, matrix=matrix, inverse_map=True, fill_value=0.0,
                             interp_type=types.INTERP_LINEAR)
        return _u8(out + fill_c)

    def smoothed(img):
        return img * (1 - interior) + fn.filter(img, smooth, border="clamp") * interior

    def aug(name, op, to_param=None, dtype=np.float32):
        level, negate = OP_TABLE[name]
        op = do_not_convert(op)
        if level is None:
            return augmentation(op, name=name, augmentation_cls=_PlainParams)
        to_param = to_param or (lambda v: v)
        return augmentation(op, name=name, mag_range=MAGNITUDES, randomly_negate=negate, param_device="auto",
                            mag_to_param=lambda m: np.asarray(to_param(level(m)), dtype=dtype),
                            augmentation_cls=_PlainParams)

    def affine(name, matrix):
        to_param = lambda m: np.asarray(matrix(OP_TABLE[name][0](m)), np.float32).reshape(2, 3)  # noqa: E731
        return augmentation(do_not_convert(warp), name=name, mag_range=MAGNITUDES, randomly_negate=True,
                            mag_to_param=to_param, augmentation_cls=_PlainParams)

    ops = {
        "AutoContrast": aug("AutoContrast", _auto_contrast),
        "Equalize": aug("Equalize", lambda img, _: fn.equalize(img)),
        "Invert": A.invert,
        "PosterizeIncreasing": aug("PosterizeIncreasing", lambda img, mask: img & mask,
                                   lambda bits: (0xFF << (8 - max(bits, 0))) & 0xFF, np.uint8),
        "SolarizeIncreasing": aug("SolarizeIncreasing",
                                  lambda img, t: _where(img >= t, 255 - fn.cast(img, dtype=types.INT32), img),
                                  dtype=np.int32),
        "SolarizeAdd": aug("SolarizeAdd",
                           lambda img, add: _where(img < 128, fn.cast(img, dtype=types.INT32) + add, img),
                           dtype=np.int32),
        "ColorIncreasing": aug("ColorIncreasing", lambda img, f: _blend(_gray(img), img, f)),
        "ContrastIncreasing": aug("ContrastIncreasing", lambda img, f: _blend(
            dmath.floor(fn.reductions.mean(_f32(_gray(img))) + 0.5), img, f)),
        "BrightnessIncreasing": aug("BrightnessIncreasing", lambda img, f: _blend(img * 0, img, f)),
        "SharpnessIncreasing": aug("SharpnessIncreasing", lambda img, f: _blend(smoothed(img), img, f)),
        "Rotate": affine("Rotate", lambda d: _rotate_matrix(S, d)),
        "ShearX": affine("ShearX", lambda s: (1, s, 0, 0, 1, 0)),
        "ShearY": affine("ShearY", lambda s: (1, 0, 0, s, 1, 0)),
        "TranslateXRel": affine("TranslateXRel", lambda p: (1, 0, p * S, 0, 1, 0)),
        "TranslateYRel": affine("TranslateYRel", lambda p: (1, 0, 0, 0, 1, p * S)),
    }
    return [ops[n] for n in names] + [A.identity]


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


def sample_of(dataset, i: int) -> tuple[int, str, int]:
    """Item ``i`` of an `evit.data.SeededDataset` over an ``imagenet`` / ``folder`` set: its index in the
    whole set, its file and its label."""
    raw = i if dataset.indices is None else dataset.indices[i]
    return (raw, *dataset.base.folder.samples[raw])


def read_image(dataset, i: int) -> tuple[np.ndarray, int, tuple[int, int]]:
    """Item ``i`` of an `evit.data.SeededDataset` over an ``imagenet`` / ``folder`` set: the file's bytes, its
    label and its (width, height) from the header. An unreadable image is the dataset's `evit.data.ImageError`
    naming the file and its index (a file-system error stays itself)."""
    raw, path, label = sample_of(dataset, i)
    with dataset.naming_errors(raw):
        with open(path, "rb") as f:
            encoded = f.read()
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

        samples = [sample_of(self.dataset, i) for batch in self.in_flight for i in batch]
        for raw, path, _ in samples:
            try:
                with Image.open(path) as img:
                    img.load()
            except Exception as e:  # noqa: BLE001 - whatever PIL raises, the image is named
                return self.dataset.image_error(raw, e)
        cause = " ".join(f"{type(error).__name__}: {error}".split())
        return ImageError(f"cannot decode one of the {len(samples)} images DALI was reading, from "
                          f"{samples[0][1]} (index {samples[0][0]}) to {samples[-1][1]} (index {samples[-1][0]}), "
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

    Each iteration is one pass of ``batch_sampler`` (a `BatchSampler` over `evit.data.TrainSampler`, at the
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
    of ``dataset`` as `evit.data.ShardSampler` splits it."""

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
