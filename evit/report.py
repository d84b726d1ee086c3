"""The paper's tables and figures from the workflow's results (`evit report`).

    evit report --experiments results/tables/experiments.yaml --bench results/bench/throughput.csv [CSV ...] \\
        [--reference results/reference/paper.csv] [--out-dir results]

Writes `<out-dir>/tables/<table>.{md,csv,tex}` (one per table of the experiments file) and
`<out-dir>/figures/{accuracy_vs_throughput,keep_rate_sweep,frontier}.{png,pdf}`. Rows are labelled by method
and parameters (`evit.config.METHODS`) and by how the weights were trained (their recipe). The frontier figure
draws the rows of the table named `frontier` (top-1 against img/s, one line per method and training), or, if
there is none, every run at the baseline's image size. With a `comparison` section, the `comparison` table and
figure (the paper's Figure 4: top-1 against img/s of experiments beside other backbones' timm pretrained weights)
follow; without one (the demo: no pretrained weights offline), one line says they are skipped. Everything is built
in memory first, so bad input writes nothing.

The experiments file (YAML, written by the workflow's `experiments_file` rule):

    dataset: ImageNet-1k              # optional; else the metrics files' `dataset`, if they have one
    tables:                           # required: one entry per table, in output order
      main: {title: "EViT-DeiT-S keep-rate sweep (fused)", baseline: deit_s}   # title optional
    experiments:                      # required: rows of every table, in this order
      - name: evit_s_0.7              # required, unique; the `label` of its row in the bench CSV
        arch: deit_small_patch16_224  # optional, not used
        img_size: 224                 # required; must equal the bench CSV's img_size
        method: evit                  # required: a name in evit.config.METHODS (none, evit, tome, ...)
        params: {keep_rate: 0.7, fuse_token: true, drop_loc: [3, 6, 9]}  # required: all of its method's, {} for none
        recipe: finetune              # required: none (evaluated off the shelf), finetune, scratch or demo
        tables: [main]                # required (may be empty): tables this experiment is a row of
        paper: evit_deit_small_0.7_fused  # optional: a `ref` of the reference CSV, or null
        schedule: {shrink_start: 0, shrink_epochs: 0}  # optional: the keep-rate schedule, when not the recipe's
        result: results/runs/deit_s/metrics.json  # required: JSON with top1 (and top5), in percent;
                                                  # relative paths are relative to the current directory
    masking:                          # optional: the `masking` table (the paper's Table 1), see `masking_table`
      result: results/masking/masking.json  # the masking job's result (evit/masking.py)
      experiment: deit_s              # whose weights were masked
      paper: {none: 79.8}             # the paper's top-1 per way (none, background, object, random), if given
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

import argparse
import html
import io
import json
import re
import sys
from pathlib import Path

import pandas as pd
import seaborn as sns
import yaml
from matplotlib.figure import Figure  # no pyplot: figures render with the Agg canvas, no global state

from evit.methods import METHODS, describe_method
from evit.errors import ReportError
from evit.layout import COMPARISON_FIGURE, COMPARISON_TABLE, MASKING_TABLE
from evit.layout import REPORT_FIGURES as FIGURES

REQUIRED = ("name", "img_size", "method", "params", "recipe", "tables", "result")
TRAINING = {"none": "off the shelf", "finetune": "fine-tuned", "scratch": "from scratch", "demo": "from scratch"}
FRONTIER = "frontier"  # the table whose rows the frontier figure draws
BENCH_COLUMNS = {  # bench CSV column -> results frame column
    "label": "experiment", "img_size": "bench_img_size", "gmacs": "gmacs", "img_s": "img_s",
    "img_s_q1": "img_s_q1", "img_s_q3": "img_s_q3", "device": "device", "threads": "threads", "dtype": "dtype",
    "batch_size": "batch_size", "compile": "compile", "date": "bench_date", "torch": "torch", "timm": "timm",
}
SETUP = ["device", "threads", "dtype", "batch_size", "compile", "cuda_graphs"]  # how the throughput was measured
PROVENANCE = [*SETUP, "bench_date", "torch", "timm"]
ISOLATION = {  # the bench CSV's `isolation` (evit.benchmark.isolation) -> the tables' note
    "exclusive node": "ran alone on an exclusive SLURM node", "after the runs": "ran after every run on its machine",
    "shared": "may have shared its machine with other jobs", "not recorded": "did not record whether it ran alone",
}
TABLE_COLUMNS = {  # results frame column -> table header (.md/.tex; the .csv keeps the frame's names)
    "experiment": "experiment", "method": "method", "parameters": "parameters", "training": "training",
    "img_size": "img size",
    "top1": "top-1", "top5": "top-5", "gmacs": "GMACs", "img_s": "img/s", "speedup": "speedup",
    "paper_top1": "paper top-1", "delta_top1": "Δ top-1", "paper_gmacs": "paper GMACs", "delta_gmacs": "Δ GMACs",
    "paper_img_s": "paper img/s", "paper_speedup": "paper speedup", "delta_speedup": "Δ speedup",
}
TEXT_COLUMNS = ("experiment", "method", "parameters", "training")  # left-aligned; the numbers are right-aligned
FORMATS = {
    "method": lambda m: METHODS[m].label, "img_size": "{:.0f}".format,
    "top1": "{:.2f}".format, "top5": "{:.2f}".format, "gmacs": "{:.3g}".format, "img_s": "{:.1f}".format,
    "speedup": "{:.2f}".format, "paper_top1": "{:.1f}".format, "delta_top1": lambda v: f"{round(v, 2) + 0:+.2f}",
    "paper_gmacs": "{:.1f}".format, "delta_gmacs": lambda v: f"{round(v, 2) + 0:+.2f}", "paper_img_s": "{:.0f}".format,
    "paper_speedup": "{:.2f}".format, "delta_speedup": lambda v: f"{round(v, 2) + 0:+.2f}",
}
_HTML_STYLE = [
    {"selector": "", "props": "border-collapse: collapse; font: 14px sans-serif"},
    {"selector": "caption", "props": "caption-side: top; text-align: left; padding-bottom: 8px"},
    {"selector": "th, td", "props": "padding: 3px 10px; text-align: right; white-space: nowrap;"
                                    " border-bottom: 1px solid #ddd"},
    {"selector": "th", "props": "border-bottom: 2px solid #444"},
]
_LATEX = str.maketrans({c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}", "^": r"\^{}",
                                                          "\\": r"\textbackslash{}"})


def _check(bad, message: str) -> None:
    """Raise `message` followed by the bad items, if there are any."""
    bad = list(dict.fromkeys(bad))
    if bad:
        raise ReportError(f"{message}: {', '.join(map(str, bad))}")


def _read_json(path: Path, whose: str, keys: tuple[str, ...] = ("top1",)) -> dict:
    """A result file, which must have `keys`; ``whose`` names its owner in the error, e.g. "experiment 'deit_s'"."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{whose}: cannot read result file {path}: {e}") from None
    lacking = [k for k in keys if not isinstance(metrics, dict) or metrics.get(k) is None]
    if lacking:
        raise ReportError(f"{whose}: result file {path} has no {', '.join(map(repr, lacking))}")
    return metrics


