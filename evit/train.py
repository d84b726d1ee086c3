"""`evit train` and `evit eval`: the run config, the `Trainer`, and evaluation of checkpoints.

Run config
==========

A YAML mapping with the sections below. Every key has a default except ``data.dataset`` (and ``data.root``
for imagenet / folder); unknown keys and bad values are rejected with one error naming the key
(``ConfigError``). `resolve_config` fills in every default, so a resolved config is complete.
Top-level ``launcher`` (read by ``evit launch``) and ``meta`` (free-form, e.g. the experiment name) are
accepted, kept, and ignored here; they are not part of the config hash.

``model:``
  ``arch`` (str) timm model name, e.g. ``evit_deit_small_patch16_224`` or plain ``deit_small_patch16_224``.
  ``img_size`` (int, 224). ``patch_size`` (int or null = the arch's). ``num_classes`` (int or null = the
  dataset's). ``keep_rate`` (float in (0, 1], 1.0) target keep rate of the reorganizing blocks; must be 1
  for a non-EViT arch. ``fuse_token`` (bool, true). ``drop_loc`` (list of block indices, [3, 6, 9]).
  ``drop_path`` (float, 0.1) stochastic depth rate. ``kwargs`` (mapping, {}) more `timm.create_model`
  arguments, e.g. ``{embed_dim: 96, depth: 12, num_heads: 3}``.

``data:``
  ``dataset`` (imagenet | folder | fashion_mnist). ``root`` (path; null = /usr/share/datasets/fashion-mnist
  for fashion_mnist, required otherwise). ``num_workers`` (int, 8) per process. ``train_subset`` /
  ``val_subset`` (int or null) use a fixed random subset of that many images (seed-independent).
  ``mean`` / ``std`` (3 floats or null = the dataset's: ImageNet's, or Fashion-MNIST's).

``train:``
  ``recipe`` (scratch | finetune | demo | none; default scratch) picks the defaults of the keys below from
  `RECIPES` (one table: scratch = DeiT, finetune = the EViT paper's fine-tuning, demo = small images on a
  CPU, none = plain); any key given in the config overrides its recipe value.
  ``init_checkpoint`` (path or null) weights to start from (DeiT / official EViT / ours) when the run dir
  has no checkpoint yet; required by the finetune recipe.
  ``epochs`` (int). ``batch_size`` (int, per process). ``blr`` (float) lr per 512 samples: the lr is
  ``blr * batch_size * world_size / 512``. ``min_lr``, ``warmup_lr`` (float). ``warmup_epochs`` (float).
  ``weight_decay`` (float). ``opt`` (timm optimizer name, adamw). ``opt_eps`` (float). ``momentum``
  (float). ``sched`` (timm scheduler name, cosine), stepped every iteration. ``clip_grad`` (float or null).
  ``shrink_start``, ``shrink_epochs`` (float) keep-rate schedule: 1 before ``shrink_start`` epochs, then a
  cosine to ``model.keep_rate`` over ``shrink_epochs``, per iteration (`evit.engine.keep_rate_at`).
  ``hold_eval`` (bool) keep the model in eval mode while training (fine-tuning: DropPath off).
  ``mixup``, ``cutmix`` (float alphas, 0 = off), ``mixup_prob``, ``mixup_switch_prob`` (float),
  ``smoothing`` (float) label smoothing. ``augment`` (deit | demo | none) the transform family;
  ``aa`` (str or null) RandAugment spec; ``reprob`` (float) random erasing; ``color_jitter`` (float);
  ``interpolation`` (str); ``demo_padding`` (int) crop padding of the demo transform.
  ``repeated_aug`` (int, 1 = off) repeated augmentation count (timm's RepeatAugSampler).
  ``amp`` (none | bf16 | fp16) mixed precision on GPU; the CPU always trains in fp32.
  ``seed`` (int). ``device`` (auto | cpu | cuda). ``eval_every`` (int, epochs; 0 = only at the end).
  ``log_every`` (int) steps between progress lines when stdout is not a terminal.

``eval:``
  ``batch_size`` (int, per process). ``crop_pct`` (float or null = 0.875 for deit/none augment, 1.0 for
  demo). ``keep_rate`` (float or null = model.keep_rate) keep rate for evaluation.

Run directory
=============

``checkpoint.pth`` (atomic; written at every epoch end, on `Trainer.checkpoint_now`, and when a run stops at
``max_steps``), ``log.jsonl`` (one line per epoch), ``metrics.json`` (final), ``config.resolved.yaml``.
A run whose directory has a checkpoint resumes from it, exactly: data order, augmentation, DropPath and
Mixup draws are functions of (seed, epoch, step, rank, sample position), never of how the run was split.
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import inspect
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml

from evit import data as D
from evit import engine as E
from evit.checkpoint import CheckpointMismatchError


class ConfigError(ValueError):
    """A run config with an unknown key or a bad value; the message names the key."""


# --------------------------------------------------------------------------------------------- recipes

RECIPE_NAMES = ("none", "scratch", "finetune", "demo")
# One row per train key, one column per recipe (order of RECIPE_NAMES). scratch = DeiT / EViT from scratch
# (EViT's README: 8 GPUs x 256); finetune = EViT's fine-tuning of DeiT-S (8 x 256, lr 2e-5 per 512, 30 epochs,
# shrink 0/0, model in eval mode); demo = small grey images on a CPU (Fashion-MNIST, a few epochs: flips only,
# as random crops slow a ViT's first epochs down a lot; see workflow/config/runs/fashion_vit.yaml).
RECIPES: dict[str, tuple] = {
    #  key                 none         scratch                   finetune                  demo
    "epochs":            (100,         300,                      30,                       4),
    "batch_size":        (128,         256,                      256,                      128),
    "blr":               (5e-4,        5e-4,                     2e-5,                     8e-3),
    "min_lr":            (1e-5,        1e-5,                     2e-6,                     1e-5),
    "warmup_lr":         (1e-6,        1e-6,                     1e-6,                     1e-6),
    "warmup_epochs":     (0.0,         5.0,                      0.0,                      0.2),
    "weight_decay":      (0.05,        0.05,                     1e-6,                     0.05),
    "opt":               ("adamw",     "adamw",                  "adamw",                  "adamw"),
    "opt_eps":           (1e-8,        1e-8,                     1e-8,                     1e-8),
    "momentum":          (0.9,         0.9,                      0.9,                      0.9),
    "sched":             ("cosine",    "cosine",                 "cosine",                 "cosine"),
    "clip_grad":         (None,        None,                     None,                     None),
    "shrink_start":      (0.0,         10.0,                     0.0,                      1.0),
    "shrink_epochs":     (0.0,         100.0,                    0.0,                      2.0),
    "hold_eval":         (False,       False,                    True,                     False),
    "mixup":             (0.0,         0.8,                      0.8,                      0.0),
    "cutmix":            (0.0,         1.0,                      1.0,                      0.0),
    "mixup_prob":        (1.0,         1.0,                      1.0,                      1.0),
    "mixup_switch_prob": (0.5,         0.5,                      0.5,                      0.5),
    "smoothing":         (0.0,         0.1,                      0.1,                      0.0),
    "augment":           ("none",      "deit",                   "deit",                   "demo"),
    "aa":                (None,        "rand-m9-mstd0.5-inc1",   "rand-m9-mstd0.5-inc1",   None),
    "reprob":            (0.0,         0.25,                     0.25,                     0.0),
    "color_jitter":      (0.3,         0.3,                      0.3,                      0.3),
    "interpolation":     ("bicubic",   "bicubic",                "bicubic",                "bicubic"),
    "demo_padding":      (2,           2,                        2,                        0),
    "repeated_aug":      (1,           3,                        3,                        1),
    "amp":               ("none",      "bf16",                   "bf16",                   "bf16"),
}


def recipe_defaults(recipe: str) -> dict:
    col = RECIPE_NAMES.index(recipe)
    return {k: v[col] for k, v in RECIPES.items()}


# --------------------------------------------------------------------------------------------- schema

_REQUIRED = object()


@dataclass(frozen=True)
class Field:
    kind: str                       # int float bool str choice intlist floatlist dict path
    default: Any = None             # None with nullable; _REQUIRED; "recipe" for train keys from RECIPES
    nullable: bool = False
    lo: float | None = None         # inclusive lower bound
    hi: float | None = None         # inclusive upper bound
    lo_open: bool = False           # lower bound exclusive
    choices: tuple = ()


_RECIPE = "recipe"
SCHEMA: dict[str, dict[str, Field]] = {
    "model": {
        "arch": Field("str", "evit_deit_small_patch16_224"),
        "img_size": Field("int", 224, lo=1),
        "patch_size": Field("int", None, nullable=True, lo=1),
        "num_classes": Field("int", None, nullable=True, lo=1),
        "keep_rate": Field("float", 1.0, lo=0.0, lo_open=True, hi=1.0),
        "fuse_token": Field("bool", True),
        "drop_loc": Field("intlist", [3, 6, 9], lo=0),
        "drop_path": Field("float", 0.1, lo=0.0, hi=1.0),
        "kwargs": Field("dict", {}),
    },
    "data": {
        "dataset": Field("choice", _REQUIRED, choices=D.DATASETS),
        "root": Field("path", None, nullable=True),
        "num_workers": Field("int", 8, lo=0),
        "train_subset": Field("int", None, nullable=True, lo=1),
        "val_subset": Field("int", None, nullable=True, lo=1),
        "mean": Field("floatlist", None, nullable=True),
        "std": Field("floatlist", None, nullable=True, lo=0.0, lo_open=True),
    },
    "train": {
        "recipe": Field("choice", "scratch", choices=RECIPE_NAMES),
        "init_checkpoint": Field("path", None, nullable=True),
        "epochs": Field("int", _RECIPE, lo=1),
        "batch_size": Field("int", _RECIPE, lo=1),
        "blr": Field("float", _RECIPE, lo=0.0),
        "min_lr": Field("float", _RECIPE, lo=0.0),
        "warmup_lr": Field("float", _RECIPE, lo=0.0),
        "warmup_epochs": Field("float", _RECIPE, lo=0.0),
        "weight_decay": Field("float", _RECIPE, lo=0.0),
        "opt": Field("str", _RECIPE),
        "opt_eps": Field("float", _RECIPE, lo=0.0, lo_open=True),
        "momentum": Field("float", _RECIPE, lo=0.0, hi=1.0),
        "sched": Field("choice", _RECIPE, choices=("cosine", "step", "multistep", "plateau", "tanh", "poly",
                                                    "const")),
        "clip_grad": Field("float", _RECIPE, nullable=True, lo=0.0, lo_open=True),
        "shrink_start": Field("float", _RECIPE, lo=0.0),
        "shrink_epochs": Field("float", _RECIPE, lo=0.0),
        "hold_eval": Field("bool", _RECIPE),
        "mixup": Field("float", _RECIPE, lo=0.0),
        "cutmix": Field("float", _RECIPE, lo=0.0),
        "mixup_prob": Field("float", _RECIPE, lo=0.0, hi=1.0),
        "mixup_switch_prob": Field("float", _RECIPE, lo=0.0, hi=1.0),
        "smoothing": Field("float", _RECIPE, lo=0.0, hi=0.999),
        "augment": Field("choice", _RECIPE, choices=D.AUGMENTS),
        "aa": Field("str", _RECIPE, nullable=True),
        "reprob": Field("float", _RECIPE, lo=0.0, hi=1.0),
        "color_jitter": Field("float", _RECIPE, lo=0.0),
        "interpolation": Field("choice", _RECIPE, choices=("bicubic", "bilinear", "nearest", "random")),
        "demo_padding": Field("int", _RECIPE, lo=0),
        "repeated_aug": Field("int", _RECIPE, lo=1),
        "amp": Field("choice", _RECIPE, choices=("none", "bf16", "fp16")),
        "seed": Field("int", 0, lo=0),
        "device": Field("choice", "auto", choices=("auto", "cpu", "cuda")),
        "eval_every": Field("int", 1, lo=0),
        "log_every": Field("int", 50, lo=1),
    },
    "eval": {
        "batch_size": Field("int", 256, lo=1),
        "crop_pct": Field("float", None, nullable=True, lo=0.0, lo_open=True, hi=1.0),
        "keep_rate": Field("float", None, nullable=True, lo=0.0, lo_open=True, hi=1.0),
    },
}
PASSTHROUGH = ("launcher", "meta")
# Keys that may differ between a checkpoint's config and the resuming run's (they do not change the maths).
RESUME_FREE = {"data.root", "data.num_workers", "data.val_subset", "train.device", "train.amp",
               "train.eval_every", "train.log_every", "eval.batch_size", "eval.crop_pct", "eval.keep_rate"}


def _check(key: str, f: Field, v: Any) -> Any:
    def bad(expected: str):
        raise ConfigError(f"{key}: expected {expected}, got {v!r}")

    if v is None:
        if f.nullable:
            return None
        bad(f"a value ({f.kind})")
    if f.kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            bad("an integer")
    elif f.kind == "float":
        if isinstance(v, bool):
            bad("a number")
        if isinstance(v, str):      # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                bad("a number")
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            bad("a finite number")
        v = float(v)
    elif f.kind == "bool":
        if not isinstance(v, bool):
            bad("true or false")
    elif f.kind in ("str", "path"):
        if not isinstance(v, str) or not v:
            bad("a non-empty string")
        if f.kind == "path":
            v = os.path.expanduser(v)
    elif f.kind == "choice":
        if v not in f.choices:
            bad("one of " + ", ".join(map(str, f.choices)))
    elif f.kind in ("intlist", "floatlist"):
        if not isinstance(v, (list, tuple)):
            bad("a list")
        elem = Field("int" if f.kind == "intlist" else "float", lo=f.lo, lo_open=f.lo_open, hi=f.hi)
        return [_check(f"{key}[{i}]", elem, x) for i, x in enumerate(v)]
    elif f.kind == "dict":
        if not isinstance(v, dict):
            bad("a mapping")
        return copy.deepcopy(v)
    if f.kind in ("int", "float"):
        if f.lo is not None and (v < f.lo or (f.lo_open and v == f.lo)):
            bad(f"a value {'>' if f.lo_open else '>='} {f.lo}")
        if f.hi is not None and v > f.hi:
            bad(f"a value <= {f.hi}")
    return v


def _is_evit(arch: str) -> bool:
    return arch.startswith("evit")


def resolve_config(raw: dict | None) -> dict:
    """Validate a run config and fill in every default (recipe values included). Raises `ConfigError`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the run config must be a mapping, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in SCHEMA and k not in PASSTHROUGH]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (expected {', '.join([*SCHEMA, *PASSTHROUGH])})")
    out: dict = {}
    for sec, fields in SCHEMA.items():
        given = raw.get(sec) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"{sec}: expected a mapping, got {given!r}")
        unknown = [k for k in given if k not in fields]
        if unknown:
            raise ConfigError(f"{sec}.{unknown[0]}: unknown key (known: {', '.join(fields)})")
        rdefaults = {}
        if sec == "train":
            recipe = _check("train.recipe", fields["recipe"], given.get("recipe", "scratch"))
            rdefaults = recipe_defaults(recipe)
        section = {}
        for k, f in fields.items():
            if k in given:
                section[k] = _check(f"{sec}.{k}", f, given[k])
            elif f.default is _REQUIRED:
                raise ConfigError(f"{sec}.{k}: required")
            elif f.default == _RECIPE:
                section[k] = rdefaults[k]
            else:
                section[k] = copy.deepcopy(f.default)
        out[sec] = section
    for k in PASSTHROUGH:
        if k in raw:
            out[k] = copy.deepcopy(raw[k])

    m, d, t, ev = out["model"], out["data"], out["train"], out["eval"]
    if not _is_evit(m["arch"]) and m["keep_rate"] < 1.0:
        raise ConfigError(f"model.keep_rate: {m['keep_rate']} needs an EViT arch (evit_*), not {m['arch']!r}")
    for key in ("img_size", "patch_size", "num_classes", "keep_rate", "fuse_token", "drop_loc",
                "drop_path_rate", "pretrained"):
        if key in m["kwargs"]:
            raise ConfigError(f"model.kwargs.{key}: set it as model.{key.removesuffix('_rate')} instead"
                              if key != "pretrained" else "model.kwargs.pretrained: not allowed (no hub "
                              "downloads); use train.init_checkpoint")
    if d["dataset"] != "fashion_mnist" and not d["root"]:
        raise ConfigError(f"data.root: required for the {d['dataset']} dataset")
    mean, std = D.default_mean_std(d["dataset"])
    for k, v in (("mean", mean), ("std", std)):
        if d[k] is None:
            d[k] = list(v)
        elif len(d[k]) != 3:
            raise ConfigError(f"data.{k}: expected 3 values (RGB), got {d[k]!r}")
    if m["num_classes"] is None and d["dataset"] == "fashion_mnist":
        m["num_classes"] = len(D.FASHION_CLASSES)
    if m["num_classes"] is None and d["dataset"] == "imagenet":
        m["num_classes"] = 1000
    if (t["mixup"] > 0 or t["cutmix"] > 0) and t["batch_size"] % 2:
        raise ConfigError(f"train.batch_size: Mixup/CutMix need an even batch size, got {t['batch_size']}")
    if t["recipe"] == "finetune" and not t["init_checkpoint"]:
        raise ConfigError("train.init_checkpoint: the finetune recipe starts from a checkpoint; give its path")
    if ev["crop_pct"] is None:
        ev["crop_pct"] = 1.0 if t["augment"] == "demo" else 0.875
    if ev["keep_rate"] is not None and ev["keep_rate"] < 1.0 and not _is_evit(m["arch"]):
        raise ConfigError(f"eval.keep_rate: needs an EViT arch (evit_*), not {m['arch']!r}")
    return out


