"""`evit report`: tables and figures from an experiments file, metrics files, a bench CSV and the paper's CSV."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import seaborn as sns
import yaml

from evit import report as R
from evit.layout import COMPARISON_FIGURE, REPORT_FIGURES
from evit.report.figures import PLOTS, plot_comparison, plot_frontier, plot_keep_rate_sweep, short_name
from evit.errors import ReportError
from evit.report.load import load_comparison, load_results, training
from evit.report.tables import TABLE_COLUMNS

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "paper.csv"



def evit(keep_rate: float, fuse_token: bool = True, recipe: str = "finetune") -> tuple:
    return "evit", {"keep_rate": keep_rate, "fuse_token": fuse_token, "drop_loc": [3, 6, 9]}, recipe


def tome(r: int, recipe: str = "finetune") -> tuple:
    return "tome", {"r": r}, recipe


BASE = ("none", {}, "scratch")
# name: (img_size, (method, params, recipe), tables, paper ref, top1, top5, gmacs, img/s) -- DeiT-S grid, H100 bf16
GRID = {
    "deit_s": (224, BASE, ["main", "fusion", "resolution"], "deit_small", 79.86, 94.97, 4.599, 8120.0),
    "evit_s_0.9": (224, evit(0.9), ["main", "fusion"], "evit_deit_small_0.9_fused", 79.78, 94.98, 4.022, 9050.0),
    "evit_s_0.8": (224, evit(0.8), ["main", "fusion"], "evit_deit_small_0.8_fused", 79.74, 94.90, 3.478, 10300.0),
    "evit_s_0.7": (224, evit(0.7), ["main", "fusion", "resolution"], "evit_deit_small_0.7_fused", 79.47, 94.77,
                   3.030, 11900.0),
    "evit_s_0.6": (224, evit(0.6), ["main", "fusion"], "evit_deit_small_0.6_fused", 78.95, 94.52, 2.636, 13500.0),
    "evit_s_0.5": (224, evit(0.5), ["main", "fusion"], "evit_deit_small_0.5_fused", 78.49, 94.18, 2.309, 15200.0),
    "evit_s_0.9_nofuse": (224, evit(0.9, False), ["fusion"], "evit_deit_small_0.9_unfused",
                          79.86, 94.91, 3.988, 9120.0),
    "evit_s_0.8_nofuse": (224, evit(0.8, False), ["fusion"], "evit_deit_small_0.8_unfused",
                          79.66, 94.82, 3.444, 10450.0),
    "evit_s_0.7_nofuse": (224, evit(0.7, False), ["fusion"], "evit_deit_small_0.7_unfused",
                          79.41, 94.69, 2.997, 12100.0),
    "evit_s_0.6_nofuse": (224, evit(0.6, False), ["fusion"], "evit_deit_small_0.6_unfused",
                          79.02, 94.47, 2.609, 13800.0),
    "evit_s_0.5_nofuse": (224, evit(0.5, False), ["fusion"], "evit_deit_small_0.5_unfused",
                          78.37, 94.08, 2.283, 15600.0),
    "evit_s_272_0.7": (272, evit(0.7), ["resolution"], None, 80.41, 95.21, 4.560, 7950.0),
    "evit_s_288_0.6": (288, evit(0.6), ["resolution"], None, 80.58, 95.30, 4.501, 8300.0),
    "evit_s_304_0.5": (304, evit(0.5), ["resolution"], None, 80.49, 95.27, 4.437, 8400.0),
}
TABLES = {
    "main": {"title": "EViT-DeiT-S keep-rate sweep (fused)", "baseline": "deit_s"},
    "fusion": {"title": "Fusion ablation", "baseline": "deit_s"},
    "resolution": {"title": "Higher resolution at about DeiT-S cost", "baseline": "deit_s"},
}
# The frontier: DeiT-S weights evaluated off the shelf as EViT and ToMe, and ToMe fine-tuned at EViT's GMACs
OFF_SHELF = {
    **{f"evit_s_{k}_offshelf": (224, evit(k, recipe="none"), ["frontier"], None, top1, None, gmacs, img_s)
       for k, top1, gmacs, img_s in ((0.9, 79.5, 4.02, 9000.0), (0.7, 77.9, 3.03, 11800.0),
                                     (0.5, 73.2, 2.31, 15100.0))},
    **{f"tome_s_r{r}_offshelf": (224, tome(r, recipe="none"), ["frontier"], None, top1, None, gmacs, img_s)
       for r, top1, gmacs, img_s in ((4, 79.6, 4.01, 9100.0), (11, 78.8, 2.99, 11500.0), (16, 77.4, 2.29, 14200.0))},
}
FRONTIER = {
    **{name: (*row[:2], [*row[2], "frontier"] if name in ("deit_s", "evit_s_0.7", "evit_s_0.5") else row[2], *row[3:])
       for name, row in GRID.items()},
    **OFF_SHELF,
    "tome_s_r11": (224, tome(11), ["frontier"], None, 79.2, 94.6, 2.99, 11500.0),
    "tome_s_r16": (224, tome(16), ["frontier"], None, 78.3, 94.1, 2.29, 14200.0),
}
META = dict(device="NVIDIA H100 80GB HBM3", device_type="cuda", threads=16, batch_size=256, dtype="bf16",
            compile=False, rounds=7, iters_per_round=10, torch="2.5.1+cu124", timm="1.0.12", python="3.11.9",
            host="gpu-node-07", date="2026-11-20T14:03:51+00:00")


def write_inputs(root: Path, grid: dict = GRID, tables: dict = TABLES, dataset: str | None = "ImageNet-1k",
                 bench_first: str | None = None) -> dict:
    """The workflow's inputs to `evit report`: metrics files, experiments.yaml and the bench CSV."""
    experiments, bench = [], []
    for name, (img, (method, params, recipe), tabs, paper, top1, top5, gmacs, img_s) in grid.items():
        result = root / "runs" / name / "metrics.json"
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps({"top1": top1, "top5": top5, "val_loss": 0.91, "num_eval_images": 50000,
                                      "params": 22050664, "dataset": "imagenet",
                                      "provenance": {"torch": META["torch"]}}))
        experiments.append({"name": name, "arch": "deit_small_patch16_224", "img_size": img, "method": method,
                            "params": params, "recipe": recipe, "tables": tabs, "paper": paper,
                            "result": str(result)})
        spec = f"{method}_deit_small_patch16_224:img_size={img}"
        bench.append(dict(label=name, spec=spec, img_size=img, gmacs=gmacs, img_s=img_s,
                          img_s_q1=img_s * 0.99, img_s_q3=img_s * 1.01, img_s_min=img_s * 0.97,
                          img_s_max=img_s * 1.02, **META))
    bench = pd.DataFrame(bench)
    if bench_first:  # the bench's own speedup is over its first row, which need not be the baseline
        bench = pd.concat([bench[bench.label == bench_first], bench[bench.label != bench_first]])
    bench.insert(5, "speedup", bench["img_s"] / bench["img_s"].iloc[0])
    bench_csv = root / "bench" / "throughput.csv"
    bench_csv.parent.mkdir(parents=True, exist_ok=True)
    bench.to_csv(bench_csv, index=False)
    spec = {"tables": tables, "experiments": experiments} | ({"dataset": dataset} if dataset else {})
    exp_file = root / "experiments.yaml"
    exp_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    return {"experiments": exp_file, "bench": bench_csv, "out_dir": root / "out"}


