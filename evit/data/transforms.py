"""The per-image transforms of ``train.augment``, for training and evaluation, and timm's evaluation geometry:

- ``deit``: timm's ``create_transform`` with the DeiT recipe (RandAugment, random erasing, bicubic), its
  posterize keeping 0 bits giving a black image as with Pillow < 13 (`posterize`); evaluation resizes to
  ``img_size / crop_pct`` and centre-crops.
- ``demo``: light and fast, for small grey images: random crop with zero padding + horizontal flip,
  done on uint8 tensors (no PIL); evaluation just resizes. With ``data.canvas`` the image is first placed on
  a black square of that many pixels, at offsets that are multiples of ``data.canvas_step`` px: random ones
  for training, the most central one for evaluation. Objects then fill only part of the frame, as in
  ImageNet, and there is background to drop.
- ``none``: no augmentation (evaluation transform for training too).

Training splits the transform like timm's prefetcher: DataLoader workers run `train_transform` (decode, crop,
augment) and hand over uint8 images; `evit.data.stage.BatchStage` normalizes, erases (deit) and mixes
(Mixup/CutMix) the batch on the training device. Evaluation transforms normalize in the worker.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from evit.data.catalog import AUGMENTS, DEFAULT_CROP_PCT
from evit.errors import ConfigError


class DemoTrainTransform:
    """Demo training transform on uint8 tensors: place the image on a black ``canvas`` (if set) at a random
    offset (multiples of ``canvas_step``), resize to ``img_size``, random crop with zero padding, horizontal
    flip; then, unless ``device_stage``, normalize to 3 channels.

    Accepts a (C, H, W) uint8 tensor or a PIL image. With ``device_stage`` it returns the un-normalized image
    for `BatchStage`: uint8, or float in [0, 1] when it had to be resized. Uses torch's global RNG (reseeded per
    sample by `SeededDataset`).
    """

    accepts_tensor = True

    def __init__(self, img_size: int, mean, std, padding: int = 2, hflip: float = 0.5, canvas: int | None = None,
                 canvas_step: int = 1, device_stage: bool = False):
        self.img_size, self.padding, self.hflip = img_size, padding, hflip
        self.canvas, self.canvas_step, self.device_stage = canvas, canvas_step, device_stage
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def _placed(self, img, random_place: bool) -> torch.Tensor:
        """uint8, or float in [0, 1] if resized."""
        if not isinstance(img, torch.Tensor):
            img = torch.from_numpy(np.asarray(img.convert("RGB"))).permute(2, 0, 1)
        x = img
        if self.canvas:
            x = place_on_canvas(x, self.canvas, self.canvas_step, random_place)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x[None].float().div_(255), size=(self.img_size, self.img_size), mode="bilinear",
                              antialias=True, align_corners=False)[0]
        return x

    def crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        if p:
            h, w = x.shape[-2:]
            x = F.pad(x, (p, p, p, p))
            i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = x[..., i:i + h, j:j + w]
        if self.hflip and torch.rand(()) < self.hflip:
            x = x.flip(-1)
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return (x - self.mean) / self.std

    def __call__(self, img) -> torch.Tensor:
        x = self.crop_flip(self._placed(img, random_place=True))
        return x.contiguous() if self.device_stage else self.normalize(x).contiguous()


class DemoEvalTransform(DemoTrainTransform):
    """Demo evaluation transform: the image at the most central offset of its canvas (if set), resized and
    normalized."""

    def __init__(self, img_size: int, mean, std, canvas: int | None = None, canvas_step: int = 1):
        super().__init__(img_size, mean, std, padding=0, hflip=0.0, canvas=canvas, canvas_step=canvas_step)

    def __call__(self, img) -> torch.Tensor:
        return self.normalize(self._placed(img, random_place=False)).contiguous()


def place_on_canvas(x: torch.Tensor, canvas: int, step: int, random_place: bool) -> torch.Tensor:
    """A (C, H, W) image on a black canvas x canvas square, at offsets that are multiples of ``step`` px:
    uniformly random ones, or the ones nearest the centre (rounded down), a position training also sees."""
    h, w = x.shape[-2:]
    if canvas < max(h, w):
        raise ValueError(f"data.canvas: {canvas} px is smaller than the {h}x{w} px image")
    slots_h, slots_w = (canvas - h) // step + 1, (canvas - w) // step + 1
    if random_place:
        top, left = step * torch.randint(0, slots_h, ()).item(), step * torch.randint(0, slots_w, ()).item()
    else:
        top, left = central_offset(canvas, h, w, step)
    return F.pad(x, (left, canvas - w - left, top, canvas - h - top))


def central_offset(canvas: int, h: int, w: int, step: int) -> tuple[int, int]:
    """(top, left) of an h x w image placed for evaluation on its canvas: the grid offset nearest the centre."""
    return step * (((canvas - h) // step) // 2), step * (((canvas - w) // step) // 2)


def build_transform(augment: str, is_training: bool, img_size: int, mean, std, *, aa: str | None = None,
                    reprob: float = 0.0, color_jitter: float = 0.3, interpolation: str = "bicubic",
                    crop_pct: float = DEFAULT_CROP_PCT, demo_padding: int = 2, canvas: int | None = None,
                    canvas_step: int = 1, device_stage: bool = False) -> Callable:
    """Training or evaluation transform for ``augment`` in {'deit', 'demo', 'none'} (``canvas``: demo only).

    Normalized float (C, H, W) images, random erasing (deit, ``reprob``) included; or, with ``device_stage``
    (training only), the worker half that `BatchStage` completes: the image before normalization (uint8; the
    demo augment gives float in [0, 1] when it resizes), without erasing (``mean``, ``std``, ``reprob`` unused).
    """
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
    if augment == "demo":
        if is_training:
            return DemoTrainTransform(img_size, mean, std, padding=demo_padding, canvas=canvas,
                                      canvas_step=canvas_step, device_stage=device_stage)
        return DemoEvalTransform(img_size, mean, std, canvas=canvas, canvas_step=canvas_step)
    if canvas:
        raise ValueError(f"data.canvas: only the demo augment places images on a canvas, not {augment!r}")
    from timm.data import create_transform

    uint8 = is_training and device_stage      # timm's prefetcher mode: no ToTensor scaling, Normalize, erasing
    if is_training and augment == "deit":
        # DeiT main.py: create_transform(input_size, is_training=True, color_jitter, auto_augment,
        # interpolation, re_prob, re_mode='pixel', re_count=1); its resize+crop for small inputs is unused here.
        try:
            transform = create_transform(
                input_size=img_size, is_training=True, color_jitter=color_jitter, auto_augment=aa or None,
                interpolation=interpolation, re_prob=reprob, re_mode="pixel", re_count=1, mean=mean, std=std,
                use_prefetcher=uint8)
        except (AssertionError, KeyError, ValueError) as e:  # timm's parser of the aa spec asserts
            raise ConfigError(f"train.aa: timm cannot parse {aa!r} ({type(e).__name__}: {e}); e.g. "
                              "rand-m9-mstd0.5-inc1 (lower-case m)") from None
        return black_at_zero_bits(transform)
    return create_transform(input_size=img_size, is_training=False, interpolation=interpolation,
                            crop_pct=crop_pct, mean=mean, std=std, use_prefetcher=uint8)


def posterize(img, bits_to_keep: int, **kwargs):
    """timm's posterize op, with 0 bits giving an all-black image as Pillow < 13 did (DeiT and EViT trained with
    that); Pillow 13's ``ImageOps.posterize`` raises for 0 bits, which RandAugment's ``PosterizeIncreasing``
    draws at magnitude 10."""
    from PIL import Image
    from timm.data.auto_augment import posterize as timm_posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_posterize(img, bits_to_keep, **kwargs)


def black_at_zero_bits(transform: Callable) -> Callable:
    """``transform`` (a timm Compose) with the posterize ops of its RandAugment / AutoAugment replaced by
    `posterize`."""
    from timm.data.auto_augment import posterize as timm_posterize

    for t in getattr(transform, "transforms", ()):
        ops = list(getattr(t, "ops", ())) + [op for sub in getattr(t, "policy", ()) for op in sub]
        for op in ops:
            if getattr(op, "aug_fn", None) is timm_posterize:
                op.aug_fn = posterize
    return transform


def train_transform(cfg: dict) -> Callable:
    """The worker half of a resolved run config's training transform; `batch_stage` gives the device half."""
    d, m, t = cfg["data"], cfg["model"], cfg["train"]
    return build_transform(t["augment"], True, m["img_size"], d["mean"], d["std"], aa=t["aa"],
                           color_jitter=t["color_jitter"], interpolation=t["interpolation"],
                           demo_padding=t["demo_padding"], canvas=d["canvas"], canvas_step=d["canvas_step"],
                           device_stage=True)


def eval_transform(cfg: dict) -> Callable:
    """The evaluation transform of a resolved run config (evaluation and the kept-patch figure)."""
    d, m, t = cfg["data"], cfg["model"], cfg["train"]
    interpolation = t["interpolation"] if t["interpolation"] != "random" else "bicubic"
    return build_transform(t["augment"], False, m["img_size"], d["mean"], d["std"], interpolation=interpolation,
                           crop_pct=cfg["eval"]["crop_pct"], canvas=d["canvas"], canvas_step=d["canvas_step"])


def eval_geometry(width: int, height: int, img_size: int, crop_pct: float) -> tuple[tuple, tuple]:
    """timm's evaluation resize + centre crop for a ``width`` x ``height`` image: the resized (height, width), as
    torchvision's ``Resize(floor(img_size / crop_pct))`` computes it, and the crop's top-left (x, y), as
    ``CenterCrop``."""
    short = math.floor(img_size / crop_pct)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    return (new_h, new_w), (int(round((new_w - img_size) / 2.0)), int(round((new_h - img_size) / 2.0)))