def config_hash(cfg: dict) -> str:
    """sha256 (12 hex digits) of the resolved config without the passthrough sections."""
    core = {k: v for k, v in cfg.items() if k not in PASSTHROUGH}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _flat(cfg: dict) -> dict:
    return {f"{s}.{k}": v for s in SCHEMA for k, v in cfg.get(s, {}).items()}


def resume_mismatch(saved: dict, current: dict) -> list[str]:
    """Keys (other than RESUME_FREE) whose values differ between a checkpoint's config and this run's."""
    a, b = _flat(saved), _flat(current)
    return [f"{k}: checkpoint {a.get(k)!r} vs config {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in RESUME_FREE and a.get(k) != b.get(k)]


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``section.key=value`` overrides (value parsed as YAML) on a raw config."""
    raw = copy.deepcopy(raw or {})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


# --------------------------------------------------------------------------------------------- building


def build_model(model_cfg: dict, num_classes: int) -> torch.nn.Module:
    """`timm.create_model` from the model section (never pretrained: weights come from checkpoints)."""
    import timm

    kwargs = dict(model_cfg["kwargs"])
    kwargs.update(num_classes=num_classes, img_size=model_cfg["img_size"], drop_path_rate=model_cfg["drop_path"])
    if model_cfg["patch_size"]:
        kwargs["patch_size"] = model_cfg["patch_size"]
    if _is_evit(model_cfg["arch"]):
        kwargs.update(keep_rate=model_cfg["keep_rate"], fuse_token=model_cfg["fuse_token"],
                      drop_loc=tuple(model_cfg["drop_loc"]))
    try:
        return timm.create_model(model_cfg["arch"], pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"model: cannot build {model_cfg['arch']!r} with {kwargs}: {e}") from e


def supports_keep_rate(model: torch.nn.Module) -> bool:
    return "keep_rate" in inspect.signature(model.forward).parameters


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _raw_dataset(cfg: dict, split: str, transform) -> D.Dataset:
    d = cfg["data"]
    return D.build_dataset(d["dataset"], d["root"], split, pil=not getattr(transform, "accepts_tensor", False))


def build_eval_loader(cfg: dict, info: E.DistInfo, device: torch.device):
    """The val-split loader for this rank (exact sharding, no padding) and the full val dataset size."""
    d, m, t, ev = cfg["data"], cfg["model"], cfg["train"], cfg["eval"]
    tf = D.build_transform(t["augment"], False, m["img_size"], d["mean"], d["std"],
                           interpolation=t["interpolation"] if t["interpolation"] != "random" else "bicubic",
                           crop_pct=ev["crop_pct"])
    raw = _raw_dataset(cfg, "val", tf)
    ds = D.SeededDataset(raw, tf, D.subset_indices(len(raw), d["val_subset"]))
    sampler = D.ShardSampler(len(ds), info.world_size, info.rank)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=ev["batch_size"], sampler=sampler, num_workers=d["num_workers"],
        pin_memory=device.type == "cuda", persistent_workers=d["num_workers"] > 0)
    return loader, len(ds), raw


def _num_classes(cfg: dict, raw) -> int:
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


def _is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Progress:
    """A tqdm bar on a terminal, plain lines every ``every`` steps otherwise (SLURM logs). Rank 0 only."""

    def __init__(self, enabled: bool, total: int, desc: str, every: int, done: int = 0):
        self.enabled, self.total, self.desc, self.every = enabled, total, desc, every
        self.bar = None
        self.t0, self.n0 = time.perf_counter(), done
        if enabled and _is_tty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, desc=desc, leave=False)
            except ImportError:
                pass

    def update(self, done: int, batch: int, **stats) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if v is not None}, refresh=False)
        elif done % self.every == 0 or done == self.total:
            rate = (done - self.n0) * batch / max(time.perf_counter() - self.t0, 1e-9)
            extra = " ".join(f"{k} {v:.4g}" for k, v in stats.items() if v is not None)
            _log(f"{self.desc} step {done}/{self.total} {extra} {rate:.1f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------- Trainer


class Trainer:
    """One training run: ``Trainer(config, run_dir)()`` trains to the end and returns the final metrics.

    - ``config``: a raw or resolved run config (dict) or a path to its YAML; validated at construction.
    - Picklable at any time: only (config, run_dir) travel; a fresh or unpickled Trainer resumes from
      ``run_dir/checkpoint.pth`` when it exists (and, for a finished run, just re-evaluates).
    - `checkpoint_now` writes a checkpoint of the current step boundary (for the launcher, e.g. from a
      preemption signal handler); `run(max_steps=N)` stops after N global steps with a checkpoint.
    - Distributed when launched under torchrun / submitit (RANK, WORLD_SIZE, ...) or srun (SLURM_*).
    """

    def __init__(self, config: dict | str | Path, run_dir: str | Path):
        raw = load_config(config) if isinstance(config, (str, Path)) else config
        self.config = resolve_config(raw)
        self.run_dir = Path(run_dir)
        self._rt: SimpleNamespace | None = None

    def __getstate__(self) -> dict:
        return {"config": self.config, "run_dir": self.run_dir}

    def __setstate__(self, state: dict) -> None:
        self.config, self.run_dir, self._rt = state["config"], Path(state["run_dir"]), None

    def __repr__(self) -> str:
        return f"Trainer(run_dir={str(self.run_dir)!r}, config_hash={config_hash(self.config)})"

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pth"

    def __call__(self) -> dict:
        return self.run()

    # ------------------------------------------------------------------ public

    def run(self, max_steps: int | None = None) -> dict | None:
        """Train (resuming if a checkpoint exists) to the end and return the metrics; with ``max_steps``,
        stop once that many global steps are done, write a checkpoint and return None."""
        info = E.dist_env()
        device = E.resolve_device(self.config["train"]["device"], info.local_rank)
        info = E.init_distributed(device, info)
        try:
            self._setup(info, device)
            return self._train(max_steps)
        finally:
            if self._rt is not None:
                self._rt.closed = True
                self._close_loaders()
            E.cleanup_distributed(info)

    def checkpoint_now(self) -> bool:
        """Write ``checkpoint.pth`` for the latest consistent point of the running training; safe to call from
        a signal handler on the main thread. Returns True if written; False if there is nothing to save (not
        started, or not rank 0) or the optimizer is in the middle of an update (then the previous checkpoint
        stays, and the run resumes from it)."""
        rt = self._rt
        if rt is None or rt.closed or not rt.ready or not rt.info.is_main or rt.state.phase == "update":
            return False
        state = E.TrainState(**rt.state.state_dict())
        if rt.epoch_started is not None and state.epoch_step < rt.ipe:
            state.epoch_time += time.perf_counter() - rt.epoch_started
        self._save(state)
        return True

    def _close_loaders(self) -> None:
        """Stop persistent DataLoader workers now, rather than whenever the garbage collector gets to them."""
        rt = self._rt
        if hasattr(rt, "ctx"):
            rt.ctx.on_step = None
        for name in ("train_loader", "eval_loader"):
            shutdown_workers(getattr(rt, name, None))

    # ------------------------------------------------------------------ setup

    def _setup(self, info: E.DistInfo, device: torch.device) -> None:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        cfg = self.config
        m, d, t = cfg["model"], cfg["data"], cfg["train"]
        rt = self._rt = SimpleNamespace(info=info, device=device, closed=False, ready=False, epoch_started=None)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        E.seed_all(D.mix_seed(t["seed"], 0xB11D))  # model init: same on every rank

        ckpt = None
        if self.checkpoint_path.is_file():
            ckpt = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
            diff = resume_mismatch(ckpt["config"], cfg)
            if diff:
                raise ConfigError(f"{self.checkpoint_path} was written by another config; use a new run dir or "
                                  "delete it. Differences: " + "; ".join(diff))
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

        # data
        train_tf = D.build_transform(t["augment"], True, m["img_size"], d["mean"], d["std"], aa=t["aa"],
                                     reprob=t["reprob"], color_jitter=t["color_jitter"],
                                     interpolation=t["interpolation"], demo_padding=t["demo_padding"])
        raw_train = _raw_dataset(cfg, "train", train_tf)
        train_ds = D.SeededDataset(raw_train, train_tf, D.subset_indices(len(raw_train), d["train_subset"]))
        rt.eval_loader, rt.num_eval, raw_val = build_eval_loader(cfg, info, device)
        num_classes = _num_classes(cfg, raw_train)
        if getattr(raw_train, "classes", None) != getattr(raw_val, "classes", None):
            raise D.DatasetError(f"{d['dataset']} dataset at {d['root']}: the train/ and val/ class folders differ "
                                 f"({len(raw_train.classes)} vs {len(raw_val.classes)}); both need the same classes")
        rt.sampler = D.TrainSampler(len(train_ds), seed=t["seed"], world_size=info.world_size, rank=info.rank,
                                    repeats=t["repeated_aug"])
        rt.batch = t["batch_size"]
        rt.ipe = len(rt.sampler) // rt.batch
        if rt.ipe < 1:
            raise ConfigError(f"train.batch_size: {rt.batch} is more than the {len(rt.sampler)} training images "
                              "per process")
        batch_sampler = torch.utils.data.BatchSampler(rt.sampler, rt.batch, drop_last=True)
        rt.train_loader = torch.utils.data.DataLoader(
            train_ds, batch_sampler=batch_sampler, num_workers=d["num_workers"],
            pin_memory=device.type == "cuda", persistent_workers=d["num_workers"] > 0)

        # model
        model = build_model(m, num_classes)
        rt.params = count_params(model)
        if ckpt is None and t["init_checkpoint"]:
            from evit.checkpoint import load_pretrained

            if not Path(t["init_checkpoint"]).is_file():
                raise ConfigError(f"train.init_checkpoint: {t['init_checkpoint']} does not exist")
            load_pretrained(model, t["init_checkpoint"])
            if info.is_main:
                _log(f"initialized from {t['init_checkpoint']}")
        model.to(device)
        rt.model = model
        rt.keep_rate_fn = (functools.partial(E.keep_rate_at, iters_per_epoch=rt.ipe, target=m["keep_rate"],
                                             shrink_start=t["shrink_start"], shrink_epochs=t["shrink_epochs"])
                           if supports_keep_rate(model) else None)
        if info.distributed:
            rt.train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            rt.train_model = model

        # optimization
        rt.world_batch = rt.batch * info.world_size
        rt.lr = t["blr"] * rt.world_batch / 512
        opt_kwargs = {"momentum": t["momentum"]} if t["opt"] in ("sgd", "momentum", "nesterov") else {}
        if "adam" in t["opt"] or "lamb" in t["opt"]:
            opt_kwargs["eps"] = t["opt_eps"]
        rt.optimizer = create_optimizer_v2(model, opt=t["opt"], lr=rt.lr, weight_decay=t["weight_decay"],
                                           **opt_kwargs)
        rt.scheduler, _ = create_scheduler_v2(
            rt.optimizer, sched=t["sched"], num_epochs=t["epochs"], min_lr=t["min_lr"], warmup_lr=t["warmup_lr"],
            warmup_epochs=t["warmup_epochs"], step_on_epochs=False, updates_per_epoch=rt.ipe)
        rt.amp_dtype = E.amp_dtype_for(t["amp"], device)
        rt.scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype == torch.float16 else None
        mixup_on = t["mixup"] > 0 or t["cutmix"] > 0
        rt.mixup = (Mixup(mixup_alpha=t["mixup"], cutmix_alpha=t["cutmix"], prob=t["mixup_prob"],
                          switch_prob=t["mixup_switch_prob"], mode="batch", label_smoothing=t["smoothing"],
                          num_classes=num_classes) if mixup_on else None)
        if mixup_on:
            criterion = SoftTargetCrossEntropy()
        elif t["smoothing"] > 0:
            criterion = LabelSmoothingCrossEntropy(smoothing=t["smoothing"])
        else:
            criterion = torch.nn.CrossEntropyLoss()
        rt.state = E.TrainState()
        rt.ctx = E.StepContext(
            criterion=criterion, device=device, iters_per_epoch=rt.ipe, seed=t["seed"], rank=info.rank,
            scheduler=rt.scheduler, keep_rate_fn=rt.keep_rate_fn, mixup_fn=rt.mixup, scaler=rt.scaler,
            amp_dtype=rt.amp_dtype, clip_grad=t["clip_grad"], hold_eval=t["hold_eval"])

        rt.ready = True
        if ckpt is not None:
            self._restore(ckpt)
            if info.is_main:
                _log(f"resumed from {self.checkpoint_path} at epoch {rt.state.epoch}, step {rt.state.step}")
        if info.is_main:
            _log(f"{m['arch']} ({rt.params / 1e6:.2f} M params), {len(train_ds)} train / {rt.num_eval} val images, "
                 f"{info.world_size} process(es) on {E.device_name(device)}, batch {rt.world_batch}, lr {rt.lr:.3g}, "
                 f"{rt.ipe} steps/epoch, amp {t['amp'] if rt.amp_dtype else 'none (fp32)'}")

    # ------------------------------------------------------------------ checkpoints

    def _save(self, state: E.TrainState) -> None:
        from evit.checkpoint import save_atomic

        rt = self._rt
        rng = rng_states(rt.device)
        save_atomic({
            "format": "evit-train-v1",
            "model": rt.model.state_dict(),
            "optimizer": rt.optimizer.state_dict(),
            "scheduler": rt.scheduler.state_dict(),
            "scaler": rt.scaler.state_dict() if rt.scaler is not None else None,
            "state": state.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "rng": rng,
            "sampler": dict(rt.sampler.state_dict(), epoch=state.epoch, start=state.epoch_step * rt.batch),
            "config": self.config,
            "config_hash": config_hash(self.config),
        }, self.checkpoint_path)

    def _restore(self, ckpt: dict) -> None:
        rt = self._rt
        rt.model.load_state_dict(ckpt["model"])
        rt.optimizer.load_state_dict(ckpt["optimizer"])
        rt.scheduler.load_state_dict(ckpt["scheduler"])
        if rt.scaler is not None and ckpt.get("scaler"):
            rt.scaler.load_state_dict(ckpt["scaler"])
        rt.state.load_state_dict(ckpt["state"])
        set_rng_states(ckpt.get("rng") or {}, rt.device)

    # ------------------------------------------------------------------ the loop

    def _evaluate(self) -> dict:
        rt = self._rt
        return E.evaluate(rt.model, rt.eval_loader, rt.device, amp_dtype=rt.amp_dtype,
                          keep_rate=self._eval_keep_rate())

    def _eval_keep_rate(self) -> float | None:
        if self._rt.keep_rate_fn is None:
            return None
        kr = self.config["eval"]["keep_rate"]
        return kr if kr is not None else self.config["model"]["keep_rate"]

    def _train(self, max_steps: int | None) -> dict | None:
        rt, cfg = self._rt, self.config
        t = cfg["train"]
        state, main = rt.state, rt.info.is_main
        log_path = self.run_dir / "log.jsonl"
        if main:
            _truncate_log(log_path, state.epoch)
        eval_res = None
        while state.epoch < t["epochs"]:
            if max_steps is not None and state.step >= max_steps:
                return self._stop(state, max_steps)
            e = state.epoch
            rt.sampler.set_epoch(e, start=state.epoch_step * rt.batch)
            progress = _Progress(main, rt.ipe, f"epoch {e + 1}/{t['epochs']}", t["log_every"], state.epoch_step)
            rt.ctx.on_step = lambda s, loss, lr, kr: progress.update(s.epoch_step, rt.world_batch, loss=loss,
                                                                     lr=lr, keep=kr)
            rt.ctx.max_step = max_steps
            rt.epoch_started = time.perf_counter()
            try:
                E.train_one_epoch(rt.train_model, rt.train_loader, rt.optimizer, state, rt.ctx)
            finally:
                rt.epoch_started = None
                progress.close()
            if state.epoch_step < rt.ipe:       # stopped early at max_steps
                return self._stop(state, max_steps)
            last = e + 1 == t["epochs"]
            eval_res = (self._evaluate() if last or (t["eval_every"] and (e + 1) % t["eval_every"] == 0)
                        else None)
            record = {
                "epoch": e, "step": state.step, "train_loss": state.loss_sum / max(state.epoch_step, 1),
                "lr": rt.optimizer.param_groups[0]["lr"],
                "keep_rate": rt.keep_rate_fn(state.step - 1) if rt.keep_rate_fn else None,
                "top1": eval_res and eval_res["top1"], "top5": eval_res and eval_res["top5"],
                "val_loss": eval_res and eval_res["loss"],
                "img_per_s": rt.ipe * rt.world_batch / max(state.epoch_time, 1e-9),
                "epoch_time_s": state.epoch_time, "train_time_s": state.train_time + state.epoch_time,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            if main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            # the epoch is done; until the save below, an on-request checkpoint still holds this epoch as
            # finished-but-unlogged (epoch e, all its steps done) and a resume re-evaluates and re-logs it
            state.epoch, state.epoch_step, state.loss_sum = e + 1, 0, 0.0
            state.train_time, state.epoch_time = state.train_time + state.epoch_time, 0.0
            if main:
                self._save(state)
                acc = f", top-1 {record['top1']:.2f} top-5 {record['top5']:.2f}" if eval_res else ""
                _log(f"epoch {e + 1}/{t['epochs']}: loss {record['train_loss']:.4f}{acc}, "
                     f"{record['img_per_s']:.1f} img/s, {record['epoch_time_s']:.1f} s")
        if eval_res is None:
            eval_res = self._evaluate()
        metrics = self._metrics(eval_res)
        if main:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        E.barrier()
        return metrics

    def _stop(self, state: E.TrainState, max_steps: int) -> None:
        if self._rt.info.is_main:
            self._save(state)
            _log(f"stopped at step {state.step} (max_steps {max_steps}); checkpoint written")
        E.barrier()
        return None

    def _metrics(self, ev: dict) -> dict:
        rt, cfg = self._rt, self.config
        return {
            "top1": ev["top1"], "top5": ev["top5"], "val_loss": ev["loss"], "num_eval_images": ev["num_images"],
            "keep_rate": self._eval_keep_rate(), "params": rt.params, "epochs": rt.state.epoch,
            "steps": rt.state.step, "train_time_s": rt.state.train_time, "arch": cfg["model"]["arch"],
            "img_size": cfg["model"]["img_size"], "dataset": cfg["data"]["dataset"],
            "run_dir": str(self.run_dir), "meta": cfg.get("meta"),
            "provenance": E.provenance(config_hash=config_hash(cfg), device=rt.device,
                                       world_size=rt.info.world_size),
        }


def rng_states(device: torch.device) -> dict:
    """python / numpy / torch / cuda RNG states, as plain lists and tensors (loadable with weights_only)."""
    version, mt, pos = random.getstate()
    name, keys, npos, has_gauss, gauss = np.random.get_state()
    return {"python": [version, list(mt), pos],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), npos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def set_rng_states(rng: dict, device: torch.device) -> None:
    if rng.get("python") is not None:
        version, mt, pos = rng["python"]
        random.setstate((version, tuple(mt), pos))
    if rng.get("numpy") is not None:
        name, keys, npos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), npos, has_gauss, gauss))
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and device.type == "cuda" and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _truncate_log(path: Path, epochs_done: int) -> None:
    """Drop log lines of epochs not covered by the checkpoint (a crash after logging, before saving)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("epoch", -1) < epochs_done]
    if len(keep) != len(lines):
        path.write_text("".join(ln + "\n" for ln in keep))


