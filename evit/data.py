"""Datasets, transforms, samplers and the evaluation loader for `evit train` / `evit eval`.

Datasets (``data.dataset`` in the run config):

- ``imagenet``: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``; classes are the sorted wnids,
  as in timm and DeiT.
- ``folder``: any ImageFolder tree ``root/{train,val}/<class>/<image>``; classes are the sorted folder names.
- ``fashion_mnist``: the four IDX ``.gz`` files of Fashion-MNIST (default directory
  ``/usr/share/datasets/fashion-mnist``, from Debian's ``dataset-fashion-mnist``); ``train`` = the 60k
  training images, ``val`` = the 10k ``t10k`` test images. Decoded once into a uint8 tensor.

Transforms (``train.augment``):

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
augment) and hand over uint8 images; `BatchStage` (`batch_stage`) normalizes, erases (deit) and mixes
(Mixup/CutMix) the batch on the training device. Evaluation transforms normalize in the worker.

Determinism: training samples are drawn by `TrainSampler`, which yields ``(index, sample_seed)`` pairs. The
order is a function of (seed, epoch) and the seed of each sample a function of (seed, epoch, position), and
`SeededDataset` reseeds python/numpy/torch before transforming a sample. So augmentation does not depend on
which worker loads a sample, on ``num_workers``, or on where an interrupted epoch was resumed.
"""
from __future__ import annotations

import contextlib
import gzip
import math
import random
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from evit.errors import DatasetError, ImageError
from evit.config.schema import (
    AUGMENTS, DATASETS, DEFAULT_CROP_PCT, FASHION_CLASSES, FASHION_MEAN, FASHION_STD, IMAGENET_MEAN, IMAGENET_STD,
    default_mean_std,
)
from evit.errors import ConfigError

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------------------------- datasets


