"""The token-reduction methods: the `Method` record (what the config, the workflow, the jobs and the report need of
a method) and the registry `METHODS`. Imports no torch.

A method owns everything of its own: its model parameters (``model.<param>``), its per-pass override, its
training schedule and the train keys that schedule reads, its labels, and the words the report uses for its
schedule. Generic code asks the method and never tests its name. A method is registered in one of two ways:

- in this repository: one module under evit/models/ (its timm models) and one line in `BUILTIN_METHODS`;
- from its own installed package, with no edit here: an entry point of group ``evit.methods`` naming a `Method`
  object, e.g. in its pyproject.toml ``[project.entry-points."evit.methods"] cut = "evit_cut:METHOD"``. Every
  process that imports this module (Snakemake, the launcher, the jobs, the report) registers it.
"""
from __future__ import annotations

import functools
import importlib.metadata
import itertools
import math
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Callable

from evit.config.fields import Field, PerRecipe, check_field, plain
from evit.errors import ConfigError

ENTRY_POINT_GROUP = "evit.methods"


@dataclass(frozen=True)
class Method:
    """A token-reduction method: what the run config, the workflow and the report need of it (no torch).

    Its models are timm's ``prefix + model.arch``, registered by ``module`` (which `build_model` imports) and
    built with its ``params`` as keyword arguments; they implement `evit.models.base.TokenReducer` (token counts,
    extra MACs, a forward pass at another ``override`` value). The default of ``override`` leaves the backbone
    unchanged (EViT's keep rate 1, ToMe's r 0). A new method is one such entry and one module: a line in
    `BUILTIN_METHODS`, or an entry point of group ``evit.methods`` in its own package (see this module's docstring).
    """

    label: str                                  # its name in tables and figures
    prefix: str                                 # timm registry prefix of its models ("" = the plain backbone)
    module: str | None                          # the module that registers its timm models
    params: dict[str, Field]                    # its keys in the model section (`model.<param>`), with defaults
    override: str | None = None                 # the parameter a pass may override: ``model(x, **{override: v})``
    shown: tuple[str, ...] = ()                 # parameters every label shows; the others when not at default
    brief: dict[str, Callable[[Any], str]] = dataclass_field(default_factory=dict)  # a value in a label
    variant: tuple[str, ...] = ()               # parameters whose values the figures colour apart
    # (model section, train section, iterations per epoch) -> step -> the override while training; None: fixed
    schedule: Callable[[dict, dict, int], Callable[[int], Any]] | None = None
    train_params: dict[str, Field] = dataclass_field(default_factory=dict)  # the train keys its schedule reads
    # its train_params' values, when not its recipe's -> how the report words them, e.g. "no keep-rate warmup"
    schedule_words: Callable[[dict], str] | None = None
    grad_checkpointing: bool = True             # its blocks can be re-run in the backward pass
    compile: bool = True                        # torch.compile builds its forward pass
    kept_patches: bool = False                  # `evit visualize`: ``model(x, return_kept=True)`` names the patches
                                                # each reorganizing block (``model.drop_loc``) kept
    trainable: bool = True                      # the trainer can train it (else: evaluated only, recipe none)

    def _brief(self, key: str, value: Any) -> str:
        return self.brief[key](value) if key in self.brief else f"{key} {plain(value)}"

    def describe(self, params: dict) -> str:
        """Its parameters in brief: the shown ones, and every other one that is not at its default."""
        return ", ".join(self._brief(k, params[k]) for k, f in self.params.items()
                         if k in self.shown or params[k] != f.default)

    def variant_name(self, params: dict) -> str:
        """The figures' colour group: its label and its variant parameters, e.g. ``EViT not fused``."""
        return " ".join([self.label, *(self._brief(k, params[k]) for k in self.variant)])

    def schedule_changes(self, train: dict) -> dict:
        """Its training keys of a resolved ``train:`` section, when any differs from its recipe's default; else {}."""
        changed = {k: train[k] for k in self.train_params}
        defaults = {k: f.default[train["recipe"]] for k, f in self.train_params.items()}
        return changed if changed != defaults else {}

    def variant_names(self) -> list[str]:
        """Every variant name, defaults first (variant parameters are bools or choices)."""
        domains = [[self.params[k].default, *(c for c in (self.params[k].choices or (True, False))
                                              if c != self.params[k].default)] for k in self.variant]
        return [self.variant_name(dict(zip(self.variant, values))) for values in itertools.product(*domains)]