# --------------------------------------------------------------------------------------------- evaluation


def evaluate_checkpoint(checkpoint: str | Path, config: dict | None = None, overrides: list[str] | None = None,
                        out: str | Path | None = None) -> dict:
    """Evaluate a checkpoint (ours, DeiT, official EViT) on the val split; returns (and writes) eval.json.

    The run config is: ``config`` if given, else the checkpoint's own (ours), else defaults; ``overrides``
    (``section.key=value``) apply last. A foreign checkpoint therefore needs at least ``model.arch`` and the
    data section. ``model.keep_rate`` (or ``eval.keep_rate``) sets the keep rate evaluated.
    """
    from evit.checkpoint import load_pretrained, read_state_dict

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    saved = None
    try:
        blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(blob, dict) and isinstance(blob.get("config"), dict):
            saved = blob["config"]
        del blob
    except Exception:  # not a weights-only file: read_state_dict below says what is wrong
        pass
    base = config if config is not None else (saved or {})
    raw = apply_overrides(base, overrides or [])
    raw = {k: v for k, v in raw.items() if k != "train" or isinstance(v, dict)}
    raw.setdefault("train", {})
    raw["train"] = {k: v for k, v in (raw["train"] or {}).items() if k != "init_checkpoint"}
    if raw["train"].get("recipe") == "finetune":
        raw["train"]["recipe"] = "none"   # no init checkpoint needed to evaluate
    cfg = resolve_config(raw)
    if cfg["eval"]["keep_rate"] is not None:
        cfg["model"]["keep_rate"] = cfg["eval"]["keep_rate"]

    info = E.dist_env()
    device = E.resolve_device(cfg["train"]["device"], info.local_rank)
    info = E.init_distributed(device, info)
    try:
        loader, n, raw_val = build_eval_loader(cfg, info, device)
        num_classes = _num_classes(cfg, raw_val)
        model = build_model(cfg["model"], num_classes)
        state = read_state_dict(checkpoint)
        if "head.weight" in state and state["head.weight"].shape[0] != num_classes:
            raise ConfigError(f"{checkpoint} has a {state['head.weight'].shape[0]}-class head but the "
                              f"{cfg['data']['dataset']} dataset has {num_classes} classes")
        load_pretrained(model, checkpoint)
        model.to(device)
        if cfg["model"]["keep_rate"] < 1.0 and not supports_keep_rate(model):
            raise ConfigError(f"model.keep_rate: {cfg['model']['arch']} has no keep rate")
        amp_dtype = E.amp_dtype_for(cfg["train"]["amp"], device)
        t0 = time.perf_counter()
        try:
            res = E.evaluate(model, loader, device, amp_dtype=amp_dtype)
        finally:
            shutdown_workers(loader)
        dt = time.perf_counter() - t0
        m = cfg["model"]
        result = {
            "checkpoint": str(checkpoint), "top1": res["top1"], "top5": res["top5"], "val_loss": res["loss"],
            "num_eval_images": res["num_images"], "keep_rate": m["keep_rate"], "arch": m["arch"],
            "img_size": m["img_size"], "fuse_token": m["fuse_token"], "drop_loc": m["drop_loc"],
            "dataset": cfg["data"]["dataset"], "params": count_params(model), "eval_time_s": dt,
            "img_per_s": res["num_images"] / max(dt, 1e-9), "meta": cfg.get("meta"),
            "provenance": E.provenance(config_hash=config_hash(cfg), device=device, world_size=info.world_size),
        }
        if out is not None and info.is_main:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        E.cleanup_distributed(info)


