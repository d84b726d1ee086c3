"""The local check job (`evit check`, evit/check.py): each input that the torch-free dry run cannot judge is one
problem naming the experiment (or masking), the key and the file, found before any cluster job is queued."""
import copy
import subprocess
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image

from evit.check import run_checks
from evit.cli import main

TINY = {"arch": "deit_tiny_patch16_224", "method": "evit", "img_size": 32, "patch_size": 8, "num_classes": 2,
        "drop_loc": [1, 2],
        "keep_rate": 0.7, "kwargs": {"embed_dim": 32, "depth": 4, "num_heads": 2}}


VAL_WNIDS = {"ILSVRC2012_val_00000001": "n01440764", "ILSVRC2012_val_00000002": "n01443537"}


def jpeg(path: Path, size=(64, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)


@pytest.fixture
def imagenet(tmp_path) -> Path:
    """A tiny ImageNet layout: two wnid classes, one train and one val image each, and LOC_val_solution.csv."""
    root = tmp_path / "imagenet"
    for i, wnid in enumerate(("n01440764", "n01443537")):
        jpeg(root / "train" / wnid / f"{wnid}_1.JPEG")
        jpeg(root / "val" / wnid / f"ILSVRC2012_val_0000000{i + 1}.JPEG")
    boxes_csv(root, {"ILSVRC2012_val_00000001": (0, 0, 32, 48), "ILSVRC2012_val_00000002": (32, 0, 64, 48)})
    return root


def boxes_csv(root: Path, boxes: dict) -> Path:
    rows = [f"{stem},{VAL_WNIDS[stem]} {' '.join(map(str, box))} " for stem, box in boxes.items()]
    (root / "LOC_val_solution.csv").write_text("\n".join(["ImageId,PredictionString", *rows]) + "\n")
    return root / "LOC_val_solution.csv"


def run_config(root: Path, **model) -> dict:
    return {"data": {"dataset": "imagenet", "root": str(root), "loader": "torch"}, "model": {**TINY, **model},
            "train": {"recipe": "scratch"}}


def plan(root: Path, trained=True, weights=None, masking=None, **model) -> dict:
    """A check file (`evit.workflow.Workflow.check_config`) of one experiment, 'exp'."""
    return {"runs": {"exp": {"config": run_config(root, **model), "trained": trained, "weights": weights,
                             "mapped": weights is not None and not trained}},
            "masking": masking}


def masking(root: Path, boxes: Path, fmt: str = "csv") -> dict:
    """The masking job's config: the tiny baseline (method none), half of each image's 16 patches masked."""
    baseline = {k: v for k, v in TINY.items() if k not in ("drop_loc", "keep_rate")} | {"method": "none"}
    return {**run_config(root), "model": baseline, "train": {"recipe": "none"},
            "mask": {"share": 0.5, "boxes": str(boxes), "boxes_format": fmt}}


def test_a_good_plan_has_no_problem_and_the_command_writes_its_stamp(tmp_path, imagenet):
    good = plan(imagenet, masking=masking(imagenet, imagenet / "LOC_val_solution.csv"))
    assert run_checks(good) == []
    (tmp_path / "checks.yaml").write_text(yaml.safe_dump(good))
    assert main(["check", "--config", str(tmp_path / "checks.yaml"), "--out", str(tmp_path / "ok.json")]) == 0
    assert (tmp_path / "ok.json").is_file()


@pytest.mark.parametrize("model, message", [
    ({"drop_loc": [1, 2, 7]}, "drop_loc must be increasing block indices in 0..3, got [1, 2, 7]"),  # 4 blocks
    ({"arch": "deit_smal_patch16_224"}, "timm has no 'evit_deit_smal_patch16_224'"),
])
def test_a_model_that_cannot_be_built_is_named_with_its_experiment(imagenet, model, message):
    problems = run_checks(plan(imagenet, **model))
    assert len(problems) == 1 and problems[0].startswith("experiment 'exp': model: ") and message in problems[0]


def test_the_paper_models_block_indices_are_checked_against_their_depth(imagenet):
    paper = {"arch": "deit_small_patch16_224", "img_size": 224, "patch_size": None, "kwargs": {},
             "drop_loc": [3, 6, 12]}
    problems = run_checks(plan(imagenet, **paper))
    assert len(problems) == 1 and "drop_loc must be increasing block indices in 0..11, got [3, 6, 12]" in problems[0]


def test_each_distinct_model_is_built_once_on_the_meta_device(imagenet, monkeypatch):
    import evit.check

    built = []
    real = evit.check.build_model
    monkeypatch.setattr(evit.check, "build_model",
                        lambda m, n: built.append(torch.empty(0).device) or real(m, n))
    checks = plan(imagenet)
    checks["runs"]["twin"] = copy.deepcopy(checks["runs"]["exp"])
    checks["runs"]["other"] = plan(imagenet, keep_rate=0.5)["runs"]["exp"]
    assert run_checks(checks) == []
    assert [d.type for d in built] == ["meta", "meta"]


def test_a_typo_in_aa_is_a_config_error_of_the_torch_loader(imagenet):
    checks = plan(imagenet)
    checks["runs"]["exp"]["config"]["train"]["aa"] = "rand-M9-mstd0.5-inc1"
    problems = run_checks(checks)
    assert len(problems) == 1
    assert problems[0].startswith("experiment 'exp': train.aa: timm cannot parse 'rand-M9-mstd0.5-inc1'")


def test_a_flat_imagenet_val_is_named_with_the_one_line_fix_which_works(imagenet):
    val = imagenet / "val"
    for image in list(val.rglob("*.JPEG")):
        image.rename(val / image.name)
    for folder in val.iterdir():
        if folder.is_dir():
            folder.rmdir()
    problems = run_checks(plan(imagenet))
    assert len(problems) == 1 and f"{val} has no class folders" in problems[0]
    fix = problems[0].split("beside it: ")[1]
    subprocess.run(["bash", "-c", fix], check=True)
    assert run_checks(plan(imagenet)) == []
    assert (val / "n01440764/ILSVRC2012_val_00000001.JPEG").is_file()


def test_a_fashion_mnist_root_that_does_not_exist_is_named(tmp_path):
    checks = plan(tmp_path)
    checks["runs"]["exp"]["config"]["data"] = {"dataset": "fashion_mnist", "root": str(tmp_path / "nowhere")}
    problems = run_checks(checks)
    assert len(problems) == 1 and f"Fashion-MNIST not found in {tmp_path / 'nowhere'}" in problems[0]


@pytest.mark.parametrize("box", [(100, 100, 200, 200), (40, 40, 10, 10), (0, 0, 64, 48)],
                         ids=["outside", "inverted", "whole-image"])
def test_boxes_that_leave_the_mask_share_far_below_its_target_are_named(imagenet, box):
    boxes = boxes_csv(imagenet, {"ILSVRC2012_val_00000001": box, "ILSVRC2012_val_00000002": box})
    problems = run_checks(plan(imagenet, masking=masking(imagenet, boxes)))
    assert len(problems) == 1 and problems[0].startswith(f"masking: mask.boxes: {boxes}: its boxes leave 0.0% ")
    assert "2 of 2 images get no masked patch" in problems[0] and "ILSVRC2012_val_00000002" in problems[0]


def test_every_xml_box_file_is_parsed(imagenet):
    folder = imagenet / "bbox_val"
    folder.mkdir()
    for i in range(1, 7):
        xml = "<annotation><object><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>30</xmax><ymax>40</ymax></bndbox>" \
              "</object></annotation>"
        (folder / f"ILSVRC2012_val_0000000{i}.xml").write_text(xml if i < 6 else xml[:50])
    problems = run_checks(plan(imagenet, masking=masking(imagenet, folder, "xml")))
    assert len(problems) == 1
    assert f"mask.boxes: {folder / 'ILSVRC2012_val_00000006.xml'} is not an ILSVRC2012 bounding-box file" in problems[0]


@pytest.fixture
def tiny_weights(tmp_path) -> Path:
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=2,
                              embed_dim=32, depth=4, num_heads=2)
    torch.save({"model": model.state_dict()}, tmp_path / "tiny.pth")
    return tmp_path / "tiny.pth"


def test_mapped_weights_are_read_and_fitted_to_their_model(imagenet, tiny_weights):
    assert run_checks(plan(imagenet, trained=False, weights=str(tiny_weights))) == []
    truncated = tiny_weights.with_name("truncated.pth")
    truncated.write_bytes(tiny_weights.read_bytes()[:20000])
    problems = run_checks(plan(imagenet, trained=False, weights=str(truncated)))
    assert len(problems) == 1
    assert problems[0].startswith(f"experiment 'exp': checkpoints: {truncated}: {truncated} is not a readable "
                                  "checkpoint")
    wider = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=2, embed_dim=64,
                              depth=4, num_heads=2)
    torch.save({"model": wider.state_dict()}, tiny_weights)  # another architecture's weights
    problems = run_checks(plan(imagenet, trained=False, weights=str(tiny_weights)))
    assert len(problems) == 1 and f"checkpoint {tiny_weights} does not fit" in problems[0]
    assert "wrong shape" in problems[0]
