"""Snakemake's HTML report (`snakemake --report`): every table and figure of the workflow, with its caption."""
import base64
import html
import json
import re
from pathlib import Path

import pytest
from pandas import read_csv

from evit.layout import FIGURES
from test_workflow import ROOT, snakemake, tiny_config, write_config

CAPTIONS = ROOT / "workflow/report"


def caption_headline(rst: str) -> str:
    """A caption's first bold phrase, which every caption starts with (the rest is templated)."""
    match = re.match(r"\*\*(.+?)\*\*", rst)
    return match.group(1) if match else ""


def test_every_figure_has_a_caption():
    missing = [fig for fig in FIGURES if not (CAPTIONS / "figures" / f"{fig}.rst").is_file()]
    assert not missing, f"evit.layout.FIGURES without a caption workflow/report/figures/<name>.rst: {missing}"
    for fig in FIGURES:
        assert caption_headline((CAPTIONS / "figures" / f"{fig}.rst").read_text()), f"{fig}.rst: no **headline**"


def embedded(report: str, script_id: str):
    """The JSON value a script of the report's page defines: `results` (path -> entry), `categories`, ..."""
    return json.loads(re.search(rf'<script id="{script_id}">\s*var \w+ = (.*?);\s*</script>', report, re.S).group(1))


def data(entry: dict) -> bytes:
    """The bytes of a result file, decoded from its base64 data URI in the report."""
    return base64.b64decode(entry["data_uri"].split(";base64,", 1)[1])


def md_rows(md: str) -> list[list[str]]:
    """Header and body rows of a Markdown pipe table, without the alignment row."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    return rows[:1] + rows[2:]


def publish_backbones(hub: Path, names: list[str]) -> None:
    """Weights of timm's tiny test models (10-class heads, for Fashion-MNIST) laid out as on the hub:
    hub/<name>/model.safetensors."""
    import timm
    from safetensors.torch import save_file

    for name in names:
        (hub / name).mkdir(parents=True)
        save_file(timm.create_model(name, num_classes=10).state_dict(), hub / name / "model.safetensors")


@pytest.mark.slow
def test_the_report_holds_every_table_and_figure_with_its_caption(tmp_path):
    """The whole tiny workflow, its comparison included (two of timm's test models as backbones, their weights
    fetched by the download rule from a file:// hub, evaluated off the shelf, benched), then the HTML report."""
    results = tmp_path / "results"
    experiments = [
        {"name": "deit", "method": "none", "recipe": "demo", "init": None, "tables": ["main", "fusion"]},
        {"name": "evit_0.5", "keep_rate": 0.5, "tables": ["main", "fusion"]},
        {"name": "evit_0.5_nofuse", "keep_rate": 0.5, "fuse_token": False, "tables": ["fusion"]},
    ]
    cfg = tiny_config(results, experiments, backend="inline")
    cfg["tables"] = {"main": {"title": "Keep-rate sweep, in miniature", "baseline": "deit"},
                     "fusion": {"title": "Fused or not, in miniature", "baseline": "deit"}}
    backbones = {"test_vit.r160_in1k": "ViT (test)", "test_efficientnet.r160_in1k": "EfficientNet (test)"}
    publish_backbones(tmp_path / "hub", list(backbones))
    cfg["comparison"] = {"weights": f"file://{tmp_path}/hub/{{name}}/model.safetensors", "backbones": backbones,
                         "experiments": ["deit", "evit_0.5"]}
    config_file = write_config(tmp_path / "c.yaml", cfg)
    snakemake("all", "--cores", "2", "--configfile", str(config_file))
    snakemake("--report", str(tmp_path / "report.html"), "--configfile", str(config_file))

    report = (tmp_path / "report.html").read_text()
    assert not re.search(r"<(script|img|link|iframe)\b[^>]*\b(src|href)=[\"']?https?:", report)  # self-contained
    entries = {e["name"]: e for e in embedded(report, "results").values()}
    category = {name: {Path(p).name for paths in subcategories.values() for p in paths}
                for name, subcategories in embedded(report, "categories").items()}
    assert f"EViT reproduction: {cfg['dataset']}" in embedded(report, "workflow-desc")
    for table, spec in cfg["tables"].items():
        csv, rendered = entries[f"{table}.csv"], entries[f"{table}.html"]
        assert data(csv) == (results / f"tables/{table}.csv").read_bytes()
        page = data(rendered).decode()
        cells = [html.unescape(c) for c in re.findall(r"<t[hd](?: [^>]*)?>(.*?)</t[hd]>", page)]
        assert cells == sum(md_rows((results / f"tables/{table}.md").read_text()), [])
        title, note = re.search(r"<caption><strong>(.*?)</strong><br><em>(.*?)</em></caption>", page).groups()
        assert title.startswith(spec["title"]) and f"Speedup: img/s over {spec['baseline']}." in note, table
        for entry in (csv, rendered):
            assert f"median over {cfg['bench']['rounds']} rounds" in entry["caption"], table
            assert f"<tt class=\"docutils literal\">{table}</tt> ({spec['title']};" in entry["caption"], table
            assert entry["name"] in category["Tables"]
    masking = data(entries["masking.html"]).decode()  # the masking job's table, with its own caption
    cells = [html.unescape(c) for c in re.findall(r"<t[hd](?: [^>]*)?>(.*?)</t[hd]>", masking)]
    rows = md_rows((results / "tables/masking.md").read_text())
    assert cells == sum(rows, []) and [row[0] for row in rows] == [
        "patches masked", "nothing", "background", "object", "random"]
    assert rows[0][2:4] == ["top-1, tokens dropped", "top-1, pixels zeroed"]
    assert "<strong>The masking experiment" in entries["masking.html"]["caption"]
    comparison = read_csv(results / "tables/comparison.csv")  # the backbones' own jobs, beside two experiments
    for name in backbones:
        row = comparison[comparison["model"] == name.split(".")[0]].iloc[0]
        evaluated = json.loads((results / f"comparison/{name}/eval.json").read_text())
        assert (row["family"], row["top1"], row["img_size"]) == (backbones[name], evaluated["top1"], 160)
        assert evaluated["num_eval_images"] == cfg["run_defaults"]["data"]["val_subset"] and row["img_s"] > 0
    assert list(comparison["model"])[:2] == ["deit", "evit_0.5"] and len(comparison) == 4  # experiments first
    assert "<strong>EViT beside other backbones" in entries["comparison.html"]["caption"]
    for fig in FIGURES:
        assert f"{fig}.png" in entries, f"figure {fig} is not in the report"
        entry = entries[f"{fig}.png"]
        assert data(entry) == (results / f"figures/{fig}.png").read_bytes()
        headline = caption_headline((CAPTIONS / "figures" / f"{fig}.rst").read_text())
        assert f"<strong>{html.escape(headline, quote=False)}</strong>" in entry["caption"], fig
        assert entry["name"] in category["Figures"]
