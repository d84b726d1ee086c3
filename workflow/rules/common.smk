# Config validation, the experiment table, and the fully resolved config of each run.
# Every run's config is resolved and validated here, while the DAG is built, with the torch-free evit.config:
# `snakemake -n` finds a bad key or value anywhere, and parsing stays fast.
import copy
import re
import sys
import urllib.parse
from pathlib import Path

import yaml
from snakemake.utils import validate

from evit.boxes import check_mask
from evit.methods import METHODS, check_method_param, check_trainable, method_param_keys, method_params, param_method
from evit.config.schema import SCHEMA, resolve_config
from evit.config.recipes import recipe_defaults
from evit.config.launcher import resolve_bench_launcher
from evit.errors import ConfigError
from evit.layout import (
    COMPARISON_FIGURE, COMPARISON_TABLE, FIGURES, KEPT_TOKENS_FIGURE, MASKING_FIGURE, MASKING_TABLE, REPORT_FIGURES,
)

validate(config, "../schemas/config.schema.yaml")
# The schema's experiment fields other than the methods' parameters, which evit.config.METHODS checks.
EXPERIMENT_FIELDS = yaml.safe_load((Path(workflow.basedir) / "workflow/schemas/config.schema.yaml").read_text())[
    "$defs"]["experiment_fields"]["properties"]

RESULTS = config["results"]
RUNS = f"{RESULTS}/runs"
EVIT = f"{sys.executable} -m evit.cli"


# Model keys that are experiment fields: the tables label rows with them, so a run: section may not override them.
# An experiment's method uses its own parameters; experiment_defaults may hold every method's.
OWNED_MODEL_KEYS = ("arch", "img_size", "method", *method_param_keys())


def _check_method_fields(name, entry):
    """An experiment's (or experiment_defaults') keys beyond the schema's: parameters of a method, each valid."""
    if entry.get("method", "none") not in METHODS:
        raise ValueError(f"config: {name}: method {entry['method']!r} is not one of {list(METHODS)}")
    for key in sorted(set(entry) - set(EXPERIMENT_FIELDS)):
        try:
            check_method_param(key, entry[key])
        except ConfigError as e:
            raise ValueError(f"config: {name}: {e}") from None


def deep_merge(base, override):
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _experiment_table():
    defaults = config["experiment_defaults"]
    _check_method_fields("experiment_defaults", defaults)
    experiments = {}
    for entry in config["experiments"]:
        _check_method_fields(f"experiment {entry['name']!r}", entry)
        exp = deep_merge(defaults, entry)
        exp.setdefault("method", SCHEMA["model"]["method"].default)
        if exp["name"] in experiments:
            raise ValueError(f"config: experiment {exp['name']!r} is defined twice")
        foreign = [k for k in entry if (param_method(k) or exp["method"]) != exp["method"]]
        if foreign:
            raise ValueError(f"config: experiment {exp['name']!r} (method {exp['method']}) sets {foreign[0]}, a "
                             f"parameter of method {param_method(foreign[0])}")
        experiments[exp["name"]] = exp
    for name, path in config["checkpoints"].items():
        if name not in experiments:
            raise ValueError(f"config: checkpoints maps unknown experiment {name!r}; known: {sorted(experiments)}")
        if not Path(path).is_file():
            raise ValueError(f"config: checkpoint {path} for experiment {name!r} does not exist")
    for exp in experiments.values():
        if exp["recipe"] != "none" and exp["name"] not in config["checkpoints"]:
            try:
                check_trainable(exp["method"])
            except ConfigError as e:
                raise ValueError(f"config: experiment {exp['name']!r} (recipe {exp['recipe']}): {e}") from None
        owned = sorted(set(OWNED_MODEL_KEYS) & set((exp.get("run") or {}).get("model") or {}))
        if owned:
            raise ValueError(f"config: experiment {exp['name']!r} sets model.{owned[0]} in its run: section; set "
                             f"`{owned[0]}:` on the experiment itself (its table rows are labelled from it)")
        init = exp.get("init")
        if exp["recipe"] in ("finetune", "none") and exp["name"] not in config["checkpoints"] and not init:
            raise ValueError(f"config: experiment {exp['name']!r} (recipe {exp['recipe']}) needs `init`: "
                             "an experiment name or a checkpoint file")
        if init and init not in experiments and init not in DOWNLOADS and not Path(init).is_file():
            raise ValueError(f"config: experiment {exp['name']!r} has init {init!r}, which is neither an "
                             f"experiment ({sorted(experiments)}), a download ({sorted(DOWNLOADS)}) nor an existing "
                             "checkpoint file")
        unknown = [t for t in exp["tables"] if t not in config["tables"]]
        if unknown:
            raise ValueError(f"config: experiment {exp['name']!r} lists unknown table(s) {unknown}; "
                             f"known: {sorted(config['tables'])}")
    for table, spec in config["tables"].items():
        if spec["baseline"] not in experiments:
            raise ValueError(f"config: table {table!r} has unknown baseline experiment {spec['baseline']!r}")
    if config["visualize"]["experiment"] not in experiments:
        raise ValueError(f"config: visualize.experiment {config['visualize']['experiment']!r} is not an experiment")
    if not METHODS[experiments[config["visualize"]["experiment"]]["method"]].kept_patches:
        raise ValueError(f"config: visualize.experiment {config['visualize']['experiment']!r}: its method does not "
                         "keep patches (the figure shows the patches kept after each block, as EViT's)")
    return experiments


