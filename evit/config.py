"""The run config: its schema, the recipes, `resolve_config`, and the launcher options. Imports no torch.

This module is all that the workflow (at DAG-build time) and the launcher's waiting process need to check a
run before it is queued.

Run config
==========

A YAML mapping with the sections of `SCHEMA` (model, data, train, eval). The model section names a backbone
(``arch``) and a token-reduction method (``method``, one of `METHODS`: none, evit, tome, dynamicvit) with that
method's own parameters; a parameter of another method is an error. Every key has a default except ``data.dataset`` (and
``data.root`` for imagenet / folder); unknown keys and bad values are rejected with one error naming the key
(``ConfigError``). `resolve_config` fills in every default, so a resolved config is
complete. Top-level ``launcher`` (read by ``evit launch``; its keys are checked by `resolve_launcher`, see
`LAUNCHER_DEFAULTS`), ``mask`` (the masking experiment's options, `resolve_mask`) and ``meta`` (free-form, e.g.
the experiment name) are kept as given; they are not part of the config hash.

The per-key reference (type, bounds, default, per recipe where `RECIPES` sets it, and meaning) is generated
from `SCHEMA` (each `Field`'s ``help``, and `SECTION_HELP`) by `config_reference`: read it in
docs/run_config.md or print it with ``python -m evit.config``. After changing the schema, regenerate it with
``python -m evit.config > docs/run_config.md`` (a test checks that the file is up to date).
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import functools
import itertools
import re
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Any, Callable

import yaml

from evit.data.catalog import (  # noqa: F401 - some re-exported: the dataset facts live in evit.data.catalog
    AUGMENTS, DATASETS, DEFAULT_CROP_PCT, FASHION_CLASSES, FASHION_MEAN, FASHION_STD, IMAGENET_MEAN, IMAGENET_STD,
    default_mean_std,
)


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
    help: str = ""                  # the key's description (Markdown) in the reference; every SCHEMA key has one


@dataclass(frozen=True)
class Method:
    """A token-reduction method: what the run config, the workflow and the report need of it (no torch).

    Its models are timm's ``prefix + model.arch``, registered by ``module`` (which `build_model` imports) and
    built with its ``params`` as keyword arguments; they implement `evit.models.base.TokenReducer` (token counts,
    extra MACs, a forward pass at another ``override`` value). The default of ``override`` leaves the backbone
    unchanged (EViT's keep rate 1, ToMe's r 0). A new method is one such entry (`register_method`) and one module.
    """

    label: str                                  # its name in tables and figures
    prefix: str                                 # timm registry prefix of its models ("" = the plain backbone)
    module: str | None                          # the module that registers its timm models
    params: dict[str, Field]                    # its keys in the model section (`model.<param>`), with defaults
    override: str | None = None                 # the parameter a pass may override: ``model(x, **{override: v})``
    shown: tuple[str, ...] = ()                 # parameters every label shows; the others when not at default
    brief: dict[str, Callable[[Any], str]] = dataclass_field(default_factory=dict)  # a value in a label
    variant: tuple[str, ...] = ()               # parameters whose values the figures colour apart
    # (model section, train section, iterations per epoch) -> step -> the override while training; None: fixed
    schedule: Callable[[dict, dict, int], Callable[[int], Any]] | None = None
    grad_checkpointing: bool = True             # its blocks can be re-run in the backward pass
    compile: bool = True                        # torch.compile builds its forward pass
    kept_patches: bool = False                  # `evit visualize`: ``model(x, return_kept=True)`` names the patches
                                                # each reorganizing block (``model.drop_loc``) kept
    trainable: bool = True                      # the trainer can train it (else: evaluated only, recipe none)

    def _brief(self, key: str, value: Any) -> str:
        return self.brief[key](value) if key in self.brief else f"{key} {_plain(value)}"

    def describe(self, params: dict) -> str:
        """Its parameters in brief: the shown ones, and every other one that is not at its default."""
        return ", ".join(self._brief(k, params[k]) for k, f in self.params.items()
                         if k in self.shown or params[k] != f.default)

    def variant_name(self, params: dict) -> str:
        """The figures' colour group: its label and its variant parameters, e.g. ``EViT not fused``."""
        return " ".join([self.label, *(self._brief(k, params[k]) for k in self.variant)])

    def variant_names(self) -> list[str]:
        """Every variant name, defaults first (variant parameters are bools or choices)."""
        domains = [[self.params[k].default, *(c for c in (self.params[k].choices or (True, False))
                                              if c != self.params[k].default)] for k in self.variant]
        return [self.variant_name(dict(zip(self.variant, values))) for values in itertools.product(*domains)]