def keep_rate_at(step: int, iters_per_epoch: int, target: float, shrink_start: float, shrink_epochs: float) -> float:
    """EViT's keep-rate schedule, per iteration.

    1 for the first ``shrink_start`` epochs; then a cosine from 1 down to ``target`` over ``shrink_epochs``:
    ``target + (1 - target) * (cos(pi * t / T) + 1) / 2`` with t the iterations since ``shrink_start`` and
    ``T = iters_per_epoch * shrink_epochs``; then ``target``. With ``shrink_epochs == 0`` the target holds from
    ``shrink_start`` on (so shrink 0/0 = the target from the first step, as in fine-tuning).
    """
    if target >= 1.0:
        return 1.0
    t = step - shrink_start * iters_per_epoch
    if t < 0:
        return 1.0
    total = iters_per_epoch * shrink_epochs
    if t >= total:
        return float(target)
    return target + (1.0 - target) * (math.cos(math.pi * t / total) + 1.0) / 2.0


def _evit_schedule_words(schedule: dict) -> str:
    start, epochs = schedule["shrink_start"], schedule["shrink_epochs"]
    if start == epochs == 0:
        return "no keep-rate warmup"
    return f"keep rate 1 for {start:g} ep, cosine over {epochs:g} ep"


BUILTIN_METHODS: dict[str, Method] = {
    "none": Method("baseline", "", None, {}),
    "evit": Method(
        "EViT", "evit_", "evit.models.evit", {
            "keep_rate": Field("float", 1.0, lo=0.0, lo_open=True, hi=1.0,
                               help="EViT: target keep rate of the reorganizing blocks."),
            "fuse_token": Field("bool", True,
                                help="EViT: fuse the inattentive tokens into one extra token (weighted by their "
                                     "attention scores); false drops them."),
            "drop_loc": Field("intlist", [3, 6, 9], lo=0, distinct=True,
                              help="EViT: block indices (0-based) of the reorganizing blocks."),
        },
        override="keep_rate", shown=("keep_rate", "fuse_token"), variant=("fuse_token",), kept_patches=True,
        brief={"keep_rate": lambda v: f"keep {v:g}", "fuse_token": lambda v: "fused" if v else "not fused"},
        schedule=lambda m, t, ipe: functools.partial(
            keep_rate_at, iters_per_epoch=ipe, target=m["keep_rate"], shrink_start=t["shrink_start"],
            shrink_epochs=t["shrink_epochs"]),
        train_params={
            "shrink_start": Field("float", PerRecipe(none=0.0, scratch=10.0, finetune=0.0, demo=1.0), lo=0.0,
                                  help="EViT: keep-rate schedule: 1 before `shrink_start` epochs, then a cosine to "
                                       "`model.keep_rate` over `shrink_epochs`, per iteration "
                                       "(`evit.methods.keep_rate_at`)."),
            "shrink_epochs": Field("float", PerRecipe(none=0.0, scratch=100.0, finetune=0.0, demo=2.0), lo=0.0,
                                   help="EViT: length of the keep-rate cosine, in epochs (see `shrink_start`)."),
        },
        schedule_words=_evit_schedule_words,
    ),
    "tome": Method(
        "ToMe", "tome_", "evit.models.tome", {
            "r": Field("int", 0, lo=0, help="ToMe: tokens merged per block (at most half of its non-CLS tokens)."),
        },
        override="r", shown=("r",),
        grad_checkpointing=False,  # the token sizes change as its blocks run
    ),
    "dynamicvit": Method(
        "DynamicViT", "dynamicvit_", "evit.models.dynamicvit", {
            "base_rate": Field("float", 0.7, lo=0.0, lo_open=True, hi=1.0,
                               help="DynamicViT: stage s keeps base_rate ** (s + 1) of the patches."),
            "pruning_loc": Field("intlist", [3, 6, 9], lo=1, distinct=True,
                                 help="DynamicViT: block indices (0-based) before which a prediction module prunes."),
        },
        override="base_rate", shown=("base_rate",), brief={"base_rate": lambda v: f"rate {v:g}"},
        trainable=False,  # its training (Gumbel-softmax decisions, masked attention, distillation) is not built
    ),
}
METHODS: dict[str, Method] = {}  # every registered method: the built-in ones, then those of entry points


