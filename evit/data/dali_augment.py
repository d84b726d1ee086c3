"""The ``deit`` augment's random draws and RandAugment ops for the DALI loader (`evit.data.dali`): timm's
RandomResizedCrop window and RandAugment op choices drawn on the host from a sample's seed (`crop_window`,
`RandAugmentSpec`), and timm's RandAugment ops written as DALI ``@augmentation`` ops (`rand_augment_ops`).

Where it differs from timm's PIL transforms (measured in tests/test_dali.py, README "Input pipeline"): the
geometric RandAugment ops (Rotate, ShearX/Y, TranslateX/YRel) resample bilinearly (DALI's warp has no bicubic);
Equalize follows OpenCV's lookup table; magnitudes are quantized to `MAGNITUDE_STEP`.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np
from nvidia.dali import fn, math as dmath, types
from nvidia.dali.auto_aug import augmentations as A
from nvidia.dali.auto_aug.core import _Augmentation, augmentation
from nvidia.dali.pipeline import do_not_convert

from evit.errors import ConfigError

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
