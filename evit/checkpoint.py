"""Checkpoint I/O: atomic writes, and loading DeiT / EViT weights into our models."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same directory, fsync, then rename over `path`.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not fit the model's architecture."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint file: a raw state dict, or one under "model" / "state_dict".

    Loads with `weights_only=True`. A DDP "module." prefix is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise CheckpointMismatchError(f"checkpoint {path} cannot be read as weights: {e}") from e
    state = ckpt
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(
            f"checkpoint {path} holds no state dict (expected tensors, or a dict with a 'model' entry)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load DeiT, official EViT or our own weights (timm key names) into a timm ViT / EViT.

    `pos_embed` is resized to the model's input size; a classifier head of another class count is
    dropped with a warning (fine-tuning to a new dataset). Any other mismatch raises
    `CheckpointMismatchError` naming the keys.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(read_state_dict(path), model)  # resizes pos_embed, adapts patch embed
    own = model.state_dict()
    head = []
    if "head.weight" in state and "head.weight" in own:
        theirs, ours = state["head.weight"].shape, own["head.weight"].shape
        if theirs[1:] == ours[1:] and theirs[0] != ours[0]:  # same features, another class count
            head = [k for k in ("head.weight", "head.bias") if k in state]
    if head:
        warnings.warn(f"{path}: dropping the classifier head {tuple(state['head.weight'].shape)} "
                      f"(the model's is {tuple(own['head.weight'].shape)}); it starts from scratch")
        for k in head:
            del state[k]
    wrong_shape = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                   for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and k not in head]
    unexpected = [k for k in state if k not in own]
    if wrong_shape or missing or unexpected:
        lines = [f"checkpoint {path} does not fit {type(model).__name__}:"]
        for what, keys in (("wrong shape", wrong_shape), ("missing", missing), ("unexpected", unexpected)):
            if keys:
                lines.append(f"  {what} ({len(keys)}): " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state, strict=False)