def run_report(inputs: dict, reference: Path = REFERENCE) -> list[Path]:
    return R.report(inputs["experiments"], inputs["bench"], reference, inputs["out_dir"], log=lambda m: None)


def read_table(out_dir: Path, table: str) -> pd.DataFrame:
    return pd.read_csv(out_dir / "tables" / f"{table}.csv", keep_default_na=False, na_values=[""])


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """One report over the paper grid, bench rows in an order whose first row is not the baseline."""
    inputs = write_inputs(tmp_path_factory.mktemp("report"), bench_first="evit_s_0.5")
    return inputs, run_report(inputs)


def test_writes_every_table_and_figure(paper_run):
    inputs, written = paper_run
    out = inputs["out_dir"]
    expected = {out / "tables" / f"{t}.{ext}" for t in TABLES for ext in ("md", "csv", "tex", "html")}
    expected |= {out / "figures" / f"{f}.{ext}" for f in REPORT_FIGURES for ext in ("png", "pdf")}
    assert set(written) == expected
    page = (out / "tables" / "main.html").read_text()
    headers = re.findall(r'class="col_heading level0 (col\d+)" >(.*?)</th>', page)
    left = set(re.findall(r"\.(col\d+) \{\s*text-align: left;", page))
    assert [h for c, h in headers if c in left] == ["experiment", "method", "parameters", "training"]  # numbers: right
    for name in REPORT_FIGURES:
        png, pdf = (out / "figures" / f"{name}.{ext}" for ext in ("png", "pdf"))
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 20_000
        assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 5_000


def test_the_figure_registry_holds_the_workflows_report_figures():
    """One plot function per figure the workflow expects of `evit report` (evit.layout.REPORT_FIGURES), in its order;
    the comparison figure is drawn from the comparison frame, by plot_comparison."""
    assert tuple(PLOTS) == REPORT_FIGURES
    assert PLOTS["frontier"] is plot_frontier and PLOTS["keep_rate_sweep"] is plot_keep_rate_sweep
    assert COMPARISON_FIGURE not in PLOTS and plot_comparison not in PLOTS.values()


def test_table_rows_columns_and_values(paper_run):
    inputs, _ = paper_run
    main = read_table(inputs["out_dir"], "main")
    assert list(main["experiment"]) == ["deit_s", "evit_s_0.9", "evit_s_0.8", "evit_s_0.7", "evit_s_0.6",
                                        "evit_s_0.5"]
    assert list(main.columns[:len(TABLE_COLUMNS)]) == list(TABLE_COLUMNS)
    assert {"device", "threads", "dtype", "batch_size", "bench_date", "torch", "timm"} <= set(main.columns)
    row = main.set_index("experiment").loc["evit_s_0.7"]
    assert row["top1"] == pytest.approx(79.47) and row["gmacs"] == pytest.approx(3.030)
    # speedup over the table's baseline deit_s, not over the bench CSV's first row (evit_s_0.5)
    assert row["speedup"] == pytest.approx(11900 / 8120)
    assert main.set_index("experiment").loc["deit_s", "speedup"] == pytest.approx(1.0)
    assert row["paper_top1"] == 79.5 and row["paper_gmacs"] == 3.0 and row["paper_img_s"] == 4385
    assert row["delta_top1"] == pytest.approx(79.47 - 79.5)
    assert row["delta_gmacs"] == pytest.approx(3.030 - 3.0)

    fusion = read_table(inputs["out_dir"], "fusion")
    assert list(fusion["method"]) == ["none"] + ["evit"] * 10 and fusion["parameters"].isna().iloc[0]
    keep_rates = ("0.9", "0.8", "0.7", "0.6", "0.5")
    assert list(fusion["parameters"].iloc[1:]) == [f"keep {k}, {f}" for f in ("fused", "not fused") for k in keep_rates]
    assert list(fusion["training"]) == ["from scratch"] + ["fine-tuned"] * 10
    resolution = read_table(inputs["out_dir"], "resolution")
    assert list(resolution["experiment"]) == ["deit_s", "evit_s_0.7", "evit_s_272_0.7", "evit_s_288_0.6",
                                              "evit_s_304_0.5"]
    assert list(resolution["img_size"]) == [224, 224, 272, 288, 304]


