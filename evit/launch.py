"""Send one run (train, eval, the bench or the preflight) to where it executes: SLURM, a local subprocess, or
this process.

`evit launch --config run.yaml --run-dir DIR [--command eval|eval-backbone|mask --checkpoint X]` checks the run
config (with the torch-free `evit.config`; this waiting process never imports torch), then submits it as its
`launcher:` section says (defaults in `evit.config.launcher.LAUNCHER_DEFAULTS`):

    launcher:
      backend: local          # local | slurm | inline  (always explicit: never auto-detected)
      nodes: 1
      tasks_per_node: 1       # processes per node; one per GPU for DDP
      gpus_per_node: 0
      cpus_per_task: 2
      mem_gb: null            # null: the cluster's default
      timeout_min: 60         # SLURM time limit of one job (requeued on timeout)
      partition: null         # SLURM only from here on
      account: null
      qos: null
      constraint: null
      signal_delay_s: 120     # USR2 this long before the time limit: checkpoint and requeue
      max_num_timeout: 10     # requeues on timeout or preemption before giving up
      sbatch_extra: {}        # any other sbatch options, e.g. {exclude: "node[1-2]", reservation: x}
      max_failures: 2         # resubmissions (from the last checkpoint) after a failed job
      exclusive: false        # SLURM: the job's nodes to itself (sbatch --exclusive); the bench's default: true

A job has nodes x tasks_per_node processes (DDP ranks); the launcher returns rank 0's result, and a failure
names each failed task with its logs. The job is a submitit `Checkpointable`: on USR2 (timeout or preemption)
rank 0 saves the step the training has reached, and the job is requeued; every rank resumes from
`checkpoint.pth` in the run dir. A failure a resubmission would repeat (a `DeterministicError`) is reported at
once; other failures are resubmitted up to `max_failures` times. The launcher records the job in
`DIR/job.json`; invoked again for the same run while that SLURM job is pending or running, it waits on it
instead of submitting another.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from evit.boxes import check_mask
from evit.config.launcher import BACKENDS, resolve_bench_launcher, resolve_launcher
from evit.config.io import load_config
from evit.config.schema import resolve_config
from evit.errors import ConfigError, DeterministicError, LaunchError

COMMANDS = ("train", "eval", "eval-backbone", "bench", "mask", "preflight")
ONE_PROCESS = ("bench", "preflight")  # jobs of one process (`resolve_bench_launcher`), whose config is not a run's
EVALUATIONS = ("eval", "eval-backbone", "mask")  # commands that read the weights of --checkpoint
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "UNKNOWN")


class RunTask(submitit.helpers.Checkpointable):
    """What runs inside the job — training, evaluation or the benchmark of one run dir — on every task of the job.

    It holds only the config and paths: on USR2, `checkpoint()` first has a running training save the step it
    has reached (rank 0 only: submitit calls it on the task of global rank 0), then resubmits a fresh task; every
    rank of the requeued job resumes from the run dir's checkpoint.
    """

    def __init__(self, command: str, config: dict, run_dir: str | os.PathLike, checkpoint: str | None = None):
        if command not in COMMANDS:
            raise ConfigError(f"command must be one of {COMMANDS}, got {command!r}")
        self.command, self.config, self.run_dir, self.eval_checkpoint = command, config, str(run_dir), checkpoint

    def __call__(self) -> dict:
        try:
            result = self._run()
        except DeterministicError as e:  # recorded by type, so that the launcher does not resubmit the job
            if "SUBMITIT_FOLDER" in os.environ:  # in a submitted job, not inline
                _write_record(error_record(submitit.JobEnvironment().paths),
                              {"type": type(e).__name__, "message": str(e)})
            raise
        # plain JSON types only: the waiting launcher unpickles the result, and must not need torch for it
        return json.loads(json.dumps(result))

    def _run(self) -> dict:
        if "SLURM_JOB_ID" in os.environ or "SUBMITIT_LOCAL_JOB_ID" in os.environ:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            import torch

            torch.set_num_threads(resolve_launcher(self.config.get("launcher"))["cpus_per_task"])  # what it was given
        run_dir = Path(self.run_dir)
        if self.command == "bench":
            from evit.benchmark import bench_from_config

            return bench_from_config(self.config, run_dir)
        if self.command == "preflight":
            from evit.preflight import preflight

            return preflight(self.config, run_dir)
        if self.command == "eval":
            from evit.evaluate import evaluate_checkpoint

            return evaluate_checkpoint(self.eval_checkpoint, self.config, out=run_dir / "eval.json")
        if self.command == "eval-backbone":
            from evit.evaluate import evaluate_backbone

            return evaluate_backbone(self.eval_checkpoint, self.config, out=run_dir / "eval.json")
        if self.command == "mask":
            from evit.masking import mask_experiment

            return mask_experiment(self.eval_checkpoint, self.config, out=run_dir / "masking.json")
        from evit.trainer import Trainer

        self._trainer = Trainer(self.config, run_dir)
        return self._trainer()

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.checkpoint_now():
            print(f"saved the step reached to {self.run_dir}/checkpoint.pth before requeue", flush=True)
        fresh = RunTask(self.command, self.config, self.run_dir, self.eval_checkpoint)
        return submitit.helpers.DelayedSubmission(fresh)


def check_run(config: dict, run_dir: Path, command: str, opts: dict, checkpoint: str | None) -> None:
    """Everything about a run that can be checked before it is queued: its config and the files it starts from."""
    if command in ONE_PROCESS:
        resolve_bench_launcher(opts)
        return
    resolve_config({**config, "launcher": opts})
    if command == "mask":
        check_mask(config.get("mask"))
    if command in EVALUATIONS:
        if not checkpoint:
            raise ConfigError(f"{command} run {run_dir}: no checkpoint to evaluate (--checkpoint)")
        if not Path(checkpoint).expanduser().is_file():
            raise ConfigError(f"checkpoint {checkpoint} to evaluate does not exist")
        return
    init = (config.get("train") or {}).get("init_checkpoint")
    if init and not (run_dir / "checkpoint.pth").is_file() and not Path(init).expanduser().is_file():
        raise ConfigError(f"train.init_checkpoint: {init} does not exist")


def make_executor(opts: dict, folder: Path, name: str) -> submitit.Executor:
    """The submitit executor of a run: one task per GPU (`tasks_per_node`), `cpus_per_task` cores each."""
    cluster = opts["backend"]
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=opts["max_num_timeout"])
    params = dict(
        name=name, nodes=opts["nodes"], tasks_per_node=opts["tasks_per_node"], gpus_per_node=opts["gpus_per_node"],
        cpus_per_task=opts["cpus_per_task"], timeout_min=opts["timeout_min"],
    )
    if opts["mem_gb"] is not None:
        params["mem_gb"] = opts["mem_gb"]
    if cluster == "slurm":
        for key in ("partition", "account", "qos", "constraint"):
            if opts[key]:
                params[f"slurm_{key}"] = opts[key]
        params["slurm_signal_delay_s"] = opts["signal_delay_s"]
        if opts["exclusive"]:
            params["slurm_exclusive"] = True  # nothing else runs on its nodes (the benchmark's timings)
        # one task failing ends the others too, instead of leaving them blocked in a collective until the limit
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        if opts["sbatch_extra"]:
            params["slurm_additional_parameters"] = dict(opts["sbatch_extra"])
    executor.update_parameters(**params)
    return executor


def _write_record(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def error_record(paths) -> Path:
    """Where a job's task records the `DeterministicError` it failed with (``paths``: the task's submitit paths)."""
    return Path(paths.folder) / f"{paths.job_id}_{paths.task_id}_error.json"


def _deterministic_error(task) -> str | None:
    """The message of the `DeterministicError` that ``task`` recorded, or None when it failed otherwise."""
    path = error_record(task.paths)
    return json.loads(path.read_text())["message"] if path.is_file() else None


def _log_hint(job) -> str:
    return f"logs: {job.paths.stdout} and {job.paths.stderr}"


def _tasks(job) -> list:
    """The job's tasks (one per process), rank 0 first."""
    return [job.task(i) for i in range(job.num_tasks)]


