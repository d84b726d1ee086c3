"""The loaders of a resolved run config: the one place that chooses, by ``data.loader``, between torch's
DataLoader (workers run the transforms of `evit.data.transforms`) and NVIDIA DALI (`evit.data.dali`, imported
only when chosen), for training (`build_train_data`) and for evaluation (`build_eval_loader`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from evit.errors import ConfigError, DatasetError
from evit.data.datasets import build_dataset
from evit.data.samplers import ShardSampler, TrainSampler, subset_indices
from evit.data.seeding import SeededDataset
from evit.data.transforms import eval_transform, train_transform


def raw_dataset(cfg: dict, split: str, transform) -> Dataset:
    """The config's dataset split, decoded as the transform wants it (uint8 tensors or PIL images)."""
    d = cfg["data"]
    return build_dataset(d["dataset"], d["root"], split, pil=not getattr(transform, "accepts_tensor", False),
                         fmt=d["format"])


@dataclass
class TrainData:
    """A training run's input on one rank, as `build_train_data` builds it."""

    loader: Iterable                # batches of (un-normalized images, labels) for `evit.data.stage.BatchStage`
    sampler: TrainSampler           # the loader's order: `set_epoch` before each pass
    eval_loader: Iterable           # this rank's share of the val split, normalized
    num_train: int                  # training images (all ranks)
    num_eval: int                   # val images (all ranks)
    num_classes: int
    steps_per_epoch: int            # full batches per rank and epoch
    notice: str | None = None       # what the log should say about the loader, if anything


def build_train_data(cfg: dict, rank: int, world_size: int, device: torch.device) -> TrainData:
    """The training loader (``train.batch_size`` per rank, last partial batch dropped) and the evaluation loader
    of rank ``rank`` of ``world_size``; the train and val splits must have the same classes."""
    d, t = cfg["data"], cfg["train"]
    train_tf = train_transform(cfg)
    raw_train = raw_dataset(cfg, "train", train_tf)
    train_ds = SeededDataset(raw_train, train_tf, subset_indices(len(raw_train), d["train_subset"]))
    eval_loader, num_eval, raw_val = build_eval_loader(cfg, rank, world_size, device)
    num_classes = num_classes_of(cfg, raw_train)
    if getattr(raw_train, "classes", None) != getattr(raw_val, "classes", None):
        raise DatasetError(f"{d['dataset']} dataset at {d['root']}: the train/ and val/ class folders differ "
                           f"({len(raw_train.classes)} vs {len(raw_val.classes)}); both need the same classes")
    sampler = TrainSampler(len(train_ds), seed=t["seed"], world_size=world_size, rank=rank,
                           repeats=t["repeated_aug"])
    batch = t["batch_size"]
    steps = len(sampler) // batch
    if steps < 1:
        raise ConfigError(f"train.batch_size: {batch} is more than the {len(sampler)} training images "
                          "per process")
    batch_sampler = BatchSampler(sampler, batch, drop_last=True)
    notice = None
    if d["loader"] == "dali":
        from evit.data.dali import DaliTrainLoader

        loader = DaliTrainLoader(cfg, train_ds, batch_sampler, device)
        if device.type != "cuda":
            notice = (f"data.loader dali: no GPU, so DALI decodes and augments in its CPU mode "
                      f"({loader.num_threads} thread(s))")
    else:
        loader = DataLoader(train_ds, batch_sampler=batch_sampler, num_workers=d["num_workers"],
                            pin_memory=device.type == "cuda", persistent_workers=d["num_workers"] > 0)
    return TrainData(loader=loader, sampler=sampler, eval_loader=eval_loader, num_train=len(train_ds),
                     num_eval=num_eval, num_classes=num_classes, steps_per_epoch=steps, notice=notice)


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
        from evit.data.dali import DaliEvalLoader

        return DaliEvalLoader(cfg, ds, rank, world_size, device), len(ds), raw
    loader = DataLoader(
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


def close_loader(loader) -> None:
    """Stop a loader's workers now, rather than whenever the garbage collector gets to them: a DataLoader's
    persistent workers, or a DALI loader's feeding thread and pipeline (its ``close``)."""
    if hasattr(loader, "close"):
        loader.close()
        return
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
        loader._iterator = None
