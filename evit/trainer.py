"""`evit train`: the `Trainer`, one training run from its run config to its final metrics.

Run directory
=============

``checkpoint.pth`` (atomic; written at every epoch end, on `Trainer.checkpoint_now`, and when a run stops at
``max_steps``), ``log.jsonl`` (one line per epoch), ``metrics.json`` (final), ``config.resolved.yaml``.
A run whose directory has a checkpoint resumes from it, exactly: data order, augmentation, DropPath and
Mixup draws are functions of (seed, epoch, step, rank, sample position), never of how the run was split.
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import yaml

from evit.data.loaders import TrainData, build_train_data
from evit.data.seeding import mix_seed
from evit.data.stage import batch_stage
from evit import engine as E
from evit.errors import ConfigError
from evit.methods import METHODS, check_trainable, method_params
from evit.config.io import apply_overrides, config_hash, load_config
from evit.config.schema import resolve_config
from evit.distributed import DistInfo, barrier, cleanup_distributed, dist_env, init_distributed, resolve_device
from evit.models.factory import build_model, count_params
from evit.progress import Progress, log
from evit.provenance import device_name, provenance
from evit.checkpoint import remove_stale_temps
from evit.run_checkpoint import load_run_checkpoint, restore_run, save_run


# --------------------------------------------------------------------------------------------- Trainer


@dataclass
class _Training:
    """A built run while it trains: what `Trainer.checkpoint_now` saves."""

    run: E.BuiltRun
    state: E.TrainState
    epoch_started: float | None = None      # perf_counter at the start of the running epoch
    interrupt_after_step: bool = False      # `Trainer.interrupt` came during an optimizer update


class Interrupted(KeyboardInterrupt):
    """`Trainer.interrupt` stopped the training; ``step``: the global step it saved, or None if it saved nothing."""

    def __init__(self, step: int | None):
        super().__init__(step)
        self.step = step


class Trainer:
    """One training run: ``Trainer(config, run_dir)()`` trains to the end and returns the final metrics.

    - ``config``: a raw or resolved run config (dict) or a path to its YAML; validated at construction.
    - Picklable at any time: only (config, run_dir) travel; a fresh or unpickled Trainer resumes from
      ``run_dir/checkpoint.pth`` when it exists (and, for a finished run, just re-evaluates).
    - `checkpoint_now` writes a checkpoint of the current step boundary (for the launcher, e.g. from a
      preemption signal handler); `run(max_steps=N)` stops after N global steps with a checkpoint.
    - `build` gives the run built on this process (`evit.engine.BuiltRun`), to train or to measure.
    - Distributed when launched under torchrun / submitit (RANK, WORLD_SIZE, ...) or srun (SLURM_*).
    """

    def __init__(self, config: dict | str | Path, run_dir: str | Path):
        raw = load_config(config) if isinstance(config, (str, Path)) else config
        self.config = resolve_config(raw)
        check_trainable(self.config["model"]["method"])
        self.run_dir = Path(run_dir)
        self._training: _Training | None = None

    def __getstate__(self) -> dict:
        return {"config": self.config, "run_dir": self.run_dir}

    def __setstate__(self, state: dict) -> None:
        self.config, self.run_dir, self._training = state["config"], Path(state["run_dir"]), None

    def __repr__(self) -> str:
        return f"Trainer(run_dir={str(self.run_dir)!r}, config_hash={config_hash(self.config)})"

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pth"

    def __call__(self) -> dict:
        return self.run()

    # ------------------------------------------------------------------ public

    def run(self, max_steps: int | None = None) -> dict | None:
        """Train (resuming if a checkpoint exists) to the end and return the metrics; with ``max_steps``,
        stop once that many global steps are done, write a checkpoint and return None."""
        with self.build():
            return self._train(max_steps)

    @contextlib.contextmanager
    def build(self) -> Iterator[E.BuiltRun]:
        """The run built on this process (process group, data, model, optimization), resumed from its checkpoint
        if any; on exit the loaders are closed and the process group destroyed. `run` trains in it;
        `evit bench-input` and scripts/ measure in it."""
        info = dist_env()
        device = resolve_device(self.config["train"]["device"], info.local_rank)
        info = init_distributed(device, info)
        run = None
        try:
            run = self._setup(info, device)
            yield run
        finally:
            self._training = None
            if run is not None:
                run.close()
            cleanup_distributed(info)

    def checkpoint_now(self) -> bool:
        """Write ``checkpoint.pth`` for the latest consistent point of the running training; safe to call from
        a signal handler on the main thread. Returns True if written; False if there is nothing to save (not
        started, or not rank 0) or the optimizer is in the middle of an update (then the previous checkpoint
        stays, and the run resumes from it)."""
        training = self._training
        if (training is None or not training.run.info.is_main or training.state.phase == "update"
                or training.state.non_finite_pending()):
            return False
        state = E.TrainState(**training.state.state_dict())
        if training.epoch_started is not None and state.epoch_step < training.run.ipe:
            state.epoch_time += time.perf_counter() - training.epoch_started
        save_run(self.checkpoint_path, training.run, state, self.config)
        return True

    def interrupt(self) -> None:
        """Stop the running training on request (SIGINT: `stop_on_sigint`): write the step reached, as
        `checkpoint_now` does, and raise `Interrupted`; during an optimizer update, once that step has ended."""
        training = self._training
        if training is not None and training.state.phase == "update":
            training.interrupt_after_step = True
            return
        step = training.state.step if training is not None else None
        raise Interrupted(step if self.checkpoint_now() else None)

    # ------------------------------------------------------------------ setup

    def _setup(self, info: DistInfo, device: torch.device) -> E.BuiltRun:
        """Build the run, restore its checkpoint if any, and make it the one `checkpoint_now` saves."""
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        E.seed_all(mix_seed(self.config["train"]["seed"], 0xB11D))  # model init: same on every rank
        ckpt = load_run_checkpoint(self.checkpoint_path, self.config)
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for tmp in remove_stale_temps(self.checkpoint_path):
                log(f"removed {tmp}, left by a checkpoint write that was killed")
            (self.run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        data = self._build_data(info, device)
        model, train_model, override_fn, target = self._build_model(info, device, data, init=ckpt is None)
        optimizer, ctx = self._build_step(info, device, data, model, override_fn)
        run = E.BuiltRun(info=info, model=model, train_model=train_model, optimizer=optimizer, sampler=data.sampler,
                         loader=data.loader, eval_loader=data.eval_loader, ctx=ctx, target=target,
                         batch=self.config["train"]["batch_size"],
                         num_train=data.num_train, num_eval=data.num_eval)
        state = E.TrainState()
        if ckpt is not None:
            restore_run(run, state, ckpt)
            who = f"rank {info.rank}: " if info.distributed else ""  # every rank says where it resumed
            log(f"{who}resumed from {self.checkpoint_path} at epoch {state.epoch}, step {state.step}")
        self._training = _Training(run, state)
        if info.is_main:
            t = self.config["train"]
            log(f"{self.config['model']['arch']} ({count_params(model) / 1e6:.2f} M params), {run.num_train} train "
                f"/ {run.num_eval} val images, {info.world_size} process(es) on {device_name(device)} "
                f"({torch.get_num_threads()} threads), batch {run.world_batch}, "
                f"lr {optimizer.defaults['lr']:.3g}, {run.ipe} steps/epoch, "
                f"amp {t['amp'] if ctx.amp_dtype else 'none (fp32)'}")
        return run

    def _build_data(self, info: DistInfo, device: torch.device) -> TrainData:
        data = build_train_data(self.config, info.rank, info.world_size, device)
        if data.notice and info.is_main:
            log(data.notice)
        return data

    def _build_model(self, info: DistInfo, device: torch.device, data: TrainData, init: bool):
        """The model (from ``train.init_checkpoint`` when ``init``), the one that trains (its DDP / compiled
        wrapper), the method's schedule (step -> its per-pass parameter, or None) and that schedule's end."""
        m, t = self.config["model"], self.config["train"]
        model = build_model(m, data.num_classes)
        if init and t["init_checkpoint"]:
            from evit.checkpoint import load_pretrained

            if not Path(t["init_checkpoint"]).is_file():
                raise ConfigError(f"train.init_checkpoint: {t['init_checkpoint']} does not exist")
            load_pretrained(model, t["init_checkpoint"])
            if info.is_main:
                log(f"initialized from {t['init_checkpoint']}")
        model.set_grad_checkpointing(t["grad_checkpointing"])
        model = model.to(device)
        override_fn, target = self._schedule(data.steps_per_epoch)
        train_model = (torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
            if info.distributed else model)
        if t["compile"]:
            train_model = E.compile_for_training(train_model, t["compile_levels"] + 1)
        return model, train_model, override_fn, target

    def _schedule(self, ipe: int) -> tuple[Callable[[int], dict] | None, dict | None]:
        """The method's schedule (step -> its per-pass parameter, `Method.schedule`) and its end, or (None, None)."""
        m, t = self.config["model"], self.config["train"]
        method = METHODS[m["method"]]
        if method.schedule is None:
            return None, None
        schedule = method.schedule(m, t, ipe)
        if t["compile"]:  # one graph per value: a bounded number of them, from the target to the identity
            ends = sorted((m[method.override], method.params[method.override].default))
            schedule = E.bucketed(schedule, *ends, t["compile_levels"])
        return (lambda step: {method.override: schedule(step)}), {method.override: m[method.override]}

    def _build_step(self, info: DistInfo, device: torch.device, data: TrainData, model: torch.nn.Module,
                    override_fn: Callable[[int], dict] | None) -> tuple[torch.optim.Optimizer, E.StepContext]:
        """Optimizer, and the step's settings: per-iteration lr schedule, mixed precision, the batch stage
        (Mixup/CutMix) and the loss."""
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        t = self.config["train"]
        lr = t["blr"] * t["batch_size"] * info.world_size / 512
        opt_kwargs = {"momentum": t["momentum"]} if t["opt"] in ("sgd", "momentum", "nesterov") else {}
        if "adam" in t["opt"] or "lamb" in t["opt"]:
            opt_kwargs["eps"] = t["opt_eps"]
        if t["opt"] in ("adam", "adamw"):
            opt_kwargs["fused"] = True      # one kernel, and it skips a non-finite step on the device (engine)
        optimizer = create_optimizer_v2(model, opt=t["opt"], lr=lr, weight_decay=t["weight_decay"], **opt_kwargs)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=t["sched"], num_epochs=t["epochs"], min_lr=t["min_lr"], warmup_lr=t["warmup_lr"],
            warmup_epochs=t["warmup_epochs"], step_on_epochs=False, updates_per_epoch=data.steps_per_epoch)
        amp_dtype = E.amp_dtype_for(t["amp"], device)
        stage = batch_stage(self.config, device, data.num_classes)
        if stage.mixup is not None:
            criterion = SoftTargetCrossEntropy()
        elif t["smoothing"] > 0:
            criterion = LabelSmoothingCrossEntropy(smoothing=t["smoothing"])
        else:
            criterion = torch.nn.CrossEntropyLoss()
        return optimizer, E.StepContext(
            criterion=criterion, device=device, iters_per_epoch=data.steps_per_epoch, seed=t["seed"], rank=info.rank,
            scheduler=scheduler, override_fn=override_fn, batch_stage=stage,
            scaler=torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None,
            amp_dtype=amp_dtype, clip_grad=t["clip_grad"], hold_eval=t["hold_eval"], check_every=t["log_every"])

    # ------------------------------------------------------------------ the loop

    def _train(self, max_steps: int | None) -> dict | None:
        """Epoch after epoch: train, evaluate when due, log and checkpoint; then the final metrics."""
        training, t = self._training, self.config["train"]
        state = training.state
        if training.run.info.is_main:
            _truncatelog(self.run_dir / "log.jsonl", state.epoch)
        eval_res = None
        while state.epoch < t["epochs"]:
            if max_steps is not None and state.step >= max_steps:
                return self._stop(max_steps)
            self._train_epoch(max_steps)
            if state.epoch_step < training.run.ipe:       # stopped early at max_steps
                return self._stop(max_steps)
            eval_res = self._end_epoch()
        return self._finish(eval_res)

    def _train_epoch(self, max_steps: int | None) -> None:
        """Train the rest of the current epoch, or up to global step ``max_steps``."""
        training, t = self._training, self.config["train"]
        run, state = training.run, training.state
        progress = Progress(run.info.is_main, run.ipe, f"epoch {state.epoch + 1}/{t['epochs']}", t["log_every"],
                             state.epoch_step)
        training.epoch_started = time.perf_counter()

        def on_step(s, loss, lr, override):
            progress.update(s.epoch_step, run.world_batch, loss=loss, lr=lr, **(override or {}))
            if training.interrupt_after_step:
                self.interrupt()

        try:
            run.steps(run.epoch(state.epoch, start=state.epoch_step * run.batch), state, max_step=max_steps,
                      on_step=on_step)
        finally:
            training.epoch_started = None
            progress.close()

    def _end_epoch(self) -> dict | None:
        """Evaluate if due, log the finished epoch, move on to the next and checkpoint; the evaluation, if any."""
        training, t = self._training, self.config["train"]
        run, state = training.run, training.state
        e = state.epoch
        due = e + 1 == t["epochs"] or (t["eval_every"] and (e + 1) % t["eval_every"] == 0)
        eval_res = self._evaluate() if due else None
        record = {
            "epoch": e, "step": state.step, "train_loss": state.loss_sum / max(state.epoch_step, 1),
            "lr": run.optimizer.param_groups[0]["lr"],
            **(run.ctx.override_fn(state.step - 1) if run.ctx.override_fn else {}),
            "top1": eval_res and eval_res["top1"], "top5": eval_res and eval_res["top5"],
            "val_loss": eval_res and eval_res["loss"],
            "img_per_s": run.ipe * run.world_batch / max(state.epoch_time, 1e-9),
            "epoch_time_s": state.epoch_time, "train_time_s": state.train_time + state.epoch_time,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if run.info.is_main:
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        # the epoch is done; until the save below, an on-request checkpoint still holds this epoch as
        # finished-but-unlogged (epoch e, all its steps done) and a resume re-evaluates and re-logs it
        state.epoch, state.epoch_step, state.loss_sum = e + 1, 0, 0.0
        state.train_time, state.epoch_time = state.train_time + state.epoch_time, 0.0
        if run.info.is_main:
            save_run(self.checkpoint_path, run, state, self.config)
            acc = f", top-1 {record['top1']:.2f} top-5 {record['top5']:.2f}" if eval_res else ""
            log(f"epoch {e + 1}/{t['epochs']}: loss {record['train_loss']:.4f}{acc}, "
                f"{record['img_per_s']:.1f} img/s, {record['epoch_time_s']:.1f} s")
        return eval_res

    def _finish(self, eval_res: dict | None) -> dict:
        """The final metrics (evaluating if the last epoch did not), written to metrics.json."""
        if eval_res is None:
            eval_res = self._evaluate()
        metrics = self._metrics(eval_res)
        if self._training.run.info.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        barrier()
        return metrics

    def _stop(self, max_steps: int) -> None:
        training = self._training
        if training.run.info.is_main:
            save_run(self.checkpoint_path, training.run, training.state, self.config)
            log(f"stopped at step {training.state.step} (max_steps {max_steps}); checkpoint written")
        barrier()
        return None

    def _evaluate(self) -> dict:
        run = self._training.run
        return E.evaluate(run.model, run.eval_loader, run.device, amp_dtype=run.ctx.amp_dtype,
                          override=self.config["eval"]["params"] or None)

    def _metrics(self, ev: dict) -> dict:
        run, state, cfg = self._training.run, self._training.state, self.config
        return {
            "top1": ev["top1"], "top5": ev["top5"], "val_loss": ev["loss"], "num_eval_images": ev["num_images"],
            **method_params(cfg["model"]) | cfg["eval"]["params"],   # the method's parameters at evaluation
            "params": count_params(run.model), "epochs": state.epoch,
            "steps": state.step, "train_time_s": state.train_time, "arch": cfg["model"]["arch"],
            "method": cfg["model"]["method"], "img_size": cfg["model"]["img_size"], "dataset": cfg["data"]["dataset"],
            "run_dir": str(self.run_dir), "meta": cfg.get("meta"),
            "provenance": provenance(config_hash=config_hash(cfg), device=run.device,
                                       world_size=run.info.world_size),
        }


def _truncatelog(path: Path, epochs_done: int) -> None:
    """Drop log lines of epochs not covered by the checkpoint (a crash after logging, before saving)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("epoch", -1) < epochs_done]
    if len(keep) != len(lines):
        path.write_text("".join(ln + "\n" for ln in keep))


# --------------------------------------------------------------------------------------------- CLI


INTERRUPTED = 130  # `evit train`'s exit status after SIGINT (Ctrl-C), as a shell reports a command it interrupted


@contextlib.contextmanager
def stop_on_sigint(trainer: Trainer) -> Iterator[None]:
    """SIGINT (Ctrl-C) stops the training with the step it has reached saved (`Trainer.interrupt`), as USR2 does
    under the launcher; a second SIGINT interrupts at once (a checkpoint being written then leaves no temp file)."""
    def on_sigint(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        trainer.interrupt()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _cmd_train(args) -> int:
    raw = apply_overrides(load_config(args.config), args.set)
    trainer = Trainer(raw, args.run_dir)
    try:
        with stop_on_sigint(trainer):
            metrics = trainer.run(max_steps=args.max_steps)
    except KeyboardInterrupt as e:
        step, path = getattr(e, "step", None), trainer.checkpoint_path
        saved = (f"saved step {step} to {path}" if step is not None else
                 f"nothing saved, {path} is as it was" if path.is_file() else "no checkpoint written")
        print(f"evit train: interrupted; {saved}; the same command resumes the run", file=sys.stderr, flush=True)
        return INTERRUPTED
    if metrics is not None and dist_env().is_main:
        print(json.dumps({k: metrics[k] for k in ("top1", "top5", "num_eval_images", "train_time_s")}))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("train", description="Train one run described by a run config (see `evit config`).")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--run-dir", required=True, help="output directory (checkpoint.pth, log.jsonl, metrics.json)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (YAML-parsed); repeatable")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many global steps (checkpointed)")
    p.set_defaults(func=_cmd_train)

