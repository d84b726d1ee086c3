"""The launcher: option validation, local-backend failures, and the real SLURM cluster (requeue, reattach, cancel)."""
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from evit.launch import LaunchError, launch, resolve_launcher

# Jobs run with the cpus_per_task threads they ask for (1 here); the inline references must match them, as
# fp32 sums may round differently with another thread count.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_run(epochs: int, backend: str, **launcher) -> dict:
    """A small but real Fashion-MNIST training: a 4-block EViT on 512 images."""
    return {
        "model": {"arch": "evit_deit_tiny_patch16_224", "img_size": 28, "patch_size": 4, "keep_rate": 0.7,
                  "drop_loc": [1, 2], "kwargs": {"embed_dim": 32, "depth": 4, "num_heads": 2}},
        "data": {"dataset": "fashion_mnist", "num_workers": 0, "train_subset": 512, "val_subset": 256},
        "train": {"recipe": "demo", "epochs": epochs, "batch_size": 64, "eval_every": 0},
        "launcher": {"backend": backend, "cpus_per_task": 1, "timeout_min": 10, **launcher},
    }


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def sh(*cmd) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def job_id(run_dir: Path) -> str:
    import json

    return json.loads((run_dir / "job.json").read_text())["job_id"]


def in_thread(fn, *args, **kwargs):
    """Run fn in a thread; returns a function that joins and returns its result or raises its error."""
    box = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join(timeout=600):
        thread.join(timeout)
        assert not thread.is_alive(), f"{fn.__name__} still running after {timeout} s"
        if "error" in box:
            raise box["error"]
        return box["result"]

    return join


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def epochs_logged(run_dir: Path) -> int:
    log = run_dir / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory):
    """Weights of an uninterrupted 6-epoch run, trained in this process."""
    run_dir = tmp_path_factory.mktemp("reference")
    launch(tiny_run(6, "inline"), run_dir)
    return final_weights(run_dir)


def test_launcher_options_are_validated_by_name():
    with pytest.raises(ValueError, match=r"unknown launcher key\(s\) \['gpus'\]"):
        resolve_launcher({"gpus": 8})
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_launcher({}, backend="auto")
    with pytest.raises(ValueError, match="timeout_min must be a positive integer"):
        resolve_launcher({"timeout_min": 0})
    with pytest.raises(ValueError, match="nodes=2 needs the slurm backend"):
        resolve_launcher({"nodes": 2, "backend": "local"})
    opts = resolve_launcher({"partition": "gpu", "sbatch_extra": {"exclude": "n1"}}, backend="slurm")
    assert opts["backend"] == "slurm" and opts["partition"] == "gpu" and opts["max_failures"] == 2


def test_failed_local_job_is_resubmitted_then_reported_with_its_logs(tmp_path):
    cfg = tiny_run(1, "local", max_failures=1)
    cfg["data"]["root"] = str(tmp_path / "no-such-dataset")
    lines = []
    with pytest.raises(LaunchError, match=r"after 1 resubmission\(s\).*logs: .*\.out") as info:
        launch(cfg, tmp_path / "run", log=lines.append, poll_s=0.5)
    assert "Fashion-MNIST not found" in str(info.value)
    assert sum(line.startswith("submitted") for line in lines) == 2


def test_local_job_output_is_relayed_while_it_runs(tmp_path):
    lines = []
    metrics = launch(tiny_run(1, "local"), tmp_path / "run", log=lines.append, poll_s=0.5)
    relayed = [line for line in lines if line.startswith("  | ")]
    assert any("epoch 1/1: loss" in line for line in relayed), lines
    assert any(f"top-1 {metrics['top1']:.2f}" in line for line in relayed)


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_training_completes_and_preemption_resumes_bitwise(tmp_path, reference_weights):
    run_dir = tmp_path / "run"
    lines = []
    join = in_thread(launch, tiny_run(6, "slurm"), run_dir, log=lines.append, poll_s=1)
    wait_for(lambda: epochs_logged(run_dir) >= 2, 180, "two epochs on SLURM")
    jid = job_id(run_dir)
    sh("scontrol", "requeue", jid)  # preemption: SLURM kills the job and queues it again
    metrics = join()
    assert metrics["top1"] > 0 and (run_dir / "metrics.json").exists()
    assert_bitwise_equal(final_weights(run_dir), reference_weights)
    assert job_id(run_dir) == jid  # the same job, requeued, not a resubmission
    assert "requeue" in sh("sacct", "-j", jid, "-n", "-X", "-D", "-o", "State%20").lower()
    assert epochs_logged(run_dir) == 6


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_time_limit_checkpoints_and_requeues(tmp_path):
    """A 1-minute time limit with USR2 30 s before it: the run is requeued (maybe more than once) and resumes.

    100 epochs take 60-70 s on one core here, well past the first signal (60 epochs could finish before it).
    """
    epochs = 100
    reference = tmp_path / "reference"
    launch(tiny_run(epochs, "inline"), reference)
    run_dir = tmp_path / "run"
    launch(tiny_run(epochs, "slurm", timeout_min=1, signal_delay_s=30), run_dir, poll_s=1)
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference))
    jid = job_id(run_dir)
    log = (run_dir / "submitit" / f"{jid}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in log and "this job is timed-out" in log
    assert "REQUEUED" in sh("sacct", "-j", jid, "-n", "-X", "-D", "-o", "State%20")
    assert epochs_logged(run_dir) == epochs


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_reinvoking_the_launcher_reattaches_instead_of_resubmitting(tmp_path):
    run_dir = tmp_path / f"reattach{time.time_ns()}"  # a job name no other test has
    first = in_thread(launch, tiny_run(4, "slurm"), run_dir, poll_s=1)
    wait_for(lambda: (run_dir / "job.json").exists(), 60, "the first submission")
    jid = job_id(run_dir)
    lines = []
    second = launch(tiny_run(4, "slurm"), run_dir, log=lines.append, poll_s=1)  # e.g. a restarted orchestrator
    assert any(f"reattaching to SLURM job {jid}" in line for line in lines)
    assert first()["top1"] == second["top1"]
    assert job_id(run_dir) == jid
    jobs = sh("sacct", "-n", "-X", "-S", "now-10minutes", "-o", "JobID,JobName%60").split("\n")
    assert sum(run_dir.name in line and "evit-train" in line for line in jobs) == 1


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_cancelled_job_gives_a_clear_error_promptly(tmp_path):
    run_dir = tmp_path / "run"
    join = in_thread(launch, tiny_run(200, "slurm"), run_dir, poll_s=1)
    wait_for(lambda: epochs_logged(run_dir) >= 1, 180, "the job to train")
    sh("scancel", job_id(run_dir))
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"was cancelled \(CANCELLED.*logs: "):
        join(timeout=120)
    assert time.monotonic() - t0 < 90