def _check_data_root():
    data = config["run_defaults"].get("data", {})
    if data.get("dataset") in ("imagenet", "folder"):
        root = Path(str(data.get("root")))
        if not ((root / "train").is_dir() and (root / "val").is_dir()):
            raise ValueError(f"config: run_defaults data.root {root} is not a {data['dataset']} directory "
                             "(expected root/train/<class>/* and root/val/<class>/*): set run_defaults.data.root "
                             "to your ImageNet in workflow/config/paper.yaml, or in a site file added with "
                             "--configfile workflow/config/paper.yaml site.yaml")


_check_data_root()
# Published weights fetched once by the local rule `download` (workflow/rules/download.smk), before the jobs that
# read them are queued: an experiment's `init` may name one.
DOWNLOADS = config.get("downloads", {})
EXPERIMENTS = _experiment_table()
MASKING = config.get("masking")  # the masking experiment (workflow/rules/masking.smk), if the config has one
COMPARISON = config.get("comparison")  # other backbones, benched and evaluated off the shelf (rules/comparison.smk)
# name (with its pretrained tag) -> family; their published weights are downloads like DOWNLOADS'
BACKBONES = COMPARISON["backbones"] if COMPARISON else {}
BACKBONE_WEIGHTS = {name: COMPARISON["weights"].format(name=name) for name in BACKBONES}


def _check_comparison():
    untagged = [name for name in BACKBONES if "." not in name]
    if untagged:
        raise ValueError(f"config: comparison.backbones: {untagged[0]!r} has no pretrained tag: name the weights as "
                         "timm does, <model>.<tag> (e.g. swin_tiny_patch4_window7_224.ms_in1k); the URL and the data "
                         "config come from it")
    for names, what in ((EXPERIMENTS, "an experiment's name (the bench labels rows by both)"),
                        (DOWNLOADS, "a download's name (results/weights/ holds both)")):
        if set(BACKBONES) & set(names):
            raise ValueError(f"config: comparison.backbones: {sorted(set(BACKBONES) & set(names))[0]!r} is also "
                             f"{what}")
    unknown = [name for name in COMPARISON["experiments"] if name not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"config: comparison.experiments: {unknown[0]!r} is not an experiment")


if COMPARISON:
    _check_comparison()
WEIGHT_URLS = {**DOWNLOADS, **BACKBONE_WEIGHTS}  # what the download rule fetches: name -> URL
TABLES = list(config["tables"]) + ([MASKING_TABLE] if MASKING else []) + ([COMPARISON_TABLE] if COMPARISON else [])
for name, what in ((MASKING_TABLE, "the masking experiment's"), (COMPARISON_TABLE, "the comparison's")):
    if name in config["tables"]:
        raise ValueError(f"config: tables: {name!r} is {what} table; name yours otherwise")
FIGURES = [fig for fig in FIGURES if (fig != MASKING_FIGURE or MASKING) and (fig != COMPARISON_FIGURE or COMPARISON)]


def is_trained(name):
    """Trained by the workflow: not mapped to an existing checkpoint and not evaluation-only."""
    return name not in config["checkpoints"] and EXPERIMENTS[name]["recipe"] != "none"


def weights(name):
    """The checkpoint file holding an experiment's final weights."""
    if name in config["checkpoints"]:
        return config["checkpoints"][name]
    if is_trained(name):
        return f"{RUNS}/{name}/checkpoint.pth"
    return init_weights(EXPERIMENTS[name]["init"])


def init_weights(init):
    """The checkpoint file an experiment starts from: another experiment's weights, a download, or a file."""
    if init in EXPERIMENTS:
        return weights(init)
    return download_file(init) if init in DOWNLOADS else init


