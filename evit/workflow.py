"""The workflow's plan for the Snakemake rules (workflow/rules/*.smk), torch-free: from the schema-validated
workflow config, the experiment table, every run's resolved config, the bench, masking and backbone configs, and
the files each rule reads and writes. `evit.workflow_build.build_workflow` builds it and checks all of it while
Snakemake builds the DAG."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import yaml

from evit.config.launcher import resolve_launcher
from evit.errors import EvitError
from evit.methods import METHODS, method_params
from evit.layout import (COMPARISON_FIGURE, COMPARISON_TABLE, FIGURES, MASKING_FIGURE, MASKING_TABLE, PREFLIGHT_TABLE,
                         REPORT_FIGURES)

SCHEMA_FILE = "workflow/schemas/config.schema.yaml"  # the workflow config's JSON schema, under the workflow's base dir
EVIT = f"{sys.executable} -m evit.cli"  # the command line of `evit`, in the interpreter that runs Snakemake


def deep_merge(base: dict, override: dict | None) -> dict:
    """``base`` with ``override``'s keys put in, nested mappings merged key by key (neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def one_of(names: Iterable[str], none: str) -> str:
    """A wildcard constraint matching exactly one of ``names`` (escaped: names hold dots), or ``none`` if empty."""
    return "|".join(map(re.escape, names)) or none


def write_yaml(path: str | Path, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def download(name: str, url: str, dest: str) -> None:
    """Fetch ``url`` to ``dest`` through a ``.part`` file (a broken download leaves no ``dest``)."""
    tmp = dest + ".part"
    Path(tmp).parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=600) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    except OSError as e:
        raise EvitError(f"download {name}: cannot fetch {url}: {e}") from None
    os.replace(tmp, dest)


