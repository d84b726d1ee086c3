"""Finished runs against an edited workflow config, torch-free: an experiment whose run (its run dir's checkpoint or
metrics, and the config.yaml they were made with) differs from its config now in a key that changes the maths is
refused while Snakemake builds the DAG, unless ``rerun`` names it; its run dir is then moved aside to
``<run>.old-<hash>`` by the first job of its rerun (`move_aside`), so that no finished result is deleted before a
run that can replace it starts.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from evit.config.io import config_hash, resume_mismatch
from evit.config.schema import resolve_config
from evit.errors import ConfigError

RUN_OUTPUTS = ("metrics.json", "checkpoint.pth")  # what a run that trained (or started to) leaves in its run dir


def saved_config(run_dir: Path) -> dict | None:
    """The resolved config a trained run was made with, when its run dir holds one of `RUN_OUTPUTS`."""
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not any((run_dir / name).is_file() for name in RUN_OUTPUTS):
        return None
    return resolve_config(yaml.safe_load(saved.read_text()))


def changed_runs(run_dirs: dict[str, Path], resolved: dict[str, dict]) -> dict[str, list[str]]:
    """Experiment -> the keys in which its finished (or started) run's config differs from ``resolved[name]``,
    for each of ``run_dirs`` (the trained experiments' run dirs) whose run would not resume under it."""
    changed = {}
    for name, run_dir in run_dirs.items():
        saved = saved_config(run_dir)
        keys = resume_mismatch(saved, resolved[name]) if saved is not None else []
        if keys:
            changed[name] = [key.replace("checkpoint ", "run ") for key in keys]
    return changed


def refuse_changed(changed: dict[str, list[str]], run_dirs: dict[str, Path], rerun: list[str]) -> None:
    """A `ConfigError` naming every changed experiment that ``rerun`` does not name, and the two remedies."""
    unknown = [name for name in rerun if name not in run_dirs]
    if unknown:
        raise ConfigError(f"config: rerun: {unknown[0]!r} is not a trained experiment; known: {sorted(run_dirs)}")
    refused = [name for name in changed if name not in rerun]
    if not refused:
        return
    lines = [f"  {name}: {'; '.join(changed[name][:3])}{' ...' if len(changed[name]) > 3 else ''}"
             f" ({run_dirs[name]})" for name in refused]
    raise ConfigError(
        f"config: {len(refused)} experiment(s) changed since their run, which the new config cannot resume or "
        "replace without deleting it:\n" + "\n".join(lines) + "\n"
        "Either give each a new name (its finished run stays, and stays in no table), or rerun it: "
        f"`--config rerun=[{','.join(refused)}]` moves its run dir to <run dir>.old-<config hash> first.")


def move_aside(run_dir: Path) -> Path | None:
    """Move a changed run's dir to ``<run_dir>.old-<its config hash>`` (the first job of its rerun does); returns
    the new place, or None when it holds no run."""
    saved = saved_config(run_dir)
    if saved is None:
        return None
    old = run_dir.with_name(f"{run_dir.name}.old-{config_hash(saved)}")
    if old.exists():
        raise ConfigError(f"rerun: {old} exists already; move it away first")
    run_dir.rename(old)
    return old