def keep_rate_at(step: int, iters_per_epoch: int, target: float, shrink_start: float, shrink_epochs: float) -> float:
    """EViT's keep-rate schedule, per iteration.

    1 for the first ``shrink_start`` epochs; then a cosine from 1 down to ``target`` over ``shrink_epochs``:
    ``target + (1 - target) * (cos(pi * t / T) + 1) / 2`` with t the iterations since ``shrink_start`` and
    ``T = iters_per_epoch * shrink_epochs``; then ``target``. With ``shrink_epochs == 0`` the target holds from
    ``shrink_start`` on (so shrink 0/0 = the target from the first step, as in fine-tuning).
    """
    if target >= 1.0:
        return 1.0
    t = step - shrink_start * iters_per_epoch
    if t < 0:
        return 1.0
    total = iters_per_epoch * shrink_epochs
    if t >= total:
        return float(target)
    return target + (1.0 - target) * (math.cos(math.pi * t / total) + 1.0) / 2.0


METHODS: dict[str, Method] = {
    "none": Method("baseline", "", None, {}),
    "evit": Method(
        "EViT", "evit_", "evit.models.evit", {
            "keep_rate": Field("float", 1.0, lo=0.0, lo_open=True, hi=1.0,
                               help="EViT: target keep rate of the reorganizing blocks."),
            "fuse_token": Field("bool", True,
                                help="EViT: fuse the inattentive tokens into one extra token (weighted by their "
                                     "attention scores); false drops them."),
            "drop_loc": Field("intlist", [3, 6, 9], lo=0,
                              help="EViT: block indices (0-based) of the reorganizing blocks."),
        },
        override="keep_rate", shown=("keep_rate", "fuse_token"), variant=("fuse_token",), kept_patches=True,
        brief={"keep_rate": lambda v: f"keep {v:g}", "fuse_token": lambda v: "fused" if v else "not fused"},
        schedule=lambda m, t, ipe: functools.partial(
            keep_rate_at, iters_per_epoch=ipe, target=m["keep_rate"], shrink_start=t["shrink_start"],
            shrink_epochs=t["shrink_epochs"]),
    ),
    "tome": Method(
        "ToMe", "tome_", "evit.models.tome", {
            "r": Field("int", 0, lo=0, help="ToMe: tokens merged per block (at most half of its non-CLS tokens)."),
        },
        override="r", shown=("r",),
        grad_checkpointing=False,  # the token sizes change as its blocks run
    ),
    "dynamicvit": Method(
        "DynamicViT", "dynamicvit_", "evit.models.dynamicvit", {
            "base_rate": Field("float", 0.7, lo=0.0, lo_open=True, hi=1.0,
                               help="DynamicViT: stage s keeps base_rate ** (s + 1) of the patches."),
            "pruning_loc": Field("intlist", [3, 6, 9], lo=1,
                                 help="DynamicViT: block indices (0-based) before which a prediction module prunes."),
        },
        override="base_rate", shown=("base_rate",), brief={"base_rate": lambda v: f"rate {v:g}"},
        trainable=False,  # its training (Gumbel-softmax decisions, masked attention, distillation) is not built
    ),
}


def register_method(name: str, method: Method) -> Method:
    """Add a method to `METHODS`; its name, prefix and parameters must be new."""
    clash = [k for k in method.params if k in SCHEMA["model"] or param_method(k)]
    if name in METHODS or not method.prefix or any(m.prefix == method.prefix for m in METHODS.values()) or clash:
        raise ValueError(f"method {name!r}: its name, its prefix {method.prefix!r} and its parameters {clash} must "
                         "be new (not a model key or another method's)")
    if method.override is not None and method.override not in method.params:
        raise ValueError(f"method {name!r}: its override {method.override!r} is not one of its parameters")
    METHODS[name] = method
    return method