def test_markdown_values_and_provenance(paper_run):
    inputs, _ = paper_run
    md = (inputs["out_dir"] / "tables" / "main.md").read_text()
    assert md.startswith("**EViT-DeiT-S keep-rate sweep (fused); top-1/top-5 on ImageNet-1k.**")
    header = next(line for line in md.splitlines() if line.startswith("| experiment"))
    # no paper speedup columns: the reference has no DeiT-S img/s, so no row has one
    assert [c.strip() for c in header.strip("|").split("|")] == list(TABLE_COLUMNS.values())[:-2]
    row = next(line for line in md.splitlines() if line.startswith("| evit_s_0.7 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:11] == ["evit_s_0.7", "EViT", "keep 0.7, fused", "fine-tuned", "224", "79.47", "94.77", "3.03",
                          "11900.0", "1.47", "79.5"]
    assert cells[11] == "-0.03"  # Δ top-1 = ours - paper
    baseline = next(line for line in md.splitlines() if line.startswith("| deit_s "))
    assert [c.strip() for c in baseline.strip("|").split("|")][:4] == ["deit_s", "baseline", "", "from scratch"]
    footer = md.strip().splitlines()[-1]
    for fact in ("NVIDIA H100 80GB HBM3", "16 threads", "bf16", "batch 256", "2026-11-20 14:03 UTC",
                 "torch 2.5.1+cu124", "timm 1.0.12", "EViT official README"):
        assert fact in footer
    assert "nan" not in md.lower()


def test_unknown_paper_values_are_blank(paper_run):
    inputs, _ = paper_run
    out = inputs["out_dir"]
    main = read_table(out, "main").set_index("experiment")
    # the reference has no DeiT-S img/s, so there is no paper speedup; DeiT-S img/s itself is unknown
    assert main["paper_speedup"].isna().all() and main["delta_speedup"].isna().all()
    assert pd.isna(main.loc["deit_s", "paper_img_s"])
    resolution = read_table(out, "resolution").set_index("experiment")  # paper: null for the 272/288/304 runs
    assert resolution.loc["evit_s_272_0.7", ["paper_top1", "paper_gmacs", "delta_top1"]].isna().all()
    csv_row = next(line for line in (out / "tables" / "resolution.csv").read_text().splitlines()
                   if line.startswith("evit_s_288"))
    assert ",,,,,,," in csv_row  # blank, not NaN or 0
    md_row = next(line for line in (out / "tables" / "resolution.md").read_text().splitlines()
                  if line.startswith("| evit_s_288"))
    assert [c.strip() for c in md_row.strip("|").split("|")][10:] == [""] * 5
    # the md/tex leave out the paper columns no row of the table has (here: paper speedup, Δ speedup)
    header = next(line for line in (out / "tables" / "resolution.md").read_text().splitlines()
                  if line.startswith("| experiment"))
    assert "paper top-1" in header and "paper speedup" not in header and "Δ speedup" not in header
    assert "paper_speedup" in pd.read_csv(out / "tables" / "resolution.csv").columns
    for table in TABLES:
        for ext in ("md", "csv", "tex", "html"):
            assert not re.search(r"\bnan\b", (out / "tables" / f"{table}.{ext}").read_text(), re.I)


def test_paper_speedup_where_the_paper_gives_both(tmp_path):
    reference = tmp_path / "paper.csv"
    ref = pd.read_csv(REFERENCE)
    ref.loc[ref["ref"] == "deit_small", "img_s"] = 2923
    ref.to_csv(reference, index=False)
    inputs = write_inputs(tmp_path)
    results = load_results(inputs["experiments"], inputs["bench"], reference)
    row = results[(results["table"] == "main") & (results["experiment"] == "evit_s_0.7")].iloc[0]
    assert row["paper_speedup"] == pytest.approx(4385 / 2923)
    assert row["delta_speedup"] == pytest.approx(11900 / 8120 - 4385 / 2923)
    assert results[results["experiment"] == "evit_s_272_0.7"]["paper_speedup"].isna().all()


def test_speedup_is_over_each_tables_own_baseline(tmp_path):
    tables = {**TABLES, "fusion": {"title": "Fusion ablation", "baseline": "evit_s_0.7"}}
    inputs = write_inputs(tmp_path, tables=tables)
    results = load_results(inputs["experiments"], inputs["bench"], REFERENCE)
    speedup = results.set_index(["table", "experiment"])["speedup"]
    assert speedup["fusion", "evit_s_0.7"] == pytest.approx(1.0)
    assert speedup["fusion", "deit_s"] == pytest.approx(8120 / 11900)
    assert speedup["main", "evit_s_0.7"] == pytest.approx(11900 / 8120)


def test_tex_is_booktabs_with_caption(paper_run):
    inputs, _ = paper_run
    tex = (inputs["out_dir"] / "tables" / "fusion.tex").read_text()
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    assert r"\hline" not in tex
    caption = re.search(r"\\caption\{(.*)\}", tex).group(1)
    assert "Fusion ablation" in caption and "NVIDIA H100 80GB HBM3 (16 threads), bf16, batch 256" in caption
    assert "torch 2.5.1+cu124, timm 1.0.12" in caption
    assert r"\label{tab:fusion}" in tex
    assert r"evit\_s\_0.7\_nofuse" in tex and r"$\Delta$ top-1" in tex
    assert tex.count(r"\\") == 12  # header + 11 rows


def test_adding_an_experiment_adds_its_row(tmp_path):
    grid = {**GRID, "evit_s_0.4": (224, evit(0.4), ["main", "fusion"], None, 77.1, 93.5, 2.03, 17000.0)}
    inputs = write_inputs(tmp_path, grid=grid)
    run_report(inputs)
    main = read_table(inputs["out_dir"], "main")
    assert len(main) == 7 and main["experiment"].iloc[-1] == "evit_s_0.4"
    assert main["speedup"].iloc[-1] == pytest.approx(17000 / 8120)
    assert len(read_table(inputs["out_dir"], "fusion")) == 12
    assert len(read_table(inputs["out_dir"], "resolution")) == 5


def _break_missing_result(inputs):
    (inputs["experiments"].parent / "runs" / "evit_s_0.6" / "metrics.json").unlink()


def _break_bench(inputs):
    bench = pd.read_csv(inputs["bench"])
    bench[bench["label"] != "evit_s_0.8_nofuse"].to_csv(inputs["bench"], index=False)


def _edit_experiments(edit):
    def apply(inputs):
        spec = yaml.safe_load(inputs["experiments"].read_text())
        edit(spec)
        inputs["experiments"].write_text(yaml.safe_dump(spec))
    return apply


@pytest.mark.parametrize("breakage, message", [
    (_break_missing_result, r"missing result files: evit_s_0\.6: .*runs/evit_s_0\.6/metrics\.json"),
    (_break_bench, r"experiments missing from the bench CSV .*throughput\.csv: evit_s_0\.8_nofuse"),
    (_edit_experiments(lambda s: s["tables"]["fusion"].update(baseline="deit_b")),
     r"tables name an unknown baseline experiment: fusion \(baseline deit_b\)"),
    (_edit_experiments(lambda s: s["experiments"][3].update(paper="evit_deit_small_0.7")),
     r"unknown paper refs, not in .*paper\.csv: evit_s_0\.7 \(paper: evit_deit_small_0\.7\)"),
    (_edit_experiments(lambda s: s["experiments"][2].update(tables=["main", "mian"])),
     r"experiments list unknown tables: evit_s_0\.8 lists 'mian'"),
    (_edit_experiments(lambda s: s["experiments"][1].pop("method")), r"evit_s_0\.9 lacks 'method'"),
    (_edit_experiments(lambda s: s["experiments"][1].update(method="tome")),
     r"params that are not all of their method's: evit_s_0\.9 \(params \['drop_loc', 'fuse_token', 'keep_rate'\], "
     r"method tome\)"),
    (_edit_experiments(lambda s: s["experiments"][2].update(method="adavit")),
     r"unknown methods \(known: none, evit, tome, dynamicvit\): evit_s_0\.8 \(method 'adavit'\)"),
], ids=["missing-result", "missing-bench", "unknown-baseline", "unknown-paper-ref", "unknown-table", "no-method",
        "foreign-params", "unknown-method"])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, breakage, message):
    inputs = write_inputs(tmp_path)
    breakage(inputs)
    with pytest.raises(ReportError, match=message):
        run_report(inputs)
    assert not inputs["out_dir"].exists()


