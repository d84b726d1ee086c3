"""`evit bench-input`: the input pipeline, the training step and the loop of a run config, on real data."""
from __future__ import annotations

import json

import pytest
import yaml

from evit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_input_reports_three_rates_and_what_limits(tmp_path, capsys):
    cfg = {
        "model": {"arch": "deit_tiny_patch16_224", "method": "evit", "keep_rate": 0.7, "drop_loc": [1, 2],
                  "img_size": 28, "patch_size": 4, "kwargs": {"embed_dim": 32, "depth": 4, "num_heads": 2}},
        "data": {"dataset": "fashion_mnist", "num_workers": 0, "train_subset": 64, "val_subset": 16},
        "train": {"recipe": "demo", "batch_size": 16, "mixup": 0.8, "cutmix": 1.0},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "res.json"
    # 4 batches per epoch: the timed batches run on through the next epochs
    assert main(["bench-input", "--config", str(tmp_path / "run.yaml"), "--steps", "5", "--warmup", "1",
                 "--rounds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert all(len(res["rates"][k]) == 2 and min(res["rates"][k]) > 0 for k in ("input", "step", "loop"))
    assert res["limited_by"] == ("input" if res["input_img_s"] < res["step_img_s"] else "step")
    assert res["input_cores"] == 1 and res["input_img_s_per_core"] == res["input_img_s"]
    assert res["loop_over_step"] == pytest.approx(res["loop_img_s"] / res["step_img_s"])
    assert len(res["input_thread_us"]) == 2 and res["input_thread_us_per_img"] > 0   # torch: all on the thread
    assert "| input pipeline alone (loader + batch stage) |" in printed and "Limited by the" in printed
    assert "loader torch, batch 16" in printed
    assert f"The loader took {res['input_thread_us_per_img']:.1f} us of the training thread's CPU time" in printed


def test_bench_input_names_a_bad_config(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"data": {"dataset": "fashion_mnist", "num_workers": -1}}))
    assert main(["bench-input", "--config", str(tmp_path / "run.yaml")]) == 2
    assert "data.num_workers" in capsys.readouterr().err
