"""Run configs as files: reading one (`load_config`), `--set` overrides, the config hash, and the keys in which a
checkpoint's config differs from a resuming run's. Imports no torch.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

from evit.config.schema import PASSTHROUGH, SCHEMA
from evit.errors import ConfigError

# Keys that may differ between a checkpoint's config and the resuming run's (they do not change the maths).
RESUME_FREE = {"data.root", "data.num_workers", "data.val_subset", "train.device", "train.amp",
               "train.grad_checkpointing", "train.eval_every", "train.log_every", "eval.batch_size", "eval.crop_pct",
               "eval.params"}


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

