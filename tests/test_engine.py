"""The engine: keep-rate schedule, distributed helpers, exact distributed evaluation, the training step."""
from __future__ import annotations

import dataclasses
import math
import os
import socket

import pytest
import timm
import torch
import torch.multiprocessing as mp

import evit.models  # noqa: F401  (registers the EViT models with timm)
from evit import distributed as dist, engine as E
from evit.methods import keep_rate_at
from evit.data.catalog import FASHION_MEAN, FASHION_STD
from evit.data.datasets import FashionMNIST
from evit.data.samplers import ShardSampler, TrainSampler, subset_indices
from evit.data.seeding import SeededDataset
from evit.data.transforms import build_transform
from evit.provenance import provenance
from evit.errors import NonFiniteLossError


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------- keep rate


def test_keep_rate_schedule_values():
    ipe, r = 10, 0.7
    f = lambda s: keep_rate_at(s, ipe, r, shrink_start=2, shrink_epochs=4)  # noqa: E731
    assert [f(s) for s in (0, 5, 19)] == [1.0, 1.0, 1.0]            # before shrink_start epochs
    assert f(20) == pytest.approx(1.0)                              # t = 0: cos(0) -> 1
    assert f(40) == pytest.approx(r + (1 - r) / 2)                  # t = T/2
    assert f(30) == pytest.approx(r + (1 - r) * (math.cos(math.pi / 4) + 1) / 2)
    assert f(59) > r and f(60) == r and f(10_000) == r               # T = ipe * shrink_epochs = 40
    values = [f(s) for s in range(80)]
    assert all(a >= b for a, b in zip(values, values[1:]))          # non-increasing
    # fine-tuning: shrink 0/0 = the target from the first step
    assert keep_rate_at(0, ipe, 0.5, 0, 0) == 0.5
    # a target of 1 never shrinks
    assert keep_rate_at(35, ipe, 1.0, 0, 1) == 1.0
    # the paper's recipe: 1 for 10 epochs, cosine over 100, then the target
    paper = lambda e: keep_rate_at(int(e * 1000), 1000, 0.7, 10, 100)  # noqa: E731
    assert paper(9.99) == 1.0 and paper(60) == pytest.approx(0.85) and paper(110) == 0.7


def test_a_bucketed_schedule_takes_few_values_and_never_keeps_fewer_tokens():
    exact = lambda s: keep_rate_at(s, 1000, 0.7, 10, 100)  # noqa: E731  (the paper's scratch recipe)
    b = E.bucketed(exact, 0.7, 1.0, 8)
    values = [b(s) for s in range(0, 120_000, 50)]
    assert sorted(set(values)) == pytest.approx([0.7 + 0.3 * j / 8 for j in range(9)])
    assert 1.0 in values and 0.7 in values                          # the ends are exact
    assert all(b(s) >= exact(s) - 1e-12 for s in range(0, 120_000, 50))
    assert all(b(s) - exact(s) <= 0.3 / 8 + 1e-12 for s in range(0, 120_000, 50))


# --------------------------------------------------------------------------------------------- distributed env


