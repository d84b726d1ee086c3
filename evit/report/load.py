"""The results of the workflow as pandas frames: the experiments file joined with each run's result file, the bench
CSVs and the paper's numbers (`load_results`), and its `comparison` section beside other backbones
(`load_comparison`); bad input is a `ReportError` naming the file, experiment, table or reference at fault.

The experiments file (YAML, written by the workflow's `experiments_file` rule):

    dataset: ImageNet-1k              # optional; else the metrics files' `dataset`, if they have one
    tables:                           # required: one entry per table, in output order
      main: {title: "EViT-DeiT-S keep-rate sweep (fused)", baseline: deit_s}   # title optional
    experiments:                      # required: rows of every table, in this order
      - name: evit_s_0.7              # required, unique; the `label` of its row in the bench CSV
        arch: deit_small_patch16_224  # optional, not used
        img_size: 224                 # required; must equal the bench CSV's img_size
        method: evit                  # required: a name in evit.methods.METHODS (none, evit, tome, ...)
        params: {keep_rate: 0.7, fuse_token: true, drop_loc: [3, 6, 9]}  # required: all of its method's, {} for none
        recipe: finetune              # required: none (evaluated off the shelf), finetune, scratch or demo
        tables: [main]                # required (may be empty): tables this experiment is a row of
        paper: evit_deit_small_0.7_fused  # optional: a `ref` of the reference CSV, or null
        schedule: {shrink_start: 0, shrink_epochs: 0}  # optional: the keep-rate schedule, when not the recipe's
        result: results/runs/deit_s/metrics.json  # required: JSON with top1 (and top5), in percent;
                                                  # relative paths are relative to the current directory
    masking:                          # optional: the `masking` table (the paper's Table 1), see `tables.masking_table`
      result: results/masking/masking.json  # the masking job's result (evit/masking.py)
      experiment: deit_s              # whose weights were masked
      paper: {none: 79.8}             # the paper's top-1 per way (none, background, object, random), if given
    preflight:                        # optional: the `preflight` table, see `tables.preflight_table`
      result: results/preflight/preflight.json  # `evit preflight`'s result: the grid's cost, the node's checks
    comparison:                       # optional: the `comparison` table and figure, see `load_comparison`
      experiments: [deit_s, evit_s_0.7, dynamicvit_s_0.7]  # names of experiments above, their rows first
      backbones:                      # then one row each, in this order
        - name: swin_tiny_patch4_window7_224.ms_in1k  # its timm name (and pretrained tag); its bench CSV `label`
          family: Swin                # its colour and marker in the figure
          result: results/comparison/swin_tiny_patch4_window7_224.ms_in1k/eval.json  # its timm pretrained
                                      # weights evaluated off the shelf: top1, top5, img_size (the input size it
                                      # was evaluated at; must equal the bench CSV's), params, dataset
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from evit.config.recipes import RECIPE_TRAINING
from evit.errors import ReportError
from evit.methods import METHODS, describe_method
from evit.report.measurement import PROVENANCE, precisions_of

REQUIRED = ("name", "img_size", "method", "params", "recipe", "tables", "result")
BENCH_COLUMNS = {  # bench CSV column -> results frame column
    "label": "experiment", "img_size": "bench_img_size", "gmacs": "gmacs", "img_s": "img_s",
    "img_s_q1": "img_s_q1", "img_s_q3": "img_s_q3", "device": "device", "threads": "threads", "dtype": "dtype",
    "batch_size": "batch_size", "compile": "compile", "date": "bench_date", "torch": "torch", "timm": "timm",
}
BACKBONE_KEYS = ("name", "family", "result")
COMPARISON_COLUMNS = {  # comparison frame column -> table header (.md/.tex/.html)
    "family": "family", "model": "model", "weights": "weights", "parameters": "parameters", "img_size": "img size",
    "top1": "top-1", "top5": "top-5", "params_m": "params (M)", "gmacs": "GMACs", "img_s": "img/s",
}


def _reject(bad, message: str) -> None:
    """Reject the input if there are bad items: a ReportError, `message` followed by each bad item once."""
    bad = list(dict.fromkeys(bad))
    if bad:
        raise ReportError(f"{message}: {', '.join(map(str, bad))}")


def read_result(path: Path, whose: str, keys: tuple[str, ...] = ("top1",)) -> dict:
    """A result file, which must have `keys`; ``whose`` names its owner in the error, e.g. "experiment 'deit_s'"."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{whose}: cannot read result file {path}: {e}") from None
    lacking = [k for k in keys if not isinstance(metrics, dict) or metrics.get(k) is None]
    if lacking:
        raise ReportError(f"{whose}: result file {path} has no {', '.join(map(repr, lacking))}")
    return metrics


