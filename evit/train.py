"""`evit train` and `evit eval`: the `Trainer` (one training run), and evaluation of checkpoints.

The run config they read is defined, documented and validated in `evit.config` (which imports no torch).

Run directory
=============

``checkpoint.pth`` (atomic; written at every epoch end, on `Trainer.checkpoint_now`, and when a run stops at
``max_steps``), ``log.jsonl`` (one line per epoch), ``metrics.json`` (final), ``config.resolved.yaml``.
A run whose directory has a checkpoint resumes from it, exactly: data order, augmentation, DropPath and
Mixup draws are functions of (seed, epoch, step, rank, sample position), never of how the run was split.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

from evit import data as D
from evit import engine as E
from evit.checkpoint import CheckpointError, load_checkpoint
from evit.config import (ConfigError, apply_overrides, config_hash, is_evit, load_config, resolve_config,
                         resume_mismatch)


# --------------------------------------------------------------------------------------------- building


def build_model(model_cfg: dict, num_classes: int) -> torch.nn.Module:
    """`timm.create_model` from the model section (never pretrained: weights come from checkpoints)."""
    import timm

    import evit.models  # noqa: F401  (registers the EViT models with timm)

    kwargs = dict(model_cfg["kwargs"])
    kwargs.update(num_classes=num_classes, img_size=model_cfg["img_size"], drop_path_rate=model_cfg["drop_path"])
    if model_cfg["patch_size"]:
        kwargs["patch_size"] = model_cfg["patch_size"]
    if is_evit(model_cfg["arch"]):
        kwargs.update(keep_rate=model_cfg["keep_rate"], fuse_token=model_cfg["fuse_token"],
                      drop_loc=tuple(model_cfg["drop_loc"]))
    try:
        return timm.create_model(model_cfg["arch"], pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"model: cannot build {model_cfg['arch']!r} with {kwargs}: {e}") from e


def supports_keep_rate(model: torch.nn.Module) -> bool:
    return "keep_rate" in inspect.signature(model.forward).parameters


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _raw_dataset(cfg: dict, split: str, transform) -> D.Dataset:
    d = cfg["data"]
    return D.build_dataset(d["dataset"], d["root"], split, pil=not getattr(transform, "accepts_tensor", False))


def build_eval_loader(cfg: dict, info: E.DistInfo, device: torch.device):
    """The val-split loader for this rank (exact sharding, no padding) and the full val dataset size."""
    d, m, t, ev = cfg["data"], cfg["model"], cfg["train"], cfg["eval"]
    tf = D.build_transform(t["augment"], False, m["img_size"], d["mean"], d["std"],
                           interpolation=t["interpolation"] if t["interpolation"] != "random" else "bicubic",
                           crop_pct=ev["crop_pct"])
    raw = _raw_dataset(cfg, "val", tf)
    ds = D.SeededDataset(raw, tf, D.subset_indices(len(raw), d["val_subset"]))
    sampler = D.ShardSampler(len(ds), info.world_size, info.rank)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=ev["batch_size"], sampler=sampler, num_workers=d["num_workers"],
        pin_memory=device.type == "cuda", persistent_workers=d["num_workers"] > 0)
    return loader, len(ds), raw


def _num_classes(cfg: dict, raw) -> int:
    n = cfg["model"]["num_classes"]
    have = len(getattr(raw, "classes", ()) or ()) or None
    if n is None:
        if have is None:
            raise ConfigError("model.num_classes: cannot infer it from the dataset; set it")
        return have
    if have is not None and have != n:
        raise ConfigError(f"model.num_classes: {n}, but the dataset has {have} classes")
    return n


def shutdown_workers(loader) -> None:
    """Stop a DataLoader's persistent workers now (the garbage collector may take seconds to join them)."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
        loader._iterator = None


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
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if v is not None}, refresh=False)
        elif done % self.every == 0 or done == self.total:
            rate = (done - self.n0) * batch / max(time.perf_counter() - self.t0, 1e-9)
            extra = " ".join(f"{k} {v:.4g}" for k, v in stats.items() if v is not None)
            _log(f"{self.desc} step {done}/{self.total} {extra} {rate:.1f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------- Trainer


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
        self.run_dir = Path(run_dir)
        self._rt: SimpleNamespace | None = None

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
        info = E.dist_env()
        device = E.resolve_device(self.config["train"]["device"], info.local_rank)
        info = E.init_distributed(device, info)
        try:
            self._setup(info, device)
            return self._train(max_steps)
        finally:
            if self._rt is not None:
                self._rt.closed = True
                self._close_loaders()
            E.cleanup_distributed(info)

    def checkpoint_now(self) -> bool:
        """Write ``checkpoint.pth`` for the latest consistent point of the running training; safe to call from
        a signal handler on the main thread. Returns True if written; False if there is nothing to save (not
        started, or not rank 0) or the optimizer is in the middle of an update (then the previous checkpoint
        stays, and the run resumes from it)."""
        rt = self._rt
        if rt is None or rt.closed or not rt.ready or not rt.info.is_main or rt.state.phase == "update":
            return False
        state = E.TrainState(**rt.state.state_dict())
        if rt.epoch_started is not None and state.epoch_step < rt.ipe:
            state.epoch_time += time.perf_counter() - rt.epoch_started
        self._save(state)
        return True

    def _close_loaders(self) -> None:
        """Stop persistent DataLoader workers now, rather than whenever the garbage collector gets to them."""
        rt = self._rt
        if hasattr(rt, "ctx"):
            rt.ctx.on_step = None
        for name in ("train_loader", "eval_loader"):
            shutdown_workers(getattr(rt, name, None))

    # ------------------------------------------------------------------ setup

    def _setup(self, info: E.DistInfo, device: torch.device) -> None:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        cfg = self.config
        m, d, t = cfg["model"], cfg["data"], cfg["train"]
        rt = self._rt = SimpleNamespace(info=info, device=device, closed=False, ready=False, epoch_started=None)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        E.seed_all(D.mix_seed(t["seed"], 0xB11D))  # model init: same on every rank

        ckpt = None
        if self.checkpoint_path.is_file():
            ckpt = load_checkpoint(self.checkpoint_path)
            diff = resume_mismatch(ckpt["config"], cfg)
            if diff:
                raise ConfigError(f"{self.checkpoint_path} was written by another config; use a new run dir or "
                                  "delete it. Differences: " + "; ".join(diff))
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

        # data
        train_tf = D.build_transform(t["augment"], True, m["img_size"], d["mean"], d["std"], aa=t["aa"],
                                     reprob=t["reprob"], color_jitter=t["color_jitter"],
                                     interpolation=t["interpolation"], demo_padding=t["demo_padding"])
        raw_train = _raw_dataset(cfg, "train", train_tf)
        train_ds = D.SeededDataset(raw_train, train_tf, D.subset_indices(len(raw_train), d["train_subset"]))
        rt.eval_loader, rt.num_eval, raw_val = build_eval_loader(cfg, info, device)
        num_classes = _num_classes(cfg, raw_train)
        if getattr(raw_train, "classes", None) != getattr(raw_val, "classes", None):
            raise D.DatasetError(f"{d['dataset']} dataset at {d['root']}: the train/ and val/ class folders differ "
                                 f"({len(raw_train.classes)} vs {len(raw_val.classes)}); both need the same classes")
        rt.sampler = D.TrainSampler(len(train_ds), seed=t["seed"], world_size=info.world_size, rank=info.rank,
                                    repeats=t["repeated_aug"])
        rt.batch = t["batch_size"]
        rt.ipe = len(rt.sampler) // rt.batch
        if rt.ipe < 1:
            raise ConfigError(f"train.batch_size: {rt.batch} is more than the {len(rt.sampler)} training images "
                              "per process")
        batch_sampler = torch.utils.data.BatchSampler(rt.sampler, rt.batch, drop_last=True)
        rt.train_loader = torch.utils.data.DataLoader(
            train_ds, batch_sampler=batch_sampler, num_workers=d["num_workers"],
            pin_memory=device.type == "cuda", persistent_workers=d["num_workers"] > 0)

        # model
        model = build_model(m, num_classes)
        rt.params = count_params(model)
        if ckpt is None and t["init_checkpoint"]:
            from evit.checkpoint import load_pretrained

            if not Path(t["init_checkpoint"]).is_file():
                raise ConfigError(f"train.init_checkpoint: {t['init_checkpoint']} does not exist")
            load_pretrained(model, t["init_checkpoint"])
            if info.is_main:
                _log(f"initialized from {t['init_checkpoint']}")
        model.to(device)
        rt.model = model
        rt.keep_rate_fn = (functools.partial(E.keep_rate_at, iters_per_epoch=rt.ipe, target=m["keep_rate"],
                                             shrink_start=t["shrink_start"], shrink_epochs=t["shrink_epochs"])
                           if supports_keep_rate(model) else None)
        if info.distributed:
            rt.train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            rt.train_model = model

        # optimization
        rt.world_batch = rt.batch * info.world_size
        rt.lr = t["blr"] * rt.world_batch / 512
        opt_kwargs = {"momentum": t["momentum"]} if t["opt"] in ("sgd", "momentum", "nesterov") else {}
        if "adam" in t["opt"] or "lamb" in t["opt"]:
            opt_kwargs["eps"] = t["opt_eps"]
        rt.optimizer = create_optimizer_v2(model, opt=t["opt"], lr=rt.lr, weight_decay=t["weight_decay"],
                                           **opt_kwargs)
        rt.scheduler, _ = create_scheduler_v2(
            rt.optimizer, sched=t["sched"], num_epochs=t["epochs"], min_lr=t["min_lr"], warmup_lr=t["warmup_lr"],
            warmup_epochs=t["warmup_epochs"], step_on_epochs=False, updates_per_epoch=rt.ipe)
        rt.amp_dtype = E.amp_dtype_for(t["amp"], device)
        rt.scaler = torch.amp.GradScaler(device.type) if rt.amp_dtype == torch.float16 else None
        mixup_on = t["mixup"] > 0 or t["cutmix"] > 0
        rt.mixup = (Mixup(mixup_alpha=t["mixup"], cutmix_alpha=t["cutmix"], prob=t["mixup_prob"],
                          switch_prob=t["mixup_switch_prob"], mode="batch", label_smoothing=t["smoothing"],
                          num_classes=num_classes) if mixup_on else None)
        if mixup_on:
            criterion = SoftTargetCrossEntropy()
        elif t["smoothing"] > 0:
            criterion = LabelSmoothingCrossEntropy(smoothing=t["smoothing"])
        else:
            criterion = torch.nn.CrossEntropyLoss()
        rt.state = E.TrainState()
        rt.ctx = E.StepContext(
            criterion=criterion, device=device, iters_per_epoch=rt.ipe, seed=t["seed"], rank=info.rank,
            scheduler=rt.scheduler, keep_rate_fn=rt.keep_rate_fn, mixup_fn=rt.mixup, scaler=rt.scaler,
            amp_dtype=rt.amp_dtype, clip_grad=t["clip_grad"], hold_eval=t["hold_eval"])

        rt.ready = True
        if ckpt is not None:
            self._restore(ckpt)
            who = f"rank {info.rank}: " if info.distributed else ""  # every rank says where it resumed
            _log(f"{who}resumed from {self.checkpoint_path} at epoch {rt.state.epoch}, step {rt.state.step}")
        if info.is_main:
            _log(f"{m['arch']} ({rt.params / 1e6:.2f} M params), {len(train_ds)} train / {rt.num_eval} val images, "
                 f"{info.world_size} process(es) on {E.device_name(device)}, batch {rt.world_batch}, lr {rt.lr:.3g}, "
                 f"{rt.ipe} steps/epoch, amp {t['amp'] if rt.amp_dtype else 'none (fp32)'}")

    # ------------------------------------------------------------------ checkpoints

    def _save(self, state: E.TrainState) -> None:
        from evit.checkpoint import save_atomic

        rt = self._rt
        rng = rng_states(rt.device)
        save_atomic({
            "format": "evit-train-v1",
            "model": rt.model.state_dict(),
            "optimizer": rt.optimizer.state_dict(),
            "scheduler": rt.scheduler.state_dict(),
            "scaler": rt.scaler.state_dict() if rt.scaler is not None else None,
            "state": state.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "rng": rng,
            "sampler": dict(rt.sampler.state_dict(), epoch=state.epoch, start=state.epoch_step * rt.batch),
            "config": self.config,
            "config_hash": config_hash(self.config),
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
                          keep_rate=self._eval_keep_rate())

    def _eval_keep_rate(self) -> float | None:
        if self._rt.keep_rate_fn is None:
            return None
        kr = self.config["eval"]["keep_rate"]
        return kr if kr is not None else self.config["model"]["keep_rate"]

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
            rt.ctx.on_step = lambda s, loss, lr, kr: progress.update(s.epoch_step, rt.world_batch, loss=loss,
                                                                     lr=lr, keep=kr)
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
                "keep_rate": rt.keep_rate_fn(state.step - 1) if rt.keep_rate_fn else None,
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
        E.barrier()
        return metrics

    def _stop(self, state: E.TrainState, max_steps: int) -> None:
        if self._rt.info.is_main:
            self._save(state)
            _log(f"stopped at step {state.step} (max_steps {max_steps}); checkpoint written")
        E.barrier()
        return None

    def _metrics(self, ev: dict) -> dict:
        rt, cfg = self._rt, self.config
        return {
            "top1": ev["top1"], "top5": ev["top5"], "val_loss": ev["loss"], "num_eval_images": ev["num_images"],
            "keep_rate": self._eval_keep_rate(), "params": rt.params, "epochs": rt.state.epoch,
            "steps": rt.state.step, "train_time_s": rt.state.train_time, "arch": cfg["model"]["arch"],
            "img_size": cfg["model"]["img_size"], "dataset": cfg["data"]["dataset"],
            "run_dir": str(self.run_dir), "meta": cfg.get("meta"),
            "provenance": E.provenance(config_hash=config_hash(cfg), device=rt.device,
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


# --------------------------------------------------------------------------------------------- evaluation


def evaluate_checkpoint(checkpoint: str | Path, config: dict | None = None, overrides: list[str] | None = None,
                        out: str | Path | None = None) -> dict:
    """Evaluate a checkpoint (ours, DeiT, official EViT) on the val split; returns (and writes) eval.json.

    The run config is: ``config`` if given, else the checkpoint's own (ours), else defaults; ``overrides``
    (``section.key=value``) apply last. A foreign checkpoint therefore needs at least ``model.arch`` and the
    data section. ``model.keep_rate`` (or ``eval.keep_rate``) sets the keep rate evaluated.
    """
    from evit.checkpoint import load_pretrained, read_checkpoint, read_state_dict

    checkpoint = Path(checkpoint)
    blob = read_checkpoint(checkpoint)
    saved = blob.get("config") if isinstance(blob, dict) and isinstance(blob.get("config"), dict) else None
    del blob
    base = config if config is not None else (saved or {})
    raw = apply_overrides(base, overrides or [])
    raw = {k: v for k, v in raw.items() if k != "train" or isinstance(v, dict)}
    # the checkpoint evaluated is the run's starting point (a finetune recipe needs one; its other keys stay)
    raw["train"] = dict(raw.get("train") or {}, init_checkpoint=str(checkpoint))
    cfg = resolve_config(raw)
    if cfg["eval"]["keep_rate"] is not None:
        cfg["model"]["keep_rate"] = cfg["eval"]["keep_rate"]

    info = E.dist_env()
    device = E.resolve_device(cfg["train"]["device"], info.local_rank)
    info = E.init_distributed(device, info)
    try:
        loader, n, raw_val = build_eval_loader(cfg, info, device)
        num_classes = _num_classes(cfg, raw_val)
        model = build_model(cfg["model"], num_classes)
        state = read_state_dict(checkpoint)
        if "head.weight" in state and state["head.weight"].shape[0] != num_classes:
            raise ConfigError(f"{checkpoint} has a {state['head.weight'].shape[0]}-class head but the "
                              f"{cfg['data']['dataset']} dataset has {num_classes} classes")
        load_pretrained(model, checkpoint)
        model.to(device)
        if cfg["model"]["keep_rate"] < 1.0 and not supports_keep_rate(model):
            raise ConfigError(f"model.keep_rate: {cfg['model']['arch']} has no keep rate")
        amp_dtype = E.amp_dtype_for(cfg["train"]["amp"], device)
        t0 = time.perf_counter()
        try:
            res = E.evaluate(model, loader, device, amp_dtype=amp_dtype)
        finally:
            shutdown_workers(loader)
        dt = time.perf_counter() - t0
        m = cfg["model"]
        result = {
            "checkpoint": str(checkpoint), "top1": res["top1"], "top5": res["top5"], "val_loss": res["loss"],
            "num_eval_images": res["num_images"], "keep_rate": m["keep_rate"], "arch": m["arch"],
            "img_size": m["img_size"], "fuse_token": m["fuse_token"], "drop_loc": m["drop_loc"],
            "dataset": cfg["data"]["dataset"], "params": count_params(model), "eval_time_s": dt,
            "img_per_s": res["num_images"] / max(dt, 1e-9), "meta": cfg.get("meta"),
            "provenance": E.provenance(config_hash=config_hash(cfg), device=device, world_size=info.world_size),
        }
        if out is not None and info.is_main:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        E.cleanup_distributed(info)


# --------------------------------------------------------------------------------------------- CLI


def _cmd_train(args) -> int:
    raw = apply_overrides(load_config(args.config), args.set)
    metrics = Trainer(raw, args.run_dir).run(max_steps=args.max_steps)
    if metrics is not None and E.dist_env().is_main:
        print(json.dumps({k: metrics[k] for k in ("top1", "top5", "num_eval_images", "train_time_s")}))
    return 0


def _cmd_eval(args) -> int:
    overrides = list(args.set or [])
    for flag, key in (("arch", "model.arch"), ("img_size", "model.img_size"), ("patch_size", "model.patch_size"),
                      ("num_classes", "model.num_classes"), ("keep_rate", "eval.keep_rate"),
                      ("fuse_token", "model.fuse_token"), ("dataset", "data.dataset"), ("data_root", "data.root"),
                      ("val_subset", "data.val_subset"), ("batch_size", "eval.batch_size"),
                      ("num_workers", "data.num_workers"), ("crop_pct", "eval.crop_pct"),
                      ("device", "train.device"), ("amp", "train.amp")):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"{key}={json.dumps(v)}")
    if args.drop_loc is not None:
        overrides.append(f"model.drop_loc=[{args.drop_loc}]")
    config = load_config(args.config) if args.config else None
    result = evaluate_checkpoint(args.checkpoint, config, overrides, args.out)
    if E.dist_env().is_main:
        print(json.dumps({k: result[k] for k in ("top1", "top5", "num_eval_images", "keep_rate")}))
    return 0


def _guard(fn):
    """Run a command; config / data / NaN errors become one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(args) -> int:
        try:
            return fn(args)
        except (ConfigError, D.DatasetError, E.NonFiniteLossError, FileNotFoundError, CheckpointError) as e:
            print(f"evit {args.command}: error: {e}", file=sys.stderr, flush=True)
            return 2
    return wrapper


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train one run (resumes from RUN_DIR/checkpoint.pth)",
                       description="Train one run described by a run config (see `evit.train`'s docstring).")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--run-dir", required=True, help="output directory (checkpoint.pth, log.jsonl, metrics.json)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (YAML-parsed); repeatable")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many global steps (checkpointed)")
    p.set_defaults(func=_guard(_cmd_train))

    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on the val split",
                       description="Evaluate our, DeiT or official EViT checkpoints, at any keep rate.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", help="run config YAML for model/data (default: the checkpoint's own)")
    p.add_argument("--arch")
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--keep-rate", type=float, help="keep rate to evaluate at (default: the model's)")
    p.add_argument("--fuse-token", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--drop-loc", help="comma-separated block indices, e.g. 3,6,9")
    p.add_argument("--dataset", choices=D.DATASETS)
    p.add_argument("--data-root")
    p.add_argument("--val-subset", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--crop-pct", type=float)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", choices=("none", "bf16", "fp16"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", help="write the result JSON here (e.g. eval.json)")
    p.set_defaults(func=_guard(_cmd_eval))
