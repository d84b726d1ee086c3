"""The datasets and augments by name, their normalization statistics and where their files lie. Imports no torch:
the run config's schema and the workflow read it."""
from __future__ import annotations

DATASETS = ("imagenet", "folder", "fashion_mnist")
AUGMENTS = ("deit", "demo", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fashion-MNIST training-set pixel statistics (grey, repeated over the three channels).
FASHION_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_STD = (0.3530, 0.3530, 0.3530)
DEFAULT_CROP_PCT = 0.875          # DeiT's evaluation: resize to img_size / 0.875, centre crop
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def default_mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (FASHION_MEAN, FASHION_STD) if name == "fashion_mnist" else (IMAGENET_MEAN, IMAGENET_STD)
