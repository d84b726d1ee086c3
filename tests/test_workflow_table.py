"""The workflow's plan (evit.workflow), without running Snakemake: the experiment table and run configs of the demo
and paper configs, validated as common.smk validates them (snakemake.utils.validate, which fills the schema's
defaults), and the config errors it names."""
import re
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from evit.methods import method_params
from evit.workflow import SCHEMA_FILE, one_of
from evit.workflow_build import build_workflow, experiment_fields

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / f"workflow/config/{name}.yaml").read_text())


def plan_of(config: dict):
    validate(config, str(ROOT / SCHEMA_FILE))
    return build_workflow(config, ROOT)


@pytest.fixture
def demo(tmp_path):
    cfg = load("demo")
    cfg["results"] = str(tmp_path / "results")
    return cfg


@pytest.fixture
def paper(tmp_path):
    """paper.yaml pointed at an (empty) ImageNet layout and its val boxes."""
    cfg = load("paper")
    imagenet = tmp_path / "imagenet"
    for split in ("train", "val"):
        (imagenet / split / "n01440764").mkdir(parents=True)
    boxes = imagenet / "LOC_val_solution.csv"
    boxes.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 111 108 441 325 \n")
    cfg["results"] = str(tmp_path / "results")
    cfg["run_defaults"]["data"]["root"] = str(imagenet)
    cfg["masking"]["boxes"] = str(boxes)
    return cfg


def test_the_demo_table_holds_every_experiment_in_order_trained_or_evaluated(demo):
    plan = plan_of(demo)
    assert list(plan.experiments) == [e["name"] for e in load("demo")["experiments"]]
    trained = [name for name in plan.experiments if plan.is_trained(name)]
    assert (len(plan.experiments), len(trained)) == (28, 19)
    assert plan.result_file("deit_s") == f"{demo['results']}/runs/deit_s/metrics.json"
    assert plan.result_file("evit_s_0.7_offshelf") == f"{demo['results']}/runs/evit_s_0.7_offshelf/eval.json"
    assert plan.tables == ["main", "fusion", "resolution", "frontier", "ablation", "masking", "preflight"]
    assert "masking" in plan.figures and "comparison" not in plan.figures  # the demo has no comparison
    assert (plan.backbones, plan.weight_urls) == ({}, {})


def test_the_paper_table_counts_its_runs_backbones_and_downloads(paper):
    plan = plan_of(paper)
    trained = [name for name in plan.experiments if plan.is_trained(name)]
    assert (len(plan.experiments), len(trained), len(plan.backbones), len(plan.weight_urls)) == (31, 20, 29, 30)
    assert plan.tables[-3:] == ["masking", "comparison", "preflight"] and "comparison" in plan.figures
    assert plan.download_file("dm_nfnet_f0.dm_in1k") == f"{paper['results']}/weights/dm_nfnet_f0.dm_in1k.safetensors"
    # DynamicViT: the official weights, a download (a .pth) fetched before its evaluation
    dynamicvit = f"{paper['results']}/weights/dynamicvit_deit_s_0.7.pth"
    assert plan.weights("dynamicvit_s_0.7") == dynamicvit
    assert plan.upstream_results("dynamicvit_s_0.7") == [dynamicvit]
    assert method_params(plan.resolved["dynamicvit_s_0.7"]["model"]) == {"base_rate": 0.7, "pruning_loc": [3, 6, 9]}
    bench = plan.bench_config()
    assert len(bench["models"]) == 31 + 29 and bench["after_runs"] is False  # the paper runs on SLURM


def test_a_run_config_holds_its_experiment_fields_its_init_and_its_own_method_params(demo):
    plan = plan_of(demo)
    cfg = plan.run_config("evit_s_0.7")
    assert {k: cfg["model"][k] for k in ("arch", "img_size", "method")} == {
        "arch": "deit_tiny_patch16_224", "img_size": 42, "method": "evit"}
    assert "r" not in cfg["model"]  # experiment_defaults' ToMe parameter is not EViT's
    assert cfg["model"]["kwargs"] == {"embed_dim": 96, "depth": 12, "num_heads": 3}  # from run_defaults
    assert cfg["train"]["init_checkpoint"] == f"{demo['results']}/runs/deit_s/checkpoint.pth"
    assert (cfg["train"]["recipe"], cfg["data"]["train_subset"], cfg["launcher"]["backend"]) == (
        "finetune", 4096, "local")
    assert method_params(plan.resolved["evit_s_0.7"]["model"]) == {
        "keep_rate": 0.7, "fuse_token": True, "drop_loc": [3, 6, 9]}
    assert method_params(plan.resolved["tome_s_r2"]["model"]) == {"r": 2}
    assert plan.run_config("evit_s_0.9_offshelf")["train"]["recipe"] == "none"  # evaluated, so no recipe
    assert plan.run_cpus("deit_s") == 2 and plan.run_cpus("evit_s_0.7") == 1  # deit_s's run: section sets 2
    assert plan.schedule_of("evit_s_0.7_warmup") == {"schedule": {"shrink_start": 0, "shrink_epochs": 1}}
    assert plan.schedule_of("evit_s_0.7") == {}


