"""The training and evaluation loops, the per-pass parameter's schedule for compiled training, and mixed precision.

Everything here works on one process of a (possibly) distributed job. `BuiltRun` is a training run's parts (model,
optimizer, loader, batch stage, step settings) and `BuiltRun.steps` its training step: `evit.trainer` builds one
and trains it; `evit bench-input` and scripts/ measure it.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from evit.data.loaders import close_loader
from evit.data.samplers import TrainSampler
from evit.data.seeding import mix_seed, seed_all
from evit.distributed import DistInfo, all_reduce_sum
from evit.errors import ConfigError, NonFiniteLossError


# --------------------------------------------------------------------------------------------- schedule


def bucketed(fn: Callable[[int], float], lo: float, hi: float, levels: int) -> Callable[[int], float]:
    """``fn`` (step -> a value in [lo, hi]) rounded up to the nearest of ``levels + 1`` evenly spaced values from lo
    to hi (both exact). A compiled model makes one graph per value of the per-pass parameter it sees; this bounds
    their number."""
    grid = [lo + (hi - lo) * j / levels for j in range(levels)] + [hi]

    def at(step: int) -> float:
        v = fn(step)
        if hi <= lo:
            return v
        return grid[min(levels, max(0, math.ceil(round((v - lo) / (hi - lo) * levels, 9))))]
    return at


def compile_for_training(model: torch.nn.Module, max_graphs: int, backend: str = "inductor") -> torch.nn.Module:
    """``torch.compile`` (static shapes) allowing ``max_graphs`` graphs of the model's forward; one more is an
    error (dynamo's ``fail_on_recompile_limit_hit``), never a silent fall-back to eager."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, max_graphs)
    cfg.fail_on_recompile_limit_hit = True
    return torch.compile(model, dynamic=False, backend=backend)


# --------------------------------------------------------------------------------------------- AMP


# The mixed precisions by name. Full precision (no autocast) is "none" in a run config's ``train.amp`` and "fp32"
# in `evit bench`.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the ``train.amp`` setting (none | bf16 | fp16), or None for fp32.

    Honoured on every device: torch autocasts on the CPU as on CUDA, in bf16 and in fp16 (fp16 training
    then needs a ``torch.amp.GradScaler(device.type)``). A device type torch cannot autocast raises.
    """
    if amp != "none" and amp not in AUTOCAST_DTYPES:
        raise ConfigError(f"amp must be one of {', '.join(('none', *AUTOCAST_DTYPES))}, got {amp!r}")
    dtype = AUTOCAST_DTYPES.get(amp)
    if dtype is not None and not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"amp={amp}: torch cannot autocast on {device.type}; use amp none")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on the device's type in ``dtype``; a no-op context for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def call_model(model: torch.nn.Module, x: torch.Tensor, override: dict | None):
    """One forward pass; ``override``: the method's per-pass parameter, e.g. ``{"keep_rate": 0.7}`` (None: none)."""
    return model(x, **(override or {}))


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
    # On the training device, what the steps since the last `settle` left unread (reading waits for the device):
    # [their loss sum, non-finite losses, the first such step, its loss].
    pending: torch.Tensor | None = field(default=None, repr=False)

    def state_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("phase", "pending")}
        if self.pending is not None:
            d["loss_sum"] += self.pending[0].item()
        return d

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)
        self.phase, self.pending = "idle", None

    def non_finite_pending(self) -> bool:
        return self.pending is not None and bool(self.pending[1] > 0)

    def record(self, loss: torch.Tensor, step: int) -> None:
        """Count one step's (all-rank mean) loss, on the device, without waiting for it."""
        if self.pending is None:
            self.pending = torch.zeros(4, dtype=torch.float64, device=loss.device)
        p, bad = self.pending, ~torch.isfinite(loss)
        first = bad & (p[1] == 0)
        p[2] = torch.where(first, step, p[2])
        p[3] = torch.where(first, loss, p[3])
        p[1] += bad
        p[0] += torch.where(bad, 0.0, loss)

    def settle(self) -> None:
        """Read what `record` counted: add the losses to ``loss_sum``; after a non-finite loss, go back to the step
        that had it (no update was applied from it on) and raise `NonFiniteLossError`."""
        if self.pending is None:
            return
        loss_sum, bad, first, first_loss = self.pending.tolist()
        self.pending.zero_()
        self.loss_sum += loss_sum
        if bad:
            undone = self.step - int(first)
            self.step, self.epoch_step, self.phase = self.step - undone, self.epoch_step - undone, "idle"
            raise NonFiniteLossError(self.epoch, int(first), first_loss)


