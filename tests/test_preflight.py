"""`evit preflight` on a CPU: its CPU parts pass and its GPU parts are not run; a decode beyond the tolerance is one
error; the grid's cost; the workflow's first job (and none when disabled); its report table."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import evit.report as R
from evit.cli import main
from evit.errors import ConfigError
from evit.launch import launch
from evit.preflight import GPU_CHECKS, grid_cost
from evit.report.tables import preflight_table
from test_report import REFERENCE, write_inputs
from test_workflow import TINY_MODEL, job_counts, snakemake, write_config
from test_workflow_table import paper, plan_of  # noqa: F401 (paper: a fixture)

TINY_RUN = {"model": {**TINY_MODEL, "arch": "deit_tiny_patch16_224", "img_size": 28, "num_classes": 2},
            "train": {"recipe": "demo", "augment": "none", "batch_size": 4, "epochs": 1},
            "launcher": {"backend": "inline", "cpus_per_task": 1}}


def image_folder(root: Path) -> Path:
    """A folder dataset of a few small RGB JPEGs, two classes in each split."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.jpg", quality=85)
    return root


def preflight_config(root: Path, **options) -> dict:
    data = {"dataset": "folder", "root": str(root), "num_workers": 0}
    run = {**TINY_RUN, "data": data}
    evit = {**run, "model": {**run["model"], "method": "evit", "keep_rate": 0.7, "drop_loc": [1, 2]}}
    return {"preflight": {"images": 6, "steps": 1, "warmup": 0, "rounds": 1, **options},
            "measure": {"base": run, "evit": evit},
            "grid": [{"name": name, "model": cfg["model"], "data": data, "train": cfg.get("train", {}),
                      "epochs": epochs, "gpus": 1}
                     for name, cfg, epochs in (("base", run, 3), ("evit", evit, 2))],
            "launcher": TINY_RUN["launcher"]}


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without a GPU, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_on_a_cpu_it_runs_the_cpu_parts_and_never_passes_a_gpu_part(tmp_path, no_gpu):
    cfg = preflight_config(image_folder(tmp_path / "data"))
    launch(cfg, tmp_path / "preflight", command="preflight")  # as the workflow's job runs it (inline here)
    result = json.loads((tmp_path / "preflight/preflight.json").read_text())
    checks = result["checks"]
    assert {name: checks[name]["status"] for name in GPU_CHECKS} == dict.fromkeys(GPU_CHECKS, "not run")
    assert all(checks[name]["reason"] == "no GPU" for name in GPU_CHECKS)
    assert [checks[name]["status"] for name in ("environment", "decode_cpu", "rates", "cost")] == ["passed"] * 4
    env = checks["environment"]
    assert env["torch"] == str(torch.__version__) and env["dali"] and env["memory_free_gb"] > 0
    assert set(env["disk_free_gb"]) == {str(tmp_path / "preflight"), str(tmp_path / "data")}
    decode = checks["decode_cpu"]  # DALI's CPU decoder against PIL: libjpeg-turbo both, the same pixels
    assert (decode["device"], decode["images"], decode["mean_level_diff"], decode["max_level_diff"]) == ("cpu", 6, 0, 0)
    rates = checks["rates"]["models"]
    assert set(rates) == {"base", "evit"} and all(m["loop_img_s"] > 0 and m["step_img_s"] > 0 for m in rates.values())
    assert rates["evit"]["gmacs"] < rates["base"]["gmacs"] and rates["base"]["device"].startswith("cpu")
    cost = checks["cost"]
    assert [(r["name"], r["measured_as"], r["train_images"]) for r in cost["rows"]] == [("base", "base", 8),
                                                                                       ("evit", "evit", 8)]
    assert cost["total_hours"] == pytest.approx(3 * 8 / rates["base"]["loop_img_s"] / 3600
                                                + 2 * 8 / rates["evit"]["loop_img_s"] / 3600)
    assert "CPU" in cost["note"]


