"""The run config's schema (`SCHEMA`: sections, keys, defaults) and `resolve_config`, which checks a run config
and fills in every default. Imports no torch.

A run config is a YAML mapping with the sections of `SCHEMA` (model, data, train, eval). The model section names a
backbone (``arch``) and a token-reduction method (``method``, one of `evit.methods.METHODS`) with that method's
own parameters; the train section holds the keys of the method's schedule too (EViT's ``shrink_start`` ...). A
parameter or training key of another method is an error. Every key has a default except ``data.dataset`` (and
``data.root`` for imagenet / folder); unknown keys and bad values are rejected with one `ConfigError` naming the
key. Top-level ``launcher`` (`evit.config.launcher`), ``mask`` (`evit.config.masking`) and ``meta``
(free-form, e.g. the experiment name) are kept as given; they are not part of the config hash.
"""
from __future__ import annotations

import copy
import importlib.util
import re

from evit.config.fields import RECIPE, REQUIRED, Field, PerRecipe, check_field
from evit.config.launcher import resolve_launcher
from evit.config.recipes import RECIPE_NAMES, recipe_defaults
from evit.data.catalog import AUGMENTS, DATASETS, DEFAULT_CROP_PCT, FASHION_CLASSES, default_mean_std
from evit.errors import ConfigError
from evit.methods import METHODS, key_owner, method_param_keys, own_keys