def register_method(name: str, method: Method) -> Method:
    """Add a method to `METHODS`; its name, prefix, parameters and training keys must be new."""
    taken = {k for m in METHODS.values() for k in (*m.params, *m.train_params)}
    clash = sorted(taken & {*method.params, *method.train_params})
    if name in METHODS or (method.prefix and any(m.prefix == method.prefix for m in METHODS.values())) or clash:
        raise ConfigError(f"method {name!r}: its name, its prefix {method.prefix!r} and its keys {clash} must be new "
                          "(not another method's)")
    if METHODS and not method.prefix:
        raise ConfigError(f"method {name!r}: needs the prefix of its timm models (only the baseline has none)")
    if method.override is not None and method.override not in method.params:
        raise ConfigError(f"method {name!r}: its override {method.override!r} is not one of its parameters")
    bad = [k for k, f in method.train_params.items() if not isinstance(f.default, PerRecipe)]
    if bad:
        raise ConfigError(f"method {name!r}: training keys {bad} need a PerRecipe default (a value per recipe)")
    METHODS[name] = method
    return method


def _register_entry_points() -> None:
    """Register the `Method` of every installed entry point of group `ENTRY_POINT_GROUP`."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        method = entry.load()
        if not isinstance(method, Method):
            raise ConfigError(f"entry point {entry.name} = {entry.value} (group {ENTRY_POINT_GROUP}): names a "
                              f"{type(method).__name__}, not an evit.methods.Method")
        register_method(entry.name, method)


for _name, _method in BUILTIN_METHODS.items():
    register_method(_name, _method)
_register_entry_points()


def check_trainable(method: str) -> None:
    """A `ConfigError` if the trainer cannot train ``method`` (it is evaluated only: recipe none)."""
    if not METHODS[method].trainable:
        raise ConfigError(f"model.method: {method} is evaluated only here (its own training is not implemented); "
                          "evaluate its weights (recipe none, or `evit eval`)")


def own_keys(method: Method, section: str) -> dict[str, Field]:
    """A method's own keys in a run config section: its parameters in ``model``, its schedule's in ``train``."""
    return method.params if section == "model" else method.train_params


def key_owner(section: str, key: str) -> str | None:
    """The method whose own key ``<section>.<key>`` is (`own_keys`), or None."""
    return next((name for name, m in METHODS.items() if key in own_keys(m, section)), None)


def method_param_keys() -> list[str]:
    """Every method's parameters (the model keys that are not the schema's)."""
    return [k for m in METHODS.values() for k in m.params]


def method_params(model: dict) -> dict:
    """The method's own parameters of a resolved ``model:`` section."""
    return {k: model[k] for k in METHODS[model["method"]].params}


def describe_method(method: str, params: dict) -> str:
    """A method's parameters in brief, e.g. ``keep 0.7, fused``, ``r 8``, ``""`` for none."""
    return METHODS[method].describe(params)


def check_method_param(key: str, value: Any) -> Any:
    """A method parameter's value, checked against its `Field` (`ConfigError` naming ``model.<key>``)."""
    method = key_owner("model", key)
    if method is None:
        raise ConfigError(f"model.{key}: not a parameter of any method ({', '.join(method_param_keys())})")
    return check_field(f"model.{key}", METHODS[method].params[key], value)
