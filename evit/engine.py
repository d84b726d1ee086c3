"""The training and evaluation loops, the keep-rate schedule, distributed helpers and provenance.

Everything here works on one process of a (possibly) distributed job; `evit.train` wires it together.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from evit.data import mix_seed, seed_all


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite. Raised before the optimizer applies that step."""

    def __init__(self, epoch: int, step: int, loss: float):
        self.epoch, self.step, self.loss = epoch, step, loss
        super().__init__(f"non-finite training loss {loss} at epoch {epoch}, step {step} (global step, before "
                         "the update); the run is stopped and the last checkpoint is left as it was")


# --------------------------------------------------------------------------------------------- keep rate


def keep_rate_at(step: int, iters_per_epoch: int, target: float, shrink_start: float, shrink_epochs: float) -> float:
    """EViT's keep-rate schedule, per iteration.

    1 for the first ``shrink_start`` epochs; then a cosine from 1 down to ``target`` over ``shrink_epochs``:
    ``target + (1 - target) * (cos(pi * t / T) + 1) / 2`` with t the iterations since ``shrink_start`` and
    ``T = iters_per_epoch * shrink_epochs``; then ``target``. With ``shrink_epochs == 0`` the target holds from
    ``shrink_start`` on (so shrink 0/0 = the target from the first step, as in fine-tuning).
    """
    if target >= 1.0:
        return 1.0
    t = step - shrink_start * iters_per_epoch
    if t < 0:
        return 1.0
    total = iters_per_epoch * shrink_epochs
    if t >= total:
        return float(target)
    return target + (1.0 - target) * (math.cos(math.pi * t / total) + 1.0) / 2.0


# --------------------------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"     # "torchrun" (RANK/WORLD_SIZE env, also set by submitit), "slurm" or "single"
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list such as ``gpu[003-005,010],cpu1`` -> ``gpu003``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.groups()
    return prefix if not ranges else prefix + ranges.split(",")[0].split("-")[0]