SECTION_HELP: dict[str, str] = {
    "model": "The network: a timm backbone and the token-reduction method applied to it (`METHODS`).",
    "data": "The dataset, where it lives, and how it is loaded and normalized.",
    "train": "Optimization, schedules, augmentation, precision and logging; most defaults come from the "
             "recipe (`train.recipe`, table `RECIPES`).",
    "eval": "Evaluation on the validation set (during training and by `evit eval`).",
}

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
        "dataset": Field("choice", REQUIRED, choices=DATASETS,
                         help="The dataset (layouts on disk: see evit/data/datasets.py's docstring)."),
        "root": Field("path", None, nullable=True,
                      help="Dataset directory; null = /usr/share/datasets/fashion-mnist for fashion_mnist, "
                           "required otherwise."),
        "format": Field("choice", "folder", choices=("folder", "packed"),
                        help="imagenet/folder datasets: `folder` reads data.root's image files; `packed` reads the "
                             "pack `evit pack` wrote of them (a few large shard files and an index per split, for "
                             "parallel file systems; evit/data/packed.py) at data.root."),
        "loader": Field("choice", "torch", choices=("torch", "dali"),
                        help="`torch`: DataLoader workers decode and augment with PIL/timm; `dali`: NVIDIA DALI "
                             "decodes and augments on the training GPU, or in DALI's CPU mode without one "
                             "(`pip install .[dali]`; imagenet/folder datasets, deit augment with a `rand-...-inc1` "
                             "RandAugment; evit/data/dali.py)."),
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
        "epochs": Field("int", RECIPE, lo=1, help="Training epochs."),
        "batch_size": Field("int", RECIPE, lo=1, help="Batch size per process."),
        "blr": Field("float", RECIPE, lo=0.0,
                     help="lr per 512 samples: the lr is `blr * batch_size * world_size / 512`."),
        "min_lr": Field("float", RECIPE, lo=0.0, help="Lowest lr of the schedule (timm's `min_lr`)."),
        "warmup_lr": Field("float", RECIPE, lo=0.0, help="lr at the start of the warmup (timm's `warmup_lr`)."),
        "warmup_epochs": Field("float", RECIPE, lo=0.0, help="lr warmup length, in epochs (may be fractional)."),
        "weight_decay": Field("float", RECIPE, lo=0.0, help="Weight decay."),
        "opt": Field("str", RECIPE, help="timm optimizer name (`timm.optim.create_optimizer_v2`)."),
        "opt_eps": Field("float", RECIPE, lo=0.0, lo_open=True,
                         help="Optimizer epsilon (Adam and LAMB family only)."),
        "momentum": Field("float", RECIPE, lo=0.0, hi=1.0,
                          help="Optimizer momentum (sgd, momentum, nesterov only)."),
        "sched": Field("choice", RECIPE, choices=("cosine", "step", "multistep", "plateau", "tanh", "poly",
                                                    "const"),
                       help="timm scheduler name, stepped every iteration."),
        "clip_grad": Field("float", RECIPE, nullable=True, lo=0.0, lo_open=True,
                           help="Gradient-norm clipping threshold; null = no clipping."),
        "hold_eval": Field("bool", RECIPE,
                           help="Keep the model in eval mode while training (fine-tuning: DropPath off)."),
        "mixup": Field("float", RECIPE, lo=0.0, help="Mixup alpha, 0 = off."),
        "cutmix": Field("float", RECIPE, lo=0.0, help="CutMix alpha, 0 = off."),
        "mixup_prob": Field("float", RECIPE, lo=0.0, hi=1.0,
                            help="Probability of applying Mixup / CutMix to a batch (timm's `Mixup` `prob`)."),
        "mixup_switch_prob": Field("float", RECIPE, lo=0.0, hi=1.0,
                                   help="Probability of CutMix rather than Mixup when both are on (timm's `Mixup` "
                                        "`switch_prob`)."),
        "smoothing": Field("float", RECIPE, lo=0.0, hi=0.999, help="Label smoothing."),
        "augment": Field("choice", RECIPE, choices=AUGMENTS,
                         help="The transform family (`evit.data.transforms.build_transform`)."),
        "aa": Field("str", RECIPE, nullable=True, help="RandAugment spec; null = off."),
        "reprob": Field("float", RECIPE, lo=0.0, hi=1.0, help="Random erasing probability."),
        "color_jitter": Field("float", RECIPE, lo=0.0, help="Color jitter (deit augment)."),
        "interpolation": Field("choice", RECIPE, choices=("bicubic", "bilinear", "nearest", "random"),
                               help="Resize interpolation (`random`: random in training, bicubic at evaluation)."),
        "demo_padding": Field("int", RECIPE, lo=0, help="Crop padding of the demo transform."),
        "repeated_aug": Field("int", RECIPE, lo=1,
                              help="Repeated augmentation count (timm's RepeatAugSampler), 1 = off."),
        "amp": Field("choice", RECIPE, choices=("none", "bf16", "fp16"),
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
def _model_fields(given: dict) -> dict[str, Field]:
    """The model section's keys for the method it names: `SCHEMA`'s and that method's own parameters."""
    field = SCHEMA["model"]["method"]
    method = check_field("model.method", field, given.get("method", field.default))
    arch = given.get("arch", "")
    for name, m in METHODS.items():
        if m.prefix and isinstance(arch, str) and arch.startswith(m.prefix):
            raise ConfigError(f"model.arch: {arch!r} includes the method ({m.label}); write `arch: "
                              f"{arch.removeprefix(m.prefix)}` and `method: {name}`")
    return _with_method_keys("model", given, method)


def _with_method_keys(section: str, given: dict, method: str) -> dict[str, Field]:
    """A section's keys for ``method``: `SCHEMA`'s and the method's own (its parameters in the model section, the
    training keys of its schedule in the train section). Another method's key is an error naming that method."""
    what = "parameter" if section == "model" else "training key"
    foreign = [k for k in given if (key_owner(section, k) or method) != method]
    if foreign:
        raise ConfigError(f"{section}.{foreign[0]}: a {what} of method {key_owner(section, foreign[0])}, not of "
                          f"{method}")
    own = own_keys(METHODS[method], section)
    clash = sorted(set(SCHEMA[section]) & set(own))
    if clash:
        raise ConfigError(f"{section}.{clash[0]}: method {method} declares a {what} that is a generic key")
    return {**SCHEMA[section], **own}


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
        elif sec == "train":
            fields = _with_method_keys("train", given, out["model"]["method"])
        unknown = [k for k in given if k not in fields]
        if unknown:
            raise ConfigError(f"{sec}.{unknown[0]}: unknown key (known: {', '.join(fields)})")
        rdefaults = {}
        if sec == "train":
            recipe = check_field("train.recipe", fields["recipe"], given.get("recipe", "scratch"))
            rdefaults = recipe_defaults(recipe)
        section = {}
        for k, f in fields.items():
            if k in given:
                section[k] = check_field(f"{sec}.{k}", f, given[k])
            elif f.default is REQUIRED:
                raise ConfigError(f"{sec}.{k}: required")
            elif f.default == RECIPE:
                section[k] = rdefaults[k]
            elif isinstance(f.default, PerRecipe):
                section[k] = f.default[section["recipe"]]
            else:
                section[k] = copy.deepcopy(f.default)
        out[sec] = section
    if "launcher" in raw:
        resolve_launcher(raw["launcher"])
    for k in PASSTHROUGH:
        if k in raw:
            out[k] = copy.deepcopy(raw[k])

    m, d, t, ev = out["model"], out["data"], out["train"], out["eval"]
    for key in ("img_size", "patch_size", "num_classes", "method", *method_param_keys(), "drop_path_rate",
                "pretrained"):
        if key in m["kwargs"]:
            raise ConfigError(f"model.kwargs.{key}: set it as model.{key.removesuffix('_rate')} instead"
                              if key != "pretrained" else "model.kwargs.pretrained: not allowed (no hub "
                              "downloads); use train.init_checkpoint")
    if d["dataset"] != "fashion_mnist" and not d["root"]:
        raise ConfigError(f"data.root: required for the {d['dataset']} dataset")
    if d["format"] == "packed" and d["dataset"] == "fashion_mnist":
        raise ConfigError("data.format: packed is for the imagenet and folder datasets, not fashion_mnist; use folder")
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
        ev["params"][key] = check_field(f"eval.params.{key}", method.params[key], value)
    return out


# The RandAugment specs evit/data/dali_augment.py implements: timm's increasing op set, no op weights, magnitude <= 10.
DALI_AA = re.compile(r"rand(-m\d+(\.\d+)?|-n\d+|-mstd\d+(\.\d+)?|-p\d+(\.\d+)?)*-inc1(-m\d+(\.\d+)?|-n\d+|"
                     r"-mstd\d+(\.\d+)?|-p\d+(\.\d+)?)*")


def _check_dali(d: dict, t: dict) -> None:
    """``data.loader: dali``: DALI is installed, and the dataset and augmentation are ones evit/data/dali.py has
    (augment none: evaluation only; `evit.data.dali.DaliTrainLoader` refuses to train with it)."""
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