def check_trainable(method: str) -> None:
    """A `ConfigError` if the trainer cannot train ``method`` (it is evaluated only: recipe none)."""
    if not METHODS[method].trainable:
        raise ConfigError(f"model.method: {method} is evaluated only here (its own training is not implemented); "
                          "evaluate its weights (recipe none, or `evit eval`)")


def param_method(key: str) -> str | None:
    """The method whose parameter ``model.<key>`` is, or None."""
    return next((name for name, m in METHODS.items() if key in m.params), None)


def method_param_keys() -> list[str]:
    """Every method's parameters (the model keys that are not `SCHEMA`'s)."""
    return [k for m in METHODS.values() for k in m.params]


def method_params(model: dict) -> dict:
    """The method's own parameters of a resolved ``model:`` section."""
    return {k: model[k] for k in METHODS[model["method"]].params}


def describe_method(method: str, params: dict) -> str:
    """A method's parameters in brief, e.g. ``keep 0.7, fused``, ``r 8``, ``""`` for none."""
    return METHODS[method].describe(params)


def check_method_param(key: str, value: Any) -> Any:
    """A method parameter's value, checked against its `Field` (`ConfigError` naming ``model.<key>``)."""
    method = param_method(key)
    if method is None:
        raise ConfigError(f"model.{key}: not a parameter of any method ({', '.join(method_param_keys())})")
    return _check(f"model.{key}", METHODS[method].params[key], value)


# One line per section of the reference (`config_reference`).
SECTION_HELP: dict[str, str] = {
    "model": "The network: a timm backbone and the token-reduction method applied to it (`METHODS`).",
    "data": "The dataset, where it lives, and how it is loaded and normalized.",
    "train": "Optimization, schedules, augmentation, precision and logging; most defaults come from the "
             "recipe (`train.recipe`, table `RECIPES`).",
    "eval": "Evaluation on the validation set (during training and by `evit eval`).",
}