@dataclass(frozen=True)
class StepContext:
    """What `train_one_epoch` needs besides the model, data and optimizer; a variant is a `dataclasses.replace`."""

    criterion: Callable
    device: torch.device
    iters_per_epoch: int
    seed: int
    rank: int = 0
    scheduler: object | None = None            # timm scheduler, stepped per iteration via step_update(step)
    override_fn: Callable[[int], dict] | None = None    # step -> the method's scheduled override, or None
    batch_stage: Callable | None = None        # (images, targets) -> on the device, ready (`data.stage.BatchStage`);
                                               # None: batches are ready, only moved to the device
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    clip_grad: float | None = None
    hold_eval: bool = False                    # model.eval() while training (fine-tuning: DropPath off)
    # (state, loss, lr, override) after each step; the loss is a 0-d tensor on the device (reading it waits for
    # the step)
    on_step: Callable[[TrainState, torch.Tensor, float, dict | None], None] | None = None
    max_step: int | None = None                # stop (before fetching more) once state.step reaches this
    check_every: int = 50                      # steps between reads of the losses (`TrainState.settle`)


def train_one_epoch(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    state: TrainState, ctx: StepContext) -> dict:
    """Train until ``loader`` is exhausted, updating ``state`` after every optimizer step.

    Per step, in order: reseed python/numpy/torch from (seed, step, rank) so that the batch stage's draws
    (random erasing, Mixup) and DropPath depend only on the step; set the lr for this step; run the batch stage;
    forward/backward; record the loss (mean over ranks); then update, unless a loss so far was not finite.

    The host does not wait for the device at every step: the losses are checked on the device, and an optimizer
    that can skip its update there (torch's fused ones, without a GradScaler) is given the flag as ``found_inf``.
    The flag is read every ``ctx.check_every`` steps and at the end (`TrainState.settle`), raising
    `NonFiniteLossError` with the weights of the step before the first non-finite loss. Other optimizers read it
    at every step, before updating. Returns the epoch's mean loss.
    """
    model.train(not ctx.hold_eval)
    device, non_blocking = ctx.device, ctx.device.type == "cuda"
    loss_buf = torch.zeros((), device=device, dtype=torch.float64)
    world = dist.get_world_size() if dist.is_initialized() else 1
    skip_on_device = ctx.scaler is None and getattr(optimizer, "_step_supports_amp_scaling", False)
    lr = optimizer.param_groups[0]["lr"]
    override = None
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
        if ctx.batch_stage is not None:
            images, targets = ctx.batch_stage(images, targets)
        else:
            images = images.to(device, non_blocking=non_blocking)
            targets = targets.to(device, non_blocking=non_blocking)
        override = ctx.override_fn(step) if ctx.override_fn is not None else None
        with autocast(device, ctx.amp_dtype):
            output = call_model(model, images, override)
            loss = ctx.criterion(output, targets)
        optimizer.zero_grad(set_to_none=True)
        if ctx.scaler is not None:
            ctx.scaler.scale(loss).backward()
        else:
            loss.backward()
        loss_buf.copy_(loss.detach())
        loss_mean = all_reduce_sum(loss_buf) / world
        state.record(loss_mean, step)
        if not skip_on_device:
            state.settle()
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
            if skip_on_device:
                optimizer.found_inf = (state.pending[1] > 0).float()   # 1: the fused kernels leave everything
            optimizer.step()
            optimizer.__dict__.pop("found_inf", None)
        state.step += 1
        state.epoch_step += 1
        state.phase = "idle"
        if ctx.on_step is not None:
            ctx.on_step(state, loss_mean, lr, override)
        if skip_on_device and state.step % ctx.check_every == 0:
            state.settle()
    state.settle()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    state.epoch_time += time.perf_counter() - t0
    return {"train_loss": state.loss_sum / max(state.epoch_step, 1), "lr": lr, "override": override}