def read_experiments(path: str | Path) -> dict:
    """The experiments file (YAML) as a mapping; unreadable, it is a `ReportError` naming it."""
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ReportError(f"experiments file {path}: cannot read it: {e}") from None


def load_results(experiments: str | Path, bench: str | Path | list, reference: str | Path) -> pd.DataFrame:
    """The long-format results frame: one row per (table, experiment), in the experiments file's order.

    experiments ⨝ metrics (top1, top5) ⨝ bench (gmacs, img_s, provenance) ⨝ reference (paper_*), with each
    row's speedup over its table's baseline (ours and the paper's) and the deltas ours − paper.
    An experiment in no table has one row with table NaN (it still appears in the figures). A bench measured at
    several precisions (its `dtype`s): img_s, speedup and the provenance are the first precision's (the figures
    and the paper comparison use it), and each other precision P adds img_s_P and speedup_P.
    """
    spec = read_experiments(experiments)
    if not isinstance(spec.get("experiments"), list) or not isinstance(spec.get("tables"), dict):
        raise ReportError(f"experiments file {experiments}: needs a `tables` mapping and an `experiments` list")
    exps = (pd.DataFrame(spec["experiments"]).reindex(columns=[*REQUIRED, "paper", "schedule"])
            .astype({"paper": object}))
    names = exps["name"].fillna(pd.Series([f"#{i + 1}" for i in exps.index]))
    lacking = exps[list(REQUIRED)].isna().set_axis(names).stack()
    _reject([f"{exp} lacks {key!r}" for exp, key in lacking[lacking].index], f"experiments file {experiments}")
    _reject(names[names.duplicated()], f"experiments file {experiments}: duplicate experiment names")
    _reject([f"{n} (method {m!r})" for n, m in zip(names, exps["method"]) if m not in METHODS],
           f"experiments file {experiments}: unknown methods (known: {', '.join(METHODS)})")
    _reject([f"{n} (params {sorted(p)}, method {m})" for n, m, p in zip(names, exps["method"], exps["params"])
            if not isinstance(p, dict) or set(p) != set(METHODS[m].params)],
           f"experiments file {experiments}: params that are not all of their method's")
    _reject([f"{n} (recipe {r!r})" for n, r in zip(names, exps["recipe"]) if r not in RECIPE_TRAINING],
           f"experiments file {experiments}: unknown recipes (known: {', '.join(RECIPE_TRAINING)})")
    exps["parameters"] = [describe_method(m, p) for m, p in zip(exps["method"], exps["params"])]
    exps["training"] = [training(r, m, sch) for r, m, sch in zip(exps["recipe"], exps["method"], exps["schedule"])]
    tables = pd.DataFrame.from_dict(spec["tables"], orient="index").reindex(columns=["title", "baseline"])
    tables = tables.rename_axis("table").reset_index()
    tables["title"] = tables["title"].fillna(tables["table"])
    bad = tables[~tables["baseline"].isin(names)]
    _reject(bad["table"] + " (baseline " + bad["baseline"].astype(str) + ")",
           "tables name an unknown baseline experiment")
    listed = exps.set_index("name")["tables"].explode().dropna()
    _reject([f"{exp} lists {t!r}" for exp, t in listed[~listed.isin(tables["table"])].items()],
           "experiments list unknown tables")
    _reject(tables["table"][~tables["table"].isin(listed)], "tables that no experiment lists")

    ref = pd.read_csv(reference)
    bad = exps[exps["paper"].notna() & ~exps["paper"].isin(ref["ref"])]
    _reject(bad["name"] + " (paper: " + bad["paper"].astype(str) + ")", f"unknown paper refs, not in {reference}")
    ref = ref[["ref", "top1", "top5", "gmacs", "img_s", "source"]].add_prefix("paper_")

    paths = exps["result"].map(Path)
    bad = exps[~paths.map(Path.is_file)]
    _reject(bad["name"] + ": " + bad["result"].astype(str), "missing result files")
    metrics = pd.DataFrame([read_result(p, f"experiment {n!r}") for p, n in zip(paths, exps["name"])]).reindex(
        columns=["top1", "top5", "dataset", "params"])

    runs, precisions = _bench(bench, exps["name"], "experiments")
    df = (exps.rename(columns={"name": "experiment"})
          .join(metrics[["top1", "top5"]]).assign(num_params=metrics["params"])
          .assign(dataset=spec.get("dataset") or ", ".join(metrics["dataset"].dropna().astype(str).unique()) or None)
          .merge(runs, on="experiment", how="left", validate="1:1")
          .merge(ref, left_on="paper", right_on="paper_ref", how="left", validate="m:1")
          .drop(columns="paper_ref"))
    bad = df[df["img_size"] != df["bench_img_size"]]
    _reject(bad["experiment"] + " (" + bad["img_size"].astype(str) + " vs " + bad["bench_img_size"].astype(str) + ")",
           "img_size differs between the experiments file and the bench CSV")
    by_experiment = df.set_index("experiment")
    df = (df.explode("tables").rename(columns={"tables": "table"})
          .merge(tables, on="table", how="left", validate="m:1").reset_index(drop=True))
    df["speedup"] = df["img_s"] / df["baseline"].map(by_experiment["img_s"])
    for p in precisions[1:]:
        df[f"speedup_{p}"] = df[f"img_s_{p}"] / df["baseline"].map(by_experiment[f"img_s_{p}"])
    df["paper_speedup"] = df["paper_img_s"] / df["baseline"].map(by_experiment["paper_img_s"])
    for m in ("top1", "gmacs", "speedup"):
        df[f"delta_{m}"] = df[m] - df[f"paper_{m}"]
    return df


