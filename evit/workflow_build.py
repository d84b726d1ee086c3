"""Builds the workflow's plan (`evit.workflow.Workflow`) from the schema-validated workflow config, torch-free: the
experiment table, every run's resolved config, and every check that needs no torch, while Snakemake builds the
DAG, so that `snakemake -n` names a bad key or value anywhere and parsing stays fast. A bad config is one
`ConfigError` ``config: ...`` naming the experiment (or section); checks that need torch run in the local `check`
job (`evit.check`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from evit.boxes import check_mask
from evit.config.launcher import resolve_bench_launcher
from evit.config.schema import SCHEMA, resolve_config
from evit.data.catalog import DEFAULT_FASHION_DIR, FASHION_FILES
from evit.errors import ConfigError, DatasetError
from evit.layout import COMPARISON_TABLE, MASKING_TABLE, PREFLIGHT_TABLE
from evit.methods import METHODS, check_method_param, check_trainable, key_owner, method_param_keys
from evit.reruns import changed_runs, refuse_changed
from evit.workflow import SCHEMA_FILE, Workflow, deep_merge

# Model keys that are experiment fields: the tables label rows with them, so a run: section may not override them.
# An experiment's method uses its own parameters; experiment_defaults may hold every method's.
OWNED_MODEL_KEYS = ("arch", "img_size", "method", *method_param_keys())

def experiment_fields(basedir: str | Path) -> set[str]:
    """The schema's experiment fields (`SCHEMA_FILE` under ``basedir``), beside which an experiment sets only the
    parameters of a method."""
    schema = yaml.safe_load((Path(basedir) / SCHEMA_FILE).read_text())
    return set(schema["$defs"]["experiment_fields"]["properties"])


def build_workflow(config: dict, basedir: str | Path) -> Workflow:
    """The plan of a workflow config that Snakemake validated against `SCHEMA_FILE` (defaults filled in), every
    part of it checked; ``basedir``: the workflow's (the folder holding the Snakefile)."""
    _check_data_root(config)
    plan = Workflow(config, _experiment_table(config, experiment_fields(basedir)))
    if plan.comparison:
        _check_comparison(plan)
    for name, what in ((MASKING_TABLE, "the masking experiment's"), (COMPARISON_TABLE, "the comparison's"),
                       (PREFLIGHT_TABLE, "the preflight's")):
        if name in config["tables"]:
            raise ConfigError(f"config: tables: {name!r} is {what} table; name yours otherwise")
    plan = dataclasses.replace(plan, resolved=_resolve_run_configs(plan))
    _check_fashion_roots(plan)
    run_dirs = plan.trained_run_dirs()
    changed = changed_runs(run_dirs, plan.resolved)
    refuse_changed(changed, run_dirs, config.get("rerun", []))
    plan = dataclasses.replace(plan, reruns=tuple(name for name in config.get("rerun", []) if name in changed))
    if plan.masking:
        _check_masking(plan)
    if plan.preflight:
        _check_preflight(plan)
    for name in plan.backbones:
        _resolved(plan.backbone_config(name), f"comparison.backbones: {name!r}")
    return plan


def _resolved(run_config: dict, where: str) -> dict:
    """`resolve_config`, its `ConfigError` re-raised as ``config: <where>: ...``."""
    try:
        return resolve_config(run_config)
    except ConfigError as e:
        raise ConfigError(f"config: {where}: {e}") from None


def _check_data_root(config: dict) -> None:
    data = config["run_defaults"].get("data", {})
    if data.get("dataset") in ("imagenet", "folder") and data.get("format") == "packed":
        from evit.data.packed import check_pack     # numpy: only for a pack

        try:
            check_pack(str(data.get("root")), data["dataset"])
        except DatasetError as e:
            raise ConfigError(f"config: run_defaults data.root: {e}") from None
    elif data.get("dataset") in ("imagenet", "folder"):
        root = Path(str(data.get("root")))
        if not ((root / "train").is_dir() and (root / "val").is_dir()):
            raise ConfigError(f"config: run_defaults data.root {root} is not a {data['dataset']} directory "
                             "(expected root/train/<class>/* and root/val/<class>/*): set run_defaults.data.root "
                             "to your ImageNet in workflow/config/paper.yaml, or in a site file added with "
                             "--configfile workflow/config/paper.yaml site.yaml")