_RECIPE = "recipe"
SCHEMA: dict[str, dict[str, Field]] = {
    "model": {
        "arch": Field("str", "deit_small_patch16_224",
                      help="The backbone: a timm model name, e.g. `deit_small_patch16_224`; the method's model is "
                           "timm's `<prefix><arch>` (e.g. `evit_deit_small_patch16_224`, see `model.method`)."),
        "method": Field("choice", "none", choices=METHODS,  # the registry itself: a registered method is valid
                        help="The token-reduction method: " + "; ".join(
                            f"`{name}` = {m.label}" + (f" (`{m.prefix}*` models; parameters "
                                                       + ", ".join(f"`model.{k}`" for k in m.params) + ")"
                                                       if m.params else "")
                            for name, m in METHODS.items())
                        + ". A parameter of another method is an error."),
        "img_size": Field("int", 224, lo=1, help="Input image size (side, in pixels)."),
        "patch_size": Field("int", None, nullable=True, lo=1, help="Patch size; null = the arch's."),
        "num_classes": Field("int", None, nullable=True, lo=1, help="Number of classes; null = the dataset's."),
        "drop_path": Field("float", 0.1, lo=0.0, hi=1.0, help="Stochastic depth rate."),
        "kwargs": Field("dict", {},
                        help="More `timm.create_model` arguments, e.g. `{embed_dim: 96, depth: 12, num_heads: 3}` "
                             "(the keys above are set as `model.*`, not here; `pretrained` is not allowed)."),
    },
    "data": {
        "dataset": Field("choice", _REQUIRED, choices=DATASETS,
                         help="The dataset (layouts on disk: see evit/data.py's docstring)."),
        "root": Field("path", None, nullable=True,
                      help="Dataset directory; null = /usr/share/datasets/fashion-mnist for fashion_mnist, "
                           "required otherwise."),
        "loader": Field("choice", "torch", choices=("torch", "dali"),
                        help="`torch`: DataLoader workers decode and augment with PIL/timm; `dali`: NVIDIA DALI "
                             "decodes and augments on the training GPU, or in DALI's CPU mode without one "
                             "(`pip install .[dali]`; imagenet/folder datasets, deit augment with a `rand-...-inc1` "
                             "RandAugment; evit/dali.py)."),
        "num_workers": Field("int", 8, lo=0,
                             help="Data-loading workers per process (`data.loader: dali`: DALI's CPU threads)."),
        "train_subset": Field("int", None, nullable=True, lo=1,
                              help="Use a fixed random subset of that many training images (seed-independent); "
                                   "null = all."),
        "val_subset": Field("int", None, nullable=True, lo=1,
                            help="Use a fixed random subset of that many validation images (seed-independent); "
                                 "null = all."),
        "canvas": Field("int", None, nullable=True, lo=1,
                        help="demo augment: place each image on a black square of this many pixels (at a random "
                             "position for training, the most central one for evaluation) before resizing to "
                             "model.img_size; null = no canvas."),
        "canvas_step": Field("int", 1, lo=1,
                             help="demo augment with a canvas: the image's offsets on it are multiples of this many "
                                  "pixels (the patch size keeps every patch's content whole)."),
        "mean": Field("floatlist", None, nullable=True,
                      help="Normalization mean, 3 floats, or null = the dataset's: ImageNet's, or Fashion-MNIST's."),
        "std": Field("floatlist", None, nullable=True, lo=0.0, lo_open=True,
                     help="Normalization std, 3 floats, or null = the dataset's: ImageNet's, or Fashion-MNIST's."),
    },
    "train": {
        "recipe": Field("choice", "scratch", choices=RECIPE_NAMES,
                        help="Picks the defaults of the recipe-driven keys below from `RECIPES` (one table: "
                             "scratch = DeiT, finetune = the EViT paper's fine-tuning, demo = small images on a "
                             "CPU, none = plain); any key given in the config overrides its recipe value."),
        "init_checkpoint": Field("path", None, nullable=True,
                                 help="Weights to start from (DeiT / official EViT / ours) when the run dir has no "
                                      "checkpoint yet; required by the finetune recipe."),
        "epochs": Field("int", _RECIPE, lo=1, help="Training epochs."),
        "batch_size": Field("int", _RECIPE, lo=1, help="Batch size per process."),
        "blr": Field("float", _RECIPE, lo=0.0,
                     help="lr per 512 samples: the lr is `blr * batch_size * world_size / 512`."),
        "min_lr": Field("float", _RECIPE, lo=0.0, help="Lowest lr of the schedule (timm's `min_lr`)."),
        "warmup_lr": Field("float", _RECIPE, lo=0.0, help="lr at the start of the warmup (timm's `warmup_lr`)."),
        "warmup_epochs": Field("float", _RECIPE, lo=0.0, help="lr warmup length, in epochs (may be fractional)."),
        "weight_decay": Field("float", _RECIPE, lo=0.0, help="Weight decay."),
        "opt": Field("str", _RECIPE, help="timm optimizer name (`timm.optim.create_optimizer_v2`)."),
        "opt_eps": Field("float", _RECIPE, lo=0.0, lo_open=True,
                         help="Optimizer epsilon (Adam and LAMB family only)."),
        "momentum": Field("float", _RECIPE, lo=0.0, hi=1.0,
                          help="Optimizer momentum (sgd, momentum, nesterov only)."),
        "sched": Field("choice", _RECIPE, choices=("cosine", "step", "multistep", "plateau", "tanh", "poly",
                                                    "const"),
                       help="timm scheduler name, stepped every iteration."),
        "clip_grad": Field("float", _RECIPE, nullable=True, lo=0.0, lo_open=True,
                           help="Gradient-norm clipping threshold; null = no clipping."),
        "shrink_start": Field("float", _RECIPE, lo=0.0,
                              help="Keep-rate schedule: 1 before `shrink_start` epochs, then a cosine to "
                                   "`model.keep_rate` over `shrink_epochs`, per iteration "
                                   "(`evit.config.keep_rate_at`)."),
        "shrink_epochs": Field("float", _RECIPE, lo=0.0,
                               help="Length of the keep-rate cosine, in epochs (see `shrink_start`)."),
        "hold_eval": Field("bool", _RECIPE,
                           help="Keep the model in eval mode while training (fine-tuning: DropPath off)."),
        "mixup": Field("float", _RECIPE, lo=0.0, help="Mixup alpha, 0 = off."),
        "cutmix": Field("float", _RECIPE, lo=0.0, help="CutMix alpha, 0 = off."),
        "mixup_prob": Field("float", _RECIPE, lo=0.0, hi=1.0,
                            help="Probability of applying Mixup / CutMix to a batch (timm's `Mixup` `prob`)."),
        "mixup_switch_prob": Field("float", _RECIPE, lo=0.0, hi=1.0,
                                   help="Probability of CutMix rather than Mixup when both are on (timm's `Mixup` "
                                        "`switch_prob`)."),
        "smoothing": Field("float", _RECIPE, lo=0.0, hi=0.999, help="Label smoothing."),
        "augment": Field("choice", _RECIPE, choices=AUGMENTS,
                         help="The transform family (`evit.data.build_transform`)."),
        "aa": Field("str", _RECIPE, nullable=True, help="RandAugment spec; null = off."),
        "reprob": Field("float", _RECIPE, lo=0.0, hi=1.0, help="Random erasing probability."),
        "color_jitter": Field("float", _RECIPE, lo=0.0, help="Color jitter (deit augment)."),
        "interpolation": Field("choice", _RECIPE, choices=("bicubic", "bilinear", "nearest", "random"),
                               help="Resize interpolation (`random`: random in training, bicubic at evaluation)."),
        "demo_padding": Field("int", _RECIPE, lo=0, help="Crop padding of the demo transform."),
        "repeated_aug": Field("int", _RECIPE, lo=1,
                              help="Repeated augmentation count (timm's RepeatAugSampler), 1 = off."),
        "amp": Field("choice", _RECIPE, choices=("none", "bf16", "fp16"),
                     help="Autocast dtype, on GPU and CPU alike (fp16 with a GradScaler)."),
        "grad_checkpointing": Field("bool", False, help="Recompute each block's activations in the backward pass "
                                    "(timm's `set_grad_checkpointing`): less memory (e.g. DeiT-B at 288-304 px on "
                                    "smaller GPUs) for about a third more compute; the same results."),
        "compile": Field("bool", False,
                         help="`torch.compile` the model for training (evaluation stays eager), if its method "
                              "supports it. One graph per value of the method's per-pass parameter: its schedule "
                              "(EViT's keep rate) is then rounded up to the nearest of `train.compile_levels` + 1 "
                              "evenly spaced values from the target to the default (keep rate 1), so a run "
                              "compiles at most that many graphs (one more is an error, never a silent fall-back to "
                              "eager)."),
        "compile_levels": Field("int", 8, lo=1,
                                help="With `train.compile`: the keep-rate schedule's steps between 1 and the target "
                                     "(more: closer to the exact schedule, more graphs to compile)."),
        "seed": Field("int", 0, lo=0, help="Random seed."),
        "device": Field("choice", "auto", choices=("auto", "cpu", "cuda"),
                        help="`auto`: this process's GPU when CUDA is available, else the CPU."),
        "eval_every": Field("int", 1, lo=0, help="Evaluate every that many epochs; 0 = only at the end."),
        "log_every": Field("int", 50, lo=1,
                           help="Steps between progress lines (on a terminal: between loss updates of the bar) and "
                                "between reads of the training loss, the only times the host waits for the device "
                                "during an epoch (with the fused adam / adamw)."),
    },
    "eval": {
        "batch_size": Field("int", 256, lo=1, help="Batch size per process."),
        "crop_pct": Field("float", None, nullable=True, lo=0.0, lo_open=True, hi=1.0,
                          help="Crop fraction (resize to `img_size / crop_pct`, centre crop); null = 0.875 for "
                               "deit/none augment, 1.0 for demo."),
        "params": Field("dict", {},
                        help="The method's per-pass parameter at evaluation (`evit eval` and training's), e.g. "
                             "`{keep_rate: 0.5}` for EViT or `{r: 8}` for ToMe; empty = the model's own."),
    },
}
PASSTHROUGH = ("launcher", "meta", "mask")
# Keys that may differ between a checkpoint's config and the resuming run's (they do not change the maths).
RESUME_FREE = {"data.root", "data.num_workers", "data.val_subset", "train.device", "train.amp",
               "train.grad_checkpointing", "train.eval_every", "train.log_every", "eval.batch_size", "eval.crop_pct",
               "eval.params"}


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


