"""Every script in scripts/ runs: each Python script in its smallest real configuration (tiny models, a few steps,
on the CPU); each shell script parses (``bash -n``) and runs as far as this machine allows without side effects."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from torch._dynamo.testing import CompileCounter

from evit import engine as E

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TESTED = {"bench_compile.py", "bench_engine.py", "bench_explicit.py", "bench_overhead.py", "bench_pack.py",
          "bench_worker.py",
          "fashion_jpegs.py", "get_fashion_mnist.sh", "report_screenshot.sh", "slurm_cluster.sh",
          "rehearsal.sh", "rehearsal_data.py"}  # the rehearsal's: tests/test_rehearsal.py, and CI runs them

pytestmark = pytest.mark.usefixtures("one_thread")


def script(name: str):
    """scripts/NAME.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bash(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60, **kwargs)


def test_every_script_is_tested_here():
    assert {p.name for p in SCRIPTS.iterdir() if p.suffix in (".py", ".sh")} == TESTED


def test_bench_compile_builds_the_run_eager_and_compiled(tmp_path, monkeypatch, capsys):
    """The run built twice through `Trainer.build`; the compiled one really goes through `torch.compile` (here
    with a counting backend that runs dynamo's graphs as they are: no inductor, which takes minutes on a CPU)."""
    cfg = {
        "model": {"arch": "deit_tiny_patch16_224", "method": "evit", "keep_rate": 0.7, "drop_loc": [1],
                  "img_size": 28, "patch_size": 7, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}},
        "data": {"dataset": "fashion_mnist", "num_workers": 0, "train_subset": 32, "val_subset": 8},
        "train": {"recipe": "demo", "batch_size": 8, "device": "cpu"},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    counter = CompileCounter()
    monkeypatch.setattr(E, "compile_for_training", functools.partial(E.compile_for_training, backend=counter))
    dynamo = torch._dynamo.config
    with dynamo.patch(recompile_limit=dynamo.recompile_limit,
                      fail_on_recompile_limit_hit=dynamo.fail_on_recompile_limit_hit):
        res = script("bench_compile").main(["--config", str(tmp_path / "run.yaml"), "--steps", "2", "--rounds", "2"])
    torch._dynamo.reset()
    assert counter.frame_count >= 1                             # the compiled run was compiled
    assert min(res["img_s"].values()) > 0 and res["compiled_over_eager"] > 0
    assert set(res["first_s"]) == {"eager", "compiled"}
    assert "evit deit_tiny_patch16_224 {'keep_rate': 0.7}, 28 px, batch 8" in capsys.readouterr().out


def test_bench_engine_trains_the_same_weights_as_a_bare_loop(tmp_path):
    out = tmp_path / "res.json"
    res = script("bench_engine").main(["--depth", "2", "--embed-dim", "32", "--heads", "2", "--keep-rate", "0.7",
                                       "--batch-size", "8", "--steps", "2", "--rounds", "2", "--loader",
                                       "--out", str(out)])
    assert res["same_weights"] is True
    assert all(res[k]["median_img_s"] > 0 and res[k]["rounds"] == 2
               for k in ("bare_timm", "engine", "loader_plain", "loader_seeded"))
    assert json.loads(out.read_text())["engine_overhead_pct"] == pytest.approx(res["engine_overhead_pct"])


def test_bench_explicit_checks_and_times_both_evits():
    medians = script("bench_explicit").main(["--size", "tiny", "--img-size", "64", "--batch-size", "2",
                                             "--rounds", "1", "--keep-rates", "0.7"])
    assert set(medians) == {"timm deit_tiny_patch16_224", "ours (SDPA) 0.7", "explicit attention 0.7"}
    assert min(medians.values()) > 0