def download_file(name):
    """Where the download rule puts a download's or a backbone's weights: a .safetensors URL keeps its format."""
    ext = "safetensors" if urllib.parse.urlsplit(WEIGHT_URLS[name]).path.endswith(".safetensors") else "pth"
    return f"{RESULTS}/weights/{name}.{ext}"


def result_file(name):
    return f"{RUNS}/{name}/metrics.json" if is_trained(name) else f"{RUNS}/{name}/eval.json"


def upstream_results(name):
    """Result files of the runs whose weights this run starts from, or the download it starts from (so they are
    made first)."""
    exp = EXPERIMENTS[name]
    if name in config["checkpoints"]:
        return []
    if exp.get("init") in DOWNLOADS:
        return [download_file(exp["init"])]
    return [result_file(exp["init"])] if exp.get("init") in EXPERIMENTS else []


def run_config(name):
    """The fully resolved config of one run, as `evit train` / `evit eval` read it."""
    exp = EXPERIMENTS[name]
    cfg = deep_merge(config["run_defaults"], {
        "model": {key: exp[key] for key in ("arch", "img_size", "method", *METHODS[exp["method"]].params)
                  if key in exp},
        "train": {"recipe": "none" if not is_trained(name) else exp["recipe"], "epochs": exp["epochs"]},
        "launcher": {**config["launcher"], "backend": config["backend"]},
    })
    if is_trained(name) and exp["recipe"] == "finetune":
        cfg["train"]["init_checkpoint"] = str(init_weights(exp["init"]))
    return deep_merge(cfg, exp.get("run", {}))


def bench_launcher():
    """The benchmark job's launcher options: one process (the bench is not distributed), on the runs' backend, on
    a node of its own on SLURM (`exclusive`)."""
    return {**config["launcher"], "nodes": 1, "tasks_per_node": 1, "exclusive": True, **config["bench_launcher"],
            "backend": config["backend"]}


def shared_one_process_launcher():
    """The launcher of a one-process evaluation (the masking job, a comparison backbone's): the bench's, but on a
    node it may share: it counts top-1s, it does not time anything."""
    return {**bench_launcher(), "exclusive": False}


def _resolve_run_configs():
    """Every run's config, resolved now (defaults filled in), so that a bad key or value fails the dry run,
    naming the experiment; the bench launcher is checked too."""
    resolved = {}
    for name in EXPERIMENTS:
        try:
            resolved[name] = resolve_config(run_config(name))
        except ConfigError as e:
            raise ValueError(f"config: experiment {name!r}: {e}") from None
    try:
        resolve_bench_launcher(bench_launcher())
    except ConfigError as e:
        raise ValueError(f"config: bench_launcher: {e}") from None
    return resolved


RESOLVED = _resolve_run_configs()


def masking_config():
    """The masking job's run config: its experiment's, in one process (the bench's launcher), with a mask: section
    (`evit.config.MASK_DEFAULTS`) that writes the figure."""
    keys = ("share", "boxes", "boxes_format", "seed", "figure_images")
    cfg = deep_merge(run_config(MASKING["experiment"]), {
        "launcher": shared_one_process_launcher(),
        "meta": {"experiment": MASKING["experiment"]},
        "mask": {**{k: MASKING[k] for k in keys if k in MASKING}, "figure": f"{RESULTS}/figures/{MASKING_FIGURE}"},
    })
    if MASKING.get("val_subset"):
        cfg["data"]["val_subset"] = MASKING["val_subset"]
    return cfg


def _check_masking():
    """The masking experiment's config, and its box file (missing or malformed), named before anything runs."""
    name = MASKING["experiment"]
    if name not in EXPERIMENTS or EXPERIMENTS[name]["method"] != "none":
        raise ValueError(f"config: masking.experiment {name!r} is not a method-none experiment (the baseline "
                         "whose patches are masked)")
    cfg = masking_config()
    try:
        resolve_config(cfg)
        check_mask(cfg["mask"])
    except ConfigError as e:
        raise ValueError(f"config: masking: {e}") from None


if MASKING:
    _check_masking()


def run_cpus(wildcards):
    """Cores a train/eval rule holds: its run's launcher cpus_per_task (the job uses that many threads)."""
    return RESOLVED[wildcards.exp]["launcher"]["cpus_per_task"]


def write_yaml(path, data):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


wildcard_constraints:
    exp="|".join(EXPERIMENTS),
    name="|".join(map(re.escape, WEIGHT_URLS)) or "no download",
    ext="pth|safetensors",
    backbone="|".join(map(re.escape, BACKBONES)) or "no backbone",