def test_cli_prints_a_line_per_file_and_errors_without_traceback(tmp_path, capsys):
    from evit import cli

    assert cli.COMMANDS["report"][0] == "evit.report"
    inputs = write_inputs(tmp_path, grid={k: GRID[k] for k in ("deit_s", "evit_s_0.7", "evit_s_0.7_nofuse")},
                          dataset=None)
    argv = ["report", "--experiments", str(inputs["experiments"]), "--bench", str(inputs["bench"]),
            "--reference", str(REFERENCE), "--out-dir", str(inputs["out_dir"])]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("comparison: no backbones")  # the demo's: skipped in one line, not an error
    lines = lines[1:]
    assert len(lines) == 3 * 4 + 2 * len(REPORT_FIGURES) and all(line.startswith("wrote ") for line in lines)
    assert f"wrote {inputs['out_dir'] / 'tables' / 'main.tex'}" in lines
    # no top-level dataset: taken from the metrics files
    assert "top-1/top-5 on imagenet." in (inputs["out_dir"] / "tables" / "main.md").read_text()

    bench = pd.read_csv(inputs["bench"])
    bench[bench["label"] != "evit_s_0.7_nofuse"].to_csv(inputs["bench"], index=False)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"evit report: error: experiments missing from the bench CSV {inputs['bench']}: evit_s_0.7_nofuse")


