"""A training run's ``checkpoint.pth``: what it holds (model, optimizer, lr schedule, GradScaler, `TrainState`, RNG
states, sampler position, config) and putting it back into a built run (`evit.engine.BuiltRun`), exactly."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from evit.checkpoint import load_checkpoint, save_atomic
from evit.errors import ConfigError
from evit.config.io import resume_mismatch
from evit.engine import BuiltRun, TrainState


def load_run_checkpoint(path: Path, config: dict) -> dict | None:
    """The checkpoint at ``path``, if any, after checking that ``config`` (resolved) wrote it."""
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    diff = resume_mismatch(ckpt["config"], config)
    if diff:
        raise ConfigError(f"{path} was written by another config; use a new run dir or delete it. Differences: "
                          + "; ".join(diff))
    return ckpt


def save_run(path: Path, run: BuiltRun, state: TrainState, config: dict) -> None:
    scaler = run.ctx.scaler
    save_atomic({
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.ctx.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "state": state.state_dict(),
        "epoch": state.epoch,             # epoch, step and sampler: for people reading the file
        "step": state.step,
        "rng": rng_states(run.device),
        "sampler": dict(run.sampler.state_dict(), epoch=state.epoch, start=state.epoch_step * run.batch),
        "config": config,
    }, path)


def restore_run(run: BuiltRun, state: TrainState, ckpt: dict) -> None:
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.ctx.scheduler.load_state_dict(ckpt["scheduler"])
    if run.ctx.scaler is not None and ckpt.get("scaler"):
        run.ctx.scaler.load_state_dict(ckpt["scaler"])
    state.load_state_dict(ckpt["state"])
    set_rng_states(ckpt.get("rng") or {}, run.device)


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