# --------------------------------------------------------------------------------------------- CLI


def _cmd_train(args) -> int:
    raw = apply_overrides(load_config(args.config), args.set)
    metrics = Trainer(raw, args.run_dir).run(max_steps=args.max_steps)
    if metrics is not None and E.dist_env().is_main:
        print(json.dumps({k: metrics[k] for k in ("top1", "top5", "num_eval_images", "train_time_s")}))
    return 0


def _cmd_eval(args) -> int:
    overrides = list(args.set or [])
    for flag, key in (("arch", "model.arch"), ("img_size", "model.img_size"), ("patch_size", "model.patch_size"),
                      ("num_classes", "model.num_classes"), ("keep_rate", "eval.keep_rate"),
                      ("fuse_token", "model.fuse_token"), ("dataset", "data.dataset"), ("data_root", "data.root"),
                      ("val_subset", "data.val_subset"), ("batch_size", "eval.batch_size"),
                      ("num_workers", "data.num_workers"), ("crop_pct", "eval.crop_pct"),
                      ("device", "train.device"), ("amp", "train.amp")):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"{key}={json.dumps(v)}")
    if args.drop_loc is not None:
        overrides.append(f"model.drop_loc=[{args.drop_loc}]")
    config = load_config(args.config) if args.config else None
    result = evaluate_checkpoint(args.checkpoint, config, overrides, args.out)
    if E.dist_env().is_main:
        print(json.dumps({k: result[k] for k in ("top1", "top5", "num_eval_images", "keep_rate")}))
    return 0


