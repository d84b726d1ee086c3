"""End-to-end checks of the real SLURM cluster (two nodes, n1 and n2) that scripts/slurm_cluster.sh runs."""

import subprocess
import time

import pytest
import submitit
from submitit.core.utils import UncompletedJobError

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

TIMEOUT_S = 60


def _wait(predicate, what: str, timeout: float = TIMEOUT_S, interval: float = 0.5) -> None:
    """Polls predicate() until true; fails after timeout seconds."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    return out.splitlines()[0] if out else ""


def _executor(folder) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition="debug")
    return executor


def test_sbatch_job_completes_in_sacct(tmp_path):
    out = tmp_path / "job.out"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "-t", "1", "-o", str(out), "--wrap", "echo hello from slurm"],
        capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]
    _wait(lambda: _sacct_state(job_id) == "COMPLETED", f"job {job_id} COMPLETED in sacct")
    assert out.read_text().strip() == "hello from slurm"


def test_submitit_slurm_executor_returns_result(tmp_path):
    # Defined locally so that cloudpickle ships it by value: the job's Python
    # cannot import this test module (tests/ is not on its sys.path).
    def add(a: int, b: int) -> int:
        return a + b

    executor = _executor(tmp_path)
    assert executor.cluster == "slurm"
    job = executor.submit(add, 2, 3)
    _wait(lambda: job.done(force_check=True), f"submitit job {job.job_id} to finish", interval=1)
    assert job.result() == 5


def test_two_node_job_runs_one_task_on_each_node(tmp_path):
    # Defined locally so that cloudpickle ships it by value (see above).
    def where() -> tuple:
        import os

        import submitit

        env = submitit.JobEnvironment()
        return os.environ["SLURMD_NODENAME"], env.global_rank, env.num_tasks, os.environ["SLURM_JOB_NODELIST"]

    executor = _executor(tmp_path)
    executor.update_parameters(nodes=2, tasks_per_node=1, cpus_per_task=1)
    job = executor.submit(where)
    _wait(lambda: job.done(force_check=True), f"2-node submitit job {job.job_id} to finish", interval=1)
    # One result per task, i.e. per node (result() asserts there is one task).
    results = sorted(job.results())
    assert results == [("n1", 0, 2, "n[1-2]"), ("n2", 1, 2, "n[1-2]")]


def test_scancelled_job_raises_uncompleted_job_error(tmp_path):
    executor = _executor(tmp_path)
    job = executor.submit(time.sleep, 300)
    # job.state polls sacct with a growing back-off; force a fresh look instead.
    _wait(lambda: job.get_info(mode="force").get("State") == "RUNNING", f"job {job.job_id} to run")
    # Cancel from outside submitit, as a user or the scheduler would. result()
    # must then raise, not hang: that needs sacct, i.e. slurmdbd accounting.
    cancelled_at = time.monotonic()
    subprocess.run(["scancel", job.job_id], check=True)
    _wait(lambda: job.done(force_check=True), f"cancelled job {job.job_id} seen as done", interval=1)
    with pytest.raises(UncompletedJobError):
        job.result()  # submitit waits ~15 s for a result file before it raises
    assert time.monotonic() - cancelled_at < TIMEOUT_S
    assert job.state.startswith("CANCELLED")
