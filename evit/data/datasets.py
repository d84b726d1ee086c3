"""The raw (untransformed) datasets of ``data.dataset``, each checked against its layout on disk:

- ``imagenet``: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``; classes are the sorted wnids,
  as in timm and DeiT.
- ``folder``: any ImageFolder tree ``root/{train,val}/<class>/<image>``; classes are the sorted folder names.
- ``fashion_mnist``: the four IDX ``.gz`` files of Fashion-MNIST (default directory
  ``/usr/share/datasets/fashion-mnist``, from Debian's ``dataset-fashion-mnist``); ``train`` = the 60k
  training images, ``val`` = the 10k ``t10k`` test images. Decoded once into a uint8 tensor.

A folder dataset lists its files and labels (`ImageFolderDataset.samples`), which the masking experiment names
images by, and reads a sample's file as it is (``encoded(i)``, which the DALI loader decodes); its pack
(``data.format: packed``, `evit.data.packed.PackedDataset`) does both the same way.
"""
from __future__ import annotations

import gzip
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from evit.data.catalog import DATASETS, DEFAULT_FASHION_DIR, FASHION_CLASSES, FASHION_FILES, IMG_EXTENSIONS
from evit.data.packed import PackedDataset
from evit.errors import DatasetError


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


# ILSVRC2012's val/ as downloaded is flat: one shell line sorts it into wnid folders from LOC_val_solution.csv.
VAL_FIX = (". For ImageNet's val/, with Kaggle's LOC_val_solution.csv beside it: cd {d} && tail -n +2 "
           "../LOC_val_solution.csv | while IFS=, read id boxes; do mkdir -p ${{boxes%% *}} && mv $id.JPEG "
           "${{boxes%% *}}/; done")


def check_folder_split(root: Path, split: str, dataset: str) -> Path:
    """The folder of ``split`` under ``root``, its layout checked (one folder per class; ImageNet's are wnids)."""
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
        hint = (f" The images lie directly in it: sort them into one folder per class{VAL_FIX.format(d=d)}"
                if loose else "")
        raise DatasetError(f"{dataset} dataset: {d} has no class folders; expected the layout {layout}.{hint}")
    if dataset == "imagenet":
        bad = sorted(p.name for p in subdirs if not re.fullmatch(r"n\d{8}", p.name))
        if bad:
            raise DatasetError(f"imagenet dataset: {d} has folders that are not wnids ({', '.join(bad[:5])}...); "
                               f"expected the layout {layout}")
    return d


class ImageFolderDataset(Dataset):
    """torchvision ImageFolder behind a clear layout check; items are ``(PIL RGB image, label)``, and
    ``samples`` lists each item's ``(file path, label)``."""

    def __init__(self, root: str | Path, split: str, dataset: str = "folder", classes: Sequence[str] | None = None):
        from torchvision.datasets import ImageFolder

        root = Path(root)
        d = check_folder_split(root, split, dataset)
        try:
            self.folder = ImageFolder(str(d))
        except (FileNotFoundError, RuntimeError) as e:
            raise DatasetError(f"{dataset} dataset: cannot read {d} ({e}); expected {d}/<class>/<image>") from e
        self.classes = self.folder.classes
        if classes is not None and list(classes) != list(self.classes):
            raise DatasetError(f"{dataset} dataset: the class folders of {d} ({len(self.classes)}) differ from "
                               f"those of the training split ({len(classes)}); both splits need the same classes")
        self.targets = self.folder.targets
        self.samples: list[tuple[str, int]] = self.folder.samples

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        return self.folder[i]

    def encoded(self, i: int) -> tuple[bytes, int]:
        """Sample ``i``'s encoded image (its file's bytes) and label."""
        path, label = self.samples[i]
        with open(path, "rb") as f:
            return f.read(), label

    def image_size(self, i: int) -> tuple[int, int]:
        """Sample ``i``'s (width, height), from its file's header."""
        from PIL import Image

        with Image.open(self.samples[i][0]) as img:
            return img.size

    def describe(self, i: int) -> str:
        return f"{self.samples[i][0]} (index {i})"


def build_dataset(name: str, root: str | None, split: str, pil: bool = True, fmt: str = "folder"):
    """The raw (untransformed) dataset for ``split`` in {'train', 'val'}; ``fmt`` (``data.format``): an imagenet /
    folder dataset's folder, or its pack (`evit.data.packed`)."""
    if name == "fashion_mnist":
        return FashionMNIST(root, split, pil=pil)
    if name in ("imagenet", "folder"):
        if not root:
            raise DatasetError(f"{name} dataset needs data.root (a directory with train/ and val/)")
        if fmt == "packed":
            return PackedDataset(root, split, dataset=name)
        return ImageFolderDataset(root, split, dataset=name)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