def test_a_table_without_paper_values_has_no_paper_columns(tmp_path):
    grid = {name: (*row[:3], None, *row[4:]) for name, row in GRID.items()}  # e.g. the Fashion-MNIST demo
    inputs = write_inputs(tmp_path, grid=grid)
    run_report(inputs)
    md = (inputs["out_dir"] / "tables" / "main.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| experiment"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(TABLE_COLUMNS.values())[:10]
    assert "Δ" not in md and "Paper:" not in md
    assert "paper_top1" in read_table(inputs["out_dir"], "main").columns  # the csv keeps every column


def test_the_frontier_table_and_figure(tmp_path):
    tables = {**TABLES, "frontier": {"title": "Accuracy-speed frontier", "baseline": "deit_s"}}
    inputs = write_inputs(tmp_path, grid=FRONTIER, tables=tables)
    run_report(inputs)
    frontier = read_table(inputs["out_dir"], "frontier").set_index("experiment")
    assert len(frontier) == 3 + 6 + 2
    assert frontier.loc["tome_s_r11_offshelf", ["method", "parameters", "training"]].tolist() == [
        "tome", "r 11", "off the shelf"]
    assert frontier.loc["evit_s_0.7_offshelf", ["method", "parameters", "training"]].tolist() == [
        "evit", "keep 0.7, fused", "off the shelf"]
    assert frontier.loc["tome_s_r16", "training"] == "fine-tuned"
    assert frontier.loc["deit_s", "training"] == "from scratch"
    assert frontier.loc["tome_s_r16", "speedup"] == pytest.approx(14200 / 8120)
    md = (inputs["out_dir"] / "tables" / "frontier.md").read_text()
    assert "| tome_s_r11 " in md and "ToMe" in md and "r 11" in md and "fine-tuned" in md

    # one line per method and training, through its runs in order of throughput; the baseline a point of its own
    results = load_results(inputs["experiments"], inputs["bench"], REFERENCE)
    ax = plot_frontier(results).axes[0]
    lines = sorted(tuple(line.get_xdata()) for line in ax.get_lines() if len(line.get_xdata()))
    assert lines == sorted([(9000.0, 11800.0, 15100.0), (9100.0, 11500.0, 14200.0), (11900.0, 15200.0),
                            (11500.0, 14200.0)])
    texts = {t.get_text() for t in ax.texts}
    assert {"deit_s (baseline)", "keep 0.7, fused", "r 11", "r 16"} <= texts and "keep 0.8, fused" not in texts
    assert "frontier table" in ax.get_title()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(ax.figure)  # drawn as saved: no two labels overlap, nor a label a point
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    points = ax.transData.transform(results.loc[results["table"] == "frontier", ["img_s", "top1"]].to_numpy())
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert not [(box, p) for box in boxes for p in points if box.contains(*p)]
    for ext in ("png", "pdf"):
        assert (inputs["out_dir"] / "figures" / f"frontier.{ext}").stat().st_size > 5_000


def test_without_a_frontier_table_the_figure_draws_every_run_at_the_baselines_size(paper_run):
    inputs, written = paper_run
    assert inputs["out_dir"] / "figures" / "frontier.png" in written
    results = load_results(inputs["experiments"], inputs["bench"], REFERENCE)
    ax = plot_frontier(results).axes[0]
    lines = [line.get_xdata() for line in ax.get_lines() if len(line.get_xdata())]
    assert sorted(map(len, lines)) == [5, 5]  # EViT fused and not fused, fine-tuned; no 272-304 px runs
    assert "no `frontier` table" in ax.get_title()


def test_ablation_rows_say_their_schedule_and_stay_out_of_the_keep_rate_sweep(tmp_path):
    grid = {**GRID,
            "evit_s_0.7_warmup": (224, evit(0.7), ["ablation"], None, 78.1, 94.0, 3.03, 11900.0),
            "evit_s_0.7_loc258": (224, ("evit", {"keep_rate": 0.7, "fuse_token": True, "drop_loc": [2, 5, 8]},
                                        "finetune"), ["ablation"], None, 78.2, 94.1, 2.9, 12300.0)}
    inputs = write_inputs(tmp_path, grid=grid, tables={**TABLES, "ablation": {"title": "A", "baseline": "deit_s"}})
    spec = yaml.safe_load(inputs["experiments"].read_text())
    spec["experiments"][-2]["schedule"] = {"shrink_start": 0, "shrink_epochs": 1.5}
    inputs["experiments"].write_text(yaml.safe_dump(spec, sort_keys=False))
    run_report(inputs)
    ablation = read_table(inputs["out_dir"], "ablation")
    assert ablation.set_index("experiment")["training"].to_dict() == {
        "evit_s_0.7_warmup": "fine-tuned, keep rate 1 for 0 ep, cosine over 1.5 ep", "evit_s_0.7_loc258": "fine-tuned"}
    assert training("scratch", "evit", {"shrink_start": 0, "shrink_epochs": 0}) == "from scratch, no keep-rate warmup"
    results = load_results(inputs["experiments"], inputs["bench"], REFERENCE)
    top1_axes = plot_keep_rate_sweep(results).axes[0]
    points = {(float(x), float(y)) for line in top1_axes.lines for x, y in zip(*line.get_data())}
    assert (0.7, 79.47) in points and not {y for _, y in points} & {78.1, 78.2}  # the sweep's own 0.7 run only


def test_a_bench_at_two_precisions_gives_img_s_and_speedup_at_each_labelled(tmp_path):
    """paper.yaml measures fp32 (the paper's) and bf16: each precision's img/s and speedup, labelled; the figures and
    the comparison with the paper use the first."""
    inputs = write_inputs(tmp_path)
    bf16 = pd.read_csv(inputs["bench"]).assign(isolation="exclusive node")
    slower = [4.0 if n == "deit_s" else 3.0 for n in bf16["label"]]
    fp32 = bf16.assign(dtype="fp32", **{c: bf16[c] / slower for c in ("img_s", "img_s_q1", "img_s_q3")})
    pd.concat([fp32, bf16]).to_csv(inputs["bench"], index=False)
    run_report(inputs)
    md = (inputs["out_dir"] / "tables" / "main.md").read_text()
    header_line = next(ln for ln in md.splitlines() if ln.startswith("| experiment"))
    header = [c.strip() for c in header_line.strip("|").split("|")]
    assert header[7:12] == ["GMACs", "img/s (fp32)", "speedup (fp32)", "img/s (bf16)", "speedup (bf16)"]
    row = next(line for line in md.splitlines() if line.startswith("| evit_s_0.7 "))
    assert [c.strip() for c in row.strip("|").split("|")][8:12] == ["3966.7", "1.95", "11900.0", "1.47"]
    footer = md.strip().splitlines()[-1]
    assert "fp32, batch 256" in footer and "; also bf16, the same way" in footer
    assert "the bench ran alone on an exclusive SLURM node" in footer
    main = read_table(inputs["out_dir"], "main").set_index("experiment")
    assert main.loc["evit_s_0.7", ["dtype", "img_s_bf16"]].tolist() == ["fp32", 11900.0]
    assert main.loc["evit_s_0.7", "speedup_bf16"] == pytest.approx(11900 / 8120)


@pytest.mark.parametrize("compiled, label", [({}, "batch 256;"), ({"compile": True}, "batch 256, torch.compile;"),
                                             ({"compile": True, "cuda_graphs": True},
                                              "batch 256, torch.compile with CUDA graphs;")])
def test_the_note_says_how_the_bench_ran_the_models(tmp_path, compiled, label):
    """Eager, compiled, or compiled with CUDA graphs (`evit bench --cuda-graphs`); a bench CSV without the
    cuda_graphs column (written before the option) reads as without."""
    inputs = write_inputs(tmp_path)
    bench = pd.read_csv(inputs["bench"]).assign(**{"compile": False, **compiled})
    bench.to_csv(inputs["bench"], index=False)
    run_report(inputs)
    footer = (inputs["out_dir"] / "tables" / "main.md").read_text().strip().splitlines()[-1]
    assert label.replace(";", ",") in footer and footer.count("CUDA graphs") == label.count("CUDA graphs")


def test_a_precision_missing_for_an_experiment_is_named(tmp_path):
    inputs = write_inputs(tmp_path)
    bf16 = pd.read_csv(inputs["bench"])
    pd.concat([bf16.assign(dtype="fp32"), bf16[bf16["label"] != "evit_s_0.8"]]).to_csv(inputs["bench"], index=False)
    with pytest.raises(ReportError, match=r"experiments missing from the bench CSV .*: evit_s_0\.8 \(bf16\)$"):
        run_report(inputs)


# The comparison (the paper's Figure 4): paper.yaml's speed_test.py backbones, with their timm pretrained weights
# evaluated off the shelf. name: (family, img_size, top1, top5, params, gmacs, img/s)
BACKBONES = {
    "swin_tiny_patch4_window7_224.ms_in1k": ("Swin", 224, 81.38, 95.54, 28288354, 4.51, 2450.0),
    "swin_small_patch4_window7_224.ms_in1k": ("Swin", 224, 83.21, 96.24, 49606258, 8.77, 1520.0),
    "tnt_s_patch16_224": ("TNT", 224, 81.52, 95.73, 23761064, 5.24, 1710.0),
    "tnt_b_patch16_224": ("TNT", 224, 82.86, 96.28, 65410920, 14.1, 760.0),
    "twins_pcpvt_small.in1k": ("Twins-PCPVT", 224, 81.09, 95.64, 24106216, 3.83, 2790.0),
    "twins_pcpvt_base.in1k": ("Twins-PCPVT", 224, 82.71, 96.24, 43828456, 6.68, 1650.0),
    "twins_svt_small.in1k": ("Twins-SVT", 224, 81.68, 95.96, 24060776, 2.94, 3080.0),
    "twins_svt_base.in1k": ("Twins-SVT", 224, 83.14, 96.42, 56070952, 8.59, 1610.0),
    "visformer_tiny.in1k": ("Visformer", 224, 78.16, 94.17, 10316264, 1.27, 9370.0),
    "visformer_small.in1k": ("Visformer", 224, 82.11, 95.88, 40216136, 4.88, 3700.0),
    "deit_small_patch16_224.fb_in1k": ("DeiT", 224, 79.86, 94.97, 22050664, 4.6, 8120.0),
    "deit_base_patch16_224.fb_in1k": ("DeiT", 224, 81.80, 95.59, 86567656, 17.6, 2870.0),
    "deit_base_patch16_384.fb_in1k": ("DeiT", 384, 83.11, 96.37, 86859496, 55.5, 780.0),
    "cait_xxs24_224.fb_dist_in1k": ("CaiT", 224, 78.39, 94.31, 11956936, 2.53, 3840.0),
    "cait_xxs24_384.fb_dist_in1k": ("CaiT", 384, 80.97, 95.64, 12033544, 9.63, 1050.0),
    "cait_xxs36_224.fb_dist_in1k": ("CaiT", 224, 79.75, 94.87, 17299408, 3.77, 2590.0),
    "cait_xxs36_384.fb_dist_in1k": ("CaiT", 384, 82.20, 96.15, 17371216, 14.4, 700.0),
    "cait_s24_224.fb_dist_in1k": ("CaiT", 224, 83.46, 96.57, 46919040, 9.35, 1370.0),
    "coat_tiny.in1k": ("CoaT", 224, 78.43, 94.04, 5501680, 4.35, 1290.0),
    "coat_mini.in1k": ("CoaT", 224, 81.27, 95.38, 10338520, 6.82, 1010.0),
    "coat_lite_tiny.in1k": ("CoaT-Lite", 224, 77.51, 93.92, 5715456, 1.6, 6010.0),
    "coat_lite_mini.in1k": ("CoaT-Lite", 224, 79.09, 94.61, 11012256, 2.0, 5200.0),
    "coat_lite_small.in1k": ("CoaT-Lite", 224, 81.91, 95.55, 19838264, 4.0, 2620.0),
    "convit_small.fb_in1k": ("ConViT", 224, 81.42, 95.73, 27777648, 5.76, 2980.0),
    "convit_base.fb_in1k": ("ConViT", 224, 82.28, 95.94, 86540040, 17.5, 1120.0),
    "dm_nfnet_f0.dm_in1k": ("NFNet", 256, 83.38, 96.37, 71485128, 12.6, 1770.0),
    "efficientnet_b0.ra_in1k": ("EfficientNet", 224, 77.69, 93.53, 5288548, 0.4, 8900.0),
    "efficientnet_b1.ft_in1k": ("EfficientNet", 256, 78.79, 94.34, 7794184, 0.77, 5300.0),
    "efficientnet_b2.ra_in1k": ("EfficientNet", 288, 80.61, 95.32, 9109994, 1.12, 3950.0),
}
DYNAMICVIT = {"dynamicvit_s_0.7": (224, ("dynamicvit", {"base_rate": 0.7, "pruning_loc": [3, 6, 9]}, "none"),
                                   ["frontier"], None, 79.32, 94.68, 2.91, 11650.0)}
COMPARED = ["deit_s", "evit_s_0.9", "evit_s_0.8", "evit_s_0.7", "evit_s_0.6", "evit_s_0.5", "evit_s_272_0.7",
            "evit_s_288_0.6", "evit_s_304_0.5", "dynamicvit_s_0.7"]  # as paper.yaml


def write_comparison(root: Path, backbones: dict = BACKBONES, precisions: tuple = ("bf16",)) -> dict:
    """The paper grid with DynamicViT and a `comparison` section: each backbone's result file (the off-the-shelf
    eval job's) and its bench rows, in the one bench CSV, at each precision (the later ones 2.5x faster)."""
    tables = {**TABLES, "frontier": {"title": "Frontier", "baseline": "deit_s"}}
    inputs = write_inputs(root, grid={**GRID, **DYNAMICVIT}, tables=tables)
    bench, entries = pd.read_csv(inputs["bench"]), []
    rows = []
    for name, (family, img, top1, top5, params, gmacs, img_s) in backbones.items():
        result = root / "comparison" / name / "eval.json"
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps({"top1": top1, "top5": top5, "img_size": img, "params": params,
                                      "num_eval_images": 50000, "dataset": "imagenet", "timm": name}))
        entries.append({"name": name, "family": family, "result": str(result)})
        rows.append(dict(label=name, spec=name, img_size=img, gmacs=gmacs, speedup=None, img_s=img_s,
                         img_s_q1=img_s * 0.99, img_s_q3=img_s * 1.01, img_s_min=img_s * 0.97,
                         img_s_max=img_s * 1.02, **META))
    bench = pd.concat([bench, pd.DataFrame(rows)], ignore_index=True)
    speeds = ("img_s", "img_s_q1", "img_s_q3")
    pd.concat([bench.assign(dtype=p, **{c: bench[c] * 2.5 ** i for c in speeds}) for i, p in enumerate(precisions)]
              ).to_csv(inputs["bench"], index=False)
    spec = yaml.safe_load(inputs["experiments"].read_text())
    spec["comparison"] = {"experiments": COMPARED, "backbones": entries}
    inputs["experiments"].write_text(yaml.safe_dump(spec, sort_keys=False))
    return inputs