def _check_fashion_roots(plan: Workflow) -> None:
    """Each run's Fashion-MNIST directory holds its four files (the check job reads them; this costs no torch)."""
    for name, cfg in plan.resolved.items():
        root = Path(cfg["data"]["root"] or DEFAULT_FASHION_DIR)
        missing = [f for pair in FASHION_FILES.values() for f in pair if not (root / f).is_file()]
        if cfg["data"]["dataset"] == "fashion_mnist" and missing:
            raise ConfigError(f"config: experiment {name!r}: data.root {root} lacks the Fashion-MNIST file(s) "
                              f"{', '.join(missing)} (`apt-get install dataset-fashion-mnist` puts them in "
                              f"{DEFAULT_FASHION_DIR}; or point data.root at a folder holding them)")


def _check_method_fields(name: str, entry: dict, fields: set[str]) -> None:
    """An experiment's (or experiment_defaults') keys beyond the schema's ``fields``: parameters of a method, each
    valid."""
    if entry.get("method", "none") not in METHODS:
        raise ConfigError(f"config: {name}: method {entry['method']!r} is not one of {list(METHODS)}")
    for key in sorted(set(entry) - fields):
        if key_owner("model", key) is None:
            raise ConfigError(f"config: {name}: {key}: unknown experiment field (fields: {', '.join(sorted(fields))}; "
                              f"the methods' parameters: {', '.join(method_param_keys())})")
        try:
            check_method_param(key, entry[key])
        except ConfigError as e:
            raise ConfigError(f"config: {name}: {e}") from None


def _experiment_table(config: dict, fields: set[str]) -> dict[str, dict]:
    """Name -> the experiment's fields merged over experiment_defaults, each entry and cross-reference checked."""
    defaults, checkpoints = config["experiment_defaults"], config["checkpoints"]
    _check_method_fields("experiment_defaults", defaults, fields)
    experiments = {}
    for entry in config["experiments"]:
        _check_method_fields(f"experiment {entry['name']!r}", entry, fields)
        exp = deep_merge(defaults, entry)
        exp.setdefault("method", SCHEMA["model"]["method"].default)
        if exp["name"] in experiments:
            raise ConfigError(f"config: experiment {exp['name']!r} is defined twice")
        foreign = [k for k in entry if (key_owner("model", k) or exp["method"]) != exp["method"]]
        if foreign:
            raise ConfigError(f"config: experiment {exp['name']!r} (method {exp['method']}) sets {foreign[0]}, a "
                             f"parameter of method {key_owner('model', foreign[0])}")
        experiments[exp["name"]] = exp
    for name, path in checkpoints.items():
        if name not in experiments:
            raise ConfigError(f"config: checkpoints maps unknown experiment {name!r}; known: {sorted(experiments)}")
        if not Path(path).is_file():
            raise ConfigError(f"config: checkpoint {path} for experiment {name!r} does not exist")
    for exp in experiments.values():
        _check_experiment(exp, config, experiments)
    for table, spec in config["tables"].items():
        if spec["baseline"] not in experiments:
            raise ConfigError(f"config: table {table!r} has unknown baseline experiment {spec['baseline']!r}")
    shown = config["visualize"]["experiment"]
    if shown not in experiments:
        raise ConfigError(f"config: visualize.experiment {shown!r} is not an experiment")
    if not METHODS[experiments[shown]["method"]].kept_patches:
        raise ConfigError(f"config: visualize.experiment {shown!r}: its method does not keep patches (the figure "
                         "shows the patches kept after each block, as EViT's)")
    return experiments