def _model_fields(given: dict) -> dict[str, Field]:
    """The model section's keys for the method it names: `SCHEMA`'s and that method's own parameters."""
    method = _check("model.method", SCHEMA["model"]["method"], given.get("method", SCHEMA["model"]["method"].default))
    foreign = [k for k in given if (param_method(k) or method) != method]
    if foreign:
        raise ConfigError(f"model.{foreign[0]}: a parameter of method {param_method(foreign[0])}, not of {method}")
    arch = given.get("arch", "")
    for name, m in METHODS.items():
        if m.prefix and isinstance(arch, str) and arch.startswith(m.prefix):
            raise ConfigError(f"model.arch: {arch!r} includes the method ({m.label}); write `arch: "
                              f"{arch.removeprefix(m.prefix)}` and `method: {name}`")
    return {**SCHEMA["model"], **METHODS[method].params}


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
        if sec == "model":
            fields = _model_fields(given)
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
    for key in ("img_size", "patch_size", "num_classes", "method", *method_param_keys(), "drop_path_rate", "pretrained"):
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
    if d["loader"] == "dali":
        _check_dali(d, t)
    if d["canvas"] and t["augment"] != "demo":
        raise ConfigError(f"data.canvas: only the demo augment places images on a canvas, not {t['augment']!r}")
    if d["canvas"] and d["dataset"] == "fashion_mnist" and d["canvas"] < 28:
        raise ConfigError(f"data.canvas: {d['canvas']} px is smaller than Fashion-MNIST's 28 px images")
    if ev["crop_pct"] is None:
        ev["crop_pct"] = 1.0 if t["augment"] == "demo" else DEFAULT_CROP_PCT
    method = METHODS[m["method"]]
    if t["grad_checkpointing"] and not method.grad_checkpointing:
        raise ConfigError(f"train.grad_checkpointing: method {m['method']} does not support it")
    if t["compile"] and not method.compile:
        raise ConfigError(f"train.compile: method {m['method']} does not support torch.compile")
    for key, value in ev["params"].items():
        if key != method.override:
            raise ConfigError(f"eval.params.{key}: method {m['method']} overrides "
                              + (f"only {method.override} at evaluation" if method.override else "nothing"))
        ev["params"][key] = _check(f"eval.params.{key}", method.params[key], value)
    return out


