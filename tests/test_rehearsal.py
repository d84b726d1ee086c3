"""The rehearsal of the paper grid (scripts/rehearsal.sh, run in CI): its overlay workflow/config/rehearsal.yaml
changes only sizes and locations of workflow/config/paper.yaml, so that the rehearsal runs paper.yaml's own code
path; and scripts/rehearsal_data.py writes an ImageNet layout, its boxes and file:// weights that the code reads."""
from __future__ import annotations

import importlib.util
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "workflow/config/paper.yaml", ROOT / "workflow/config/rehearsal.yaml"]
# What the overlay may set (dotted keys of the merged workflow config, fnmatch patterns), and nothing else.
LOCATIONS = {"results", "run_defaults.data.root", "masking.boxes", "downloads.*", "comparison.weights"}
SIZES = {"max_epochs", "run_defaults.data.train_subset", "run_defaults.data.val_subset",
         "run_defaults.train.batch_size", "run_defaults.eval.batch_size", "run_defaults.model.kwargs.embed_dim",
         "run_defaults.model.kwargs.num_heads",
         "bench.batch_size", "bench.warmup", "bench.rounds", "bench.iters", "comparison.backbones.*",
         "preflight.images", "preflight.steps", "preflight.warmup", "preflight.rounds"}
MACHINE = {"launcher.tasks_per_node", "launcher.gpus_per_node", "launcher.cpus_per_task", "launcher.mem_gb",
           "launcher.timeout_min", "launcher.signal_delay_s", "bench_launcher.gpus_per_node",
           "bench_launcher.cpus_per_task", "bench_launcher.timeout_min", "run_defaults.data.num_workers",
           "bench.device"}
MAY_CHANGE = LOCATIONS | SIZES | MACHINE
# What those reach in a run's resolved config (train.init_checkpoint lies under `results`).
RUN_MAY_CHANGE = {"model.kwargs*", "data.root", "data.num_workers", "data.train_subset", "data.val_subset",
                  "train.batch_size", "eval.batch_size", "train.epochs", "train.init_checkpoint", "launcher.*"}