def _wait(job, log, poll_s: float) -> dict:
    """Wait for `job`, printing its state changes and rank 0's output; returns rank 0's result.

    Raises `LaunchError` for a task that failed with a `DeterministicError` (which a resubmission would repeat),
    and submitit's errors for the others; the
    message names every task that failed, with its logs.
    """
    rank0 = job.task(0)
    last, relayed = None, 0
    while not job.done():
        state = job.state
        if state != last:
            log(f"job {job.job_id}: {state}")
            last = state
        relayed = _relay_output(rank0.paths.stdout, relayed, log)
        time.sleep(poll_s)
    _relay_output(rank0.paths.stdout, relayed, log)
    errors = [(task, task.exception()) for task in _tasks(job)]
    errors = [(task, e) for task, e in errors if e is not None]
    if not errors:
        return rank0.result()
    not_retryable = [message for task, _ in errors if (message := _deterministic_error(task))]
    if not_retryable:
        where = "\n".join(f"  task {task.task_id} {_log_hint(task)}" for task, _ in errors)
        raise LaunchError(f"job {job.job_id} failed: {not_retryable[0]}\n{where}")
    raise type(errors[0][1])("\n".join(f"  task {task.task_id}: {_job_error(e)}; {_log_hint(task)}"
                                        for task, e in errors))


