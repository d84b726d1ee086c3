"""The report's tables, each as {"md", "csv", "tex", "html"} text: one table of the results frame (`make_table`), the
masking job's (`masking_table`), the backbones comparison (`comparison_table`), each captioned with where and how
its throughput was measured, and the preflight's grid cost (`preflight_table`)."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from evit.errors import ReportError
from evit.methods import METHODS
from evit.layout import COMPARISON_TABLE, PREFLIGHT_TABLE
from evit.report.load import COMPARISON_COLUMNS, read_result
from evit.report.measurement import ISOLATION, PROVENANCE, precisions_of, provenance

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


def make_table(results: pd.DataFrame, table: str) -> dict[str, str]:
    """One table of the results frame as {"md": ..., "csv": ..., "tex": ..., "html": ...} (the html page is what
    Snakemake's report shows); unknown values are blank."""
    rows = results[results["table"] == table]
    title, baseline, dataset = rows[["title", "baseline", "dataset"]].iloc[0]
    first, *others = precisions_of(rows)
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
    result = read_result(Path(spec["result"]), f"experiment {spec['experiment']!r}")
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


def comparison_table(rows: pd.DataFrame) -> dict[str, str]:
    """The `comparison` table of the comparison frame (`load_comparison`) as {"md", "csv", "tex", "html"}: the
    experiments, then the backbones, with img/s at each precision, each labelled."""
    first, *others = precisions_of(rows)
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


def _check_words(name: str, c: dict) -> str:
    """One check of preflight.json in a few words: its status, and its figures or the reason."""
    if c["status"] != "passed" or name not in ("nccl", "decode_gpu", "decode_cpu", "rates"):
        return f"{name} {c['status']}" + (f" ({c['reason']})" if c.get("reason") else "")
    if name == "nccl":
        return f"nccl passed ({c['bus_bandwidth_gb_s']} GB/s bus bandwidth across {c['gpus']} GPUs)"
    if name == "rates":
        return "rates: loop / step " + ", ".join(f"{label} {m['loop_over_step']:.2f} (limited by {m['limited_by']})"
                                                 for label, m in c["models"].items())
    return (f"{name} passed (DALI vs PIL over {c['images']} images: mean {c['mean_level_diff']:.3g}, "
            f"largest {c['max_level_diff']} levels)")


def preflight_table(spec: dict) -> dict[str, str]:
    """The `preflight` table from the preflight's result (``spec["result"]``, evit/preflight.py): each trained
    experiment's estimated device-hours, with every check's status in the notes."""
    result = read_result(Path(spec["result"]), "the preflight", ("checks",))
    cost = result["checks"]["cost"]
    if cost["status"] != "passed":
        raise ReportError(f"the preflight: result file {spec['result']} has no cost ({_check_words('cost', cost)})")
    hours = "GPU-hours" if result["gpu"] else "CPU-hours"
    frame = pd.DataFrame(cost["rows"])
    headers = {"name": "experiment", "epochs": "epochs", "train_images": "train images", "gmacs": "GMACs",
               "measured_as": "measured as", "img_s": "img/s", "hours": hours, "gpus": "GPUs",
               "wall_hours": "wall hours"}
    formats = {"name": str, "epochs": "{:g}".format, "train_images": "{:,}".format, "gmacs": "{:.3g}".format,
               "measured_as": str, "img_s": "{:.1f}".format, "hours": "{:.3g}".format, "gpus": "{:d}".format,
               "wall_hours": "{:.3g}".format}
    shown = frame[list(headers)].apply(lambda col: col.map(formats[col.name])).rename(columns=headers)
    caption = f"The grid's cost, estimated by the preflight on {cost['device']}: {cost['total_hours']:.3g} {hours}."
    notes = (f"Each run at the training loop's rate (evit bench-input) of the measured model nearest in GMACs "
             f"(measured as); {cost['note']}; wall hours: on the run's GPUs. Checks: "
             + "; ".join(_check_words(name, c) for name, c in result["checks"].items() if name != "cost") + ".")
    csv = frame.assign(device=cost["device"]).to_csv(index=False, float_format="%.8g")
    align = "lrrrlrrrr"
    return {**_render_table(shown, align, caption, notes, PREFLIGHT_TABLE), "csv": csv}
