#!/usr/bin/env python
"""An ImageNet-like `folder` dataset from Fashion-MNIST: each garment, tinted, scaled up to 150-375 px and placed
at a random spot on a 500 x 375 photo-like background (a colour gradient with grain), saved as a JPEG
(quality 90, like ImageNet's ~110 KB files). For measuring the input pipeline where ImageNet is not at hand.

    .venv/bin/python scripts/fashion_jpegs.py /tmp/fashion-jpegs --train 1024 --val 256

writes ROOT/{train,val}/<class>/<n>.JPEG (classes are Fashion-MNIST's, as folder names 0_T-shirt_top, ...).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from evit.data.catalog import FASHION_CLASSES
from evit.data.datasets import FashionMNIST

SIZE = (500, 375)


def garment_photo(img: np.ndarray, rng: np.random.Generator, sides: tuple[int, int] = (150, SIZE[1]),
                  spread: float = 1.0) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One 28 x 28 grey garment as a 500 x 375 RGB photo, and the garment's box (xmin, ymin, xmax, ymax). Its side
    is drawn from ``sides`` (px), its offset from the centre from ``spread`` times the room on either side."""
    w, h = SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    t = (xx / w * rng.uniform(0.3, 1) + yy / h * rng.uniform(0.3, 1))[..., None] / 2
    photo = c0 * (1 - t) + c1 * t + rng.normal(0, 20, (h, w, 3))
    side = int(rng.integers(sides[0], sides[1] + 1))
    g = np.asarray(Image.fromarray(img).resize((side, side), Image.BICUBIC), dtype=np.float32)[..., None] / 255
    top, left = (round(room / 2 + (int(rng.integers(0, room + 1)) - room / 2) * spread)
                 for room in (h - side, w - side))
    tint = rng.uniform(60, 255, 3)
    patch = photo[top:top + side, left:left + side]
    photo[top:top + side, left:left + side] = patch * (1 - g) + tint * g
    return Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)), (left, top, left + side, top + side)


def write_split(root: Path, split: str, n: int, seed: int) -> list[Path]:
    ds = FashionMNIST(None, split)
    rng = np.random.default_rng(seed)
    names = [f"{i}_{c.replace('/', '_')}" for i, c in enumerate(FASHION_CLASSES)]
    paths = []
    for i in range(n):
        label = int(ds.targets[i])
        d = root / split / names[label]
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{i:06d}.JPEG"
        garment_photo(ds.images[i].numpy(), rng)[0].save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--train", type=int, default=1024, help="training images (the first of Fashion-MNIST's)")
    p.add_argument("--val", type=int, default=256, help="validation images (the first of its test set)")
    args = p.parse_args(argv)
    write_split(args.root, "train", args.train, seed=0)
    write_split(args.root, "val", args.val, seed=1)
    print(f"wrote {args.train} + {args.val} JPEGs of {SIZE[0]}x{SIZE[1]} px to {args.root}/{{train,val}}")


if __name__ == "__main__":
    main()
