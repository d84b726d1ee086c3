"""The one model factory: a run config's ``model:`` section -> a timm model (training, evaluation and the bench)."""
from __future__ import annotations

import torch

from evit.config import ConfigError, is_evit


def build_model(model_cfg: dict, num_classes: int) -> torch.nn.Module:
    """`timm.create_model` from a resolved ``model:`` section (never pretrained: weights come from checkpoints)."""
    import timm

    import evit.models  # noqa: F401  (registers the EViT models with timm)

    kwargs = dict(model_cfg["kwargs"])
    kwargs.update(num_classes=num_classes, img_size=model_cfg["img_size"], drop_path_rate=model_cfg["drop_path"])
    if model_cfg["patch_size"]:
        kwargs["patch_size"] = model_cfg["patch_size"]
    if is_evit(model_cfg["arch"]):
        kwargs.update(keep_rate=model_cfg["keep_rate"], fuse_token=model_cfg["fuse_token"],
                      drop_loc=tuple(model_cfg["drop_loc"]))
    try:
        return timm.create_model(model_cfg["arch"], pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"model: cannot build {model_cfg['arch']!r} with {kwargs}: {e}") from e


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