def load_results(experiments: str | Path, bench: str | Path | list, reference: str | Path) -> pd.DataFrame:
    """The long-format results frame: one row per (table, experiment), in the experiments file's order.

    experiments ⨝ metrics (top1, top5) ⨝ bench (gmacs, img_s, provenance) ⨝ reference (paper_*), with each
    row's speedup over its table's baseline (ours and the paper's) and the deltas ours − paper.
    An experiment in no table has one row with table NaN (it still appears in the figures). A bench measured at
    several precisions (its `dtype`s): img_s, speedup and the provenance are the first precision's (the figures
    and the paper comparison use it), and each other precision P adds img_s_P and speedup_P.
    """
    spec = yaml.safe_load(Path(experiments).read_text()) or {}
    if not isinstance(spec.get("experiments"), list) or not isinstance(spec.get("tables"), dict):
        raise ReportError(f"experiments file {experiments}: needs a `tables` mapping and an `experiments` list")
    exps = (pd.DataFrame(spec["experiments"]).reindex(columns=[*REQUIRED, "paper", "schedule"])
            .astype({"paper": object}))
    names = exps["name"].fillna(pd.Series([f"#{i + 1}" for i in exps.index]))
    lacking = exps[list(REQUIRED)].isna().set_axis(names).stack()
    _check([f"{exp} lacks {key!r}" for exp, key in lacking[lacking].index], f"experiments file {experiments}")
    _check(names[names.duplicated()], f"experiments file {experiments}: duplicate experiment names")
    _check([f"{n} (method {m!r})" for n, m in zip(names, exps["method"]) if m not in METHODS],
           f"experiments file {experiments}: unknown methods (known: {', '.join(METHODS)})")
    _check([f"{n} (params {sorted(p)}, method {m})" for n, m, p in zip(names, exps["method"], exps["params"])
            if not isinstance(p, dict) or set(p) != set(METHODS[m].params)],
           f"experiments file {experiments}: params that are not all of their method's")
    _check([f"{n} (recipe {r!r})" for n, r in zip(names, exps["recipe"]) if r not in TRAINING],
           f"experiments file {experiments}: unknown recipes (known: {', '.join(TRAINING)})")
    exps["parameters"] = [describe_method(m, p) for m, p in zip(exps["method"], exps["params"])]
    exps["training"] = [training(r, sch) for r, sch in zip(exps["recipe"], exps["schedule"])]
    tables = pd.DataFrame.from_dict(spec["tables"], orient="index").reindex(columns=["title", "baseline"])
    tables = tables.rename_axis("table").reset_index()
    tables["title"] = tables["title"].fillna(tables["table"])
    bad = tables[~tables["baseline"].isin(names)]
    _check(bad["table"] + " (baseline " + bad["baseline"].astype(str) + ")",
           "tables name an unknown baseline experiment")
    listed = exps.set_index("name")["tables"].explode().dropna()
    _check([f"{exp} lists {t!r}" for exp, t in listed[~listed.isin(tables["table"])].items()],
           "experiments list unknown tables")
    _check(tables["table"][~tables["table"].isin(listed)], "tables that no experiment lists")

    ref = pd.read_csv(reference)
    bad = exps[exps["paper"].notna() & ~exps["paper"].isin(ref["ref"])]
    _check(bad["name"] + " (paper: " + bad["paper"].astype(str) + ")", f"unknown paper refs, not in {reference}")
    ref = ref[["ref", "top1", "top5", "gmacs", "img_s", "source"]].add_prefix("paper_")

    paths = exps["result"].map(Path)
    bad = exps[~paths.map(Path.is_file)]
    _check(bad["name"] + ": " + bad["result"].astype(str), "missing result files")
    metrics = pd.DataFrame([_read_json(p, f"experiment {n!r}") for p, n in zip(paths, exps["name"])]).reindex(
        columns=["top1", "top5", "dataset", "params"])

    runs, precisions = _bench(bench, exps["name"], "experiments")
    df = (exps.rename(columns={"name": "experiment"})
          .join(metrics[["top1", "top5"]]).assign(num_params=metrics["params"])
          .assign(dataset=spec.get("dataset") or ", ".join(metrics["dataset"].dropna().astype(str).unique()) or None)
          .merge(runs, on="experiment", how="left", validate="1:1")
          .merge(ref, left_on="paper", right_on="paper_ref", how="left", validate="m:1")
          .drop(columns="paper_ref"))
    bad = df[df["img_size"] != df["bench_img_size"]]
    _check(bad["experiment"] + " (" + bad["img_size"].astype(str) + " vs " + bad["bench_img_size"].astype(str) + ")",
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
    _check(set(BENCH_COLUMNS) - set(runs.columns), f"bench CSV {', '.join(map(str, bench_paths))} lacks columns")
    runs = runs.reindex(columns=[*BENCH_COLUMNS, "cuda_graphs", "isolation"]).rename(columns=BENCH_COLUMNS)
    runs["cuda_graphs"] = runs["cuda_graphs"].astype(object).fillna(False).astype(bool)  # a CSV from before it
    runs["isolation"] = runs["isolation"].astype(object).fillna("not recorded")
    twice = runs[runs.duplicated(["experiment", "dtype"])]
    _check(twice["experiment"] + " (" + twice["dtype"] + ")", "experiments measured twice in the bench CSVs")
    precisions = list(dict.fromkeys(runs["dtype"]))  # the first is the figures' and the paper comparison's
    measured = set(zip(runs["experiment"], runs["dtype"]))
    _check([f"{n} ({p})" if len(precisions) > 1 else n for p in precisions for n in names if (n, p) not in measured],
           f"{what} missing from {where}")
    runs = runs[runs["experiment"].isin(names)]
    at = {p: runs[runs["dtype"] == p].set_index("experiment")["img_s"] for p in precisions[1:]}
    runs = runs[runs["dtype"] == precisions[0]]
    runs = runs.assign(**{f"img_s_{p}": runs["experiment"].map(s) for p, s in at.items()})
    runs["bench_date"] = (pd.to_datetime(runs["bench_date"], utc=True, format="ISO8601")
                          .dt.strftime("%Y-%m-%d %H:%M UTC"))
    return runs, precisions


def training(recipe: str, schedule) -> str:
    """How the weights were trained, e.g. ``fine-tuned``, and the keep-rate schedule when it is not its recipe's
    (``schedule``: {shrink_start, shrink_epochs}, or missing)."""
    if not isinstance(schedule, dict):
        return TRAINING[recipe]
    start, epochs = schedule["shrink_start"], schedule["shrink_epochs"]
    if start == epochs == 0:
        return f"{TRAINING[recipe]}, no keep-rate warmup"
    return f"{TRAINING[recipe]}, keep rate 1 for {start:g} ep, cosine over {epochs:g} ep"


def _precisions(rows: pd.DataFrame) -> list[str]:
    """The precisions the throughput was measured at: the first one's (`dtype`), then those of img_s_P."""
    return [rows["dtype"].iloc[0], *(c.removeprefix("img_s_") for c in rows.columns
                                     if c.startswith("img_s_") and c not in ("img_s_q1", "img_s_q3"))]


def _hardware(r) -> str:
    compiled = ", torch.compile with CUDA graphs" if r.cuda_graphs else ", torch.compile" if r.compile else ""
    return f"{r.device} ({r.threads} threads), {r.dtype}, batch {r.batch_size}{compiled}"


def provenance(rows: pd.DataFrame, full: bool = True) -> str:
    """Where (and, if `full`, when and with which torch/timm) the throughput was measured, per distinct setup."""
    setups = rows[PROVENANCE if full else SETUP].drop_duplicates()
    return "; ".join(_hardware(r) + (f", measured {r.bench_date}, torch {r.torch}, timm {r.timm}" if full else "")
                     for r in setups.itertuples())


def make_table(results: pd.DataFrame, table: str) -> dict[str, str]:
    """One table of the results frame as {"md": ..., "csv": ..., "tex": ..., "html": ...} (the html page is what
    Snakemake's report shows); unknown values are blank."""
    rows = results[results["table"] == table]
    title, baseline, dataset = rows[["title", "baseline", "dataset"]].iloc[0]
    first, *others = _precisions(rows)
    columns, headers, formats = list(TABLE_COLUMNS), dict(TABLE_COLUMNS), dict(FORMATS)
    if others:  # img/s and speedup at each precision, each labelled
        after = columns.index("speedup") + 1
        columns[after:after] = [f"{m}_{p}" for p in others for m in ("img_s", "speedup")]
        for p, suffix in ((first, ""), *((p, f"_{p}") for p in others)):
            headers |= {f"img_s{suffix}": f"img/s ({p})", f"speedup{suffix}": f"speedup ({p})"}
            formats |= {f"img_s{suffix}": FORMATS["img_s"], f"speedup{suffix}": FORMATS["speedup"]}
    data = rows[columns]
    data = data.loc[:, ~(data.columns.str.startswith(("paper_", "delta_")) & data.isna().all().to_numpy())]
    shown = data.apply(lambda col: col.map(formats.get(col.name, str), na_action="ignore").astype("string").fillna(""))
    shown = shown.rename(columns=headers)
    align = "".join("l" if c in TEXT_COLUMNS else "r" for c in data.columns)
    sources = ", ".join(rows["paper_source"].dropna().unique()) or "none"
    caption = f"{title}" + (f"; top-1/top-5 on {dataset}" if dataset else "") + "."
    notes = f"Throughput: {provenance(rows)}" + "".join(f"; also {p}, the same way" for p in others)
    notes += f"; the bench {ISOLATION[rows['isolation'].iloc[0]]}. Speedup: img/s over {baseline}"
    notes += f", at each precision (Δ speedup: at {first})." if others and "paper_speedup" in data else "."
    if "paper_speedup" in data:
        notes += f" Paper speedup: the paper's img/s over its {baseline} img/s, blank where the paper gives none."
    if data.columns.str.startswith("paper_").any():
        notes += f" Δ = ours - paper. Paper: {sources}."
    csv = rows[[*columns, "baseline", "dataset", *PROVENANCE, "isolation"]].to_csv(index=False, float_format="%.8g")
    return {**_render_table(shown, align, caption, notes, table), "csv": csv}


def _render_table(shown: pd.DataFrame, align: str, caption: str, notes: str, table: str) -> dict[str, str]:
    """A table's formatted cells as {"md", "tex", "html"}: the caption and notes above; ``align`` per column l/r."""
    md = (f"**{caption}**\n\n"
          + shown.to_markdown(index=False, disable_numparse=True,
                              colalign=[{"l": "left", "r": "right"}[a] for a in align])
          + f"\n\n*{notes}*\n")
    tex = (shown.rename(columns=lambda c: c.replace("Δ", r"$\Delta$")).style.hide(axis="index")
           .format(escape="latex").format_index(escape="latex-math", axis=1)
           .to_latex(hrules=True, column_format=align, position_float="centering",
                     label=f"tab:{table}", caption=f"{caption} {notes}".translate(_LATEX).replace("Δ", r"$\Delta$")))
    left = [{"selector": f".col{i}", "props": "text-align: left"} for i, a in enumerate(align) if a == "l"]
    page = (shown.style.hide(axis="index").format(escape="html").format_index(escape="html", axis=1)
            .set_caption(f"<strong>{html.escape(caption)}</strong><br><em>{html.escape(notes)}</em>")
            .set_table_styles(_HTML_STYLE + left).to_html(doctype_html=True))
    return {"md": md, "tex": tex, "html": page}


MASKING_WAYS = {"none": "nothing", "background": "background", "object": "object", "random": "random"}


def masking_table(spec: dict, dataset: str | None) -> dict[str, str]:
    """The `masking` table (the paper's Table 1) from the masking job's result: top-1 per way masked, with the
    tokens dropped and with the pixels zeroed, beside the paper's (``spec["paper"]``: way -> top-1)."""
    result = _read_json(Path(spec["result"]), f"experiment {spec['experiment']!r}")
    paper = spec.get("paper") or {}
    frame = pd.DataFrame({
        "masked": list(MASKING_WAYS.values()),
        "share": [0.0] + [100 * result["masked_share"]] * 3,
        "top1_drop": [result["top1"]["none"]] + [result["top1"][f"{w}_drop"] for w in list(MASKING_WAYS)[1:]],
        "top1_zero": [result["top1"]["none"]] + [result["top1"][f"{w}_zero"] for w in list(MASKING_WAYS)[1:]],
        "paper_top1": [paper.get(w) for w in MASKING_WAYS],
    })
    headers = {"masked": "patches masked", "share": "share masked (%)", "top1_drop": "top-1, tokens dropped",
               "top1_zero": "top-1, pixels zeroed", "paper_top1": "paper top-1"}
    formats = {"masked": str, "share": "{:.1f}".format, "top1_drop": "{:.2f}".format, "top1_zero": "{:.2f}".format,
               "paper_top1": "{:.1f}".format}
    shown = frame.loc[:, frame.notna().any().to_numpy()]
    shown = shown.apply(lambda col: col.map(formats[col.name], na_action="ignore").astype("string").fillna(""))
    shown = shown.rename(columns=headers)
    caption = (f"Masking patches of {spec['experiment']}'s input (the paper's Table 1): top-1 on "
               f"{dataset or 'the validation set'}, {result['num_images']} images.")
    notes = (f"Each image loses the same number of its {result['num_patches']} patches in every way: "
             f"round({result['share']:g} x {result['num_patches']}), at most its object's and its background's "
             f"patch count (object: patch centre in a box; boxes: {result['boxes']}). Tokens dropped: the masked "
             "patches leave the token sequence; pixels zeroed: they are set to the dataset's mean colour."
             + (" Paper: EViT (Liang et al., ICLR 2022), Table 1." if paper else ""))
    csv = frame.assign(experiment=spec["experiment"], num_images=result["num_images"]).to_csv(
        index=False, float_format="%.8g")
    return {**_render_table(shown, "l" + "r" * (shown.shape[1] - 1), caption, notes, "masking"), "csv": csv}


BACKBONE_KEYS = ("name", "family", "result")
COMPARISON_COLUMNS = {  # comparison frame column -> table header (.md/.tex/.html)
    "family": "family", "model": "model", "weights": "weights", "parameters": "parameters", "img_size": "img size",
    "top1": "top-1", "top5": "top-5", "params_m": "params (M)", "gmacs": "GMACs", "img_s": "img/s",
}


def load_comparison(spec: dict, results: pd.DataFrame, bench: str | Path | list) -> pd.DataFrame:
    """The comparison frame from the experiments file's `comparison` section (``spec``): the rows of its
    ``experiments`` (from the results frame), then one row per entry of its ``backbones`` ({name, family, result}):
    its result file (top1, top5, img_size, params: its timm pretrained weights evaluated off the shelf) joined with
    its bench rows (`label`: its name), which must be at the result's img_size. Columns: those of
    `COMPARISON_COLUMNS`, img_s_P per other precision P, the provenance, ``kind`` (experiment or backbone) and an
    experiment's ``method``, ``variant`` and ``main_size`` (`_runs`). A family is an experiment's method label; a
    backbone's model is its timm name without its pretrained tag, which is its weights."""
    where = "experiments file: comparison"
    if not (isinstance(spec, dict) and isinstance(spec.get("experiments"), list)
            and isinstance(spec.get("backbones"), list) and all(isinstance(b, dict) for b in spec["backbones"])):
        raise ReportError(f"{where}: needs an `experiments` list and a `backbones` list of {{name, family, result}}")
    runs = _runs(results).set_index("experiment", drop=False)
    _check([n for n in spec["experiments"] if n not in runs.index], f"{where}: unknown experiments")
    _check([n for i, n in enumerate(spec["experiments"]) if n in spec["experiments"][:i]],
           f"{where}: experiments listed twice")
    exps = runs.loc[spec["experiments"]].reset_index(drop=True)
    exps = exps.assign(kind="experiment", family=exps["method"].map(lambda m: METHODS[m].label),
                       model=exps["experiment"], weights=exps["training"])

    backbones = pd.DataFrame(spec["backbones"]).reindex(columns=list(BACKBONE_KEYS))
    names = backbones["name"].fillna(pd.Series([f"#{i + 1}" for i in backbones.index])).astype(str)
    lacking = backbones.isna().set_axis(names).stack()
    _check([f"{n} lacks {key!r}" for n, key in lacking[lacking].index], f"{where}: backbones")
    _check(names[names.duplicated()], f"{where}: backbones listed twice")
    found = pd.DataFrame([_read_json(Path(r), f"comparison backbone {n!r}", ("top1", "img_size"))
                          for n, r in zip(names, backbones["result"])], index=backbones.index)
    measured, _ = _bench(bench, names, "comparison backbones")
    backbones = (backbones.join(found.reindex(columns=["top1", "top5", "img_size", "params"]))
                 .merge(measured, left_on="name", right_on="experiment", how="left", validate="1:1"))
    bad = backbones[backbones["img_size"] != backbones["bench_img_size"]]
    _check(bad["name"] + " (result " + bad["img_size"].astype(str) + " px, bench "
           + bad["bench_img_size"].astype(str) + " px)", "comparison backbones benched at another img_size than "
           "their result's")
    model, _, tag = backbones["name"].str.partition(".").T.to_numpy()
    backbones = backbones.assign(kind="backbone", model=model, weights=pd.Series(tag).replace("", "timm default"),
                                 parameters="", num_params=backbones["params"])
    rows = pd.concat([exps.drop(columns="params"), backbones.drop(columns="params")], ignore_index=True)
    rows["params_m"] = rows["num_params"] / 1e6
    rows["dataset"] = _data_name(results)
    speeds = [f"img_s_{p}" for p in _precisions(results)[1:]]
    return rows[["kind", *COMPARISON_COLUMNS, *speeds, "method", "variant", "main_size", "dataset", *PROVENANCE,
                 "isolation"]]


def comparison_table(rows: pd.DataFrame) -> dict[str, str]:
    """The `comparison` table of the comparison frame (`load_comparison`) as {"md", "csv", "tex", "html"}: the
    experiments, then the backbones, with img/s at each precision, each labelled."""
    first, *others = _precisions(rows)
    columns = [*COMPARISON_COLUMNS, *(f"img_s_{p}" for p in others)]
    headers = {**COMPARISON_COLUMNS, **({"img_s": f"img/s ({first})"} if others else {}),
               **{f"img_s_{p}": f"img/s ({p})" for p in others}}
    formats = {**FORMATS, "params_m": "{:.1f}".format, **{f"img_s_{p}": FORMATS["img_s"] for p in others}}
    shown = rows[columns].apply(lambda col: col.map(formats.get(col.name, str), na_action="ignore")
                                .astype("string").fillna(""))
    shown = shown.rename(columns=headers)
    align = "".join("l" if c in ("family", "model", "weights", "parameters") else "r" for c in columns)
    dataset = rows["dataset"].iloc[0]
    caption = f"EViT beside other backbones (the paper's Figure 4): top-1/top-5 on {dataset}."
    notes = f"Throughput: {provenance(rows)}" + "".join(f"; also {p}, the same way" for p in others)
    notes += (f"; the bench {ISOLATION[rows['isolation'].iloc[0]]}. The backbones: their "
              "timm pretrained weights (weights: the pretrained tag) evaluated off the shelf with each one's own "
              "pretrained data config (resize, crop, mean and std) at the input size it was benched at (img size); "
              "the experiments: their own weights. GMACs: the bench's count per image.")
    csv = rows[["kind", *columns, "dataset", *PROVENANCE, "isolation"]].to_csv(index=False, float_format="%.8g")
    return {**_render_table(shown, align, caption, notes, COMPARISON_TABLE), "csv": csv}


def _runs(results: pd.DataFrame) -> pd.DataFrame:
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


def _colours(variants) -> tuple[list[str], dict[str, str]]:
    """The figures' hue order and palette for these variants: every method's variants in `METHODS` order take the
    colours in turn (the baseline grey, then tab10's), so a variant has the same colour in every figure."""
    known = [v for m in METHODS.values() for v in m.variant_names()]
    colours = dict(zip(known, ["0.2", *sns.color_palette("tab10").as_hex()]))
    present = set(variants)
    order = [v for v in known if v in present]
    return order, {v: colours[v] for v in order}


# Where a label may sit around its point (points): rings of 8 directions, nearest first.
LABEL_OFFSETS = [(round(r * dx), round(r * dy)) for r in (7, 16, 28, 42)
                 for dx, dy in ((1, 0.6), (1, -0.9), (-1, 0.6), (-1, -0.9), (0.3, 1.2), (0.3, -1.6), (-0.3, 1.2),
                                (-0.3, -1.6))]


def place_labels(ax, points: list[tuple[float, float, str]], fontsize: int = 8) -> list:
    """Annotate each (x, y, text) point where its label overlaps no other label and no point, inside the axes: the
    first clear place of `LABEL_OFFSETS` (a crowded point keeps the farthest one, with a line to it). Call it last:
    it settles the figure's layout and limits first, since constrained layout moves the axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    fig = ax.figure
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [Bbox.from_bounds(px - 5, py - 5, 10, 10) for px, py in ax.transData.transform([p[:2] for p in points])]
    labels = []
    for x, y, text in points:
        for i, (dx, dy) in enumerate(LABEL_OFFSETS):
            last = i == len(LABEL_OFFSETS) - 1
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                                ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top",
                                arrowprops=dict(arrowstyle="-", color="0.5", lw=0.6) if abs(dy) > 20 else None)
            label.set_in_layout(False)
            box = label.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if last or (inside and not any(box.overlaps(t) for t in taken)):
                break
            label.remove()
        taken.append(box)
        labels.append(label)
    return labels


def _data_name(results: pd.DataFrame) -> str:
    return results["dataset"].dropna().iloc[0] if results["dataset"].notna().any() else "dataset not given"


def plot_accuracy_vs_throughput(results: pd.DataFrame) -> Figure:
    """Top-1 against median img/s (bars: interquartile range), coloured by variant (method, and e.g. EViT's fusion),
    labelled by parameters."""
    runs = _runs(results)
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    ax.errorbar(runs["img_s"], runs["top1"], xerr=[runs["img_s"] - runs["img_s_q1"], runs["img_s_q3"] - runs["img_s"]],
                fmt="none", ecolor="0.6", elinewidth=1, zorder=1)
    order, palette = _colours(runs["variant"])
    sns.scatterplot(data=runs, x="img_s", y="top1", hue="variant", style="img size", s=90, zorder=3, ax=ax,
                    palette=palette, hue_order=order)
    base = runs[runs["is_baseline"]]
    ax.scatter(base["img_s"], base["top1"], s=380, facecolors="none", edgecolors="black", linewidths=1.5,
               zorder=2, label="baseline")
    # label by parameters, on the side away from the run's partners of its method at the same setting (they sit
    # close together); runs at other image sizes are named by the marker legend
    labelled = runs[runs["main_size"] | runs["is_baseline"]]
    fastest = labelled.groupby(["method", "setting"], dropna=False)["img_s"].transform("max")
    labelled = labelled.assign(left=labelled["img_s"] < fastest)
    for r in labelled.itertuples():
        text = f"{r.experiment} (baseline)" if r.is_baseline else r.parameters
        left = r.left and not r.is_baseline
        ax.annotate(text, (r.img_s, r.top1), xytext=(-9 if left else 9, 9 if r.is_baseline else 0),
                    textcoords="offset points", ha="right" if left else "left", va="center", fontsize=8)
    ax.margins(x=0.12, y=0.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.set(xlabel="throughput (img/s, median over rounds; bars: interquartile range)",
           ylabel="top-1 accuracy (%)", title=f"Top-1 vs throughput, labelled by parameters: {_data_name(results)}\n"
                                               f"measured on {provenance(runs, full=False)}")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    return fig


def plot_keep_rate_sweep(results: pd.DataFrame) -> Figure:
    """Top-1 and GMACs of the trained runs against their method's per-pass parameter (EViT's keep rate, ToMe's r)
    at the baseline's image size: one row per method, one line per variant (EViT: fused or not; the paper dashed),
    each from the baseline (at the parameter's default, which leaves the backbone unchanged). Runs evaluated off
    the shelf, and ablations (another parameter off its default, or another schedule), are left out."""
    runs = _runs(results)
    main = runs[runs["main_size"]]
    baseline = main[main["is_baseline"]]
    # the sweep's runs: trained on their recipe's schedule, with every parameter but the swept one and the variant's
    # at its default (not an ablation's rows)
    plain = pd.Series([all(v == m.params[k].default for k, v in p.items() if k != m.override and k not in m.variant)
                       for m, p in zip(main["method"].map(METHODS), main["params"])], index=main.index)
    trained = main[plain & ~main["is_baseline"] & (main["recipe"] != "none") & main["setting"].notna()
                   & main["schedule"].isna()]
    methods = [name for name in METHODS if (trained["method"] == name).any()]
    img_size = main["img_size"].iloc[0]
    dataset = _data_name(results)
    imagenet = results["dataset"].isna().all() or "imagenet" in dataset.lower()  # else the paper is not comparable
    fig = Figure(figsize=(10, 4.5 * max(len(methods), 1)), layout="constrained")
    axes = fig.subplots(max(len(methods), 1), 2, squeeze=False)
    for row, name in zip(axes, methods or [None]):
        method = METHODS[name] if name else None
        swept = trained[trained["method"] == name]
        variants = swept["variant"].unique() if len(swept) else baseline["variant"].unique()
        start = baseline.assign(setting=method.params[method.override].default if method else 1.0)
        sweep = pd.concat([swept, *(start.assign(variant=v) for v in variants)]).astype({"setting": float})
        paper = [sweep.assign(source="paper", top1=sweep["paper_top1"], gmacs=sweep["paper_gmacs"])] if imagenet else []
        long = (pd.concat([sweep.assign(source="ours"), *paper])
                .melt(id_vars=["setting", "variant", "source"], value_vars=["top1", "gmacs"], var_name="metric")
                .dropna(subset="value"))
        order, palette = _colours(long["variant"])
        for ax, (metric, label) in zip(row, [("top1", "top-1 accuracy (%)"), ("gmacs", "GMACs per image")]):
            sns.lineplot(data=long[long["metric"] == metric], x="setting", y="value", hue="variant", style="source",
                         palette=palette, hue_order=order,
                         style_order=[s for s in ("ours", "paper") if s in set(long["source"])],
                         markers=True, markersize=8, ax=ax, legend=ax is row[1])
            ax.set(xlabel=f"{method.label}: {method.override}" if method else "", ylabel=label)
            ax.grid(alpha=0.3)
        row[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    note = "" if imagenet else " (the paper's ImageNet numbers are not plotted)"
    fig.suptitle(f"Each method's sweep of its per-pass parameter at {img_size} px: {dataset}{note}\n"
                 "GMACs: analytic count, attention included", fontsize=10)
    return fig


def plot_frontier(results: pd.DataFrame) -> Figure:
    """Top-1 against median img/s of the `frontier` table's rows (else of every run at the baseline's image size):
    one line per variant (method, and e.g. EViT's fusion) and training, points labelled by parameters, the baseline
    marked."""
    runs = _runs(results)
    in_table = runs["experiment"].isin(results.loc[results["table"] == FRONTIER, "experiment"])
    rows = runs[in_table] if in_table.any() else runs[runs["main_size"]]
    base, lines = rows[rows["is_baseline"]], rows[~rows["is_baseline"]].sort_values("img_s")
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    order, palette = _colours(lines["variant"])
    trainings = list(dict.fromkeys([t for t in TRAINING.values() if t in set(lines["training"])]
                                   + sorted(set(lines["training"]))))
    sns.lineplot(data=lines, x="img_s", y="top1", hue="variant", style="training", hue_order=order, palette=palette,
                 style_order=trainings, estimator=None, sort=True, markers=True, markersize=8, ax=ax)
    ax.scatter(base["img_s"], base["top1"], s=260, marker="*", color="black", zorder=3, label="baseline")
    ax.margins(x=0.12, y=0.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    rows_are = ("the frontier table's runs" if in_table.any()
                else f"every run at {rows['img_size'].iloc[0]} px (no `{FRONTIER}` table)")
    ax.set(xlabel="throughput (img/s, median over rounds)", ylabel="top-1 accuracy (%)",
           title=f"Accuracy-speed frontier, {rows_are}: {_data_name(results)}\n"
                 f"measured on {provenance(rows, full=False)}")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    place_labels(ax, [(r.img_s, r.top1, f"{r.experiment} (baseline)" if r.is_baseline else r.parameters)
                      for r in pd.concat([base, lines]).itertuples()])
    return fig


BACKBONE_MARKERS = "osD^vP<>Xphd"  # one per family of the comparison figure's backbones, in turn (not the baseline's *)


def short_name(model: str) -> str:
    """A timm model name as the comparison figure labels it: without its patch and window sizes, nor a 224 px
    input size (``swin_tiny_patch4_window7_224`` -> ``swin_tiny``; ``deit_base_patch16_384`` -> ``deit_base_384``)."""
    return re.sub(r"_(patch|window)\d+|_224$", "", model)


def plot_comparison(rows: pd.DataFrame) -> Figure:
    """The paper's Figure 4: top-1 against median img/s (log scale, the first precision) of the comparison frame
    (`load_comparison`): the backbones as points, a colour and marker per family; the experiments in their variant's
    colour (`_colours`), those at the baseline's image size as a line (EViT's keep-rate sweep), those at another as
    squares; the baseline a star. Every point is labelled (a backbone by `short_name`, an experiment by its
    parameters, and its image size if not the baseline's) where no label hides another."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    exps, backbones = rows[rows["kind"] == "experiment"], rows[rows["kind"] == "backbone"]
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    ax = fig.subplots()
    families = list(dict.fromkeys(backbones["family"]))
    hues = sns.color_palette("husl", len(families))
    for family, colour, marker in zip(families, hues[::2] + hues[1::2],  # neighbours in the legend: hues apart
                                      BACKBONE_MARKERS * (len(families) // len(BACKBONE_MARKERS) + 1)):
        points = backbones[backbones["family"] == family]
        ax.scatter(points["img_s"], points["top1"], s=45, color=colour, marker=marker, zorder=3, label=family)
    trained = exps[exps["method"] != "none"]
    order, palette = _colours(trained["variant"])
    for variant in order:
        points = trained[trained["variant"] == variant].sort_values("img_s")
        at_main = points["main_size"].astype(bool)
        sweep, other = points[at_main], points[~at_main]
        if len(sweep):
            ax.plot(sweep["img_s"], sweep["top1"], color=palette[variant], marker="o", markersize=8, zorder=4,
                    linewidth=2 if len(sweep) > 1 else 0, markeredgecolor="black", label=variant)
        if len(other):
            ax.scatter(other["img_s"], other["top1"], s=70, marker="s", color=palette[variant], edgecolors="black",
                       zorder=4, label=f"{variant}, another input size")
    base = exps[exps["method"] == "none"]
    ax.scatter(base["img_s"], base["top1"], s=260, marker="*", color="black", zorder=5, label="baseline")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.08, y=0.08)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=9)
    ax.set(xlabel="throughput (img/s, median over rounds; log scale)", ylabel="top-1 accuracy (%)",
           title=f"EViT beside other backbones (timm pretrained, off the shelf): {rows['dataset'].iloc[0]}\n"
                 f"measured on {provenance(rows, full=False)}")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3, which="both")
    place_labels(ax, [(r.img_s, r.top1, f"{r.model} (baseline)" if r.method == "none"
                       else r.parameters if r.main_size else f"{r.parameters}, {r.img_size} px")
                      for r in exps.itertuples()]
                 + [(r.img_s, r.top1, short_name(r.model)) for r in backbones.itertuples()], fontsize=7)
    return fig


def _render(fig: Figure) -> dict[str, bytes]:
    out = {}
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=150, metadata={"CreationDate": None} if ext == "pdf" else None)
        out[ext] = buf.getvalue()
    return out


def report(experiments, bench, reference="results/reference/paper.csv", out_dir="results", log=print) -> list[Path]:
    """Build every table and figure in memory, then write them; returns the paths written. Without backbones in
    the experiments file's `comparison` section, its table and figure are skipped with one line to `log`."""
    results = load_results(experiments, bench, reference)
    spec = yaml.safe_load(Path(experiments).read_text()) or {}
    out_dir = Path(out_dir)
    files = {out_dir / "tables" / f"{table}.{ext}": text
             for table in results["table"].dropna().unique() for ext, text in make_table(results, table).items()}
    if spec.get("masking"):
        dataset = results["dataset"].dropna().iloc[0] if results["dataset"].notna().any() else None
        files |= {out_dir / "tables" / f"{MASKING_TABLE}.{ext}": text
                  for ext, text in masking_table(spec["masking"], dataset).items()}
    comparison = spec.get("comparison")
    skipped = not comparison or isinstance(comparison, dict) and not comparison.get("backbones")
    rows = None if skipped else load_comparison(comparison, results, bench)
    if rows is not None:
        files |= {out_dir / "tables" / f"{COMPARISON_TABLE}.{ext}": text
                  for ext, text in comparison_table(rows).items()}
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook"):
        for name, plot in zip(FIGURES, (plot_accuracy_vs_throughput, plot_keep_rate_sweep, plot_frontier)):
            files |= {out_dir / "figures" / f"{name}.{ext}": data for ext, data in _render(plot(results)).items()}
        if rows is not None:
            files |= {out_dir / "figures" / f"{COMPARISON_FIGURE}.{ext}": data
                      for ext, data in _render(plot_comparison(rows)).items()}
    if rows is None:
        log(f"{COMPARISON_TABLE}: no backbones in the experiments file (the demo has no pretrained weights offline): "
            "table and figure skipped")
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        log(f"wrote {path}")
    return list(files)


def _cmd_report(args) -> int:
    try:
        report(args.experiments, args.bench, args.reference, args.out_dir)
    except (ReportError, OSError, yaml.YAMLError) as e:
        print(f"evit report: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report")
    p.add_argument("--experiments", required=True, help="experiments file (YAML) written by the workflow")
    p.add_argument("--bench", required=True, nargs="+",
                   help="bench CSV(s) from `evit bench`; their labels are the experiment names")
    p.add_argument("--reference", default="results/reference/paper.csv", help="the paper's numbers (CSV)")
    p.add_argument("--out-dir", default="results", help="writes OUT_DIR/tables/ and OUT_DIR/figures/")
    p.set_defaults(func=_cmd_report)
