"""The launcher: checks before submission, failures, the sbatch script, and the real two-node SLURM cluster
(multi-node DDP, requeue, preemption, reattach, cancel)."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from evit.benchmark import isolation
from evit.config.launcher import resolve_bench_launcher, resolve_launcher
from evit.errors import ConfigError, LaunchError
from evit.launch import RunTask, launch, make_executor

ROOT = Path(__file__).resolve().parents[1]
EVIT = [sys.executable, "-m", "evit.cli"]

# Jobs run with the cpus_per_task threads they ask for (1 here); the inline references must match them, as
# fp32 sums may round differently with another thread count.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_run(epochs: int, backend: str, **launcher) -> dict:
    """A small but real Fashion-MNIST training: a 4-block EViT on 512 images."""
    return {
        "model": {"arch": "deit_tiny_patch16_224", "method": "evit", "img_size": 28, "patch_size": 4,
                  "keep_rate": 0.7, "drop_loc": [1, 2], "kwargs": {"embed_dim": 32, "depth": 4, "num_heads": 2}},
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


def child_processes(pid: int) -> list[int]:
    """The pids of the children of process `pid` (a local job's id is its controller, which starts the task)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def job_id(run_dir: Path) -> str:
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


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


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


@pytest.mark.parametrize("section, key, message", [
    ("train", "blrr", "train.blrr: unknown key"),
    ("data", "num_workrs", "data.num_workrs: unknown key"),
    ("launcher", "partitoin", "unknown launcher key(s) ['partitoin']"),
])
def test_a_bad_config_is_refused_before_anything_is_submitted(tmp_path, section, key, message):
    cfg = tiny_run(1, "local")
    cfg[section][key] = 4
    with pytest.raises(ConfigError) as info:
        launch(cfg, tmp_path / "run")
    assert message in str(info.value)
    assert not (tmp_path / "run").exists()  # no job.json, no submitit folder: nothing was queued


def test_a_missing_init_checkpoint_is_refused_before_submission(tmp_path):
    cfg = tiny_run(1, "local")
    cfg["train"].update(recipe="finetune", init_checkpoint=str(tmp_path / "deit_s.pth"))
    with pytest.raises(ConfigError, match=r"train.init_checkpoint: .*deit_s.pth does not exist"):
        launch(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="no checkpoint to evaluate"):
        launch(tiny_run(1, "local"), tmp_path / "run", command="eval")
    with pytest.raises(ConfigError, match=r"checkpoint .*deit_s.pth to evaluate does not exist"):
        launch(tiny_run(1, "local"), tmp_path / "run", command="eval", checkpoint=tmp_path / "deit_s.pth")


def test_missing_data_fails_at_once_without_resubmission(tmp_path):
    cfg = tiny_run(1, "local", max_failures=3)
    cfg["data"]["root"] = str(tmp_path / "no-such-dataset")
    lines = []
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(cfg, tmp_path / "run", log=lines.append, poll_s=0.5)
    message = str(info.value)
    assert "Fashion-MNIST not found" in message.splitlines()[0]
    assert "task 0 logs: " in message and "_0_log.out" in message
    assert "Traceback" not in message
    assert sum(line.startswith("submitted") for line in lines) == 1  # a retry would fail the same way
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_a_bad_image_fails_at_once_naming_the_file_without_resubmission(tmp_path):
    """An image that a DataLoader worker cannot decode is reported once, by name, and the run is not resubmitted."""
    from PIL import Image

    from evit.data.datasets import FashionMNIST

    images = FashionMNIST(None, "val").images
    root = tmp_path / "garments"
    for split in ("train", "val"):
        for c in ("bags", "shirts"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(images[i].numpy()).convert("RGB").save(root / split / c / f"{i}.jpg")
    bad = root / "train" / "shirts" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    cfg = tiny_run(1, "local", max_failures=3)
    cfg["data"] = {"dataset": "folder", "root": str(root), "num_workers": 1}
    cfg["train"].update(batch_size=8, augment="none")
    lines = []
    with pytest.raises(LaunchError) as info:
        launch(cfg, tmp_path / "run", log=lines.append, poll_s=0.5)
    first = str(info.value).splitlines()[0]
    assert f"cannot decode or augment the image {bad} (index 6): OSError" in first, first
    assert sum(line.startswith("submitted") for line in lines) == 1


def test_a_checkpoint_of_another_architecture_fails_at_once(tmp_path):
    import timm

    import evit.models  # noqa: F401

    shallow = timm.create_model("evit_deit_tiny_patch16_224", img_size=28, patch_size=4, num_classes=10, embed_dim=32,
                                depth=2, num_heads=2, drop_loc=(1,))
    checkpoint = tmp_path / "shallow.pth"
    torch.save({"model": shallow.state_dict()}, checkpoint)
    lines = []
    with pytest.raises(LaunchError, match=r"shallow.pth does not fit EViT") as info:
        launch(tiny_run(1, "local", max_failures=2), tmp_path / "run", command="eval", checkpoint=checkpoint,
               log=lines.append, poll_s=0.5)
    assert "missing" in str(info.value) and "task 0 logs: " in str(info.value)
    assert sum(line.startswith("submitted") for line in lines) == 1


def test_a_comparison_backbone_is_evaluated_by_its_own_job_and_wrong_weights_fail_at_once(tmp_path):
    """`--command eval-backbone` (the comparison's jobs): a local job evaluates timm's model of a pretrained tag
    with its safetensors weights and writes eval.json; weights of another model fail once, not resubmitted."""
    import timm
    from safetensors.torch import save_file

    name = "test_vit.r160_in1k"
    cfg = {"model": {"arch": name}, "data": {"dataset": "fashion_mnist", "num_workers": 0, "val_subset": 16},
           "launcher": {"backend": "local", "cpus_per_task": 1, "max_failures": 2}}
    save_file(timm.create_model(name, num_classes=10).state_dict(), tmp_path / "model.safetensors")
    result = launch(cfg, tmp_path / "good", command="eval-backbone", checkpoint=tmp_path / "model.safetensors",
                    log=lambda m: None, poll_s=0.5)
    assert json.loads((tmp_path / "good" / "eval.json").read_text()) == result
    assert (result["timm"], result["img_size"], result["num_eval_images"]) == (name, 160, 16)
    save_file(timm.create_model("test_vit2.r160_in1k", num_classes=10).state_dict(), tmp_path / "other.safetensors")
    lines = []
    with pytest.raises(LaunchError, match=f"other.safetensors does not fit timm's {name}"):
        launch(cfg, tmp_path / "bad", command="eval-backbone", checkpoint=tmp_path / "other.safetensors",
               log=lines.append, poll_s=0.5)
    assert sum(line.startswith("submitted") for line in lines) == 1


def test_a_truncated_checkpoint_is_one_clear_error_and_is_left_as_it_was(tmp_path):
    run_dir = tmp_path / "run"
    launch(tiny_run(1, "inline"), run_dir)
    checkpoint = run_dir / "checkpoint.pth"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    (run_dir / "metrics.json").unlink()
    proc = subprocess.run([*EVIT, "launch", "--config", str(write_yaml(tmp_path / "c.yaml", tiny_run(1, "local"))),
                           "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    error = proc.stderr.strip()
    assert str(checkpoint) in error and "Traceback" not in error, error
    assert proc.stdout.count("submitted train") == 1
    assert checkpoint.read_bytes() == data[: len(data) // 2]


def test_a_crashed_local_job_is_resubmitted_and_resumes_bitwise(tmp_path):
    epochs = 20
    launch(tiny_run(epochs, "inline"), tmp_path / "reference")
    run_dir = tmp_path / "run"
    lines = []
    join = in_thread(launch, tiny_run(epochs, "local", max_failures=1), run_dir, log=lines.append, poll_s=0.5)
    wait_for(lambda: epochs_logged(run_dir) >= 2, 180, "two epochs")
    for pid in child_processes(int(job_id(run_dir))):  # the process that trains: a crash a retry can fix
        os.kill(pid, signal.SIGKILL)
    join()
    assert sum(line.startswith("submitted") for line in lines) == 2, lines
    assert 2 <= epochs_logged(run_dir) == epochs
    assert_bitwise_equal(final_weights(run_dir), final_weights(tmp_path / "reference"))
    assert json.loads((run_dir / "job.json").read_text())["failures"] == 1


def test_a_two_task_local_job_trains_with_ddp_and_returns_rank_0s_result(tmp_path):
    run_dir = tmp_path / "run"
    metrics = launch(tiny_run(1, "local", tasks_per_node=2), run_dir, poll_s=0.5)
    assert metrics["provenance"]["world_size"] == 2
    assert json.loads((run_dir / "job.json").read_text())["num_tasks"] == 2
    assert json.loads((run_dir / "metrics.json").read_text())["top1"] == metrics["top1"]  # rank 0 wrote it


def test_on_usr2_a_task_hands_submitit_a_fresh_copy_of_itself(tmp_path):
    """What submitit requeues: `checkpoint()` must return a DelayedSubmission of a new RunTask with the same run."""
    task = RunTask("eval", tiny_run(1, "slurm"), tmp_path, checkpoint=str(tmp_path / "w.pth"))
    delayed = task.checkpoint()
    fresh = delayed.function
    assert isinstance(fresh, RunTask) and fresh is not task
    assert (fresh.command, fresh.config, fresh.run_dir, fresh.eval_checkpoint) == (
        "eval", task.config, str(tmp_path), str(tmp_path / "w.pth"))


def test_the_waiting_launcher_imports_no_torch():
    code = ("import sys; from evit import cli; cli.build_parser('launch'); import evit.launch; "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'pandas', 'seaborn', 'numpy'});"
            "print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_whole_local_launch_never_imports_torch_in_the_launcher(tmp_path):
    """`evit launch` of a real local training and then of its evaluation: the launcher process waits on the jobs
    and unpickles their results (with their provenance), and never imports torch; its peak RSS is printed."""
    config = write_yaml(tmp_path / "c.yaml", tiny_run(1, "local"))
    run_dir = tmp_path / "run"
    code = f"""if True:
        import json, sys
        from pathlib import Path
        from evit import cli
        common = ["--config", {str(config)!r}, "--run-dir", {str(run_dir)!r}]
        rcs = [cli.main(["launch", *common]),
               cli.main(["launch", "--command", "eval", "--checkpoint", {str(run_dir / "checkpoint.pth")!r}, *common])]
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "timm", "numpy"}})
        # VmHWM, not ru_maxrss: that keeps the peak of the (torch-laden) pytest process across fork and exec
        peak_kb = next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                       if line.startswith("VmHWM"))
        print(json.dumps(dict(rcs=rcs, heavy=heavy, peak_rss_mb=int(peak_kb) / 1024)))
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"launcher peak RSS over a local train + eval: {summary['peak_rss_mb']:.0f} MB")
    assert summary["rcs"] == [0, 0] and summary["heavy"] == [], summary
    assert json.loads((run_dir / "eval.json").read_text())["provenance"]["torch"] == torch.__version__


def test_sbatch_script_of_a_multi_node_gpu_job(tmp_path):
    """One task per GPU: 2 nodes x 8 GPUs is 16 processes, each with its CPUs; srun ends all if one fails."""
    opts = resolve_launcher({"nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 10, "mem_gb": 480,
                             "timeout_min": 1440, "partition": "gpu", "account": "vision", "signal_delay_s": 300},
                            backend="slurm")
    executor = make_executor(opts, tmp_path, name="evit-train-x")
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --mem=480GB", "#SBATCH --time=1440",
                 "#SBATCH --partition=gpu", "#SBATCH --account=vision", "#SBATCH --signal=USR2@300",
                 "#SBATCH --job-name=evit-train-x"):
        assert line in script.splitlines(), (line, script)
    srun = next(line for line in script.splitlines() if line.startswith("srun"))
    assert "--kill-on-bad-exit=1" in srun


def test_the_bench_job_has_its_node_to_itself(tmp_path):
    """sbatch --exclusive for the bench (unless its launcher says otherwise), not for runs; the CSV records it."""
    def script(opts):
        executor = make_executor(opts, tmp_path, name="evit-bench")
        return executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid").splitlines()

    assert "#SBATCH --exclusive" in script(resolve_bench_launcher({"cpus_per_task": 4}, backend="slurm"))
    assert "#SBATCH --exclusive" not in script(resolve_bench_launcher({"exclusive": False}, backend="slurm"))
    assert "#SBATCH --exclusive" not in script(resolve_launcher({"cpus_per_task": 4}, backend="slurm"))
    assert isolation({"launcher": {"backend": "slurm"}}) == "exclusive node"
    assert isolation({"launcher": {"backend": "slurm", "exclusive": False}}) == "shared"
    assert isolation({"launcher": {"backend": "local"}, "after_runs": True}) == "after the runs"
    assert isolation({"launcher": {"backend": "local"}}) == "shared"
    with pytest.raises(ConfigError, match="launcher exclusive must be true or false, got 'yes'"):
        resolve_launcher({"exclusive": "yes"})


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
    """SLURM's own time limit, 1 minute with USR2 15 s before it: the run is checkpointed, requeued (maybe more
    than once) and resumed, and ends with bitwise the weights of an uninterrupted run.

    slurmctld checks time limits every 30 s and signals at the last check before the signal is due, so USR2
    comes 15-45 s into each start of the job: after submitit has installed its handler, even on a loaded
    machine. The run is sized from this machine's epoch time, measured first, to train for about 50 s, so that
    it is still running at the first signal whatever the load. The uninterrupted run trains meanwhile, on the
    other core."""
    calibration = tmp_path / "calibration"
    launch(tiny_run(4, "inline"), calibration)
    epoch_s = min(json.loads(line)["epoch_time_s"] for line in (calibration / "log.jsonl").read_text().splitlines())
    epochs = round(50 / epoch_s)
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    slurm_run = in_thread(launch, tiny_run(epochs, "slurm", timeout_min=1, signal_delay_s=15), run_dir, poll_s=1)
    launch(tiny_run(epochs, "inline"), reference)
    slurm_run(timeout=900)
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


# ------------------------------------------------------------------------------------------ two nodes


def two_node_run(epochs: int, **launcher) -> dict:
    """The tiny training as DDP over the cluster's two nodes, one process each."""
    return tiny_run(epochs, "slurm", nodes=2, tasks_per_node=1, **launcher)


def task_log(run_dir: Path, jid: str, task: int) -> str:
    return (run_dir / "submitit" / f"{jid}_{task}_log.out").read_text()


def job_processes(jid: str) -> dict:
    """{SLURM_PROCID: pid} of the python processes of SLURM job `jid` that run its tasks."""
    found = {}
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = dict(kv.split("=", 1) for kv in env_file.read_text().split("\0") if "=" in kv)
            cmdline = (env_file.parent / "cmdline").read_text()
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == jid and "SLURM_PROCID" in env and "submitit" in cmdline:
            found[int(env["SLURM_PROCID"])] = int(env_file.parent.name)
    return found


TWO_NODE_EPOCHS = 30


@pytest.fixture(scope="module")
def two_node_reference(tmp_path_factory):
    """An uninterrupted 2-node x 1-task DDP training through the launcher."""
    run_dir = tmp_path_factory.mktemp("two_nodes") / "run"
    lines = []
    metrics = launch(two_node_run(TWO_NODE_EPOCHS), run_dir, log=lines.append, poll_s=1)
    return run_dir, metrics, lines


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_two_node_ddp_training_through_the_launcher(two_node_reference):
    run_dir, metrics, lines = two_node_reference
    jid = job_id(run_dir)
    assert metrics["provenance"]["world_size"] == 2 and metrics["epochs"] == TWO_NODE_EPOCHS
    assert json.loads((run_dir / "metrics.json").read_text())["top1"] == metrics["top1"]
    assert json.loads((run_dir / "job.json").read_text())["num_tasks"] == 2
    assert any(f"slurm job {jid} (2 tasks)" in line for line in lines)
    assert any(f"epoch {TWO_NODE_EPOCHS}/{TWO_NODE_EPOCHS}: loss" in line for line in lines)  # rank 0's output
    accounting = lambda: sh("sacct", "-j", jid, "-n", "-X", "-o", "State,NNodes,NodeList%20").split()  # noqa: E731
    wait_for(lambda: accounting()[0] != "RUNNING", 60, "the job to leave RUNNING")  # results come before the end
    assert accounting() == ["COMPLETED", "2", "n[1-2]"]


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_two_node_job_preempted_at_a_random_step_resumes_every_rank_bitwise(tmp_path, two_node_reference):
    run_dir = tmp_path / "run"
    join = in_thread(launch, two_node_run(TWO_NODE_EPOCHS), run_dir, poll_s=1)
    wait_for(lambda: epochs_logged(run_dir) >= 1, 180, "the first epoch on two nodes")
    delay = random.uniform(0, 2)
    print(f"USR2 (preemption) {delay:.2f} s after the first epoch")
    time.sleep(delay)
    jid = job_id(run_dir)
    sh("scancel", "--signal=USR2", jid)  # what SLURM sends before preempting or at the time limit
    join()
    assert epochs_logged(run_dir) == TWO_NODE_EPOCHS
    assert "REQUEUED" in sh("sacct", "-j", jid, "-n", "-X", "-D", "-o", "State%20")
    for task in (0, 1):  # every rank resumed from the one checkpoint rank 0 wrote
        assert "resumed from" in task_log(run_dir, jid, task), task
    assert_bitwise_equal(final_weights(run_dir), final_weights(two_node_reference[0]))


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_restarted_orchestrator_reattaches_to_a_running_two_node_job(tmp_path):
    run_dir = tmp_path / f"reattach2n{time.time_ns()}"
    config = write_yaml(tmp_path / "c.yaml", two_node_run(TWO_NODE_EPOCHS))
    cmd = [*EVIT, "launch", "--config", str(config), "--run-dir", str(run_dir)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: epochs_logged(run_dir) >= 1, 180, "the two-node job to train")
    first.kill()  # the orchestrator dies (login node reboot, Snakemake killed); the job goes on
    first.wait()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    jid = job_id(run_dir)
    assert f"reattaching to SLURM job {jid}" in second.stdout
    assert json.loads(second.stdout[second.stdout.index("{"):])["top1"] > 0
    jobs = sh("sacct", "-n", "-X", "-S", "now-15minutes", "-o", "JobID,JobName%80").splitlines()
    assert sum(run_dir.name in line for line in jobs) == 1


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_a_crash_on_rank_1_is_reported_with_that_tasks_log(tmp_path):
    run_dir = tmp_path / "run"
    join = in_thread(launch, two_node_run(200, max_failures=0), run_dir, poll_s=1)
    wait_for(lambda: epochs_logged(run_dir) >= 1, 180, "the two-node job to train")
    jid = job_id(run_dir)
    wait_for(lambda: 1 in job_processes(jid), 30, "rank 1's process")
    os.kill(job_processes(jid)[1], signal.SIGKILL)  # the node of rank 1 goes away
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        join(timeout=300)
    message = str(info.value)
    assert "task 1: " in message and f"{jid}_1_log.out" in message, message
    assert time.monotonic() - t0 < 120  # srun ends the other rank instead of leaving it blocked in all-reduce