def read_idx(path: str | Path) -> np.ndarray:
    """Decode one IDX file (optionally gzipped) into a numpy array of its declared dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise DatasetError(f"{path}: unknown IDX data type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=offset)
    if arr.size != math.prod(shape):
        raise DatasetError(f"{path}: truncated IDX file ({arr.size} values, header says {shape})")
    return arr.reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files. ``images`` is an (N, 28, 28) uint8 tensor, ``targets`` (N,) int64.

    Items are ``(image, label)`` with the image a (1, 28, 28) uint8 tensor, or a PIL RGB image when
    ``pil=True`` (for PIL-based transforms such as timm's).
    """

    classes = FASHION_CLASSES

    def __init__(self, root: str | Path | None, split: str, pil: bool = False):
        root = Path(root or DEFAULT_FASHION_DIR)
        if split not in FASHION_FILES:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        files = [root / name for name in FASHION_FILES[split]]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DatasetError(
                f"Fashion-MNIST not found in {root}: missing {', '.join(missing)}. Expected the four IDX files "
                f"{', '.join(n for pair in FASHION_FILES.values() for n in pair)} in that directory. Install them "
                f"with `apt-get install dataset-fashion-mnist` (to {DEFAULT_FASHION_DIR}), or download the "
                "dataset's public release files (github.com/zalandoresearch/fashion-mnist, data/fashion/) into a "
                "directory and point data.root at it.")
        images, labels = read_idx(files[0]), read_idx(files[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"{root}: IDX shapes {images.shape} / {labels.shape} are not images (N,H,W) "
                               "with N labels")
        self.images = torch.from_numpy(images.copy())
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.pil = pil

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.pil:
            from PIL import Image
            return Image.fromarray(img.numpy(), mode="L").convert("RGB"), int(self.targets[i])
        return img.unsqueeze(0), int(self.targets[i])


def _check_folder_split(root: Path, split: str, dataset: str) -> Path:
    layout = (f"{root}/{split}/<wnid>/*.JPEG (class order = sorted wnids)" if dataset == "imagenet"
              else f"{root}/{split}/<class>/<image>")
    d = root / split
    if not root.is_dir():
        raise DatasetError(f"{dataset} dataset root {root} does not exist; expected the layout {layout}")
    if not d.is_dir():
        raise DatasetError(f"{dataset} dataset: no {split}/ directory in {root}; expected the layout {layout}")
    subdirs = [p for p in d.iterdir() if p.is_dir()]
    if not subdirs:
        loose = any(p.suffix.lower() in IMG_EXTENSIONS for p in d.iterdir())
        hint = (" The images lie directly in it: sort them into one folder per class (for ImageNet val, e.g. "
                "with the usual valprep.sh script)." if loose else "")
        raise DatasetError(f"{dataset} dataset: {d} has no class folders; expected the layout {layout}.{hint}")
    if dataset == "imagenet":
        bad = sorted(p.name for p in subdirs if not re.fullmatch(r"n\d{8}", p.name))
        if bad:
            raise DatasetError(f"imagenet dataset: {d} has folders that are not wnids ({', '.join(bad[:5])}...); "
                               f"expected the layout {layout}")
    return d


class ImageFolderDataset(Dataset):
    """torchvision ImageFolder behind a clear layout check; items are ``(PIL RGB image, label)``."""

    def __init__(self, root: str | Path, split: str, dataset: str = "folder", classes: Sequence[str] | None = None):
        from torchvision.datasets import ImageFolder

        root = Path(root)
        d = _check_folder_split(root, split, dataset)
        try:
            self.folder = ImageFolder(str(d))
        except (FileNotFoundError, RuntimeError) as e:
            raise DatasetError(f"{dataset} dataset: cannot read {d} ({e}); expected {d}/<class>/<image>") from e
        self.classes = self.folder.classes
        if classes is not None and list(classes) != list(self.classes):
            raise DatasetError(f"{dataset} dataset: the class folders of {d} ({len(self.classes)}) differ from "
                               f"those of the training split ({len(classes)}); both splits need the same classes")
        self.targets = self.folder.targets

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        return self.folder[i]

    def describe(self, i: int) -> str:
        return f"{self.folder.samples[i][0]} (index {i})"


def build_dataset(name: str, root: str | None, split: str, pil: bool = True):
    """The raw (untransformed) dataset for ``split`` in {'train', 'val'}."""
    if name == "fashion_mnist":
        return FashionMNIST(root, split, pil=pil)
    if name in ("imagenet", "folder"):
        if not root:
            raise DatasetError(f"{name} dataset needs data.root (a directory with train/ and val/)")
        return ImageFolderDataset(root, split, dataset=name)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# --------------------------------------------------------------------------------------------- transforms


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
        return black_at_zero_bits(create_transform(
            input_size=img_size, is_training=True, color_jitter=color_jitter, auto_augment=aa or None,
            interpolation=interpolation, re_prob=reprob, re_mode="pixel", re_count=1, mean=mean, std=std,
            use_prefetcher=uint8))
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


# --------------------------------------------------------------------------------------------- device stage


class BatchStage:
    """The device half of the training input pipeline (timm's `PrefetchLoader` habit): what runs on a whole batch
    on the training device, so that loader workers only decode, crop and augment, and hand over uint8.

    ``stage(images, targets) -> (images, targets)``, in this order:

    1. moves both to ``device`` (non-blocking: pinned batches overlap the copy);
    2. images (B, C, H, W), uint8 in 0..255 or float in [0, 1], C = 1 or 3, become float32 (B, 3, H, W)
       normalized by ``mean`` / ``std`` (``normalize=False``: already normalized float, left as they are);
    3. timm's `RandomErasing` on the normalized batch: per image with probability ``reprob``, one box of
       per-pixel normal noise (DeiT's ``re_mode='pixel', re_count=1``);
    4. timm's `Mixup` / CutMix when ``mixup`` is given; targets (B,) int64 then become soft (B, classes).

    Random draws (steps 3 and 4) come from python's, numpy's and the device's global generators, which
    `evit.engine.train_one_epoch` seeds per step. Any loader can use it: the torch path with `train_transform`,
    and a loader that decodes and normalizes on the device itself (``normalize=False``) for erasing and Mixup.
    """

    def __init__(self, device: torch.device, mean, std, *, reprob: float = 0.0, mixup: Callable | None = None,
                 normalize: bool = True):
        from timm.data.random_erasing import RandomErasing

        self.device, self.mixup, self.normalize = torch.device(device), mixup, normalize
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.erasing = (RandomErasing(reprob, mode="pixel", max_count=1, device=self.device) if reprob > 0
                        else None)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        x = images.to(self.device, non_blocking=non_blocking)
        targets = targets.to(self.device, non_blocking=non_blocking)
        if self.normalize:
            scale = 255.0 if x.dtype == torch.uint8 else 1.0
            x = x.float()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = (x - self.mean * scale) / (self.std * scale)
        if self.erasing is not None:
            x = self.erasing(x)
        if self.mixup is not None:
            x, targets = self.mixup(x, targets)
        return x, targets


def batch_stage(cfg: dict, device: torch.device, num_classes: int) -> BatchStage:
    """The device half of a resolved run config's training input (`train_transform` gives the worker half):
    normalization, random erasing (deit augment) and Mixup / CutMix (when ``train.mixup`` or ``train.cutmix``)."""
    from timm.data import Mixup

    d, t = cfg["data"], cfg["train"]
    mixup = (Mixup(mixup_alpha=t["mixup"], cutmix_alpha=t["cutmix"], prob=t["mixup_prob"],
                   switch_prob=t["mixup_switch_prob"], mode="batch", label_smoothing=t["smoothing"],
                   num_classes=num_classes) if t["mixup"] > 0 or t["cutmix"] > 0 else None)
    reprob = t["reprob"] if t["augment"] == "deit" else 0.0
    return BatchStage(device, d["mean"], d["std"], reprob=reprob, mixup=mixup)


# --------------------------------------------------------------------------------------------- loaders


def raw_dataset(cfg: dict, split: str, transform) -> Dataset:
    """The config's dataset split, decoded as the transform wants it (uint8 tensors or PIL images)."""
    d = cfg["data"]
    return build_dataset(d["dataset"], d["root"], split, pil=not getattr(transform, "accepts_tensor", False))


def build_eval_loader(cfg: dict, rank: int, world_size: int, device: torch.device, transform: Callable | None = None):
    """The val-split loader of this rank (exact sharding, no padding), the val set's size, and the raw val set.

    ``transform``: the images' transform (PIL image -> normalized tensor), when not the run config's
    (`eval_transform`): e.g. a comparison backbone's own timm data config; the torch loader only."""
    d = cfg["data"]
    if d["loader"] == "dali" and transform is not None:
        raise ConfigError("data.loader: dali computes the run config's eval transform; a model's own transform "
                          "needs data.loader: torch")
    tf = transform or eval_transform(cfg)
    raw = raw_dataset(cfg, "val", tf)
    ds = SeededDataset(raw, tf, subset_indices(len(raw), d["val_subset"]))
    if d["loader"] == "dali":
        from evit.dali import DaliEvalLoader

        return DaliEvalLoader(cfg, ds, rank, world_size, device), len(ds), raw
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg["eval"]["batch_size"], sampler=ShardSampler(len(ds), world_size, rank),
        num_workers=d["num_workers"], pin_memory=device.type == "cuda", persistent_workers=d["num_workers"] > 0)
    return loader, len(ds), raw


