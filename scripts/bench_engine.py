#!/usr/bin/env python
"""Engine overhead: train-step throughput of `evit.engine.train_one_epoch` vs a bare timm training loop.

Both loops train their own copy of the same model (same init) with the same optimizer (timm AdamW), loss and
batches (real Fashion-MNIST images, pre-collated in memory, so only the loops differ). The engine adds what a
run pays per step: per-step reseeding, per-iteration lr and keep-rate schedules, the finite-loss check (an
all-reduce and a sync), state bookkeeping and the progress callback. Rounds are interleaved A B A B after a
warm-up; medians and the spread are reported.

    .venv/bin/python scripts/bench_engine.py                    # the Fashion-MNIST ViT (fashion_vit.yaml), batch 128
    .venv/bin/python scripts/bench_engine.py --loader           # also: our seeded data pipeline vs a plain one

With ``--loader`` it also compares the whole input pipeline + step: `TrainSampler` + `SeededDataset` (per-sample
reseeding) vs a plain shuffling DataLoader over the same transform.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time

import timm
import torch

import evit.models  # noqa: F401  (registers the EViT models with timm)
from evit import engine as E
from evit.benchmark import quartiles
from evit.data.catalog import FASHION_MEAN, FASHION_STD
from evit.data.datasets import FashionMNIST
from evit.data.samplers import TrainSampler, subset_indices
from evit.data.seeding import SeededDataset
from evit.data.transforms import build_transform
from evit.methods import keep_rate_at
from evit.progress import Progress
from evit.provenance import device_name


def build(args) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(args.arch, img_size=28, patch_size=args.patch_size, num_classes=10,
                             embed_dim=args.embed_dim,
                             depth=args.depth, num_heads=args.heads, keep_rate=args.keep_rate, fuse_token=True,
                             drop_loc=tuple(d for d in (3, 6, 9) if d < args.depth) or (args.depth - 1,),
                             drop_path_rate=args.drop_path)


def optimizer(model):
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)


def bare_loop(model, batches, opt, criterion):
    """The reference: the loop of timm's train.py stripped to the maths."""
    model.train()
    for x, y in batches:
        loss = criterion(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def make_engine(model, opt, criterion, steps, args):
    from timm.scheduler import create_scheduler_v2

    # a cosine from 1e-3 to 1e-3: the scheduler runs every step, but the lr equals the bare loop's, so both
    # copies of the model follow the same trajectory (same values, same cost, and a check of the engine's maths)
    sched, _ = create_scheduler_v2(opt, "cosine", num_epochs=100, warmup_epochs=0, min_lr=1e-3,
                                   step_on_epochs=False, updates_per_epoch=steps)
    ctx = E.StepContext(
        criterion=criterion, device=torch.device("cpu"), iters_per_epoch=steps, seed=0, scheduler=sched,
        # shrink 0/0: the model's own target from step 0, so both loops compute the same thing
        override_fn=lambda s: {"keep_rate": keep_rate_at(s, steps, args.keep_rate, 0, 0)})
    state = E.TrainState()

    def run(batches):
        # the Trainer's progress for a non-TTY (SLURM) run, one per epoch; quiet here (every > steps)
        progress = Progress(True, steps + 1, "bench", every=10 ** 9)

        def on_step(st, loss, lr, override):
            progress.update(st.epoch_step, args.batch_size, loss=loss, lr=lr, **(override or {}))

        state.epoch_step, state.loss_sum = 0, 0.0
        E.train_one_epoch(model, batches, opt, state, dataclasses.replace(ctx, on_step=on_step))
    return run


def timed(fn, *a) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def summary(times: list[float], images: int) -> dict:
    q1, median, q3 = quartiles([images / t for t in times])
    return {"median_img_s": median, "q1": q1, "q3": q3, "rounds": len(times)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="evit_deit_tiny_patch16_224")
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--keep-rate", type=float, default=1.0)
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of each loop first")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--loader", action="store_true", help="also compare the data pipelines (+ step)")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    val = FashionMNIST(None, "train")
    tf = build_transform("demo", False, 28, FASHION_MEAN, FASHION_STD)
    n = args.steps * args.batch_size
    xs = torch.stack([tf(val[i][0]) for i in range(n)])
    ys = val.targets[:n].clone()
    batches = [(xs[i:i + args.batch_size], ys[i:i + args.batch_size]) for i in range(0, n, args.batch_size)]
    criterion = torch.nn.CrossEntropyLoss()

    m_bare, m_eng = build(args), None
    m_eng = copy.deepcopy(m_bare)
    o_bare, o_eng = optimizer(m_bare), optimizer(m_eng)
    engine = make_engine(m_eng, o_eng, criterion, args.steps, args)

    for _ in range(args.warmup):
        bare_loop(m_bare, batches, o_bare, criterion)
        engine(batches)
    t_bare, t_eng = [], []
    for r in range(args.rounds):                       # interleaved A B B A A B ...: no loop always goes first
        pair = [("bare", lambda: timed(bare_loop, m_bare, batches, o_bare, criterion)),
                ("engine", lambda: timed(engine, batches))]
        out = dict((name, fn()) for name, fn in (pair if r % 2 == 0 else pair[::-1]))
        t_bare.append(out["bare"])
        t_eng.append(out["engine"])
    res = {
        "bare_timm": summary(t_bare, n), "engine": summary(t_eng, n),
        "model": f"{args.arch} patch {args.patch_size} dim {args.embed_dim} depth {args.depth} keep {args.keep_rate}",
        "batch_size": args.batch_size, "steps_per_round": args.steps, "threads": torch.get_num_threads(),
        "device": device_name(torch.device("cpu")), "torch": torch.__version__, "timm": timm.__version__,
    }
    # paired per-round ratios are less sensitive to drifting load than a ratio of medians
    res["engine_overhead_pct"] = 100 * (statistics.median(e / b for e, b in zip(t_eng, t_bare)) - 1)
    res["same_weights"] = all(torch.equal(a, b) for a, b in zip(m_bare.state_dict().values(),
                                                                   m_eng.state_dict().values()))

    if args.loader:
        res.update(bench_loaders(args, val, criterion))

    print(f"model {res['model']}, batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps, "
          f"{res['threads']} threads, {res['device']}")
    for name in ("bare_timm", "engine", "loader_plain", "loader_seeded"):
        if name in res:
            r = res[name]
            print(f"  {name:14s} {r['median_img_s']:8.1f} img/s  (IQR {r['q1']:.1f} - {r['q3']:.1f})")
    print(f"  engine overhead vs bare timm loop: {res['engine_overhead_pct']:+.2f} % "
          f"(median of paired round ratios); identical weights after both: {res['same_weights']}")
    if "loader_overhead_pct" in res:
        print(f"  seeded data pipeline + engine vs plain loader + bare loop: {res['loader_overhead_pct']:+.2f} %")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return res


