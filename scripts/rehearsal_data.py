#!/usr/bin/env python
"""What the rehearsal of the paper grid (scripts/rehearsal.sh) reads from disk, written where its workflow config
(paper.yaml with the overlay workflow/config/rehearsal.yaml, merged as Snakemake merges them) says:

- ``run_defaults.data.root``: ImageNet's layout, ``train/<wnid>/<wnid>_<n>.JPEG`` and
  ``val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG``, with every one of the 1000 wnids (timm's imagenet_synsets.txt;
  the imagenet dataset has 1000 classes, and torchvision's ImageFolder refuses an empty class folder):
  ``--per-class`` images each, Fashion-MNIST garments on 500 x 375 photos (`fashion_jpegs.garment_photo`);
- ``masking.boxes``: its LOC_val_solution.csv, each val image's garment as its box;
- every ``file://`` URL of ``downloads:`` and ``comparison.weights``: the weights of the model that reads them (a
  download's: the model of the experiments that start from it, built from their run config; a backbone's: timm's,
  1000 classes).

    .venv/bin/python scripts/rehearsal_data.py workflow/config/paper.yaml workflow/config/rehearsal.yaml

The images are written once (a stamp file in the root records their layout); the weights every time.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import yaml
from snakemake.utils import update_config, validate

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ is no package
from fashion_jpegs import garment_photo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAMP = ".rehearsal_images"
# Each garment covers about half of the 224 px centre crop (the masking experiment masks half the patches, at most
# the object's and the background's count): its side (px) and how far it strays from the centre.
GARMENT = dict(sides=(220, 235), spread=0.3)


def merged_config(files: list[str]) -> dict:
    """The workflow config of ``files`` as Snakemake reads them: merged in order, validated, defaults filled in."""
    from evit.workflow import SCHEMA_FILE

    config: dict = {}
    for f in files:
        update_config(config, yaml.safe_load(Path(f).read_text()))
    validate(config, str(REPO / SCHEMA_FILE))
    return config


def imagenet_wnids() -> list[str]:
    from timm.data import ImageNetInfo

    return sorted(ImageNetInfo().label_names())


def write_imagenet(root: Path, boxes_csv: Path, per_class: int, wnids: list[str]) -> int:
    """The train and val splits of ``wnids`` under ``root`` and the val boxes; returns the number of JPEGs written."""
    from evit.data.datasets import FashionMNIST

    rng = np.random.default_rng(0)
    rows = []
    for split in ("train", "val"):
        garments = FashionMNIST(None, split).images
        for c, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                n = c * per_class + k
                stem = f"{wnid}_{k}" if split == "train" else f"ILSVRC2012_val_{n + 1:08d}"
                photo, box = garment_photo(garments[n].numpy(), rng, **GARMENT)
                photo.save(root / split / wnid / f"{stem}.JPEG", format="JPEG", quality=90)
                if split == "val":
                    rows.append((stem, " ".join(map(str, (wnid, *box)))))
    boxes_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(boxes_csv, "w", newline="") as f:
        csv.writer(f).writerows([("ImageId", "PredictionString"), *rows])
    return 2 * len(wnids) * per_class


def local_path(url: str) -> Path | None:
    """The file a ``file://`` URL names, or None for any other URL."""
    parts = urllib.parse.urlsplit(url)
    return Path(urllib.parse.unquote(parts.path)) if parts.scheme == "file" else None


def save_weights(state: dict, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.clone() for k, v in state.items()}, path)  # a tensor shared by two keys: saved twice
    else:
        torch.save({"model": state}, path)


def publish_weights(config: dict) -> list[Path]:
    """The weights behind every file:// URL the workflow downloads; returns their paths."""
    import timm

    from evit.models.factory import build_model
    from evit.workflow_build import build_workflow

    plan = build_workflow(config, REPO)
    written = []
    for name, url in plan.weight_urls.items():
        path = local_path(url)
        if path is None:
            continue
        if name in plan.backbones:
            model = timm.create_model(name, num_classes=1000)
        else:
            readers = [exp for exp, e in plan.experiments.items() if e.get("init") == name]
            if not readers:
                raise SystemExit(f"rehearsal_data: download {name!r} ({url}) is no experiment's init")
            model = build_model(plan.resolved[readers[0]]["model"], 1000)
        save_weights(model.state_dict(), path)
        written.append(path)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configfiles", nargs="+", help="the workflow config files, in Snakemake's order")
    p.add_argument("--per-class", type=int, default=1, help="images per wnid in each split")
    args = p.parse_args(argv)
    config = merged_config(args.configfiles)
    root = Path(config["run_defaults"]["data"]["root"])
    boxes = Path(config["masking"]["boxes"])
    stamp, layout = root / STAMP, f"{args.per_class} per class, {GARMENT}\n"
    if stamp.is_file() and boxes.is_file() and stamp.read_text() == layout:
        print(f"rehearsal_data: {root} is there ({args.per_class} image(s) per wnid and split)")
    else:
        for split in ("train", "val"):
            shutil.rmtree(root / split, ignore_errors=True)
        n = write_imagenet(root, boxes, args.per_class, imagenet_wnids())
        stamp.write_text(layout)
        print(f"rehearsal_data: wrote {n} JPEGs to {root}/{{train,val}}/<wnid>/ and their boxes to {boxes}")
    for path in publish_weights(config):
        print(f"rehearsal_data: wrote {path}")


if __name__ == "__main__":
    main()