def num_classes_of(cfg: dict, raw) -> int:
    """``model.num_classes``, or the dataset's class count when it is null; a disagreement is a `ConfigError`."""
    n = cfg["model"]["num_classes"]
    have = len(getattr(raw, "classes", ()) or ()) or None
    if n is None:
        if have is None:
            raise ConfigError("model.num_classes: cannot infer it from the dataset; set it")
        return have
    if have is not None and have != n:
        raise ConfigError(f"model.num_classes: {n}, but the dataset has {have} classes")
    return n


def shutdown_workers(loader) -> None:
    """Stop a DataLoader's persistent workers now (the garbage collector may take seconds to join them)."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
        loader._iterator = None


# --------------------------------------------------------------------------------------------- seeding


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
        raw = i if self.indices is None else self.indices[i]
        with self.naming_errors(raw):
            img, target = self.base[raw]
            if self.transform is not None:
                img = self.transform(img)
        return img, target

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

    def image_error(self, raw: int, e: Exception) -> ImageError:
        describe = getattr(self.base, "describe", None)
        what = describe(raw) if describe else f"item {raw} of {type(self.base).__name__}"
        cause = " ".join(f"{type(e).__name__}: {e}".split())
        return ImageError(f"cannot decode or augment the image {what}: {cause}")


def subset_indices(n: int, size: int | None) -> list[int] | None:
    """A fixed random subset (independent of the run seed) of ``size`` indices out of n, sorted; None = all."""
    if size is None or size >= n:
        return None
    g = torch.Generator().manual_seed(0)
    return sorted(torch.randperm(n, generator=g)[:size].tolist())


# --------------------------------------------------------------------------------------------- samplers


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
