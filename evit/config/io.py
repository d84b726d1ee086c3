"""Run configs as files: reading one (`load_config`), `--set` overrides, the config hash, and the keys in which a
checkpoint's config differs from a resuming run's; a YAML syntax error as one line (`yaml_error`). Imports no torch.
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


def yaml_error(where: str, error: yaml.YAMLError, in_value: bool = False) -> ConfigError:
    """A YAML syntax error as one line: ``where``, the line and column (1-based; the column alone ``in_value``, a
    one-line command-line value) and PyYAML's own words."""
    mark = getattr(error, "problem_mark", None)
    at = "" if mark is None else (f", column {mark.column + 1} of the value" if in_value
                                  else f", line {mark.line + 1}, column {mark.column + 1}")
    words = "; ".join(filter(None, (getattr(error, "context", None), getattr(error, "problem", None))))
    return ConfigError(f"{where}{at}: not valid YAML: {words or type(error).__name__}")


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise yaml_error(str(path), e) from None


def yaml_file_error(path: str | Path, error: Exception) -> Exception:
    """The one-line YAML syntax error of the file at ``path`` if it has one, else ``error`` (e.g. Snakemake's
    "Config file is not valid JSON or YAML", which names neither file nor line)."""
    try:
        yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        return yaml_error(str(path), e)
    return error


def parse_value(flag: str, item: str, value: str):
    """The YAML value of a command-line ``flag``'s ``item`` (e.g. ``--set 'train.lr=0.1'``); a syntax error names
    the argument."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise yaml_error(f"{flag} {item!r}", e, in_value=True) from None


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
        node[parts[-1]] = parse_value("--set", item, value)
    return raw

