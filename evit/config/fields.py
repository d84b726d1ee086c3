"""A config key's `Field` (type, bounds, choices, default, help) and `check_field`, which checks a value against it.

Every section of a run config (`evit.config.schema`), every method's parameters and training keys
(`evit.methods`) are declared as fields. Imports no torch.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any

from evit.errors import ConfigError

REQUIRED = object()     # a Field's default: the key must be given
RECIPE = "recipe"       # a train Field's default: the value of the run's recipe (`evit.config.recipes.RECIPES`)


class PerRecipe(dict):
    """A Field's default that depends on the run's recipe: ``PerRecipe(none=0.0, scratch=10.0, ...)`` (a method's
    training keys; every recipe of `evit.config.recipes.RECIPE_NAMES` has a value)."""


REQUIRED = object()


@dataclass(frozen=True)
class Field:
    kind: str                       # int float bool str choice intlist floatlist dict path
    default: Any = None             # None with nullable; REQUIRED; RECIPE; a PerRecipe
    nullable: bool = False
    lo: float | None = None         # inclusive lower bound
    hi: float | None = None         # inclusive upper bound
    lo_open: bool = False           # lower bound exclusive
    choices: tuple = ()
    distinct: bool = False          # a list's values must differ (block indices: a repeat would be ignored)
    help: str = ""                  # the key's description (Markdown) in the reference; every SCHEMA key has one



def check_field(key: str, f: Field, v: Any) -> Any:
    def bad(expected: str):
        raise ConfigError(f"{key}: expected {expected}, got {v!r}")

    if v is None:
        if f.nullable:
            return None
        bad(f"a value ({f.kind})")
    if f.kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            bad("an integer")
    elif f.kind == "float":
        if isinstance(v, bool):
            bad("a number")
        if isinstance(v, str):      # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                bad("a number")
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            bad("a finite number")
        v = float(v)
    elif f.kind == "bool":
        if not isinstance(v, bool):
            bad("true or false")
    elif f.kind in ("str", "path"):
        if not isinstance(v, str) or not v:
            bad("a non-empty string")
        if f.kind == "path":
            v = os.path.expanduser(v)
    elif f.kind == "choice":
        if v not in f.choices:
            bad("one of " + ", ".join(map(str, f.choices)))
    elif f.kind in ("intlist", "floatlist"):
        if not isinstance(v, (list, tuple)):
            bad("a list")
        if f.distinct and len(set(v)) != len(v):
            bad("distinct values (each at most once)")
        elem = Field("int" if f.kind == "intlist" else "float", lo=f.lo, lo_open=f.lo_open, hi=f.hi)
        return [check_field(f"{key}[{i}]", elem, x) for i, x in enumerate(v)]
    elif f.kind == "dict":
        if not isinstance(v, dict):
            bad("a mapping")
        return copy.deepcopy(v)
    if f.kind in ("int", "float"):
        if f.lo is not None and (v < f.lo or (f.lo_open and v == f.lo)):
            bad(f"a value {'>' if f.lo_open else '>='} {f.lo}")
        if f.hi is not None and v > f.hi:
            bad(f"a value <= {f.hi}")
    return v


def plain(x: Any) -> str:
    """A value as YAML would write it: null, true, [3, 6, 9], {}."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(plain(e) for e in x) + "]"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {plain(e)}" for k, e in x.items()) + "}"
    return str(x)
