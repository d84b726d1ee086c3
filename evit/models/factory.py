"""The one model factory: a run config's ``model:`` section -> a timm model (training, evaluation and the bench)."""
from __future__ import annotations

import importlib

import torch

from evit.methods import METHODS, method_params
from evit.errors import ConfigError


def register_models() -> None:
    """Import every method's module (`Method.module`), which registers its models with timm."""
    for method in METHODS.values():
        if method.module:
            importlib.import_module(method.module)


def build_model(model_cfg: dict, num_classes: int) -> torch.nn.Module:
    """timm's ``<method prefix><arch>`` (e.g. ``evit_deit_small_patch16_224``) with the method's parameters, from a
    resolved ``model:`` section (never pretrained: weights come from checkpoints)."""
    import timm

    method = METHODS[model_cfg["method"]]
    if method.module:
        importlib.import_module(method.module)  # registers the method's models with timm
    name = method.prefix + model_cfg["arch"]
    if not timm.is_model(name):
        raise ConfigError(f"model: method {model_cfg['method']} has no model of arch {model_cfg['arch']!r} "
                          f"(timm has no {name!r})")
    kwargs = dict(model_cfg["kwargs"])
    kwargs.update(num_classes=num_classes, img_size=model_cfg["img_size"], drop_path_rate=model_cfg["drop_path"])
    if model_cfg["patch_size"]:
        kwargs["patch_size"] = model_cfg["patch_size"]
    kwargs.update(method_params(model_cfg))
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"model: cannot build {name!r} with {kwargs}: {e}") from e


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