def rehearsal_data():
    """scripts/rehearsal_data.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("scripts_rehearsal_data", ROOT / "scripts/rehearsal_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flat(tree: dict, prefix: str = "") -> dict:
    """Dotted key -> value of every leaf (a list is a leaf)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed(before: dict, after: dict) -> set[str]:
    a, b = flat(before), flat(after)
    return {k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>")}


def unlisted(keys: set[str], patterns: set[str]) -> list[str]:
    return sorted(k for k in keys if not any(fnmatch(k, p) for p in patterns))


@pytest.fixture
def configs():
    """paper.yaml alone and with the overlay, each as Snakemake reads it (validated, defaults filled in)."""
    data = rehearsal_data()
    return data.merged_config(CONFIGS[:1]), data.merged_config(CONFIGS)


def test_the_overlay_changes_only_sizes_and_locations(configs):
    paper, rehearsal = configs
    diff = changed(paper, rehearsal)
    assert unlisted(diff, MAY_CHANGE) == []
    assert {"max_epochs", "run_defaults.data.root", "comparison.weights"} <= diff   # it is overlaid at all
    kept = {name for name, family in rehearsal["comparison"]["backbones"].items() if family is not None}
    assert kept and all(rehearsal["comparison"]["backbones"][name] == family   # a backbone is kept as it is or left out
                        for name, family in paper["comparison"]["backbones"].items() if name in kept)
    urls = [*rehearsal["downloads"].values(), rehearsal["comparison"]["weights"]]
    assert all(url.startswith("file://") for url in urls)


def test_the_rehearsal_runs_every_experiment_of_paper_yaml_with_its_own_run_config(configs, tmp_path):
    """The plans of both (their data redirected to one stand-in folder): the same experiments, tables, masking and
    comparison experiments; each run's resolved config differs only where the overlay's keys reach."""
    from evit.workflow_build import build_workflow

    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    (tmp_path / "boxes.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 30 40\n")
    plans = []
    for cfg in configs:
        cfg["run_defaults"]["data"]["root"], cfg["masking"]["boxes"] = str(tmp_path), str(tmp_path / "boxes.csv")
        plans.append(build_workflow(cfg, ROOT))
    paper, rehearsal = plans
    assert list(rehearsal.experiments) == list(paper.experiments)
    assert rehearsal.experiments == paper.experiments   # fields, epochs included (max_epochs caps the runs only)
    assert (rehearsal.tables, rehearsal.drawn_figures) == (paper.tables, paper.drawn_figures)
    assert rehearsal.comparison["experiments"] == paper.comparison["experiments"]
    assert set(rehearsal.backbones) < set(paper.backbones) and None not in rehearsal.backbones.values()
    for name in paper.experiments:
        assert unlisted(changed(paper.resolved[name], rehearsal.resolved[name]), RUN_MAY_CHANGE) == [], name
        run = rehearsal.resolved[name]
        assert (run["data"]["loader"], run["data"]["dataset"], run["train"]["amp"]) == ("dali", "imagenet", "bf16")
        assert run["train"]["epochs"] == 1
    assert {paper.resolved[name]["train"]["recipe"] for name in paper.experiments} == {"scratch", "finetune", "none"}


def test_rehearsal_data_writes_an_imagenet_layout_its_boxes_and_the_file_weights(configs, tmp_path):
    """Two wnids' images (the rehearsal writes all 1000) read as the imagenet dataset, a box per val image inside it;
    the weights behind the file:// URLs load into the models that read them."""
    import timm
    from PIL import Image

    from evit.boxes import read_boxes
    from evit.checkpoint import load_pretrained, read_state_dict
    from evit.data.datasets import ImageFolderDataset
    from evit.models.factory import build_model
    from evit.workflow_build import build_workflow

    data = rehearsal_data()
    root, wnids = tmp_path / "imagenet", data.imagenet_wnids()[:2]
    assert data.write_imagenet(root, root / "LOC_val_solution.csv", 2, wnids) == 8
    val = ImageFolderDataset(root, "val", dataset="imagenet")
    assert val.classes == wnids and len(val) == 4
    assert ImageFolderDataset(root, "train", dataset="imagenet", classes=wnids).classes == wnids
    boxes = read_boxes(root / "LOC_val_solution.csv", "csv")
    for path, _ in val.samples:
        assert Path(path).name.startswith("ILSVRC2012_val_") and Image.open(path).size == (500, 375)
        [(x0, y0, x1, y1)] = boxes[Path(path).stem]
        assert 0 <= x0 < x1 <= 500 and 0 <= y0 < y1 <= 375 and x1 - x0 >= 200

    cfg = configs[1]
    cfg["run_defaults"]["data"]["root"], cfg["masking"]["boxes"] = str(root), str(root / "LOC_val_solution.csv")
    cfg["downloads"] = {name: f"file://{tmp_path}/hub/{name}.pth" for name in cfg["downloads"]}
    cfg["comparison"]["weights"] = f"file://{tmp_path}/hub/{{name}}/model.safetensors"
    written = data.publish_weights(cfg)
    plan = build_workflow(cfg, ROOT)
    assert sorted(written) == sorted([tmp_path / "hub/dynamicvit_deit_s_0.7.pth",
                                      *(tmp_path / "hub" / name / "model.safetensors" for name in plan.backbones)])
    dynamicvit = build_model(plan.resolved["dynamicvit_s_0.7"]["model"], 1000)
    load_pretrained(dynamicvit, tmp_path / "hub/dynamicvit_deit_s_0.7.pth")  # every key, each of its shape
    for name in plan.backbones:
        timm.create_model(name, num_classes=1000).load_state_dict(
            read_state_dict(tmp_path / "hub" / name / "model.safetensors"))
