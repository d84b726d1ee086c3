"""The run config: its schema, the recipes, `resolve_config`, and the launcher options. Imports no torch.

This module is all that the workflow (at DAG-build time) and the launcher's waiting process need to check a
run before it is queued.

Run config
==========

A YAML mapping with the sections below. Every key has a default except ``data.dataset`` (and ``data.root``
for imagenet / folder); unknown keys and bad values are rejected with one error naming the key
(``ConfigError``). `resolve_config` fills in every default, so a resolved config is complete.
Top-level ``launcher`` (read by ``evit launch``; its keys are checked by `resolve_launcher`, see
`LAUNCHER_DEFAULTS`) and ``meta`` (free-form, e.g. the experiment name) are kept as given; they are not
part of the config hash.

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
  ``amp`` (none | bf16 | fp16) autocast dtype, on GPU and CPU alike (fp16 with a GradScaler).
  ``seed`` (int). ``device`` (auto | cpu | cuda). ``eval_every`` (int, epochs; 0 = only at the end).
  ``log_every`` (int) steps between progress lines when stdout is not a terminal.

``eval:``
  ``batch_size`` (int, per process). ``crop_pct`` (float or null = 0.875 for deit/none augment, 1.0 for
  demo). ``keep_rate`` (float or null = model.keep_rate) keep rate for evaluation.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# --------------------------------------------------------------------------------------------- datasets

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


def default_mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (FASHION_MEAN, FASHION_STD) if name == "fashion_mnist" else (IMAGENET_MEAN, IMAGENET_STD)


class ConfigError(ValueError):
    """A run config with an unknown key or a bad value; the message names the key."""


# --------------------------------------------------------------------------------------------- recipes

RECIPE_NAMES = ("none", "scratch", "finetune", "demo")
# One row per train key, one column per recipe (order of RECIPE_NAMES). scratch = DeiT / EViT from scratch
# (EViT's README: 8 GPUs x 256); finetune = EViT's fine-tuning of DeiT-S (8 x 256, lr 2e-5 per 512, 30 epochs,
# shrink 0/0, model in eval mode); demo = small grey images on a CPU (Fashion-MNIST, a few epochs: flips only,
# as random crops slow a ViT's first epochs down a lot; see workflow/config/runs/fashion_vit.yaml; fp32, as
# bf16 autocast is ~1.45x slower per step than fp32 on the CPUs here).
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
    "amp":               ("none",      "bf16",                   "bf16",                   "none"),
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
        "dataset": Field("choice", _REQUIRED, choices=DATASETS),
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
        "augment": Field("choice", _RECIPE, choices=AUGMENTS),
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


def is_evit(arch: str) -> bool:
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
    if "launcher" in raw:
        resolve_launcher(raw["launcher"])
    for k in PASSTHROUGH:
        if k in raw:
            out[k] = copy.deepcopy(raw[k])

    m, d, t, ev = out["model"], out["data"], out["train"], out["eval"]
    if not is_evit(m["arch"]) and m["keep_rate"] < 1.0:
        raise ConfigError(f"model.keep_rate: {m['keep_rate']} needs an EViT arch (evit_*), not {m['arch']!r}")
    for key in ("img_size", "patch_size", "num_classes", "keep_rate", "fuse_token", "drop_loc",
                "drop_path_rate", "pretrained"):
        if key in m["kwargs"]:
            raise ConfigError(f"model.kwargs.{key}: set it as model.{key.removesuffix('_rate')} instead"
                              if key != "pretrained" else "model.kwargs.pretrained: not allowed (no hub "
                              "downloads); use train.init_checkpoint")
    if d["dataset"] != "fashion_mnist" and not d["root"]:
        raise ConfigError(f"data.root: required for the {d['dataset']} dataset")
    mean, std = default_mean_std(d["dataset"])
    for k, v in (("mean", mean), ("std", std)):
        if d[k] is None:
            d[k] = list(v)
        elif len(d[k]) != 3:
            raise ConfigError(f"data.{k}: expected 3 values (RGB), got {d[k]!r}")
    if m["num_classes"] is None and d["dataset"] == "fashion_mnist":
        m["num_classes"] = len(FASHION_CLASSES)
    if m["num_classes"] is None and d["dataset"] == "imagenet":
        m["num_classes"] = 1000
    if (t["mixup"] > 0 or t["cutmix"] > 0) and t["batch_size"] % 2:
        raise ConfigError(f"train.batch_size: Mixup/CutMix need an even batch size, got {t['batch_size']}")
    if t["recipe"] == "finetune" and not t["init_checkpoint"]:
        raise ConfigError("train.init_checkpoint: the finetune recipe starts from a checkpoint; give its path")
    if ev["crop_pct"] is None:
        ev["crop_pct"] = 1.0 if t["augment"] == "demo" else DEFAULT_CROP_PCT
    if ev["keep_rate"] is not None and ev["keep_rate"] < 1.0 and not is_evit(m["arch"]):
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


# --------------------------------------------------------------------------------------------- launcher

# The `launcher:` section of a run config (documented in evit/launch.py's docstring).
LAUNCHER_DEFAULTS = dict(
    backend="local", nodes=1, tasks_per_node=1, gpus_per_node=0, cpus_per_task=2, mem_gb=None, timeout_min=60,
    partition=None, account=None, qos=None, constraint=None, signal_delay_s=120, max_num_timeout=10,
    sbatch_extra={}, max_failures=2,
)
BACKENDS = ("slurm", "local", "inline")


def resolve_launcher(section: dict | None, backend: str | None = None) -> dict:
    """The launcher options with defaults filled in; an unknown key or bad value is named (`ConfigError`)."""
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"launcher: expected a mapping, got {section!r}")
    section = dict(section or {})
    unknown = sorted(set(section) - set(LAUNCHER_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown launcher key(s) {unknown}; known: {sorted(LAUNCHER_DEFAULTS)}")
    opts = {**LAUNCHER_DEFAULTS, **section}
    if backend is not None:
        opts["backend"] = backend
    if opts["backend"] not in BACKENDS:
        raise ConfigError(f"launcher backend must be one of {list(BACKENDS)}, got {opts['backend']!r}")
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1:
            raise ConfigError(f"launcher {key} must be a positive integer, got {opts[key]!r}")
    for key in ("gpus_per_node", "signal_delay_s", "max_num_timeout", "max_failures"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 0:
            raise ConfigError(f"launcher {key} must be a non-negative integer, got {opts[key]!r}")
    if opts["mem_gb"] is not None and (isinstance(opts["mem_gb"], bool) or not isinstance(opts["mem_gb"], (int, float))
                                       or opts["mem_gb"] <= 0):
        raise ConfigError(f"launcher mem_gb must be a positive number or null, got {opts['mem_gb']!r}")
    for key in ("partition", "account", "qos", "constraint"):
        if opts[key] is not None and not isinstance(opts[key], str):
            raise ConfigError(f"launcher {key} must be a string or null, got {opts[key]!r}")
    if not isinstance(opts["sbatch_extra"], dict):
        raise ConfigError(f"launcher sbatch_extra must be a mapping of sbatch options, got {opts['sbatch_extra']!r}")
    if opts["backend"] != "slurm" and opts["nodes"] > 1:
        raise ConfigError(f"launcher nodes={opts['nodes']} needs the slurm backend, not {opts['backend']!r}")
    return opts