@dataclasses.dataclass(frozen=True)
class Workflow:
    """What the rules ask: ``config`` (validated, defaults filled in), ``experiments`` (name -> the experiment's
    fields merged over experiment_defaults) and ``resolved`` (name -> its run config, every default filled in)."""
    config: dict
    experiments: dict[str, dict]
    resolved: dict[str, dict] = dataclasses.field(default_factory=dict)
    reruns: tuple[str, ...] = ()  # changed experiments whose run moves aside before they rerun (`evit.reruns`)

    @property
    def results(self) -> str:
        return self.config["results"]

    @property
    def runs(self) -> str:
        return f"{self.results}/runs"

    @property
    def downloads(self) -> dict[str, str]:
        """Published weights fetched once by the local rule `download`: name -> URL (an `init` may name one)."""
        return self.config["downloads"]

    @property
    def masking(self) -> dict | None:
        """The masking experiment (workflow/rules/masking.smk), if the config has one."""
        return self.config.get("masking")

    @property
    def comparison(self) -> dict | None:
        """Other backbones, benched and evaluated off the shelf (workflow/rules/comparison.smk), if any."""
        return self.config.get("comparison")

    @property
    def backbones(self) -> dict[str, str]:
        """The comparison's backbones: timm name with its pretrained tag -> family (one mapped to null is left out:
        an overlay config's way to drop it)."""
        backbones = self.comparison["backbones"] if self.comparison else {}
        return {name: family for name, family in backbones.items() if family is not None}

    @property
    def weight_urls(self) -> dict[str, str]:
        """What the download rule fetches: a download's or a backbone's name -> URL."""
        return {**self.downloads, **{name: self.comparison["weights"].format(name=name) for name in self.backbones}}

    @property
    def preflight(self) -> dict | None:
        """The preflight job's options (workflow/rules/preflight.smk), if it is enabled."""
        section = self.config.get("preflight") or {}
        return section if section.get("enabled") else None

    @property
    def preflight_files(self) -> list[str]:
        """What every training job waits for: the preflight's result, if it is enabled."""
        return [f"{self.results}/preflight/preflight.json"] if self.preflight else []

    @property
    def tables(self) -> list[str]:
        return [*self.config["tables"], *([MASKING_TABLE] if self.masking else []),
                *([COMPARISON_TABLE] if self.comparison else []), *([PREFLIGHT_TABLE] if self.preflight else [])]

    @property
    def figures(self) -> list[str]:
        """Every figure this config makes (`evit.layout.FIGURES`, less the masking or comparison one without it)."""
        return [fig for fig in FIGURES
                if (fig != MASKING_FIGURE or self.masking) and (fig != COMPARISON_FIGURE or self.comparison)]

    @property
    def drawn_figures(self) -> list[str]:
        """The figures `evit report` draws."""
        return [*REPORT_FIGURES, *([COMPARISON_FIGURE] if self.comparison else [])]

    def is_trained(self, name: str) -> bool:
        """Trained by the workflow: not mapped to an existing checkpoint and not evaluation-only."""
        return name not in self.config["checkpoints"] and self.experiments[name]["recipe"] != "none"

    def weights(self, name: str) -> str:
        """The checkpoint file holding an experiment's final weights."""
        if name in self.config["checkpoints"]:
            return self.config["checkpoints"][name]
        if self.is_trained(name):
            return f"{self.runs}/{name}/checkpoint.pth"
        return self.init_weights(self.experiments[name]["init"])

    def init_weights(self, init: str) -> str:
        """The checkpoint file an experiment starts from: another experiment's weights, a download, or a file."""
        if init in self.experiments:
            return self.weights(init)
        return self.download_file(init) if init in self.downloads else init

    def download_file(self, name: str) -> str:
        """Where the download rule puts a download's or a backbone's weights: a .safetensors URL keeps its format."""
        ext = "safetensors" if urllib.parse.urlsplit(self.weight_urls[name]).path.endswith(".safetensors") else "pth"
        return f"{self.results}/weights/{name}.{ext}"

    def result_file(self, name: str) -> str:
        return f"{self.runs}/{name}/metrics.json" if self.is_trained(name) else f"{self.runs}/{name}/eval.json"

    def upstream_results(self, name: str) -> list[str]:
        """Result files of the runs whose weights this run starts from, or the download it starts from (so they are
        made first)."""
        init = self.experiments[name].get("init")
        if name in self.config["checkpoints"]:
            return []
        if init in self.downloads:
            return [self.download_file(init)]
        return [self.result_file(init)] if init in self.experiments else []

    def run_config(self, name: str) -> dict:
        """The fully resolved config of one run, as `evit train` / `evit eval` read it."""
        exp = self.experiments[name]
        cfg = deep_merge(self.config["run_defaults"], {
            "model": {key: exp[key] for key in ("arch", "img_size", "method", *METHODS[exp["method"]].params)
                      if key in exp},
            "train": {"recipe": exp["recipe"] if self.is_trained(name) else "none",
                      "epochs": min(exp["epochs"], self.config.get("max_epochs") or exp["epochs"])},
            "launcher": {**self.config["launcher"], "backend": self.config["backend"]},
        })
        if self.is_trained(name) and exp["recipe"] == "finetune":
            cfg["train"]["init_checkpoint"] = str(self.init_weights(exp["init"]))
        return deep_merge(cfg, exp.get("run", {}))

    @property
    def check_stamp(self) -> str:
        """What the local `check` job writes when every check passes; every cluster job waits on it."""
        return f"{self.results}/checks/ok.json"

    def check_config(self) -> dict:
        """What the local `check` job reads (`evit.check`): every run's config, whether it trains, and the weights
        file it reads that no job makes (a mapped checkpoint, an init file); the masking job's config."""
        return {
            "runs": {name: {"config": self.run_config(name), "trained": self.is_trained(name),
                            "weights": self.given_weights(name), "mapped": name in self.config["checkpoints"]}
                     for name in self.experiments},
            "masking": self.masking_config() if self.masking else None,
        }

    def given_weights(self, name: str) -> str | None:
        """The weights file an experiment reads that no job of the workflow makes, if any."""
        exp, init = self.experiments[name], self.experiments[name].get("init")
        if name in self.config["checkpoints"]:
            return self.config["checkpoints"][name]
        if (self.is_trained(name) and exp["recipe"] != "finetune") or init in self.experiments:
            return None
        return None if not init or init in self.downloads else init

    def trained_run_dirs(self) -> dict[str, Path]:
        """The run dir of each experiment the workflow trains."""
        return {name: Path(self.runs) / name for name in self.experiments if self.is_trained(name)}

    def run_cpus(self, name: str) -> int:
        """Cores a train/eval rule holds: its run's launcher cpus_per_task (the job uses that many threads)."""
        return self.resolved[name]["launcher"]["cpus_per_task"]

    def bench_launcher(self) -> dict:
        """The benchmark job's launcher options: one process (the bench is not distributed), on the runs' backend,
        on a node of its own on SLURM (`exclusive`)."""
        return {**self.config["launcher"], "nodes": 1, "tasks_per_node": 1, "exclusive": True,
                **self.config["bench_launcher"], "backend": self.config["backend"]}

    def shared_one_process_launcher(self) -> dict:
        """The launcher of a one-process evaluation (the masking job, a comparison backbone's): the bench's, but on
        a node it may share: it counts top-1s, it does not time anything."""
        return {**self.bench_launcher(), "exclusive": False}

    def preflight_config(self) -> dict:
        """The preflight job's config (`evit.preflight`): its options, the run configs it measures, and every trained
        experiment's model, data, epochs and GPUs (the grid's cost); on one node with the runs' GPUs, one process."""
        opts = self.preflight
        launcher = {**self.config["launcher"], "nodes": 1, "tasks_per_node": 1, "exclusive": True,
                    "backend": self.config["backend"]}
        return {
            "preflight": {k: opts[k] for k in ("images", "tolerance", "steps", "warmup", "rounds")},
            "measure": {name: self.resolved[name] for name in opts["measure"]},
            "grid": [{"name": name, "model": run["model"], "data": run["data"], "train": run["train"],
                      "epochs": run["train"]["epochs"],
                      "gpus": math.prod(resolve_launcher(run["launcher"])[k] for k in ("nodes", "tasks_per_node"))}
                     for name, run in self.resolved.items() if self.is_trained(name)],
            "launcher": launcher,
        }

    def bench_config(self) -> dict:
        """The bench job's config: every experiment's model (built from its run config's model section, as in
        training) and every backbone by timm name; `after_runs` when the runs share its machine (no SLURM)."""
        return {
            **self.config["bench"],
            "models": [{"label": name, "model": self.resolved[name]["model"]} for name in self.experiments]
            + [{"label": name, "timm": name} for name in self.backbones],
            "launcher": self.bench_launcher(),
            "after_runs": self.config["backend"] != "slurm",
        }

    def masking_config(self) -> dict:
        """The masking job's run config: its experiment's, in one process (the bench's launcher), with a mask:
        section (`evit.config.masking.MASK_DEFAULTS`) that writes the figure."""
        masking = self.masking
        keys = ("share", "boxes", "boxes_format", "seed", "figure_images")
        cfg = deep_merge(self.run_config(masking["experiment"]), {
            "launcher": self.shared_one_process_launcher(),
            "meta": {"experiment": masking["experiment"]},
            "mask": {**{k: masking[k] for k in keys if k in masking},
                     "figure": f"{self.results}/figures/{MASKING_FIGURE}"},
        })
        if masking.get("val_subset"):
            cfg["data"]["val_subset"] = masking["val_subset"]
        return cfg

    def backbone_config(self, name: str) -> dict:
        """A backbone's eval config: the runs' data and device, timm's model `name`, the torch loader with the
        backbone's own transform (so not the demo's canvas), in one process on a node it may share."""
        return deep_merge(self.config["run_defaults"], {
            "model": {"arch": name},
            "data": {"loader": "torch", "canvas": None},
            "launcher": self.shared_one_process_launcher(),
            "meta": {"backbone": name, "family": self.backbones[name]},
        })

    def schedule_of(self, name: str) -> dict:
        """{"schedule": the training keys of the run's method} when they are not its recipe's (an ablation's row
        says so), else {}."""
        resolved = self.resolved[name]
        changes = METHODS[resolved["model"]["method"]].schedule_changes(resolved["train"])
        return {"schedule": changes} if changes else {}

    def experiments_file(self) -> dict:
        """What `evit report` reads: the tables, each experiment's row labels and result file, the masking and
        comparison results."""
        masking, comparison = self.masking, self.comparison
        return {
            **({"preflight": {"result": self.preflight_files[0]}} if self.preflight else {}),
            "dataset": self.config["dataset"],
            "tables": self.config["tables"],
            **({"masking": {"result": f"{self.results}/masking/masking.json", "experiment": masking["experiment"],
                            "paper": masking.get("paper") or {}}} if masking else {}),
            **({"comparison": {"experiments": comparison["experiments"], "backbones": [
                {"name": name, "family": family, "result": f"{self.results}/comparison/{name}/eval.json"}
                for name, family in self.backbones.items()]}} if comparison else {}),
            "experiments": [
                {"name": name, "arch": e["arch"], "img_size": e["img_size"], "method": e["method"],
                 "params": method_params(self.resolved[name]["model"]), "recipe": e["recipe"],
                 "tables": e["tables"], "paper": e.get("paper"), "result": self.result_file(name),
                 **self.schedule_of(name)}
                for name, e in self.experiments.items()
            ],
        }