def _guard(fn):
    """Run a command; config / data / NaN errors become one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(args) -> int:
        try:
            return fn(args)
        except (ConfigError, D.DatasetError, E.NonFiniteLossError, FileNotFoundError, CheckpointMismatchError) as e:
            print(f"evit {args.command}: error: {e}", file=sys.stderr, flush=True)
            return 2
    return wrapper


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train one run (resumes from RUN_DIR/checkpoint.pth)",
                       description="Train one run described by a run config (see `evit.train`'s docstring).")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--run-dir", required=True, help="output directory (checkpoint.pth, log.jsonl, metrics.json)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (YAML-parsed); repeatable")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many global steps (checkpointed)")
    p.set_defaults(func=_guard(_cmd_train))

    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on the val split",
                       description="Evaluate our, DeiT or official EViT checkpoints, at any keep rate.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", help="run config YAML for model/data (default: the checkpoint's own)")
    p.add_argument("--arch")
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--keep-rate", type=float, help="keep rate to evaluate at (default: the model's)")
    p.add_argument("--fuse-token", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--drop-loc", help="comma-separated block indices, e.g. 3,6,9")
    p.add_argument("--dataset", choices=D.DATASETS)
    p.add_argument("--data-root")
    p.add_argument("--val-subset", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--crop-pct", type=float)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", choices=("none", "bf16", "fp16"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", help="write the result JSON here (e.g. eval.json)")
    p.set_defaults(func=_guard(_cmd_eval))
