"""The workflow config's schema errors in one line. Snakemake's `validate` checks the config against
workflow/schemas/config.schema.yaml (filling in its defaults) and reports a violation with the whole schema and
config; `schema_error` turns it into one `ConfigError` naming the key, the config file that sets it and what is
allowed there. Torch-free.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from evit.errors import ConfigError


def schema_error(error: Exception, config: dict, configfiles: Sequence[str | Path],
                 overrides: Mapping = {}) -> Exception:
    """One line for Snakemake's `validate` failure (a WorkflowError raised while handling jsonschema's
    ValidationError) on ``config``, read from ``configfiles`` (later files override earlier ones) and the top-level
    ``overrides`` of ``--config KEY=VALUE`` (which override every file); any other error is returned as it is."""
    cause = error.__context__
    if not hasattr(cause, "absolute_path") or not hasattr(cause, "validator"):
        return error
    path = list(cause.absolute_path)
    if cause.validator == "additionalProperties" and isinstance(cause.instance, dict):
        known = cause.schema.get("properties") or {}
        key = sorted(set(cause.instance) - set(known))[0]
        path, problem = [*path, key], f"unknown key (known: {', '.join(sorted(known))})"
    elif cause.validator == "required" and isinstance(cause.instance, dict):
        key = next(k for k in cause.validator_value if k not in cause.instance)
        path, problem = [*path, key], "missing; this key is required"
    else:
        problem = cause.message if len(cause.message) <= 300 else cause.message[:300] + " ..."
    source = "--config" if path and path[0] in overrides else _file_setting(path, configfiles)
    return ConfigError(f"config {source}: {_key_name(path, config)}: {problem}")


def _key_name(path: list, config: dict) -> str:
    """``experiment 'evit_s_0.7': recipe`` for an experiment's field, else the dotted key (``masking.share``)."""
    if len(path) >= 2 and path[0] == "experiments" and isinstance(path[1], int):
        entry = config["experiments"][path[1]]
        name = entry.get("name") if isinstance(entry, dict) else None
        head = f"experiment {name!r}" if name else f"experiments[{path[1]}]"
        return ": ".join([head, ".".join(map(str, path[2:]))]) if path[2:] else head
    return ".".join(map(str, path)) or "(top level)"


def _file_setting(path: list, configfiles: Sequence[str | Path]) -> str:
    """The config file that sets ``path`` (the last one that holds most of it), or the files that do not."""
    best, depth = None, 0
    for file in configfiles:
        try:
            node = yaml.safe_load(Path(file).read_text())
        except (OSError, yaml.YAMLError):
            continue
        reached = 0
        for key in path:
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                break
            reached += 1
        if reached and reached >= depth:
            best, depth = file, reached
    if best is not None:
        return str(best)
    return f"(in none of {', '.join(map(str, configfiles))})" if configfiles else "(no config file)"
