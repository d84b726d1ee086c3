"""Checkpoint I/O: atomic writes, and loading DeiT / EViT weights and our training checkpoints.

Every checkpoint is read by `read_checkpoint` alone: ``torch.load(weights_only=True)``, so a file that would need
arbitrary pickled code is refused, with `argparse.Namespace` (the ``args`` of official DeiT / EViT training
checkpoints) as the one class allowed besides torch's defaults; a ``.safetensors`` file (timm's published weights)
by `safetensors.torch.load_file`.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

from evit.errors import CheckpointError, CheckpointMismatchError


def _temp_prefix_suffix(path: Path) -> tuple[str, str]:
    """The names of `save_atomic`'s temp files for ``path``: ``.<name>.<random>.tmp`` beside it."""
    return f".{path.name}.", ".tmp"


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same directory, fsync, then rename over `path`.

    A crash at any point leaves either the old file or the new one, never a torn one; a process killed while
    writing (SIGKILL, or SIGTERM without a handler) leaves its temp file, which `remove_stale_temps` removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_prefix_suffix(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files an interrupted `save_atomic` of ``path`` left beside it (only those: named
    ``.<name>.*.tmp``); call it before the one process that writes ``path`` starts. Returns what it removed."""
    path = Path(path)
    prefix, suffix = _temp_prefix_suffix(path)
    stale = sorted(path.parent.glob(f"{glob.escape(prefix)}*{suffix}")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


TRAIN_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "state", "config")  # what `evit.trainer` resumes from


def _why_unreadable(e: Exception) -> str:
    """One line on why torch.load failed (its own messages run over several lines)."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(e)) if "Weights only load failed" in str(e) else None
    if refused:
        return f"it needs {refused.group(1)}, which weights-only loading refuses as arbitrary code"
    first = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else ""
    return f"truncated or corrupt: {type(e).__name__}" + (f": {first}" if first else "")


def read_checkpoint(path: str | os.PathLike, *, advice: str = "") -> object:
    """Whatever a checkpoint file holds: ``torch.load(path, weights_only=True)`` on the CPU, allowing
    `argparse.Namespace` besides torch's defaults, or a ``.safetensors`` file's state dict. Any failure to read it
    becomes one `CheckpointError` with a one-line message naming the file (``advice`` appended); a missing file is a
    FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated, corrupt or foreign file
        raise CheckpointError(f"{path} is not a readable checkpoint ({_why_unreadable(e)}){advice}") from e


def load_checkpoint(path: str | os.PathLike) -> dict:
    """One of our training checkpoints (``checkpoint.pth`` of a run dir, written by `evit.trainer`), read-only.

    A file that cannot be read, or that lacks any of `TRAIN_CHECKPOINT_KEYS`, raises `CheckpointError` with a
    one-line message naming it; the file itself is never modified or removed.
    """
    path = Path(path)
    advice = "; delete it to start the run over, or restore it"
    ckpt = read_checkpoint(path, advice=advice)
    missing = [k for k in TRAIN_CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint of evit (no {', '.join(missing)}){advice}")
    return ckpt


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint file: a raw state dict, or one under "model" / "state_dict".

    Reads official DeiT / EViT releases and training checkpoints (their ``args`` included) and ours, with
    `read_checkpoint`. A DDP "module." prefix is stripped.
    """
    path = Path(path)
    return state_dict_of(read_checkpoint(path), path)


def state_dict_of(checkpoint: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights in a loaded checkpoint (read from ``path``, named in errors); see `read_state_dict`."""
    state = checkpoint
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"checkpoint {path} holds no state dict (expected tensors, or a dict with a 'model' entry)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: torch.nn.Module, path: str | os.PathLike, state: dict | None = None) -> None:
    """Load DeiT, official EViT or our own weights (timm key names) into a timm ViT / EViT.

    ``state``: the weights of ``path`` when already read (`state_dict_of`), so the file is read once.
    `pos_embed` is resized to the model's input size; a classifier head of another class count is
    dropped with a warning (fine-tuning to a new dataset). Any other mismatch raises
    `CheckpointMismatchError` naming the keys.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(read_state_dict(path) if state is None else state, model)  # resizes pos_embed
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