def test_dist_env_sources():
    assert dist.dist_env({}) == dist.DistInfo()
    info = dist.dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.source) == (3, 8, 1, "torchrun")
    info = dist.dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.source) == (5, 8, 1, "slurm")
    # a single SLURM task is not distributed; torchrun's variables win over SLURM's
    assert not dist.dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).distributed
    info = dist.dist_env({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"})
    assert (info.rank, info.world_size) == (1, 2)


def test_first_slurm_host():
    assert dist.first_slurm_host("gpu[003-005,010],cpu1") == "gpu003"
    assert dist.first_slurm_host("node7") == "node7"
    assert dist.first_slurm_host("a-b[1,3]") == "a-b1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("evit_deit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=4,
                             num_heads=2, num_classes=10, drop_loc=(1, 2), **kw)


def _val_loader(world: int, rank: int, n: int = 101, batch: int = 8):
    tf = build_transform("demo", False, 28, FASHION_MEAN, FASHION_STD)
    ds = SeededDataset(FashionMNIST(None, "val"), tf, subset_indices(10000, n))
    return torch.utils.data.DataLoader(ds, batch_size=batch, sampler=ShardSampler(len(ds), world, rank))


def _ddp_eval_worker(rank: int, world: int, port: int, out):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    info = dist.init_distributed(torch.device("cpu"))
    try:
        assert info.initialized_here and torch.distributed.get_backend() == "gloo"
        res = E.evaluate(_tiny_model(keep_rate=0.7, fuse_token=True), _val_loader(world, rank), torch.device("cpu"))
        out[rank] = res
    finally:
        dist.cleanup_distributed(info)


def test_distributed_evaluation_counts_every_image_once():
    """2 gloo processes on 101 real images (odd): same counts and accuracy as one process."""
    single = E.evaluate(_tiny_model(keep_rate=0.7, fuse_token=True), _val_loader(1, 0), torch.device("cpu"))
    assert single["num_images"] == 101
    ctx = mp.get_context("fork")          # fork: children start without re-importing torch/timm
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_ddp_eval_worker, args=(2, _free_port(), out), nprocs=2, start_method="fork")
        results = dict(out)
    for rank in (0, 1):
        assert results[rank]["num_images"] == 101
        assert results[rank]["top1"] == pytest.approx(single["top1"], abs=1e-9)
        assert results[rank]["top5"] == pytest.approx(single["top5"], abs=1e-9)
        assert results[rank]["loss"] == pytest.approx(single["loss"], rel=1e-6)


