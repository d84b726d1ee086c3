"""The paper's tables and figures from the workflow's results (`evit report`).

    evit report --experiments results/tables/experiments.yaml --bench results/bench/throughput.csv [CSV ...] \\
        [--reference results/reference/paper.csv] [--out-dir results]

Writes `<out-dir>/tables/<table>.{md,csv,tex}` (one per table of the experiments file) and
`<out-dir>/figures/{accuracy_vs_throughput,keep_rate_sweep,frontier}.{png,pdf}`. Rows are labelled by method
and parameters (`evit.methods.METHODS`) and by how the weights were trained (their recipe). The frontier figure
draws the rows of the table named `frontier` (top-1 against img/s, one line per method and training), or, if
there is none, every run at the baseline's image size. With a `comparison` section, the `comparison` table and
figure (the paper's Figure 4: top-1 against img/s of experiments beside other backbones' timm pretrained weights)
follow; without one (the demo: no pretrained weights offline), one line says they are skipped. With a `preflight`
section (``result``: its preflight.json), the `preflight` table: the grid's estimated cost and the node's checks.
Everything is built in memory first, so bad input writes nothing.

This module builds them all and writes them (`report`), and is the `evit report` command; its parts: `load` (the
results frames, and the experiments file's format), `tables`, `figures` (one registry, figure name -> plot function)
and `measurement` (how the throughput was measured, as the tables and figures say it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import seaborn as sns

from evit.layout import COMPARISON_FIGURE, COMPARISON_TABLE, MASKING_TABLE, PREFLIGHT_TABLE
from evit.report.figures import PLOTS, plot_comparison, render
from evit.report.load import load_comparison, load_results, read_experiments
from evit.report.tables import comparison_table, make_table, masking_table, preflight_table


def report(experiments, bench, reference="results/reference/paper.csv", out_dir="results", log=print) -> list[Path]:
    """Build every table and figure in memory, then write them; returns the paths written. Without backbones in
    the experiments file's `comparison` section, its table and figure are skipped with one line to `log`."""
    results = load_results(experiments, bench, reference)
    spec = read_experiments(experiments)
    out_dir = Path(out_dir)
    files = {out_dir / "tables" / f"{table}.{ext}": text
             for table in results["table"].dropna().unique() for ext, text in make_table(results, table).items()}
    if spec.get("masking"):
        dataset = results["dataset"].dropna().iloc[0] if results["dataset"].notna().any() else None
        files |= {out_dir / "tables" / f"{MASKING_TABLE}.{ext}": text
                  for ext, text in masking_table(spec["masking"], dataset).items()}
    if spec.get("preflight"):
        files |= {out_dir / "tables" / f"{PREFLIGHT_TABLE}.{ext}": text
                  for ext, text in preflight_table(spec["preflight"]).items()}
    comparison = spec.get("comparison")
    skipped = not comparison or isinstance(comparison, dict) and not comparison.get("backbones")
    rows = None if skipped else load_comparison(comparison, results, bench)
    if rows is not None:
        files |= {out_dir / "tables" / f"{COMPARISON_TABLE}.{ext}": text
                  for ext, text in comparison_table(rows).items()}
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook"):
        for name, plot in PLOTS.items():
            files |= {out_dir / "figures" / f"{name}.{ext}": data for ext, data in render(plot(results)).items()}
        if rows is not None:
            files |= {out_dir / "figures" / f"{COMPARISON_FIGURE}.{ext}": data
                      for ext, data in render(plot_comparison(rows)).items()}
    if rows is None:
        log(f"{COMPARISON_TABLE}: no backbones in the experiments file (the demo has no pretrained weights offline): "
            "table and figure skipped")
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        log(f"wrote {path}")
    return list(files)


def _cmd_report(args) -> int:
    report(args.experiments, args.bench, args.reference, args.out_dir)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report")
    p.add_argument("--experiments", required=True, help="experiments file (YAML) written by the workflow")
    p.add_argument("--bench", required=True, nargs="+",
                   help="bench CSV(s) from `evit bench`; their labels are the experiment names")
    p.add_argument("--reference", default="results/reference/paper.csv", help="the paper's numbers (CSV)")
    p.add_argument("--out-dir", default="results", help="writes OUT_DIR/tables/ and OUT_DIR/figures/")
    p.set_defaults(func=_cmd_report)