def bench_loaders(args, val, criterion) -> dict:
    """Whole input pipeline + step: our seeded sampler/dataset + engine vs a plain DataLoader + bare loop."""
    tf = build_transform("demo", True, 28, FASHION_MEAN, FASHION_STD)
    n = args.steps * args.batch_size
    sub = subset_indices(len(val), n)
    ours_ds = SeededDataset(val, tf, sub)
    sampler = TrainSampler(n, seed=0)
    ours = torch.utils.data.DataLoader(ours_ds, batch_sampler=torch.utils.data.BatchSampler(
        sampler, args.batch_size, drop_last=True))

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            img, y = val[sub[i]]
            return tf(img), y

    plain = torch.utils.data.DataLoader(Plain(), batch_size=args.batch_size, shuffle=True, drop_last=True)
    m_bare = build(args)
    m_eng = copy.deepcopy(m_bare)
    o_bare, o_eng = optimizer(m_bare), optimizer(m_eng)
    engine = make_engine(m_eng, o_eng, criterion, args.steps, args)
    epoch = [0]

    def ours_epoch():
        sampler.set_epoch(epoch[0])
        epoch[0] += 1
        engine(ours)

    def plain_epoch():
        bare_loop(m_bare, plain, o_bare, criterion)

    for _ in range(args.warmup):
        plain_epoch()
        ours_epoch()
    t_plain, t_ours = [], []
    for r in range(args.rounds):
        if r % 2 == 0:
            t_plain.append(timed(plain_epoch))
            t_ours.append(timed(ours_epoch))
        else:
            t_ours.append(timed(ours_epoch))
            t_plain.append(timed(plain_epoch))
    return {"loader_plain": summary(t_plain, n), "loader_seeded": summary(t_ours, n),
            "loader_overhead_pct": 100 * (statistics.median(o / p for o, p in zip(t_ours, t_plain)) - 1)}


if __name__ == "__main__":
    main()