def test_bench_overhead_counts_ops(capsys):
    specs = ["deit_tiny_patch16_224:img_size=32,depth=2",
             "evit_deit_tiny_patch16_224:img_size=32,depth=2,keep_rate=0.5,fuse_token=true,drop_loc=[1]"]
    script("bench_overhead").main([*specs, "--batch-size", "1", "--amp", "bf16", "--detail", "3"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(tuple(specs))]
    assert [r[0] for r in rows] == specs and all(int(r[1]) > 0 and int(r[2]) >= int(r[1]) for r in rows)
    assert f"  {specs[1]}: " in out                          # the EViT's op differences to the DeiT


@pytest.mark.slow
def test_bench_overhead_times_an_inductor_compile():
    res = script("bench_overhead").compile_time("deit_tiny_patch16_224:img_size=32,depth=1", 1, "fp32")
    assert res["seconds"] > 0 and res["graphs"] == 1 and res["breaks"] == 0 and res["kernels"] > 0


def test_fashion_jpegs_then_bench_worker_on_them(tmp_path):
    script("fashion_jpegs").main([str(tmp_path), "--train", "6", "--val", "2"])
    train, val = sorted((tmp_path / "train").rglob("*.JPEG")), sorted((tmp_path / "val").rglob("*.JPEG"))
    assert len(train) == 6 and len(val) == 2
    res = script("bench_worker").main([str(tmp_path / "train"), "--n", "4", "--rounds", "1", "--img-size", "64"])
    assert all(res[k][1] > 0 for k in ("decode", "decode_draft_half", "worker_before_float", "worker_after_uint8"))
    assert res["bytes_per_image"] == {"before": 4 * 3 * 64 ** 2, "after": 3 * 64 ** 2}
    assert 0 <= res["draft_half_possible_pct"] <= 100


def test_bench_pack_reads_a_folder_and_its_pack_cold_and_warm(tmp_path, capsys):
    from evit.data.packed import pack_dataset

    script("fashion_jpegs").main([str(tmp_path / "folder"), "--train", "6", "--val", "2"])
    pack_dataset(tmp_path / "folder", tmp_path / "pack", splits=("train",), threads=1)
    res = script("bench_pack").main(["--folder", str(tmp_path / "folder"), "--pack", str(tmp_path / "pack"),
                                     "--images", "4", "--cache", "fadvise"])
    assert res["images"] == 4 and res["cache"] == "fadvise"
    for name in ("folder", "pack"):
        assert all(res[name][state]["img_s"] > 0 for state in ("cold", "warm"))
    assert res["folder"]["cold"]["mean_kb"] == res["pack"]["warm"]["mean_kb"] > 10    # the same bytes from both
    assert "pack / folder, cold: " in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(n for n in TESTED if n.endswith(".sh")))
def test_shell_scripts_parse(name):
    proc = bash("-n", str(SCRIPTS / name))
    assert proc.returncode == 0, proc.stderr


def test_get_fashion_mnist_checks_a_directory(tmp_path):
    files = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz"]
    for f in files[:3]:
        (tmp_path / f).write_bytes(b"x")
    missing = bash(str(SCRIPTS / "get_fashion_mnist.sh"), str(tmp_path))
    assert missing.returncode == 1 and f"Fashion-MNIST is not in {tmp_path}" in missing.stderr
    (tmp_path / files[3]).write_bytes(b"x")
    assert bash(str(SCRIPTS / "get_fashion_mnist.sh"), str(tmp_path)).returncode == 0


def test_report_screenshot_opens_the_result_in_the_browser(tmp_path):
    """With a stand-in for chromium, which records the page it is given and writes the PNG."""
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "chromium"
    fake.write_text('#!/usr/bin/env bash\nfor a in "$@"; do case $a in --screenshot=*) png=${a#--screenshot=};; '
                    'file://*) cp "${a#file://}" "$(dirname "$0")/page.html";; esac; done\necho PNG > "$png"\n')
    fake.chmod(0o755)
    report = tmp_path / "report.html"
    report.write_text('<html><script>var results = {"a": {"name": "main.html"}};</script></html>')
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    proc = bash(str(SCRIPTS / "report_screenshot.sh"), str(report), str(tmp_path / "out" / "shot.png"), "main.html",
                env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "shot.png").read_text() == "PNG\n"
    page = (tmp_path / "bin" / "page.html").read_text()
    assert page.startswith(report.read_text()) and 'results[p].name === "main.html"' in page
    other = bash(str(SCRIPTS / "report_screenshot.sh"), str(report), str(tmp_path / "x.png"), "kept_tokens.png",
                 env=env)
    assert other.returncode == 1 and "has no result named kept_tokens.png" in other.stderr


def test_slurm_cluster_names_its_commands():
    """Only its usage: the cluster is never started from the tests here (conftest's `slurm_cluster` does)."""
    proc = bash(str(SCRIPTS / "slurm_cluster.sh"), "help")
    assert proc.returncode == 2 and "usage:" in proc.stderr and "install|start|stop|status" in proc.stderr