def test_the_masking_config_is_its_experiments_in_one_process_with_the_figure(demo):
    cfg = plan_of(demo).masking_config()
    assert cfg["model"]["method"] == "none" and cfg["data"]["val_subset"] == 2000
    assert cfg["mask"] == {"share": 0.4, "boxes": None, "boxes_format": "xml", "seed": 0, "figure_images": 4,
                           "figure": f"{demo['results']}/figures/masking"}
    assert (cfg["launcher"]["tasks_per_node"], cfg["launcher"]["exclusive"]) == (1, False)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["experiments"][1].update(method="dynamicvt"),
     "config: experiment 'evit_s_0.9': method 'dynamicvt' is not one of ['none', 'evit', 'tome', 'dynamicvit']"),
    (lambda c: c["experiments"][1].update(keep_rate=1.7),
     "config: experiment 'evit_s_0.9': model.keep_rate: expected a value <= 1.0, got 1.7"),
    (lambda c: c["experiments"][1].update(keep_rat=0.7),
     "config: experiment 'evit_s_0.9': keep_rat: unknown experiment field"),
    (lambda c: c["experiments"][1].update(r=4),
     "config: experiment 'evit_s_0.9' (method evit) sets r, a parameter of method tome"),
    (lambda c: c["experiments"].append({"name": "evit_s_0.9", "keep_rate": 0.5}),
     "config: experiment 'evit_s_0.9' is defined twice"),
    (lambda c: c["experiments"][3].update(run={"data": {"num_workrs": 4}}),
     "config: experiment 'evit_s_0.7': data.num_workrs: unknown key"),
    (lambda c: c["masking"].update(experiment="evit_s_0.7"),
     "config: masking.experiment 'evit_s_0.7' is not a method-none experiment"),
])
def test_a_bad_experiment_is_one_error_naming_it(demo, mutate, message):
    mutate(demo)
    with pytest.raises(ValueError, match=re.escape(message)):
        plan_of(demo)


def test_a_backbone_without_its_pretrained_tag_is_named(paper):
    paper["comparison"]["backbones"]["nfnet_f0"] = "NFNet"
    with pytest.raises(ValueError, match=re.escape("config: comparison.backbones: 'nfnet_f0' has no pretrained tag")):
        plan_of(paper)


def test_the_dry_run_checks_a_pack(paper, tmp_path):
    """data.format packed: the pack at data.root opens (sizes and index, no shard read), or one error names its
    file."""
    from PIL import Image

    from evit.data.packed import pack_dataset

    imagenet, pack = Path(paper["run_defaults"]["data"]["root"]), tmp_path / "pack"
    paper["run_defaults"]["data"]["format"] = "packed"
    with pytest.raises(ValueError, match=re.escape(f"config: run_defaults data.root: data.format packed: no pack.json "
                                                   f"in {imagenet / 'train'}")):
        plan_of(paper)
    for split in ("train", "val"):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(imagenet / split / "n01440764" / "a.JPEG")
    pack_dataset(imagenet, pack, "imagenet", threads=1)
    paper["run_defaults"]["data"]["root"] = str(pack)
    assert plan_of(paper).resolved["evit_s_0.7"]["data"]["format"] == "packed"
    shard = pack / "val" / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(ValueError, match=re.escape(f"config: run_defaults data.root: {shard}: the shard is truncated")):
        plan_of(paper)


def test_the_experiment_fields_are_the_schemas():
    fields = experiment_fields(ROOT)
    assert {"name", "arch", "img_size", "method", "recipe", "init", "epochs", "tables", "paper", "run"} == fields


def test_a_wildcard_constraint_matches_each_name_exactly_dots_included(demo):
    constraint = one_of(plan_of(demo).experiments, "no experiment")
    assert re.fullmatch(constraint, "evit_s_0.7") and re.fullmatch(constraint, "evit_s_0.7_offshelf")
    assert not re.fullmatch(constraint, "evit_s_0x7") and not re.fullmatch(constraint, "evit_s_0")
    assert re.fullmatch(one_of(["evit_0.7"], "none"), "evit_0.7")
    assert not re.fullmatch(one_of(["evit_0.7"], "none"), "evit_0x7")
    assert one_of([], "no backbone") == "no backbone"