def dist_env(environ=None) -> DistInfo:
    """Rank / world size / local rank from torchrun's env vars, else SLURM's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        return DistInfo(rank, world, local, "torchrun" if world > 1 else "single")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                        "slurm")
    return DistInfo()


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU (cuda:LOCAL_RANK) when CUDA is available, else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: torch.device | None = None, info: DistInfo | None = None,
                     timeout_min: float = 30) -> DistInfo:
    """Join the process group described by the environment (NCCL on GPU, gloo on CPU). No-op for 1 process."""
    info = info or dist_env()
    if not info.distributed or (dist.is_available() and dist.is_initialized()):
        return info
    if info.source == "slurm":
        os.environ.setdefault("MASTER_ADDR", first_slurm_host(
            os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        os.environ.setdefault("MASTER_PORT", str(10000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 50000))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"distributed run ({info.world_size} processes) but {', '.join(missing)} not set")
    device = device or resolve_device("auto", info.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(minutes=timeout_min))
    info.initialized_here = True
    return info


def cleanup_distributed(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
        info.initialized_here = False


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


# --------------------------------------------------------------------------------------------- AMP


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the ``amp`` setting (none | bf16 | fp16), or None for fp32.

    Honoured on every device: torch autocasts on the CPU as on CUDA, in bf16 and in fp16 (fp16 training
    then needs a ``torch.amp.GradScaler(device.type)``). A device type torch cannot autocast raises.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    if dtype is not None and not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"amp={amp}: torch cannot autocast on {device.type}; use amp none")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on the device's type in ``dtype``; a no-op context for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def call_model(model: torch.nn.Module, x: torch.Tensor, keep_rate: float | None):
    return model(x) if keep_rate is None else model(x, keep_rate=keep_rate)


# --------------------------------------------------------------------------------------------- training


@dataclass
class TrainState:
    """Where training stands; saved in checkpoints. ``phase`` tells an on-request checkpoint whether the model
    and optimizer are consistent with ``step``: "idle" or "compute" (this step has not touched them yet), or
    "update" (they are being changed)."""

    epoch: int = 0            # current epoch (0-based); at an epoch boundary = the number of completed epochs
    step: int = 0             # optimizer steps completed, all epochs
    epoch_step: int = 0       # optimizer steps completed in `epoch`
    loss_sum: float = 0.0     # sum of the (all-rank mean) step losses in `epoch`
    epoch_time: float = 0.0   # training seconds spent in `epoch` (before this session, if resumed)
    train_time: float = 0.0   # training seconds in completed epochs, all sessions
    phase: str = "idle"

    def state_dict(self) -> dict:
        d = asdict(self)
        d.pop("phase")
        return d

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)
        self.phase = "idle"


@dataclass
class StepContext:
    """What `train_one_epoch` needs besides the model, data and optimizer."""

    criterion: Callable
    device: torch.device
    iters_per_epoch: int
    seed: int
    rank: int = 0
    scheduler: object | None = None            # timm scheduler, stepped per iteration via step_update(step)
    keep_rate_fn: Callable[[int], float] | None = None   # step -> keep rate, or None (model without keep_rate)
    mixup_fn: Callable | None = None
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    clip_grad: float | None = None
    hold_eval: bool = False                    # model.eval() while training (fine-tuning: DropPath off)
    on_step: Callable[[TrainState, float, float, float | None], None] | None = None  # (state, loss, lr, kr)
    max_step: int | None = None                # stop (before fetching more) once state.step reaches this


def train_one_epoch(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    state: TrainState, ctx: StepContext) -> dict:
    """Train until ``loader`` is exhausted, updating ``state`` after every optimizer step.

    Per step, in order: reseed python/numpy/torch from (seed, step, rank) so that DropPath and Mixup draws
    depend only on the step; set the lr for this step; forward/backward; check the loss (mean over ranks) is
    finite, raising `NonFiniteLossError` before any update; then update. Returns the epoch's mean loss.
    """
    model.train(not ctx.hold_eval)
    device, non_blocking = ctx.device, ctx.device.type == "cuda"
    loss_buf = torch.zeros((), device=device, dtype=torch.float64)
    lr = optimizer.param_groups[0]["lr"]
    kr = None
    t0 = time.perf_counter()
    for images, targets in loader:
        if ctx.max_step is not None and state.step >= ctx.max_step:
            break
        state.phase = "compute"
        step = state.step
        seed_all(mix_seed(ctx.seed, step, ctx.rank, 0xD0))
        if ctx.scheduler is not None:
            ctx.scheduler.step_update(num_updates=step)
        lr = optimizer.param_groups[0]["lr"]
        images = images.to(device, non_blocking=non_blocking)
        targets = targets.to(device, non_blocking=non_blocking)
        if ctx.mixup_fn is not None:
            images, targets = ctx.mixup_fn(images, targets)
        kr = ctx.keep_rate_fn(step) if ctx.keep_rate_fn is not None else None
        with autocast(device, ctx.amp_dtype):
            output = call_model(model, images, kr)
            loss = ctx.criterion(output, targets)
        optimizer.zero_grad(set_to_none=True)
        if ctx.scaler is not None:
            ctx.scaler.scale(loss).backward()
        else:
            loss.backward()
        loss_buf.copy_(loss.detach())
        loss_value = all_reduce_sum(loss_buf).item() / (dist.get_world_size() if dist.is_initialized() else 1)
        if not math.isfinite(loss_value):
            state.phase = "idle"
            raise NonFiniteLossError(state.epoch, step, loss_value)
        state.phase = "update"
        if ctx.scaler is not None:
            if ctx.clip_grad:
                ctx.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), ctx.clip_grad)
            ctx.scaler.step(optimizer)
            ctx.scaler.update()
        else:
            if ctx.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), ctx.clip_grad)
            optimizer.step()
        state.step += 1
        state.epoch_step += 1
        state.loss_sum += loss_value
        state.phase = "idle"
        if ctx.on_step is not None:
            ctx.on_step(state, loss_value, lr, kr)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    state.epoch_time += time.perf_counter() - t0
    return {"train_loss": state.loss_sum / max(state.epoch_step, 1), "lr": lr, "keep_rate": kr}


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, device: torch.device, *, amp_dtype: torch.dtype | None = None,
             keep_rate: float | None = None, progress: Callable[[int], None] | None = None) -> dict:
    """Top-1 / top-5 / mean cross-entropy over this rank's share of ``loader``, summed over all ranks.

    With `evit.data.ShardSampler` each image is counted exactly once over the ranks. ``keep_rate`` overrides the
    model's own (None: the model's target)."""
    model.eval()
    non_blocking = device.type == "cuda"
    sums = torch.zeros(4, dtype=torch.float64, device=device)    # correct@1, correct@5, loss sum, count
    for images, targets in loader:
        images = images.to(device, non_blocking=non_blocking)
        targets = targets.to(device, non_blocking=non_blocking)
        with autocast(device, amp_dtype):
            output = call_model(model, images, keep_rate)
        output = output.float()
        k = min(5, output.shape[-1])
        top = output.topk(k, dim=-1).indices
        hit = top.eq(targets[:, None])
        sums[0] += hit[:, 0].sum()
        sums[1] += hit.any(dim=-1).sum()
        sums[2] += torch.nn.functional.cross_entropy(output, targets, reduction="sum")
        sums[3] += targets.numel()
        if progress is not None:
            progress(targets.numel())
    all_reduce_sum(sums)
    c1, c5, loss, n = sums.tolist()
    n = int(round(n))
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "loss": loss / max(n, 1),
            "num_images": n}


# --------------------------------------------------------------------------------------------- provenance


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the source tree (``-dirty`` appended if tracked files changed); EVIT_GIT_COMMIT overrides."""
    if os.environ.get("EVIT_GIT_COMMIT"):
        return os.environ["EVIT_GIT_COMMIT"]
    where = str(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name} ({torch.get_num_threads()} threads)"


def provenance(*, config_hash: str | None, device: torch.device, world_size: int) -> dict:
    """Where a result came from: one function shared by `evit train` (metrics.json) and `evit eval`."""
    import timm

    return {
        "git_commit": git_commit(),
        "config_hash": config_hash,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": device_name(device),
        "world_size": world_size,
        "host": socket.gethostname(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
