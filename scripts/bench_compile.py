#!/usr/bin/env python
"""Training step of a run config's model, eager vs ``train.compile`` (`evit.engine.compile_for_training`), in one
process: the run built twice (`evit.trainer.Trainer.build`: same initial weights, the run's own optimizer), compile
off and on; the time of the first steps (compiling), then interleaved rounds of steps on one staged batch held on
the device, at the end of the method's schedule (e.g. EViT's target keep rate). Medians of img/s and their ratio.

    .venv/bin/python scripts/bench_compile.py --config run.yaml [--steps 5] [--rounds 4]
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import tempfile
import time

import torch

from evit.config.io import apply_overrides, load_config
from evit.trainer import Trainer


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    raw = apply_overrides(load_config(args.config), args.set)
    with contextlib.ExitStack() as stack:
        runs = {}
        for name, compile in (("eager", "false"), ("compiled", "true")):
            run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"evit-bench-compile-{name}-"))
            trainer = Trainer(apply_overrides(raw, [f"train.compile={compile}"]), run_dir)
            runs[name] = stack.enter_context(trainer.build())
        eager = runs["eager"]
        staged = eager.stage(*next(eager.batches()))

        def steps(name, n):
            t0 = time.perf_counter()
            runs[name].steps(itertools.repeat(staged, n), staged=True, at_target=True)
            if eager.device.type == "cuda":
                torch.cuda.synchronize(eager.device)
            return time.perf_counter() - t0

        first = {k: steps(k, 1) for k in runs}              # compiles forward and backward
        times = {k: [] for k in runs}
        for r in range(args.rounds):
            for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                times[k].append(steps(k, args.steps))
        batch = staged[0].shape[0]
        rate = {k: statistics.median(batch * args.steps / t for t in v) for k, v in times.items()}
        ratio = statistics.median(e / c for e, c in zip(times["eager"], times["compiled"]))
        m = trainer.config["model"]
        print(f"{m['method']} {m['arch']} {eager.target}, {m['img_size']} px, batch {batch}, "
              f"{torch.get_num_threads()} threads, {eager.device}: first step eager {first['eager']:.1f} s, compiled "
              f"{first['compiled']:.1f} s (compiling); then eager {rate['eager']:.1f} img/s, compiled "
              f"{rate['compiled']:.1f} img/s: compiled / eager {ratio:.2f}x (median of paired rounds)")
        return {"first_s": first, "img_s": rate, "compiled_over_eager": ratio}


if __name__ == "__main__":
    main()