@dataclass(frozen=True)
class BuiltRun:
    """One process's share of a training run, built from its config (`evit.trainer.Trainer.build`) and ready to
    train: the parts, and `steps`, the training step as `evit train`'s loop runs it."""

    info: DistInfo
    model: torch.nn.Module              # the bare model: checkpoints, evaluation
    train_model: torch.nn.Module        # what trains: the model, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    sampler: TrainSampler
    loader: Iterable                    # this process's training batches of the sampler's epoch (see `epoch`)
    eval_loader: Iterable
    ctx: StepContext                    # loss, lr schedule, batch stage, mixed precision ...
    target: dict | None                 # the method's per-pass parameter at its schedule's end (None: no schedule)
    batch: int                          # images per process and step
    num_train: int
    num_eval: int

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def stage(self) -> Callable:
        """The batch stage: (images, targets) from the loader -> ready on the device (`evit.data.stage.BatchStage`)."""
        return self.ctx.batch_stage

    @property
    def ipe(self) -> int:
        """Optimizer steps per epoch."""
        return self.ctx.iters_per_epoch

    @property
    def world_batch(self) -> int:
        return self.batch * self.info.world_size

    def epoch(self, epoch: int, start: int = 0) -> Iterable:
        """The training batches of ``epoch``, from this process's ``start``-th sample on."""
        self.sampler.set_epoch(epoch, start=start)
        return self.loader

    def batches(self) -> Iterator:
        """The training batches, epoch after epoch, without end."""
        epoch = 0
        while True:
            yield from self.epoch(epoch)
            epoch += 1

    def steps(self, batches: Iterable, state: TrainState | None = None, *, staged: bool = False,
              at_target: bool = False, on_step: Callable | None = None, max_step: int | None = None) -> TrainState:
        """Train on ``batches`` (`train_one_epoch`), counting in ``state`` (None: a fresh one), which is returned.

        ``staged``: the batches are already through the batch stage (on the device). ``at_target``: the lr as it
        is (no schedule) and the method's parameter at `target`, as when measuring a step. ``on_step``,
        ``max_step``: as in `StepContext`."""
        ctx = replace(self.ctx, on_step=on_step, max_step=max_step)
        if staged:
            ctx = replace(ctx, batch_stage=None)
        if at_target:
            target = self.target
            ctx = replace(ctx, scheduler=None, override_fn=(lambda step: target) if target else None)
        state = TrainState() if state is None else state
        train_one_epoch(self.train_model, batches, self.optimizer, state, ctx)
        return state

    def close(self) -> None:
        """Close the loaders now (`close_loader`): their workers, and DALI's feeding threads."""
        for loader in (self.loader, self.eval_loader):
            close_loader(loader)


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, device: torch.device, *, amp_dtype: torch.dtype | None = None,
             override: dict | None = None) -> dict:
    """Top-1 / top-5 / mean cross-entropy over this rank's share of ``loader``, summed over all ranks.

    With `evit.data.samplers.ShardSampler` each image is counted exactly once over the ranks. ``override`` sets the
    model's per-pass parameter (e.g. ``{"keep_rate": 0.5}``; None: the model's own)."""
    model.eval()
    non_blocking = device.type == "cuda"
    sums = torch.zeros(4, dtype=torch.float64, device=device)    # correct@1, correct@5, loss sum, count
    for images, targets in loader:
        images = images.to(device, non_blocking=non_blocking)
        targets = targets.to(device, non_blocking=non_blocking)
        with autocast(device, amp_dtype):
            output = call_model(model, images, override)
        output = output.float()
        k = min(5, output.shape[-1])
        top = output.topk(k, dim=-1).indices
        hit = top.eq(targets[:, None])
        sums[0] += hit[:, 0].sum()
        sums[1] += hit.any(dim=-1).sum()
        sums[2] += torch.nn.functional.cross_entropy(output, targets, reduction="sum")
        sums[3] += targets.numel()
    all_reduce_sum(sums)
    c1, c5, loss, n = sums.tolist()
    n = int(round(n))
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "loss": loss / max(n, 1),
            "num_images": n}
