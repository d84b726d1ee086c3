"""The run config's reference in Markdown (docs/run_config.md), generated from the schema, the recipes and every
registered method's keys; and `evit config`, which prints it. Imports no torch.
"""
from __future__ import annotations

import argparse
from typing import Any

from evit.config.fields import RECIPE, REQUIRED, Field, PerRecipe, plain
from evit.config.recipes import RECIPE_NAMES, recipe_defaults
from evit.config.schema import SCHEMA, SECTION_HELP
from evit.methods import METHODS

REFERENCE_PATH = "docs/run_config.md"      # config_reference()'s output, committed; a test checks it is current


def _md_value(v: Any) -> str:
    """A value as YAML would write it, in a Markdown code span."""
    return f"`{plain(v)}`"


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
    if f.default is REQUIRED:
        return "required"
    if f.default == RECIPE or isinstance(f.default, PerRecipe):
        values = [f.default[r] if isinstance(f.default, PerRecipe) else recipe_defaults(r)[key] for r in recipe_order]
        if all(v == values[0] for v in values):
            return f"{_md_value(values[0])} (every recipe)"
        return " / ".join(f"{r} {_md_value(v)}" for r, v in zip(recipe_order, values))
    return _md_value(f.default)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference() -> str:
    """The run-config reference as Markdown, rendered from `SCHEMA`, `SECTION_HELP` and `RECIPES`.

    Committed as docs/run_config.md (`REFERENCE_PATH`); ``evit config`` prints it, with the keys of every
    method registered here (entry points included)."""
    default_recipe = SCHEMA["train"]["recipe"].default
    # the default recipe first, the plain one (none) last, the others in RECIPE_NAMES order
    recipe_order = sorted(RECIPE_NAMES, key=lambda r: (r != default_recipe, r == "none"))
    lines = [
        "# Run config reference",
        "",
        "<!-- Generated from SCHEMA in evit/config/schema.py and the methods of evit/methods.py: do not edit by",
        f"     hand; after changing either run `evit config > {REFERENCE_PATH}` (a test checks that this file is up",
        "     to date). -->",
        "",
        "A run config is a YAML mapping with the sections below. Every key has a default except "
        "`data.dataset` (and `data.root` for imagenet / folder); unknown keys and bad values are rejected "
        "with one error naming the key (`ConfigError`). `resolve_config` fills in every default, so a "
        "resolved config is complete. Top-level `launcher` (read by `evit launch`; its keys are documented "
        "in evit/launch.py's docstring and checked by `resolve_launcher`), `mask` (the masking job's options) "
        "and `meta` (free-form, e.g. the "
        "experiment name) are kept as given; they are not part of the config hash.",
        "",
        "A default written as `" + " / ".join(f"{r} ..." for r in recipe_order) + "` comes from the recipe "
        f"chosen by `train.recipe` (default `{default_recipe}`; table `RECIPES` in evit/config/recipes.py); a key "
        "given in the config overrides it.",
    ]
    for sec, fields in SCHEMA.items():
        if sec in ("model", "train"):  # then every method's own keys, each valid with its own method only
            fields = {**fields, **{k: f for m in METHODS.values()
                                   for k, f in (m.params if sec == "model" else m.train_params).items()}}
        lines += ["", f"## `{sec}`", "", SECTION_HELP[sec], "",
                  "| key | type | default | description |", "| --- | --- | --- | --- |"]
        for key, f in fields.items():
            cells = (f"`{sec}.{key}`", _md_type(f), _md_default(key, f, recipe_order), f.help)
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _cmd_config(args) -> int:
    print(config_reference(), end="")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config")
    p.set_defaults(func=_cmd_config)
