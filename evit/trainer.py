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
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import yaml

from evit import engine as E
from evit.checkpoint import load_checkpoint, save_atomic
from evit.methods import METHODS, check_trainable, method_params
from evit.errors import ConfigError
from evit.config.io import apply_overrides, config_hash, load_config, resume_mismatch
from evit.config.schema import resolve_config
from evit.data.loaders import build_train_data, shutdown_workers
from evit.data.samplers import TrainSampler
from evit.data.seeding import mix_seed
from evit.data.stage import batch_stage
from evit.distributed import DistInfo, barrier, cleanup_distributed, dist_env, init_distributed, resolve_device
from evit.models.factory import build_model, count_params
from evit.provenance import device_name, provenance


def _is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Progress:
    """A tqdm bar on a terminal, plain lines every ``every`` steps otherwise (SLURM logs). Rank 0 only."""

    def __init__(self, enabled: bool, total: int, desc: str, every: int, done: int = 0):
        self.enabled, self.total, self.desc, self.every = enabled, total, desc, every
        self.bar = None
        self.t0, self.n0 = time.perf_counter(), done
        if enabled and _is_tty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, desc=desc, leave=False)
            except ImportError:
                pass

    def update(self, done: int, batch: int, **stats) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if done % self.every == 0 or done == self.total:   # reading a device tensor waits for the device
                self.bar.set_postfix({k: f"{float(v):.4g}" for k, v in stats.items() if v is not None}, refresh=False)
        elif done % self.every == 0 or done == self.total:
            rate = (done - self.n0) * batch / max(time.perf_counter() - self.t0, 1e-9)
            extra = " ".join(f"{k} {float(v):.4g}" for k, v in stats.items() if v is not None)
            _log(f"{self.desc} step {done}/{self.total} {extra} {rate:.1f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------- Trainer


@dataclass
class Runtime:
    """What a running training holds besides its config, filled in by `Trainer._setup`'s steps in order."""

    info: DistInfo
    device: torch.device
    state: E.TrainState
    # data
    sampler: TrainSampler | None = None
    train_loader: torch.utils.data.DataLoader | None = None
    eval_loader: torch.utils.data.DataLoader | None = None
    num_train: int = 0
    num_eval: int = 0
    num_classes: int = 0
    batch: int = 0                          # per process
    world_batch: int = 0                    # all processes
    ipe: int = 0                            # iterations (optimizer steps) per epoch
    # model
    model: torch.nn.Module | None = None
    train_model: torch.nn.Module | None = None   # the DDP wrapper when distributed
    params: int = 0
    override_fn: Callable[[int], dict] | None = None   # step -> the method's scheduled override (`Method.schedule`)
    # optimization
    lr: float = 0.0
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    ctx: E.StepContext | None = None
    # lifecycle
    ready: bool = False                     # set up: `checkpoint_now` may save
    closed: bool = False
    epoch_started: float | None = None      # perf_counter at the start of the running epoch


class Trainer:
    """One training run: ``Trainer(config, run_dir)()`` trains to the end and returns the final metrics.

    - ``config``: a raw or resolved run config (dict) or a path to its YAML; validated at construction.
    - Picklable at any time: only (config, run_dir) travel; a fresh or unpickled Trainer resumes from
      ``run_dir/checkpoint.pth`` when it exists (and, for a finished run, just re-evaluates).
    - `checkpoint_now` writes a checkpoint of the current step boundary (for the launcher, e.g. from a
      preemption signal handler); `run(max_steps=N)` stops after N global steps with a checkpoint.
    - Distributed when launched under torchrun / submitit (RANK, WORLD_SIZE, ...) or srun (SLURM_*).
    """

    def __init__(self, config: dict | str | Path, run_dir: str | Path):
        raw = load_config(config) if isinstance(config, (str, Path)) else config
        self.config = resolve_config(raw)
        check_trainable(self.config["model"]["method"])
        self.run_dir = Path(run_dir)
        self._rt: Runtime | None = None

    def __getstate__(self) -> dict:
        return {"config": self.config, "run_dir": self.run_dir}

    def __setstate__(self, state: dict) -> None:
        self.config, self.run_dir, self._rt = state["config"], Path(state["run_dir"]), None

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
        with self.session():
            return self._train(max_steps)

    @contextlib.contextmanager
    def session(self) -> Iterator[Runtime]:
        """The run set up (process group, data, model, optimization; resumed from its checkpoint if any), as its
        `Runtime`; on exit the loaders are closed and the process group destroyed. `run` trains in one, and
        `evit bench-input` measures in one."""
        info = dist_env()
        device = resolve_device(self.config["train"]["device"], info.local_rank)
        info = init_distributed(device, info)
        try:
            self._setup(info, device)
            yield self._rt
        finally:
            if self._rt is not None:
                self._rt.closed = True
                self._close_loaders()
            cleanup_distributed(info)

    def checkpoint_now(self) -> bool:
        """Write ``checkpoint.pth`` for the latest consistent point of the running training; safe to call from
        a signal handler on the main thread. Returns True if written; False if there is nothing to save (not
        started, or not rank 0) or the optimizer is in the middle of an update (then the previous checkpoint
        stays, and the run resumes from it)."""
        rt = self._rt
        if (rt is None or rt.closed or not rt.ready or not rt.info.is_main or rt.state.phase == "update"
                or rt.state.non_finite_pending()):
            return False
        state = E.TrainState(**rt.state.state_dict())
        if rt.epoch_started is not None and state.epoch_step < rt.ipe:
            state.epoch_time += time.perf_counter() - rt.epoch_started
        self._save(state)
        return True

    def _close_loaders(self) -> None:
        """Stop persistent DataLoader workers now, rather than whenever the garbage collector gets to them."""
        rt = self._rt
        if rt.ctx is not None:
            rt.ctx.on_step = None
        for loader in (rt.train_loader, rt.eval_loader):
            shutdown_workers(loader)

    # ------------------------------------------------------------------ setup

    def _setup(self, info: DistInfo, device: torch.device) -> None:
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        E.seed_all(mix_seed(self.config["train"]["seed"], 0xB11D))  # model init: same on every rank
        ckpt = self._resume_checkpoint()
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        rt = self._rt = Runtime(info=info, device=device, state=E.TrainState())
        self._build_data(rt)
        self._build_model(rt, init=ckpt is None)
        self._build_optimization(rt)
        rt.ready = True
        if ckpt is not None:
            self._restore(ckpt)
            who = f"rank {info.rank}: " if info.distributed else ""  # every rank says where it resumed
            _log(f"{who}resumed from {self.checkpoint_path} at epoch {rt.state.epoch}, step {rt.state.step}")
        if info.is_main:
            t = self.config["train"]
            _log(f"{self.config['model']['arch']} ({rt.params / 1e6:.2f} M params), {rt.num_train} train / "
                 f"{rt.num_eval} val images, {info.world_size} process(es) on {device_name(device)} "
                 f"({torch.get_num_threads()} threads), "
                 f"batch {rt.world_batch}, lr {rt.lr:.3g}, {rt.ipe} steps/epoch, "
                 f"amp {t['amp'] if rt.amp_dtype else 'none (fp32)'}")

    def _resume_checkpoint(self) -> dict | None:
        """The run dir's checkpoint, if any, after checking that this config wrote it."""
        if not self.checkpoint_path.is_file():
            return None
        ckpt = load_checkpoint(self.checkpoint_path)
        diff = resume_mismatch(ckpt["config"], self.config)
        if diff:
            raise ConfigError(f"{self.checkpoint_path} was written by another config; use a new run dir or "
                              "delete it. Differences: " + "; ".join(diff))
        return ckpt

    def _build_data(self, rt: Runtime) -> None:
        data = build_train_data(self.config, rt.info.rank, rt.info.world_size, rt.device)
        rt.train_loader, rt.sampler, rt.eval_loader = data.loader, data.sampler, data.eval_loader
        rt.num_train, rt.num_eval, rt.num_classes = data.num_train, data.num_eval, data.num_classes
        rt.batch = self.config["train"]["batch_size"]
        rt.world_batch, rt.ipe = rt.batch * rt.info.world_size, data.steps_per_epoch
        if data.notice and rt.info.is_main:
            _log(data.notice)

    def _build_model(self, rt: Runtime, init: bool) -> None:
        """The model (from ``train.init_checkpoint`` when ``init``), its DDP wrapper and its keep-rate schedule."""
        m, t = self.config["model"], self.config["train"]
        model = build_model(m, rt.num_classes)
        rt.params = count_params(model)
        if init and t["init_checkpoint"]:
            from evit.checkpoint import load_pretrained

            if not Path(t["init_checkpoint"]).is_file():
                raise ConfigError(f"train.init_checkpoint: {t['init_checkpoint']} does not exist")
            load_pretrained(model, t["init_checkpoint"])
            if rt.info.is_main:
                _log(f"initialized from {t['init_checkpoint']}")
        model.set_grad_checkpointing(t["grad_checkpointing"])
        rt.model = model.to(rt.device)
        method = METHODS[m["method"]]
        if method.schedule is not None:
            schedule = method.schedule(m, t, rt.ipe)
            if t["compile"]:  # one graph per value: a bounded number of them, from the target to the identity
                ends = sorted((m[method.override], method.params[method.override].default))
                schedule = E.bucketed(schedule, *ends, t["compile_levels"])
            rt.override_fn = lambda step: {method.override: schedule(step)}
        rt.train_model = (torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
            if rt.info.distributed else model)
        if t["compile"]:
            rt.train_model = E.compile_for_training(rt.train_model, t["compile_levels"] + 1)

    def _build_optimization(self, rt: Runtime) -> None:
        """Optimizer, per-iteration lr schedule, mixed precision, the batch stage (Mixup/CutMix) and the loss."""
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        t = self.config["train"]
        rt.lr = t["blr"] * rt.world_batch / 512
        opt_kwargs = {"momentum": t["momentum"]} if t["opt"] in ("sgd", "momentum", "nesterov") else {}
        if "adam" in t["opt"] or "lamb" in t["opt"]:
            opt_kwargs["eps"] = t["opt_eps"]
        if t["opt"] in ("adam", "adamw"):
            opt_kwargs["fused"] = True      # one kernel, and it skips a non-finite step on the device (engine)
        rt.optimizer = create_optimizer_v2(rt.model, opt=t["opt"], lr=rt.lr, weight_decay=t["weight_decay"],
                                           **opt_kwargs)
        rt.scheduler, _ = create_scheduler_v2(
            rt.optimizer, sched=t["sched"], num_epochs=t["epochs"], min_lr=t["min_lr"], warmup_lr=t["warmup_lr"],
            warmup_epochs=t["warmup_epochs"], step_on_epochs=False, updates_per_epoch=rt.ipe)
        rt.amp_dtype = E.amp_dtype_for(t["amp"], rt.device)
        rt.scaler = torch.amp.GradScaler(rt.device.type) if rt.amp_dtype == torch.float16 else None
        stage = batch_stage(self.config, rt.device, rt.num_classes)
        if stage.mixup is not None:
            criterion = SoftTargetCrossEntropy()
        elif t["smoothing"] > 0:
            criterion = LabelSmoothingCrossEntropy(smoothing=t["smoothing"])
        else:
            criterion = torch.nn.CrossEntropyLoss()
        rt.ctx = E.StepContext(
            criterion=criterion, device=rt.device, iters_per_epoch=rt.ipe, seed=t["seed"], rank=rt.info.rank,
            scheduler=rt.scheduler, override_fn=rt.override_fn, batch_stage=stage, scaler=rt.scaler,
            amp_dtype=rt.amp_dtype, clip_grad=t["clip_grad"], hold_eval=t["hold_eval"],
            check_every=t["log_every"])

    # ------------------------------------------------------------------ checkpoints

    def _save(self, state: E.TrainState) -> None:
        rt = self._rt
        save_atomic({
            "model": rt.model.state_dict(),
            "optimizer": rt.optimizer.state_dict(),
            "scheduler": rt.scheduler.state_dict(),
            "scaler": rt.scaler.state_dict() if rt.scaler is not None else None,
            "state": state.state_dict(),
            "epoch": state.epoch,             # epoch, step and sampler: for people reading the file
            "step": state.step,
            "rng": rng_states(rt.device),
            "sampler": dict(rt.sampler.state_dict(), epoch=state.epoch, start=state.epoch_step * rt.batch),
            "config": self.config,
        }, self.checkpoint_path)

    def _restore(self, ckpt: dict) -> None:
        rt = self._rt
        rt.model.load_state_dict(ckpt["model"])
        rt.optimizer.load_state_dict(ckpt["optimizer"])
        rt.scheduler.load_state_dict(ckpt["scheduler"])
        if rt.scaler is not None and ckpt.get("scaler"):
            rt.scaler.load_state_dict(ckpt["scaler"])
        rt.state.load_state_dict(ckpt["state"])
        set_rng_states(ckpt.get("rng") or {}, rt.device)

    # ------------------------------------------------------------------ the loop

    def _evaluate(self) -> dict:
        rt = self._rt
        return E.evaluate(rt.model, rt.eval_loader, rt.device, amp_dtype=rt.amp_dtype,
                          override=self.config["eval"]["params"] or None)

    def _eval_params(self) -> dict:
        """The method's parameters at evaluation: the model's, with `eval.params` over them."""
        return method_params(self.config["model"]) | self.config["eval"]["params"]

    def _train(self, max_steps: int | None) -> dict | None:
        rt, cfg = self._rt, self.config
        t = cfg["train"]
        state, main = rt.state, rt.info.is_main
        log_path = self.run_dir / "log.jsonl"
        if main:
            _truncate_log(log_path, state.epoch)
        eval_res = None
        while state.epoch < t["epochs"]:
            if max_steps is not None and state.step >= max_steps:
                return self._stop(state, max_steps)
            e = state.epoch
            rt.sampler.set_epoch(e, start=state.epoch_step * rt.batch)
            progress = _Progress(main, rt.ipe, f"epoch {e + 1}/{t['epochs']}", t["log_every"], state.epoch_step)
            rt.ctx.on_step = lambda s, loss, lr, override: progress.update(s.epoch_step, rt.world_batch, loss=loss,
                                                                           lr=lr, **(override or {}))
            rt.ctx.max_step = max_steps
            rt.epoch_started = time.perf_counter()
            try:
                E.train_one_epoch(rt.train_model, rt.train_loader, rt.optimizer, state, rt.ctx)
            finally:
                rt.epoch_started = None
                progress.close()
            if state.epoch_step < rt.ipe:       # stopped early at max_steps
                return self._stop(state, max_steps)
            last = e + 1 == t["epochs"]
            eval_res = (self._evaluate() if last or (t["eval_every"] and (e + 1) % t["eval_every"] == 0)
                        else None)
            record = {
                "epoch": e, "step": state.step, "train_loss": state.loss_sum / max(state.epoch_step, 1),
                "lr": rt.optimizer.param_groups[0]["lr"],
                **(rt.override_fn(state.step - 1) if rt.override_fn else {}),
                "top1": eval_res and eval_res["top1"], "top5": eval_res and eval_res["top5"],
                "val_loss": eval_res and eval_res["loss"],
                "img_per_s": rt.ipe * rt.world_batch / max(state.epoch_time, 1e-9),
                "epoch_time_s": state.epoch_time, "train_time_s": state.train_time + state.epoch_time,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            if main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            # the epoch is done; until the save below, an on-request checkpoint still holds this epoch as
            # finished-but-unlogged (epoch e, all its steps done) and a resume re-evaluates and re-logs it
            state.epoch, state.epoch_step, state.loss_sum = e + 1, 0, 0.0
            state.train_time, state.epoch_time = state.train_time + state.epoch_time, 0.0
            if main:
                self._save(state)
                acc = f", top-1 {record['top1']:.2f} top-5 {record['top5']:.2f}" if eval_res else ""
                _log(f"epoch {e + 1}/{t['epochs']}: loss {record['train_loss']:.4f}{acc}, "
                     f"{record['img_per_s']:.1f} img/s, {record['epoch_time_s']:.1f} s")
        if eval_res is None:
            eval_res = self._evaluate()
        metrics = self._metrics(eval_res)
        if main:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        barrier()
        return metrics

    def _stop(self, state: E.TrainState, max_steps: int) -> None:
        if self._rt.info.is_main:
            self._save(state)
            _log(f"stopped at step {state.step} (max_steps {max_steps}); checkpoint written")
        barrier()
        return None

    def _metrics(self, ev: dict) -> dict:
        rt, cfg = self._rt, self.config
        return {
            "top1": ev["top1"], "top5": ev["top5"], "val_loss": ev["loss"], "num_eval_images": ev["num_images"],
            **self._eval_params(), "params": rt.params, "epochs": rt.state.epoch,
            "steps": rt.state.step, "train_time_s": rt.state.train_time, "arch": cfg["model"]["arch"],
            "method": cfg["model"]["method"], "img_size": cfg["model"]["img_size"], "dataset": cfg["data"]["dataset"],
            "run_dir": str(self.run_dir), "meta": cfg.get("meta"),
            "provenance": provenance(config_hash=config_hash(cfg), device=rt.device,
                                       world_size=rt.info.world_size),
        }


def rng_states(device: torch.device) -> dict:
    """python / numpy / torch / cuda RNG states, as plain lists and tensors (loadable with weights_only)."""
    version, mt, pos = random.getstate()
    name, keys, npos, has_gauss, gauss = np.random.get_state()
    return {"python": [version, list(mt), pos],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), npos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def set_rng_states(rng: dict, device: torch.device) -> None:
    if rng.get("python") is not None:
        version, mt, pos = rng["python"]
        random.setstate((version, tuple(mt), pos))
    if rng.get("numpy") is not None:
        name, keys, npos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), npos, has_gauss, gauss))
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and device.type == "cuda" and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _truncate_log(path: Path, epochs_done: int) -> None:
    """Drop log lines of epochs not covered by the checkpoint (a crash after logging, before saving)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("epoch", -1) < epochs_done]
    if len(keep) != len(lines):
        path.write_text("".join(ln + "\n" for ln in keep))


# --------------------------------------------------------------------------------------------- CLI


def _cmd_train(args) -> int:
    raw = apply_overrides(load_config(args.config), args.set)
    metrics = Trainer(raw, args.run_dir).run(max_steps=args.max_steps)
    if metrics is not None and dist_env().is_main:
        print(json.dumps({k: metrics[k] for k in ("top1", "top5", "num_eval_images", "train_time_s")}))
    return 0



def add_commands(sub) -> None:
    p = sub.add_parser("train", description="Train one run described by a run config (see `evit.config`'s docstring).")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--run-dir", required=True, help="output directory (checkpoint.pth, log.jsonl, metrics.json)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (YAML-parsed); repeatable")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many global steps (checkpointed)")
    p.set_defaults(func=_cmd_train)