def test_the_comparison_table_and_figure(tmp_path):
    inputs = write_comparison(tmp_path)
    lines = []
    written = R.report(inputs["experiments"], inputs["bench"], REFERENCE, inputs["out_dir"], log=lines.append)
    out = inputs["out_dir"]
    assert {out / "tables" / f"comparison.{ext}" for ext in ("md", "csv", "tex", "html")} <= set(written)
    assert {out / "figures" / f"comparison.{ext}" for ext in ("png", "pdf")} <= set(written)
    assert [p.name for p in written if p.parent.name == "figures"] == [
        f"{f}.{ext}" for f in (*REPORT_FIGURES, COMPARISON_FIGURE) for ext in ("png", "pdf")]
    assert all(line.startswith("wrote ") for line in lines)  # no skip line
    table = read_table(out, "comparison")
    assert list(table["model"]) == [*COMPARED, *(n.partition(".")[0] for n in BACKBONES)]
    assert list(table["kind"]) == ["experiment"] * 10 + ["backbone"] * len(BACKBONES)
    assert list(table["family"][:10]) == ["baseline", *["EViT"] * 8, "DynamicViT"]
    assert list(table["family"][10:]) == [b[0] for b in BACKBONES.values()]
    rows = table.set_index("model")
    # top-1 from each one's result file, img/s and GMACs from the bench CSV, img size the benched one
    for name, (family, img, top1, top5, params, gmacs, img_s) in BACKBONES.items():
        row = rows.loc[name.partition(".")[0]]
        assert row[["top1", "top5", "img_size", "gmacs", "img_s"]].tolist() == pytest.approx([top1, top5, img, gmacs,
                                                                                            img_s])
        assert row["params_m"] == pytest.approx(params / 1e6)
    assert rows.loc["swin_tiny_patch4_window7_224", "weights"] == "ms_in1k"
    assert rows.loc["tnt_s_patch16_224", "weights"] == "timm default"  # a name without a pretrained tag
    assert rows.loc["evit_s_0.7", ["parameters", "weights", "top1", "img_s"]].tolist() == [
        "keep 0.7, fused", "fine-tuned", 79.47, 11900.0]
    assert rows.loc["dynamicvit_s_0.7", ["parameters", "weights", "top1"]].tolist() == ["rate 0.7", "off the shelf",
                                                                                        79.32]
    assert rows.loc["deit_s", "params_m"] == pytest.approx(22.050664)
    md = (out / "tables" / "comparison.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| Swin "))
    assert [c.strip() for c in row.strip("|").split("|")] == [
        "Swin", "swin_tiny_patch4_window7_224", "ms_in1k", "", "224", "81.38", "95.54", "28.3", "4.51", "2450.0"]
    footer = md.strip().splitlines()[-1]
    for fact in ("NVIDIA H100 80GB HBM3 (16 threads), bf16, batch 256", "2026-11-20 14:03 UTC", "off the shelf",
                 "own pretrained data config", "at the input size it was benched at"):
        assert fact in footer
    assert md.startswith("**EViT beside other backbones (the paper's Figure 4): top-1/top-5 on ImageNet-1k.**")
    assert not re.search(r"\bnan\b", md + (out / "tables" / "comparison.tex").read_text(), re.I)

    # the figure: each family a colour and marker in the legend, EViT's sweep one line, every point labelled once
    results = load_results(inputs["experiments"], inputs["bench"], REFERENCE)
    frame = load_comparison(yaml.safe_load(inputs["experiments"].read_text())["comparison"], results,
                              inputs["bench"])
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook"):
        ax = plot_comparison(frame).axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [*dict.fromkeys(b[0] for b in BACKBONES.values()), "EViT fused",
                      "EViT fused, another input size", "DynamicViT", "baseline"]
    sweep = next(line for line in ax.get_lines() if line.get_label() == "EViT fused")  # at 224 px only
    assert list(sweep.get_xdata()) == [9050.0, 10300.0, 11900.0, 13500.0, 15200.0]
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["deit_s (baseline)", *(f"keep {k}, fused" for k in (0.9, 0.8, 0.7, 0.6, 0.5)),
                            "keep 0.7, fused, 272 px", "keep 0.6, fused, 288 px", "keep 0.5, fused, 304 px",
                            "rate 0.7", *(short_name(n.partition(".")[0]) for n in BACKBONES)])
    assert {"swin_tiny", "deit_base_384", "cait_xxs24"} <= set(texts)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(ax.figure)  # drawn as saved: no two labels overlap, nor a label a point
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    points = ax.transData.transform(frame[["img_s", "top1"]].to_numpy())
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert not [(box, p) for box in boxes for p in points if box.contains(*p)]
    frame_box = ax.get_window_extent(renderer)
    assert all(frame_box.x0 <= b.x0 and b.x1 <= frame_box.x1 and frame_box.y0 <= b.y0 and b.y1 <= frame_box.y1
               for b in boxes)
    assert ax.get_xscale() == "log" and "ImageNet-1k" in ax.get_title()