# The RandAugment specs evit/dali.py implements: timm's increasing op set, no op weights, magnitude <= 10.
DALI_AA = re.compile(r"rand(-m\d+(\.\d+)?|-n\d+|-mstd\d+(\.\d+)?|-p\d+(\.\d+)?)*-inc1(-m\d+(\.\d+)?|-n\d+|"
                     r"-mstd\d+(\.\d+)?|-p\d+(\.\d+)?)*")


def _check_dali(d: dict, t: dict) -> None:
    """``data.loader: dali``: DALI is installed, and the dataset and augmentation are ones evit/dali.py has
    (augment none: evaluation only; `evit.dali.DaliTrainLoader` refuses to train with it)."""
    if importlib.util.find_spec("nvidia.dali") is None:
        raise ConfigError("data.loader: dali needs NVIDIA DALI, which is not installed: `pip install .[dali]` "
                          "(nvidia-dali-cuda130), or use data.loader: torch")
    if d["dataset"] not in ("imagenet", "folder"):
        raise ConfigError(f"data.loader: dali reads the imagenet and folder datasets (JPEG files), not "
                          f"{d['dataset']}; use data.loader: torch")
    if t["augment"] not in ("deit", "none"):
        raise ConfigError(f"data.loader: dali implements the deit augment, not train.augment {t['augment']!r}")
    if t["augment"] == "deit" and (t["aa"] is None or not DALI_AA.fullmatch(t["aa"])):
        raise ConfigError(f"train.aa: data.loader dali implements timm's RandAugment with the increasing op set, "
                          f"rand-m<M>[-n<N>][-mstd<S>]-inc1, not {t['aa']!r}")
    if t["interpolation"] == "random":
        raise ConfigError("train.interpolation: random is not implemented by data.loader dali; use bicubic")


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