def _check_experiment(exp: dict, config: dict, experiments: dict[str, dict]) -> None:
    """One merged experiment against the others: trainable, its run: section, its init and its tables."""
    name, recipe, init = exp["name"], exp["recipe"], exp.get("init")
    checkpoints, downloads = config["checkpoints"], config["downloads"]
    if recipe != "none" and name not in checkpoints:
        try:
            check_trainable(exp["method"])
        except ConfigError as e:
            raise ConfigError(f"config: experiment {name!r} (recipe {recipe}): {e}") from None
    owned = sorted(set(OWNED_MODEL_KEYS) & set((exp.get("run") or {}).get("model") or {}))
    if owned:
        raise ConfigError(f"config: experiment {name!r} sets model.{owned[0]} in its run: section; set "
                         f"`{owned[0]}:` on the experiment itself (its table rows are labelled from it)")
    if recipe in ("finetune", "none") and name not in checkpoints and not init:
        raise ConfigError(f"config: experiment {name!r} (recipe {recipe}) needs `init`: an experiment name or a "
                         "checkpoint file")
    if init and init not in experiments and init not in downloads and not Path(init).is_file():
        raise ConfigError(f"config: experiment {name!r} has init {init!r}, which is neither an experiment "
                         f"({sorted(experiments)}), a download ({sorted(downloads)}) nor an existing checkpoint file")
    unknown = [t for t in exp["tables"] if t not in config["tables"]]
    if unknown:
        raise ConfigError(f"config: experiment {name!r} lists unknown table(s) {unknown}; "
                         f"known: {sorted(config['tables'])}")


def _check_comparison(plan: Workflow) -> None:
    untagged = [name for name in plan.backbones if "." not in name]
    if untagged:
        raise ConfigError(f"config: comparison.backbones: {untagged[0]!r} has no pretrained tag: name the weights as "
                         "timm does, <model>.<tag> (e.g. swin_tiny_patch4_window7_224.ms_in1k); the URL and the data "
                         "config come from it")
    for names, what in ((plan.experiments, "an experiment's name (the bench labels rows by both)"),
                        (plan.downloads, "a download's name (results/weights/ holds both)")):
        if set(plan.backbones) & set(names):
            raise ConfigError(f"config: comparison.backbones: {sorted(set(plan.backbones) & set(names))[0]!r} is "
                             f"also {what}")
    unknown = [name for name in plan.comparison["experiments"] if name not in plan.experiments]
    if unknown:
        raise ConfigError(f"config: comparison.experiments: {unknown[0]!r} is not an experiment")


def _resolve_run_configs(plan: Workflow) -> dict[str, dict]:
    """Every run's config, resolved now (defaults filled in), so that a bad key or value fails the dry run,
    naming the experiment; the bench launcher is checked too."""
    resolved = {name: _resolved(plan.run_config(name), f"experiment {name!r}") for name in plan.experiments}
    try:
        resolve_bench_launcher(plan.bench_launcher())
    except ConfigError as e:
        raise ConfigError(f"config: bench_launcher: {e}") from None
    return resolved


def _check_masking(plan: Workflow) -> None:
    """The masking experiment's config, and its box file (missing or malformed), named before anything runs."""
    name = plan.masking["experiment"]
    if name not in plan.experiments or plan.experiments[name]["method"] != "none":
        raise ConfigError(f"config: masking.experiment {name!r} is not a method-none experiment (the baseline "
                         "whose patches are masked)")
    cfg = plan.masking_config()
    _resolved(cfg, "masking")
    try:
        check_mask(cfg["mask"])
    except ConfigError as e:
        raise ConfigError(f"config: masking: {e}") from None


def _check_preflight(plan: Workflow) -> None:
    """The preflight measures runs the workflow trains (their training settings are what it measures)."""
    for name in plan.preflight["measure"]:
        if name not in plan.experiments or not plan.is_trained(name):
            raise ConfigError(f"config: preflight.measure: {name!r} is not an experiment the workflow trains; name "
                             f"trained ones (e.g. the baseline and EViT at 0.7), or set preflight.enabled: false")