def _bench(bench: str | Path | list, names, what: str) -> tuple[pd.DataFrame, list[str]]:
    """The bench CSVs' rows of `names` (their `label`; columns renamed by `BENCH_COLUMNS`): one per name at the first
    precision (`dtype`) of the CSVs, with img_s_P for each other precision P; and the precisions. A name not
    measured at every precision is a ReportError listing them as `what` (e.g. "experiments"); the CSVs' other rows
    are left out."""
    bench_paths = [bench] if isinstance(bench, (str, Path)) else list(bench)
    where = f"the bench CSV {', '.join(map(str, bench_paths))}"
    runs = pd.concat([pd.read_csv(p) for p in bench_paths], ignore_index=True)
    _reject(set(BENCH_COLUMNS) - set(runs.columns), f"bench CSV {', '.join(map(str, bench_paths))} lacks columns")
    runs = runs.reindex(columns=[*BENCH_COLUMNS, "cuda_graphs", "isolation"]).rename(columns=BENCH_COLUMNS)
    runs["cuda_graphs"] = runs["cuda_graphs"].astype(object).fillna(False).astype(bool)  # a CSV from before it
    runs["isolation"] = runs["isolation"].astype(object).fillna("not recorded")
    twice = runs[runs.duplicated(["experiment", "dtype"])]
    _reject(twice["experiment"] + " (" + twice["dtype"] + ")", "experiments measured twice in the bench CSVs")
    precisions = list(dict.fromkeys(runs["dtype"]))  # the first is the figures' and the paper comparison's
    measured = set(zip(runs["experiment"], runs["dtype"]))
    _reject([f"{n} ({p})" if len(precisions) > 1 else n for p in precisions for n in names if (n, p) not in measured],
           f"{what} missing from {where}")
    runs = runs[runs["experiment"].isin(names)]
    at = {p: runs[runs["dtype"] == p].set_index("experiment")["img_s"] for p in precisions[1:]}
    runs = runs[runs["dtype"] == precisions[0]]
    runs = runs.assign(**{f"img_s_{p}": runs["experiment"].map(s) for p, s in at.items()})
    runs["bench_date"] = (pd.to_datetime(runs["bench_date"], utc=True, format="ISO8601")
                          .dt.strftime("%Y-%m-%d %H:%M UTC"))
    return runs, precisions


def training(recipe: str, method: str, schedule) -> str:
    """How the weights were trained, e.g. ``fine-tuned``, and in the method's words its schedule when that is not
    its recipe's (``schedule``: the method's training keys, or missing)."""
    if not isinstance(schedule, dict) or not schedule:
        return RECIPE_TRAINING[recipe]
    return f"{RECIPE_TRAINING[recipe]}, {METHODS[method].schedule_words(schedule)}"