# --------------------------------------------------------------------------------------------- reference

REFERENCE_PATH = "docs/run_config.md"      # config_reference()'s output, committed; a test checks it is current


def _plain(x: Any) -> str:
    """A value as YAML would write it: null, true, [3, 6, 9], {}."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_plain(e) for e in x) + "]"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_plain(e)}" for k, e in x.items()) + "}"
    return str(x)


def _md_value(v: Any) -> str:
    """A value as YAML would write it, in a Markdown code span."""
    return f"`{_plain(v)}`"


def _md_type(f: Field) -> str:
    """The key's type with its choices and bounds, e.g. ``float in (0, 1]``, ``int >= 1 or null``."""
    if f.kind == "choice":
        return "one of " + ", ".join(f"`{c}`" for c in f.choices) + (" or null" if f.nullable else "")
    base = {"intlist": "list of int", "floatlist": "list of float", "dict": "mapping"}.get(f.kind, f.kind)
    lo = None if f.lo is None else f"{f.lo:g}"
    hi = None if f.hi is None else f"{f.hi:g}"
    if lo is not None and hi is not None:
        base += f" in {'(' if f.lo_open else '['}{lo}, {hi}]"
    elif lo is not None:
        base += f" {'>' if f.lo_open else '>='} {lo}"
    elif hi is not None:
        base += f" <= {hi}"
    return base + (" or null" if f.nullable else "")


def _md_default(key: str, f: Field, recipe_order: list[str]) -> str:
    if f.default is _REQUIRED:
        return "required"
    if f.default == _RECIPE:
        values = [recipe_defaults(r)[key] for r in recipe_order]
        if all(v == values[0] for v in values):
            return f"{_md_value(values[0])} (every recipe)"
        return " / ".join(f"{r} {_md_value(v)}" for r, v in zip(recipe_order, values))
    return _md_value(f.default)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference() -> str:
    """The run-config reference as Markdown, rendered from `SCHEMA`, `SECTION_HELP` and `RECIPES`.

    Committed as docs/run_config.md (`REFERENCE_PATH`); ``python -m evit.config`` prints it."""
    default_recipe = SCHEMA["train"]["recipe"].default
    # the default recipe first, the plain one (none) last, the others in RECIPE_NAMES order
    recipe_order = sorted(RECIPE_NAMES, key=lambda r: (r != default_recipe, r == "none"))
    lines = [
        "# Run config reference",
        "",
        "<!-- Generated from SCHEMA in evit/config.py: do not edit by hand; after changing the schema run",
        f"     `python -m evit.config > {REFERENCE_PATH}` (a test checks that this file is up to date). -->",
        "",
        "A run config is a YAML mapping with the sections below. Every key has a default except "
        "`data.dataset` (and `data.root` for imagenet / folder); unknown keys and bad values are rejected "
        "with one error naming the key (`ConfigError`). `resolve_config` fills in every default, so a "
        "resolved config is complete. Top-level `launcher` (read by `evit launch`; its keys are documented "
        "in evit/launch.py's docstring and checked by `resolve_launcher`) and `meta` (free-form, e.g. the "
        "experiment name) are kept as given; they are not part of the config hash.",
        "",
        "A default written as `" + " / ".join(f"{r} ..." for r in recipe_order) + "` comes from the recipe "
        f"chosen by `train.recipe` (default `{default_recipe}`; table `RECIPES` in evit/config.py); a key "
        "given in the config overrides it.",
    ]
    for sec, fields in SCHEMA.items():
        if sec == "model":  # then every method's parameters, each valid with its own method only
            fields = {**fields, **{k: f for m in METHODS.values() for k, f in m.params.items()}}
        lines += ["", f"## `{sec}`", "", SECTION_HELP[sec], "",
                  "| key | type | default | description |", "| --- | --- | --- | --- |"]
        for key, f in fields.items():
            cells = (f"`{sec}.{key}`", _md_type(f), _md_default(key, f, recipe_order), f.help)
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- launcher