def test_evaluate_topk_by_hand():
    model = _tiny_model()
    loader = _val_loader(1, 0, n=37, batch=10)
    res = E.evaluate(model, loader, torch.device("cpu"))
    logits, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            logits.append(model(x))
            labels.append(y)
    logits, labels = torch.cat(logits), torch.cat(labels)
    top5 = logits.topk(5, -1).indices
    assert res["num_images"] == 37
    assert res["top1"] == pytest.approx(100 * (logits.argmax(-1) == labels).float().mean().item())
    assert res["top5"] == pytest.approx(100 * (top5 == labels[:, None]).any(-1).float().mean().item())
    assert res["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


# --------------------------------------------------------------------------------------------- training step


class _Spy(torch.nn.Module):
    """Wraps a model and records the keep rate and train/eval mode of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, keep_rate=None):
        self.calls.append((keep_rate, self.model.training))
        return self.model(x, keep_rate=keep_rate)


def _train_batches(n_batches=6, batch=16):
    tf = build_transform("demo", True, 28, FASHION_MEAN, FASHION_STD)
    ds = SeededDataset(FashionMNIST(None, "val"), tf, subset_indices(10000, n_batches * batch))
    s = TrainSampler(len(ds), seed=0)
    return torch.utils.data.DataLoader(ds, batch_sampler=torch.utils.data.BatchSampler(s, batch, True))


def test_train_one_epoch_schedules_and_learns():
    from timm.scheduler import create_scheduler_v2

    spy = _Spy(_tiny_model(keep_rate=0.5, fuse_token=True))
    opt = torch.optim.AdamW(spy.parameters(), lr=3e-3)
    sched, _ = create_scheduler_v2(opt, "cosine", num_epochs=2, warmup_epochs=1, warmup_lr=1e-5, min_lr=0,
                                   step_on_epochs=False, updates_per_epoch=6)
    loader = _train_batches()
    krf = lambda s: keep_rate_at(s, 6, 0.5, shrink_start=0.5, shrink_epochs=1)  # noqa: E731
    lrs = []
    state = E.TrainState()
    ctx = E.StepContext(criterion=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"), iters_per_epoch=6,
                        seed=0, scheduler=sched, override_fn=lambda s: {"keep_rate": krf(s)},
                        on_step=lambda s, loss, lr, kr: lrs.append(lr))
    out0 = E.train_one_epoch(spy, loader, opt, state, ctx)
    state.epoch, state.epoch_step, state.loss_sum = 1, 0, 0.0
    out1 = E.train_one_epoch(spy, loader, opt, state, ctx)
    assert state.step == 12 and state.phase == "idle"
    assert [kr for kr, _ in spy.calls] == [krf(s) for s in range(12)]
    assert all(training for _, training in spy.calls)
    # per-iteration lr: linear warmup over epoch 0, then timm's cosine (over all 12 steps, warmup included)
    assert lrs[0] == pytest.approx(1e-5) and lrs[3] == pytest.approx(1e-5 + 3 * (3e-3 - 1e-5) / 6)
    assert lrs[6] == pytest.approx(3e-3 * (1 + math.cos(math.pi * 6 / 12)) / 2)
    assert out1["train_loss"] < out0["train_loss"]                            # it learns

    # fine-tuning mode: the model is held in eval mode (DropPath off) and trained all the same
    spy.calls.clear()
    before = [p.detach().clone() for p in spy.parameters()]
    E.train_one_epoch(spy, loader, opt, E.TrainState(), dataclasses.replace(ctx, hold_eval=True, scheduler=None))
    assert not any(training for _, training in spy.calls)
    assert any(not torch.equal(a, b) for a, b in zip(before, spy.parameters()))


def test_non_finite_loss_stops_before_the_update():
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bad = [(torch.full((4, 3, 28, 28), float("nan")), torch.zeros(4, dtype=torch.long))]
    before = [p.detach().clone() for p in model.parameters()]
    state = E.TrainState(epoch=3, step=17)
    ctx = E.StepContext(criterion=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"), iters_per_epoch=1,
                        seed=0)
    with pytest.raises(NonFiniteLossError) as e:
        E.train_one_epoch(model, bad, opt, state, ctx)
    assert (e.value.epoch, e.value.step) == (3, 17) and math.isnan(e.value.loss)
    assert "epoch 3, step 17" in str(e.value)
    assert state.step == 17 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_nan_mid_epoch_stops_with_the_last_good_weights_without_a_sync_per_step():
    """Fused AdamW, losses read every 4 steps: a NaN image batch at step 5 of 8 is caught on the device; steps 5
    to 7 update nothing, and the run stops at the read after step 8 with the weights, optimizer state and step count
    of a run that stopped before step 5."""
    batches = list(_train_batches(n_batches=8, batch=8))
    poisoned = list(batches)
    poisoned[5] = (torch.full_like(batches[5][0], float("nan")), batches[5][1])
    reads = []

    def run(loader, max_step=None):
        model = _tiny_model(keep_rate=0.7, fuse_token=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        state = E.TrainState(epoch=2, step=40)
        ctx = E.StepContext(criterion=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"), iters_per_epoch=8,
                            seed=0, check_every=4, max_step=max_step)
        settle = state.settle
        state.settle = lambda: (reads.append(state.step), settle())[1]
        return model, opt, state, ctx

    model, opt, state, ctx = run(poisoned)
    with pytest.raises(NonFiniteLossError) as e:
        E.train_one_epoch(model, poisoned, opt, state, ctx)
    assert (e.value.epoch, e.value.step) == (2, 45) and math.isnan(e.value.loss)
    assert reads == [44, 48]                   # read at steps 4 and 8 only, not per step
    assert (state.step, state.epoch_step) == (45, 5)
    ref, ref_opt, ref_state, ref_ctx = run(batches, max_step=45)
    E.train_one_epoch(ref, batches, ref_opt, ref_state, ref_ctx)
    assert ref_state.step == 45
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))
    for p, q in zip(ref.parameters(), model.parameters()):
        a, b = ref_opt.state[p], opt.state[q]
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


# --------------------------------------------------------------------------------------------- AMP


def _amp_run(amp: str, n_batches: int = 3):
    """Train a tiny EViT for ``n_batches`` real Fashion-MNIST batches with train.amp = ``amp`` on the CPU, as the
    Trainer does; returns the model, its weights before, the step losses, the scaler and the dtypes of every
    qkv-projection and head output seen in training and then in evaluation."""
    device = torch.device("cpu")
    dtype = E.amp_dtype_for(amp, device)
    model = _tiny_model(keep_rate=0.7, fuse_token=True)
    seen = {"train": [], "eval": []}
    phase = ["train"]
    for layer in (model.blocks[1].attn.qkv, model.head):   # a reorganizing block's attention, and the classifier
        layer.register_forward_hook(lambda mod, inputs, out: seen[phase[0]].append(out.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    losses = []
    ctx = E.StepContext(criterion=torch.nn.CrossEntropyLoss(), device=device, iters_per_epoch=n_batches, seed=0,
                        scaler=scaler, amp_dtype=dtype, on_step=lambda s, loss, lr, kr: losses.append(loss.item()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = E.TrainState()
    E.train_one_epoch(model, _train_batches(n_batches), opt, state, ctx)
    assert state.step == n_batches
    phase[0] = "eval"
    res = E.evaluate(model, _val_loader(1, 0, n=16, batch=16), device, amp_dtype=dtype)
    return model, before, losses, scaler, seen, res


def test_amp_settings_map_to_autocast_dtypes_on_every_device():
    cpu = torch.device("cpu")
    assert [E.amp_dtype_for(a, cpu) for a in ("none", "bf16", "fp16")] == [None, torch.bfloat16, torch.float16]
    assert E.amp_dtype_for("bf16", torch.device("cuda", 0)) == torch.bfloat16   # no GPU needed to resolve it
    with pytest.raises(ValueError, match="amp must be one of none, bf16, fp16, got 'fp8'"):
        E.amp_dtype_for("fp8", cpu)
    with pytest.raises(ValueError, match="cannot autocast on meta"):
        E.amp_dtype_for("bf16", torch.device("meta"))
    assert E.amp_dtype_for("none", torch.device("meta")) is None


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_one_epoch_autocasts_on_the_cpu(amp):
    """train.amp is honoured on the CPU: the matmuls run in the requested dtype, fp16 through a GradScaler, the
    weights stay fp32 and change, and the losses track an fp32 run of the same batches."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    model, before, losses, scaler, seen, res = _amp_run(amp)
    assert seen["train"] == [dtype] * 6 and seen["eval"] == [dtype] * 2     # 3 steps x (qkv, head); 1 eval batch
    assert all(math.isfinite(loss) for loss in losses) and len(losses) == 3
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()) if b.requires_grad)
    if amp == "fp16":
        assert scaler.get_scale() == 2.0 ** 16                  # set, and no overflow backed it off
        assert scaler.state_dict()["_growth_tracker"] == 3      # scaler.update() after each of the 3 steps
    else:
        assert scaler is None
    _, _, fp32_losses, _, fp32_seen, fp32_res = _amp_run("none")
    assert fp32_seen["train"] == [torch.float32] * 6
    assert losses != fp32_losses                                # really another precision ...
    assert losses == pytest.approx(fp32_losses, rel=0.03)       # ... of the same computation
    assert res["num_images"] == fp32_res["num_images"] == 16 and math.isfinite(res["loss"])


def test_provenance_fields():
    p = provenance(config_hash="abc", device=torch.device("cpu"), world_size=1)
    assert p["config_hash"] == "abc" and p["world_size"] == 1
    assert p["torch"] == torch.__version__ and p["timm"] == timm.__version__
    assert p["python"].count(".") == 2 and p["device"].startswith("cpu")
    assert p["git_commit"] is None or len(p["git_commit"].split("-")[0]) == 40


def test_engine_step_equals_a_bare_timm_loop():
    """scripts/bench_engine.py's two loops (ours and a bare timm loop) end with bitwise equal weights."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_engine.py"
    spec = importlib.util.spec_from_file_location("bench_engine", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for keep in ("1.0", "0.5"):
        res = bench.main(["--embed-dim", "32", "--depth", "4", "--heads", "2", "--batch-size", "16", "--steps", "2",
                          "--rounds", "2", "--warmup", "0", "--keep-rate", keep])
        assert res["same_weights"], keep
        assert res["bare_timm"]["median_img_s"] > 0 and res["engine"]["median_img_s"] > 0