def test_a_decode_beyond_the_tolerance_stops_it_with_one_error(tmp_path, no_gpu, capsys):
    root = image_folder(tmp_path / "data")
    # a 16-bit greyscale PNG: PIL's RGB clips it, DALI scales it to 8 bits
    odd = root / "val/b/16bit.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 65535, (30, 40), dtype=np.uint16)).save(odd)
    config = tmp_path / "preflight.yaml"
    config.write_text(yaml.safe_dump(preflight_config(root, images=12)))
    assert main(["preflight", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("evit preflight: error: preflight failed")
    assert "decode_cpu: DALI's decode differs from PIL's by" in err and f"in {odd} (index 4) (largest" in err
    assert "beyond the tolerance 1.0" in err
    decode = json.loads((tmp_path / "out/preflight.json").read_text())["checks"]["decode_cpu"]
    assert (decode["status"], decode["worst"]["image"]) == ("failed", f"{odd} (index 4)")  # val: b/0, b/1, b/16bit
    assert decode["max_level_diff"] > 100


def test_the_grid_cost_takes_each_experiment_at_the_rate_of_the_model_nearest_in_gmacs():
    measured = {"deit_s": {"gmacs": 4.6, "loop_img_s": 1000.0}, "evit_s_0.7": {"gmacs": 3.0, "loop_img_s": 1500.0}}
    grid = [{"name": "deit_s", "epochs": 300, "train_images": 1281167, "gmacs": 4.6, "gpus": 8},
            {"name": "evit_s_0.9", "epochs": 30, "train_images": 1281167, "gmacs": 4.0, "gpus": 8},
            {"name": "evit_s_0.5", "epochs": 30, "train_images": 1281167, "gmacs": 2.3, "gpus": 4}]
    cost = grid_cost(grid, measured)
    assert [r["measured_as"] for r in cost["rows"]] == ["deit_s", "deit_s", "evit_s_0.7"]
    hours = [300 * 1281167 / 1000 / 3600, 30 * 1281167 / 1000 / 3600, 30 * 1281167 / 1500 / 3600]
    assert [r["hours"] for r in cost["rows"]] == pytest.approx(hours)
    assert [r["wall_hours"] for r in cost["rows"]] == pytest.approx([hours[0] / 8, hours[1] / 8, hours[2] / 4])
    assert cost["total_hours"] == pytest.approx(sum(hours)) and math.isclose(hours[0], 106.76, rel_tol=1e-3)


def test_the_workflow_runs_it_before_every_training_job_and_not_when_disabled(tmp_path):
    site = write_config(tmp_path / "site.yaml", {"results": str(tmp_path / "results")})
    dry_run = snakemake("-n", "all", "--configfile", "workflow/config/demo.yaml", str(site)).stdout
    assert job_counts(dry_run).items() >= {"preflight_config": 1, "preflight": 1, "train": 19}.items()
    preflight = f"{tmp_path}/results/preflight/preflight.json"
    trains = dry_run.split("rule train:")[1:]
    assert len(trains) == 19 and all(preflight in job.split("output:")[0] for job in trains)
    report = dry_run.split("rule report:")[1].split("output:")
    assert preflight in report[0] and f"{tmp_path}/results/tables/preflight.html" in report[1]
    off = write_config(tmp_path / "off.yaml", {"results": str(tmp_path / "results"), "preflight": {"enabled": False}})
    dry_run = snakemake("-n", "all", "--configfile", "workflow/config/demo.yaml", str(off)).stdout
    assert "rule preflight" not in dry_run and f"{tmp_path}/results/preflight" not in dry_run
    assert job_counts(dry_run)["train"] == 19


def test_its_config_measures_trained_runs_on_one_node_with_the_runs_gpus(paper):
    cfg = paper
    job = plan_of(cfg).preflight_config()
    assert list(job["measure"]) == ["deit_s", "evit_s_0.7"]
    assert job["measure"]["evit_s_0.7"]["data"]["loader"] == "dali" and job["preflight"]["images"] == 256
    launcher = job["launcher"]
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["backend"]) == (
        1, 1, 8, "slurm")
    assert {g["name"] for g in job["grid"]} >= {"deit_s", "evit_s_0.5", "tome_s_r16"}
    assert not {g["name"] for g in job["grid"]} & {"evit_s_0.5_offshelf", "dynamicvit_s_0.7"}  # evaluated only
    assert {g["gpus"] for g in job["grid"]} == {8}
    cfg["preflight"]["measure"] = ["deit_s", "evit_s_0.7_offshelf"]
    with pytest.raises(ConfigError, match="preflight.measure: 'evit_s_0.7_offshelf' is not an experiment the "
                                          "workflow trains"):
        plan_of(cfg)


def test_the_report_shows_the_grid_cost_beside_the_results(tmp_path):
    inputs = write_inputs(tmp_path)
    measured = {"deit_s": {"gmacs": 4.6, "loop_img_s": 1000.0}}
    cost = grid_cost([{"name": "deit_s", "epochs": 300, "train_images": 1281167, "gmacs": 4.6, "gpus": 8}], measured)
    not_run = {"status": "not run", "reason": "one GPU: nothing to all-reduce across"}
    result = tmp_path / "preflight.json"
    result.write_text(json.dumps({"gpu": True, "checks": {
        "gpu": {"status": "passed"}, "nccl": not_run,
        "decode_gpu": {"status": "passed", "images": 256, "mean_level_diff": 0.41, "max_level_diff": 9},
        "rates": {"status": "passed", "models": {"deit_s": {"loop_over_step": 0.93, "limited_by": "step"}}},
        "cost": {**cost, "device": "NVIDIA H100 80GB HBM3", "note": "training only"}}}))
    spec = yaml.safe_load(inputs["experiments"].read_text())
    inputs["experiments"].write_text(yaml.safe_dump({**spec, "preflight": {"result": str(result)}}))
    written = R.report(inputs["experiments"], inputs["bench"], REFERENCE, inputs["out_dir"], log=lambda m: None)
    assert inputs["out_dir"] / "tables/preflight.html" in written
    md = (inputs["out_dir"] / "tables/preflight.md").read_text()
    assert "on NVIDIA H100 80GB HBM3: 107 GPU-hours" in md and "| deit_s " in md and "13.3" in md  # wall: / 8
    assert "nccl not run (one GPU: nothing to all-reduce across)" in md
    assert "decode_gpu passed (DALI vs PIL over 256 images: mean 0.41, largest 9 levels)" in md
    assert "rates: loop / step deit_s 0.93 (limited by step)" in md
    failed = json.loads(result.read_text())
    failed["checks"]["cost"] = {"status": "not run", "reason": "no measured rates"}
    result.write_text(json.dumps(failed))
    with pytest.raises(Exception, match="has no cost"):
        preflight_table({"result": str(result)})
