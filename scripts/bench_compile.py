#!/usr/bin/env python
"""Training step of a run config's model, eager vs ``train.compile`` (`evit.engine.compile_for_training`), in one
process: the time of the first compiled steps (compiling), then interleaved rounds of steps on one staged batch
held on the device, at the end of the method's schedule (e.g. EViT's target keep rate), fused AdamW for both.
Medians of img/s and their ratio.

    .venv/bin/python scripts/bench_compile.py --config run.yaml [--steps 5] [--rounds 4]
"""
from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import tempfile
import time

import torch

from evit import engine as E
from evit.methods import METHODS
from evit.config.io import apply_overrides, load_config
from evit.trainer import Trainer


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    trainer = Trainer(apply_overrides(load_config(args.config), args.set), tempfile.mkdtemp())
    with trainer.session() as rt:
        rt.sampler.set_epoch(0)
        images, targets = next(iter(rt.train_loader))
        staged = rt.ctx.batch_stage(images, targets)
        m = trainer.config["model"]
        name = METHODS[m["method"]].override
        target = {name: m.get(name)} if rt.ctx.override_fn else None        # the schedule's end
        ctx = E.StepContext(**dict(rt.ctx.__dict__, batch_stage=None, scheduler=None, on_step=None,
                                   override_fn=(lambda s: target) if target else None))
        models = {"eager": rt.model, "compiled": E.compile_for_training(copy.deepcopy(rt.model), 2)}
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
                for k, m in models.items()}

        def steps(name, n):
            t0 = time.perf_counter()
            E.train_one_epoch(models[name], itertools.repeat(staged, n), opts[name], E.TrainState(), ctx)
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
            return time.perf_counter() - t0

        first = {k: steps(k, 1) for k in models}            # compiles forward and backward
        times = {k: [] for k in models}
        for r in range(args.rounds):
            for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
                times[k].append(steps(k, args.steps))
        batch = staged[0].shape[0]
        rate = {k: statistics.median(batch * args.steps / t for t in v) for k, v in times.items()}
        ratio = statistics.median(e / c for e, c in zip(times["eager"], times["compiled"]))
        print(f"{m['method']} {m['arch']} {target}, {m['img_size']} px, batch {batch}, "
              f"{torch.get_num_threads()} threads, {rt.device}: first step eager {first['eager']:.1f} s, compiled "
              f"{first['compiled']:.1f} s (compiling); then eager {rate['eager']:.1f} img/s, compiled "
              f"{rate['compiled']:.1f} img/s: compiled / eager {ratio:.2f}x (median of paired rounds)")
        return {"first_s": first, "img_s": rate, "compiled_over_eager": ratio}


if __name__ == "__main__":
    main()
