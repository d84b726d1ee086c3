"""The report's figures, each a plot function of the results frame registered under its name (`PLOTS`, filled by
the `figure` decorator; the names are `evit.layout.REPORT_FIGURES`), and the comparison figure of the comparison
frame (`plot_comparison`); their colours, the placing of their labels, and their rendering to png and pdf."""
from __future__ import annotations

import io
import re
from collections.abc import Callable

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure  # no pyplot: figures render with the Agg canvas, no global state

from evit.config.recipes import RECIPE_TRAINING
from evit.methods import METHODS
from evit.report.load import dataset_name, experiment_runs
from evit.report.measurement import provenance

FRONTIER = "frontier"  # the table whose rows the frontier figure draws
PLOTS: dict[str, Callable[[pd.DataFrame], Figure]] = {}  # figure name -> its plot of the results frame, in order


def figure(name: str):
    """Register the decorated plot function of the results frame as the figure `name`."""
    def register(plot: Callable[[pd.DataFrame], Figure]) -> Callable[[pd.DataFrame], Figure]:
        PLOTS[name] = plot
        return plot
    return register


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


@figure("accuracy_vs_throughput")
def plot_accuracy_vs_throughput(results: pd.DataFrame) -> Figure:
    """Top-1 against median img/s (bars: interquartile range), coloured by variant (method, and e.g. EViT's fusion),
    labelled by parameters."""
    runs = experiment_runs(results)
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
           ylabel="top-1 accuracy (%)", title=f"Top-1 vs throughput, labelled by parameters: {dataset_name(results)}\n"
                                               f"measured on {provenance(runs, full=False)}")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    return fig


@figure("keep_rate_sweep")
def plot_keep_rate_sweep(results: pd.DataFrame) -> Figure:
    """Top-1 and GMACs of the trained runs against their method's per-pass parameter (EViT's keep rate, ToMe's r)
    at the baseline's image size: one row per method, one line per variant (EViT: fused or not; the paper dashed),
    each from the baseline (at the parameter's default, which leaves the backbone unchanged). Runs evaluated off
    the shelf, and ablations (another parameter off its default, or another schedule), are left out."""
    runs = experiment_runs(results)
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
    dataset = dataset_name(results)
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


@figure("frontier")
def plot_frontier(results: pd.DataFrame) -> Figure:
    """Top-1 against median img/s of the `frontier` table's rows (else of every run at the baseline's image size):
    one line per variant (method, and e.g. EViT's fusion) and training, points labelled by parameters, the baseline
    marked."""
    runs = experiment_runs(results)
    in_table = runs["experiment"].isin(results.loc[results["table"] == FRONTIER, "experiment"])
    rows = runs[in_table] if in_table.any() else runs[runs["main_size"]]
    base, lines = rows[rows["is_baseline"]], rows[~rows["is_baseline"]].sort_values("img_s")
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    order, palette = _colours(lines["variant"])
    trainings = list(dict.fromkeys([t for t in RECIPE_TRAINING.values() if t in set(lines["training"])]
                                   + sorted(set(lines["training"]))))
    sns.lineplot(data=lines, x="img_s", y="top1", hue="variant", style="training", hue_order=order, palette=palette,
                 style_order=trainings, estimator=None, sort=True, markers=True, markersize=8, ax=ax)
    ax.scatter(base["img_s"], base["top1"], s=260, marker="*", color="black", zorder=3, label="baseline")
    ax.margins(x=0.12, y=0.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    rows_are = ("the frontier table's runs" if in_table.any()
                else f"every run at {rows['img_size'].iloc[0]} px (no `{FRONTIER}` table)")
    ax.set(xlabel="throughput (img/s, median over rounds)", ylabel="top-1 accuracy (%)",
           title=f"Accuracy-speed frontier, {rows_are}: {dataset_name(results)}\n"
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


def render(fig: Figure) -> dict[str, bytes]:
    out = {}
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=150, metadata={"CreationDate": None} if ext == "pdf" else None)
        out[ext] = buf.getvalue()
    return out