# The `launcher:` section of a run config (documented in evit/launch.py's docstring).
LAUNCHER_DEFAULTS = dict(
    backend="local", nodes=1, tasks_per_node=1, gpus_per_node=0, cpus_per_task=2, mem_gb=None, timeout_min=60,
    partition=None, account=None, qos=None, constraint=None, signal_delay_s=120, max_num_timeout=10,
    sbatch_extra={}, max_failures=2, exclusive=False,
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
    if not isinstance(opts["exclusive"], bool):
        raise ConfigError(f"launcher exclusive must be true or false, got {opts['exclusive']!r}")
    if not isinstance(opts["sbatch_extra"], dict):
        raise ConfigError(f"launcher sbatch_extra must be a mapping of sbatch options, got {opts['sbatch_extra']!r}")
    if opts["backend"] != "slurm" and opts["nodes"] > 1:
        raise ConfigError(f"launcher nodes={opts['nodes']} needs the slurm backend, not {opts['backend']!r}")
    return opts


def resolve_bench_launcher(section: dict | None, backend: str | None = None) -> dict:
    """`resolve_launcher` for the benchmark job, which runs in one process (it is not distributed) and, on SLURM,
    on a node of its own unless its section says ``exclusive: false``."""
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"launcher: expected a mapping, got {section!r}")
    opts = resolve_launcher({"exclusive": True, **(section or {})}, backend)
    if opts["nodes"] * opts["tasks_per_node"] != 1:
        raise ConfigError("the benchmark runs in one process; set its launcher to nodes: 1 and tasks_per_node: 1")
    return opts


# --------------------------------------------------------------------------------------------- masking

BOX_FORMATS = ("xml", "csv")  # of ImageNet's validation boxes (evit/boxes.py)
# The `mask:` section of a masking job's run config (`evit launch --command mask`, evit/masking.py).
MASK_DEFAULTS = dict(
    share=0.5,              # the share of an image's patches masked, the same number in each of the three ways
    boxes=None,             # ImageNet's validation boxes (a file or folder); null: the demo canvas's exact square
    boxes_format="xml",     # xml: the ILSVRC2012 bounding-box XML folder; csv: LOC_val_solution.csv
    seed=0,                 # which patches are masked (per image, whatever the batch or the process)
    figure=None,            # output path without extension of the figure (.png, .pdf); null: none
    figure_images=4,        # images in the figure, each masked the three ways
)


def resolve_mask(section: dict | None) -> dict:
    """The masking options with defaults filled in; an unknown key or bad value is named (`ConfigError`)."""
    if not isinstance(section, dict):
        raise ConfigError(f"mask: expected a mapping, got {section!r}")
    unknown = sorted(set(section) - set(MASK_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown mask key(s) {unknown}; known: {sorted(MASK_DEFAULTS)}")
    opts = {**MASK_DEFAULTS, **section}
    if isinstance(opts["share"], bool) or not isinstance(opts["share"], (int, float)) or not 0 < opts["share"] < 1:
        raise ConfigError(f"mask.share must be a number in (0, 1), got {opts['share']!r}")
    for key in ("seed", "figure_images"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 0:
            raise ConfigError(f"mask.{key} must be a non-negative integer, got {opts[key]!r}")
    if opts["boxes_format"] not in BOX_FORMATS:
        raise ConfigError(f"mask.boxes_format: expected one of {list(BOX_FORMATS)}, got {opts['boxes_format']!r}")
    return opts


if __name__ == "__main__":
    print(config_reference(), end="")