def test_the_comparison_at_two_precisions_labels_each(tmp_path):
    inputs = write_comparison(tmp_path, backbones=dict(list(BACKBONES.items())[:3]), precisions=("fp32", "bf16"))
    run_report(inputs)
    md = (inputs["out_dir"] / "tables" / "comparison.md").read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| family"))
    assert [c.strip() for c in header.strip("|").split("|")][-2:] == ["img/s (fp32)", "img/s (bf16)"]
    row = next(line for line in md.splitlines() if line.startswith("| TNT "))
    assert [c.strip() for c in row.strip("|").split("|")][-2:] == ["1710.0", "4275.0"]
    assert "; also bf16, the same way" in md


def _comparison_breakage(edit):
    def apply(inputs):
        spec = yaml.safe_load(inputs["experiments"].read_text())
        edit(spec["comparison"], inputs)
        inputs["experiments"].write_text(yaml.safe_dump(spec))
    return apply


def _unbench(comparison, inputs):
    bench = pd.read_csv(inputs["bench"])
    bench[bench["label"] != "coat_mini.in1k"].to_csv(inputs["bench"], index=False)


def _evaluated_at(comparison, inputs):
    result = Path(comparison["backbones"][1]["result"])
    result.write_text(json.dumps({**json.loads(result.read_text()), "img_size": 256}))