def load_comparison(spec: dict, results: pd.DataFrame, bench: str | Path | list) -> pd.DataFrame:
    """The comparison frame from the experiments file's `comparison` section (``spec``): the rows of its
    ``experiments`` (from the results frame), then one row per entry of its ``backbones`` ({name, family, result}):
    its result file (top1, top5, img_size, params: its timm pretrained weights evaluated off the shelf) joined with
    its bench rows (`label`: its name), which must be at the result's img_size. Columns: those of
    `COMPARISON_COLUMNS`, img_s_P per other precision P, the provenance, ``kind`` (experiment or backbone) and an
    experiment's ``method``, ``variant`` and ``main_size`` (`experiment_runs`). A family is an experiment's method
    label; a backbone's model is its timm name without its pretrained tag, which is its weights."""
    where = "experiments file: comparison"
    if not (isinstance(spec, dict) and isinstance(spec.get("experiments"), list)
            and isinstance(spec.get("backbones"), list) and all(isinstance(b, dict) for b in spec["backbones"])):
        raise ReportError(f"{where}: needs an `experiments` list and a `backbones` list of {{name, family, result}}")
    runs = experiment_runs(results).set_index("experiment", drop=False)
    _reject([n for n in spec["experiments"] if n not in runs.index], f"{where}: unknown experiments")
    _reject([n for i, n in enumerate(spec["experiments"]) if n in spec["experiments"][:i]],
           f"{where}: experiments listed twice")
    exps = runs.loc[spec["experiments"]].reset_index(drop=True)
    exps = exps.assign(kind="experiment", family=exps["method"].map(lambda m: METHODS[m].label),
                       model=exps["experiment"], weights=exps["training"])

    backbones = pd.DataFrame(spec["backbones"]).reindex(columns=list(BACKBONE_KEYS))
    names = backbones["name"].fillna(pd.Series([f"#{i + 1}" for i in backbones.index])).astype(str)
    lacking = backbones.isna().set_axis(names).stack()
    _reject([f"{n} lacks {key!r}" for n, key in lacking[lacking].index], f"{where}: backbones")
    _reject(names[names.duplicated()], f"{where}: backbones listed twice")
    found = pd.DataFrame([read_result(Path(r), f"comparison backbone {n!r}", ("top1", "img_size"))
                          for n, r in zip(names, backbones["result"])], index=backbones.index)
    measured, _ = _bench(bench, names, "comparison backbones")
    backbones = (backbones.join(found.reindex(columns=["top1", "top5", "img_size", "params"]))
                 .merge(measured, left_on="name", right_on="experiment", how="left", validate="1:1"))
    bad = backbones[backbones["img_size"] != backbones["bench_img_size"]]
    _reject(bad["name"] + " (result " + bad["img_size"].astype(str) + " px, bench "
           + bad["bench_img_size"].astype(str) + " px)", "comparison backbones benched at another img_size than "
           "their result's")
    model, _, tag = backbones["name"].str.partition(".").T.to_numpy()
    backbones = backbones.assign(kind="backbone", model=model, weights=pd.Series(tag).replace("", "timm default"),
                                 parameters="", num_params=backbones["params"])
    rows = pd.concat([exps.drop(columns="params"), backbones.drop(columns="params")], ignore_index=True)
    rows["params_m"] = rows["num_params"] / 1e6
    rows["dataset"] = dataset_name(results)
    speeds = [f"img_s_{p}" for p in precisions_of(results)[1:]]
    return rows[["kind", *COMPARISON_COLUMNS, *speeds, "method", "variant", "main_size", "dataset", *PROVENANCE,
                 "isolation"]]


def experiment_runs(results: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment, with its variant (colour) for the figures (`Method.variant_name`), the value of its
    method's per-pass parameter (`setting`: EViT's keep rate, ToMe's r; None for the baseline), and whether it is a
    table's baseline."""
    runs = results.drop_duplicates("experiment").copy()
    methods = runs["method"].map(METHODS)
    runs["variant"] = [m.variant_name(p) for m, p in zip(methods, runs["params"])]
    runs["setting"] = [p[m.override] if m.override else None for m, p in zip(methods, runs["params"])]
    runs["is_baseline"] = runs["experiment"].isin(results["baseline"])
    main_size = (runs.loc[runs["is_baseline"], "img_size"] if runs["is_baseline"].any() else runs["img_size"]).mode()[0]
    runs["main_size"] = runs["img_size"] == main_size
    other_size = (", " + runs["parameters"]).where(~runs["main_size"] & (runs["parameters"] != ""), "")
    runs["img size"] = runs["img_size"].astype(int).astype(str) + " px" + other_size  # the marker legend
    return runs


def dataset_name(results: pd.DataFrame) -> str:
    return results["dataset"].dropna().iloc[0] if results["dataset"].notna().any() else "dataset not given"
