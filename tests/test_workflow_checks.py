"""The workflow before and after its jobs: the local check job runs before any cluster job and stops the
workflow at a bad input; a failed job's cause reaches the terminal on both profiles; editing a finished
experiment never deletes its result before a rerun that can replace it (`--config rerun=[name]`)."""
import json
from pathlib import Path

import pytest
import yaml

from test_workflow import ROOT, job_counts, snakemake, tiny_config, write_config

EXPERIMENTS = [
    {"name": "base", "method": "none", "recipe": "demo", "init": None, "tables": ["main"]},
    {"name": "evit", "keep_rate": 0.5, "tables": ["main"]},
]


def config_file(tmp_path: Path, experiments: list[dict] = EXPERIMENTS, **extra) -> Path:
    cfg = tiny_config(tmp_path / "results", [dict(e) for e in experiments], backend="inline", **extra)
    return write_config(tmp_path / "c.yaml", cfg)


def test_the_check_job_comes_before_every_cluster_job(tmp_path):
    off_the_shelf = {"name": "evit_off", "keep_rate": 0.5, "recipe": "none", "tables": ["main"]}  # an evaluate job
    dry_run = snakemake("-n", "all", "--configfile", str(config_file(tmp_path, [*EXPERIMENTS, off_the_shelf])))
    assert job_counts(dry_run.stdout)["check"] == 1
    for rule in ("train", "evaluate", "benchmark", "masking"):  # each waits on the check's stamp
        block = dry_run.stdout.split(f"rule {rule}:")[1].split("jobid")[0]
        assert f"{tmp_path}/results/checks/ok.json" in block, rule


@pytest.mark.slow
def test_a_bad_model_stops_the_workflow_at_the_local_check_before_any_job(tmp_path):
    cfg = yaml.safe_load(config_file(tmp_path).read_text())
    cfg["experiments"][1]["drop_loc"] = [1, 2, 7]  # the tiny model has 4 blocks
    proc = snakemake("all", "--cores", "2", "--configfile", str(write_config(tmp_path / "c.yaml", cfg)), check=False)
    assert proc.returncode != 0
    assert "experiment 'evit': model: cannot build 'evit_deit_tiny_patch16_224'" in proc.stderr
    assert "drop_loc must be increasing block indices in 0..3, got [1, 2, 7]" in proc.stderr
    assert not list((tmp_path / "results").rglob("*.log"))  # no job started (local rules wrote configs)
    assert not (tmp_path / "results/checks/ok.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_a_failed_jobs_cause_and_log_reach_the_terminal(tmp_path, profile):
    """A job that fails (here: resuming from an unreadable checkpoint) shows its error and its log's path in
    Snakemake's own output, on both profiles (the slurm profile's runs made local by --config)."""
    run_dir = tmp_path / "results/runs/base"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pth").write_bytes(b"not a checkpoint")
    proc = snakemake(f"{run_dir}/metrics.json", "--profile", str(ROOT / "workflow/profiles" / profile),
                     "--configfile", str(config_file(tmp_path)), "--config", "backend=local", check=False)
    assert proc.returncode != 0
    error = next(line for line in proc.stderr.splitlines() if line.startswith("evit launch: error:"))
    assert f"{run_dir}/checkpoint.pth is not a readable checkpoint" in error
    assert f"  log: {run_dir}/train.log" in proc.stderr
    assert "is not a readable checkpoint" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_editing_a_finished_experiment_keeps_its_result_until_an_explicit_rerun(tmp_path):
    results = tmp_path / "results"
    files = ("--configfile", str(config_file(tmp_path)))
    metrics = results / "runs/base/metrics.json"
    snakemake(str(metrics), "--cores", "2", *files)
    finished = metrics.read_text()

    cfg = yaml.safe_load(Path(files[1]).read_text())
    cfg["experiments"][0]["epochs"] = 2
    write_config(Path(files[1]), cfg)
    proc = snakemake("-n", "all", *files, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config: 1 experiment(s) changed since their run" in output
    assert "  base: train.epochs: run 1 vs config 2" in output
    assert "give each a new name" in output and "`--config rerun=[base]` moves its run dir" in output
    proc = snakemake("all", "--cores", "2", *files, check=False)  # not with a real run either
    assert proc.returncode != 0 and metrics.read_text() == finished

    assert "train" in job_counts(snakemake("-n", "all", *files, "--config", "rerun=[base]").stdout)
    snakemake(str(metrics), "--cores", "2", *files, "--config", "rerun=[base]")
    old = [p for p in (results / "runs").iterdir() if p.name.startswith("base.old-")]
    assert len(old) == 1 and (old[0] / "metrics.json").read_text() == finished  # moved aside, not deleted
    assert json.loads(metrics.read_text())["epochs"] == 2  # the rerun's result