def _relay_output(path: Path, offset: int, log) -> int:
    """Log the complete lines the job added to its stdout after byte `offset`; returns the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            new = f.read()
    except FileNotFoundError:
        return offset
    end = new.rfind(b"\n") + 1
    for line in new[:end].decode(errors="replace").splitlines():
        log(f"  | {line}")
    return offset + end


def _reattach(record: dict, opts: dict, run_dir: Path, command: str, log):
    """The SLURM job of a previous launch of this run when it is still pending, running, or finished well."""
    if not (record.get("backend") == "slurm" == opts["backend"] and record.get("command") == command):
        return None
    tasks = tuple(range(record.get("num_tasks", 1)))
    previous = submitit.SlurmJob(folder=run_dir / "submitit", job_id=record["job_id"], tasks=tasks)
    state = previous.state
    if state.split()[0] in ACTIVE_STATES or state == "COMPLETED":
        log(f"reattaching to SLURM job {previous.job_id} ({state}) for {run_dir}")
        return previous
    return None


def launch(config: dict, run_dir: str | os.PathLike, command: str = "train", backend: str | None = None,
           checkpoint: str | os.PathLike | None = None, log=print, poll_s: float = 5.0) -> dict:
    """Run `command` for the run in `run_dir` on the configured backend; returns its (rank 0's) metrics.

    ``checkpoint``: the weights an ``eval`` evaluates.

    The config is checked before anything is submitted (`check_run`). A failure that a resubmission would
    repeat is a `LaunchError` at once; any other failed job is resubmitted up to `max_failures` times.
    """
    if command not in COMMANDS:
        raise ConfigError(f"command must be one of {COMMANDS}, got {command!r}")
    opts = (resolve_bench_launcher if command in ONE_PROCESS else resolve_launcher)(config.get("launcher"), backend)
    run_dir = Path(run_dir)
    checkpoint = None if checkpoint is None else str(checkpoint)
    check_run(config, run_dir, command, opts, checkpoint)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = RunTask(command, config, run_dir, checkpoint)
    if opts["backend"] == "inline":
        return task()

    record_path = run_dir / "job.json"
    executor = make_executor(opts, run_dir / "submitit", name=f"evit-{command}-{run_dir.name}")
    job, failures = None, 0
    if record_path.exists():
        record = json.loads(record_path.read_text())
        failures = record.get("failures", 0)
        job = _reattach(record, opts, run_dir, command, log)
        if record.get("backend") == "local" and _pid_alive(record.get("job_id")):
            raise LaunchError(f"a local job (pid {record['job_id']}) is still running for {run_dir}; "
                              "wait for it or kill it first")
    while True:
        if job is None:
            job = executor.submit(task)
            _write_record(record_path, dict(
                backend=opts["backend"], command=command, job_id=str(job.job_id), num_tasks=job.num_tasks,
                failures=failures, submitted=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            ))
            log(f"submitted {command} of {run_dir} as {opts['backend']} job {job.job_id}"
                + (f" ({job.num_tasks} tasks)" if job.num_tasks > 1 else ""))
        try:
            return _wait(job, log, poll_s)
        except (UncompletedJobError, FailedJobError) as e:
            state = job.state
            if state.startswith("CANCELLED"):
                raise LaunchError(f"job {job.job_id} for {run_dir} was cancelled ({state}); {_log_hint(job.task(0))}"
                                  ) from e
            failures += 1
            if failures > opts["max_failures"]:
                raise LaunchError(
                    f"job {job.job_id} for {run_dir} ended {state}, after {failures - 1} resubmission(s) "
                    f"(max_failures={opts['max_failures']}):\n{e}") from e
            log(f"job {job.job_id} ended {state}:\n{e}\n"
                f"resubmitting from the last checkpoint ({failures}/{opts['max_failures']})")
            job = None


def _job_error(error: Exception) -> str:
    """The job's own error: the last line of the remote traceback submitit quotes, else of the message."""
    text = str(error)
    parts = text.split("-" * 22)  # submitit frames the remote traceback with dashed lines
    lines = [line for line in (parts[1] if len(parts) > 2 else text).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError, PermissionError):
        return False
    return True


def _output_to(path: str):
    """This process's stdout and stderr into the file ``path`` from now on; returns the former stderr."""
    terminal = os.fdopen(os.dup(2), "w")
    with open(path, "w") as log_file:
        for fd in (1, 2):
            os.dup2(log_file.fileno(), fd)
    return terminal


def _cmd_launch(args) -> int:
    terminal = _output_to(args.log) if args.log else None
    try:
        metrics = launch(load_config(args.config), args.run_dir, command=args.command, backend=args.backend,
                         checkpoint=args.checkpoint, log=lambda msg: print(msg, flush=True))
    except Exception as e:  # the log gets it too (evit.cli); the terminal the cause and where the log is
        if terminal:
            print(f"evit launch: error: {str(e).strip() or type(e).__name__}\n  log: {args.log}", file=terminal,
                  flush=True)
        raise
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=1))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch")
    p.add_argument("--config", required=True, help="the run's resolved config (YAML) with a launcher: section")
    p.add_argument("--run-dir", required=True, help="the run directory (checkpoint, logs, metrics, job.json)")
    p.add_argument("--command", choices=COMMANDS, default="train")
    p.add_argument("--log", help="write this command's output to LOG; a failure's message and LOG's path still go "
                   "to stderr (what Snakemake shows)")
    p.add_argument("--backend", choices=BACKENDS, help="override launcher.backend from the config")
    p.add_argument("--checkpoint", help="the weights to evaluate (--command eval; eval-backbone: a comparison "
                   "backbone's published weights, model.arch its timm name; mask: the masking experiment of "
                   "evit/masking.py, options in the config's mask: section)")
    p.set_defaults(func=_cmd_launch)