@pytest.mark.parametrize("breakage, message", [
    (_comparison_breakage(_unbench),
     r"comparison backbones missing from the bench CSV .*throughput\.csv: coat_mini\.in1k$"),
    (_comparison_breakage(_evaluated_at), r"comparison backbones benched at another img_size than their result's: "
                                          r"swin_small_patch4_window7_224\.ms_in1k \(result 256 px, bench 224 px\)$"),
    (_comparison_breakage(lambda c, i: c["experiments"].append("evit_s_0.4")),
     r"experiments file: comparison: unknown experiments: evit_s_0\.4$"),
    (_comparison_breakage(lambda c, i: Path(c["backbones"][2]["result"]).unlink()),
     r"comparison backbone 'tnt_s_patch16_224': cannot read result file .*tnt_s_patch16_224/eval\.json"),
    (_comparison_breakage(lambda c, i: c["backbones"][0].pop("family")),
     r"experiments file: comparison: backbones: swin_tiny_patch4_window7_224\.ms_in1k lacks 'family'$"),
], ids=["missing-bench", "img-size", "unknown-experiment", "missing-result", "no-family"])
def test_bad_comparison_input_is_one_clear_error_and_writes_nothing(tmp_path, breakage, message):
    inputs = write_comparison(tmp_path, backbones={k: BACKBONES[k] for k in list(BACKBONES)[:3] + ["coat_mini.in1k"]})
    breakage(inputs)
    with pytest.raises(ReportError, match=message):
        run_report(inputs)
    assert not inputs["out_dir"].exists()


def test_without_comparison_backbones_one_line_says_it_is_skipped(tmp_path):
    inputs = write_inputs(tmp_path, grid={k: GRID[k] for k in ("deit_s", "evit_s_0.7")})
    lines = []
    written = R.report(inputs["experiments"], inputs["bench"], REFERENCE, inputs["out_dir"], log=lines.append)
    assert [line for line in lines if not line.startswith("wrote ")] == [
        "comparison: no backbones in the experiments file (the demo has no pretrained weights offline): "
        "table and figure skipped"]
    assert not [p for p in written if p.stem == "comparison"]
    assert not list(inputs["out_dir"].rglob("comparison.*"))
