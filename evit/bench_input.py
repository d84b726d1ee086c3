"""`evit bench-input`: does a run's input pipeline keep up with its training step?

For a run config, in one process, after warm-up, in interleaved rounds, three rates in img/s:

- **input**: the training loader the Trainer builds (whichever the run config chooses) and its batch stage
  (`evit.data.stage.BatchStage`: normalization, erasing, Mixup on the device), with no model; also per CPU core (the
  loader's ``num_workers``, or its ``num_threads``), and the training thread's CPU time per image in the loader
  (``time.thread_time`` around each ``next``: what the loader costs the thread that launches the step), and, for
  the DALI loader, the CPU time per image of its feeding thread (which runs DALI off the training thread);
- **step**: the training step (`evit.engine.BuiltRun.steps`: forward, backward, optimizer, with ``train.amp`` and
  ``train.compile``) on one staged batch held on the device, at the model's target keep rate;
- **loop**: `evit train`'s loop over the real loader, as a run trains.

The loop can go no faster than the slower of input and step; the report says which one limits, and how close
the loop comes to the step (loop / step: 1 means the device never waits for data).

    evit bench-input --config run.yaml [--set data.num_workers=2] [--steps 20] [--rounds 3]
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from typing import Iterator

import torch

from evit.config.io import apply_overrides, load_config
from evit.methods import describe_method, method_params
from evit.distributed import dist_env
from evit.errors import ConfigError
from evit.provenance import device_name
from evit.trainer import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(batches: Iterator, warmup: int, steps: int, device: torch.device, marks: list[float],
          thread_s: list[float] | None = None) -> Iterator:
    """Yields ``warmup + steps`` batches; appends to ``marks`` the times (device synchronized) when the last
    ``steps`` of them start being consumed and when they are done, and to ``thread_s`` (if given) the CPU time
    this thread (the training thread) spent getting each of them from ``batches``."""
    it = iter(batches)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            marks.append(time.perf_counter())
        cpu = time.thread_time()
        batch = next(it)
        if i >= warmup and thread_s is not None:
            thread_s.append(time.thread_time() - cpu)
        yield batch
    _sync(device)
    marks.append(time.perf_counter())


def cpu_cores(loader) -> int | None:
    """The CPU cores an input pipeline decodes on: a DataLoader's workers (or the main process), else the
    loader's ``num_threads``."""
    if isinstance(loader, torch.utils.data.DataLoader):
        return max(loader.num_workers, 1)
    return getattr(loader, "num_threads", None)


def bench_input(raw_config: dict, *, steps: int = 20, warmup: int = 5, rounds: int = 3, log=print) -> dict:
    """The three rates (median over ``rounds`` of ``steps`` batches each, after ``warmup`` batches per round)."""
    if dist_env().distributed:
        raise ConfigError("evit bench-input runs in one process, not under torchrun / srun")
    with tempfile.TemporaryDirectory(prefix="evit-bench-input-") as run_dir:
        return _bench_input(Trainer(raw_config, run_dir), steps, warmup, rounds, log)


def _bench_input(trainer: Trainer, steps: int, warmup: int, rounds: int, log) -> dict:
    with trainer.build() as run:
        device, stage = run.device, run.stage

        thread_us: list[float] = []       # the training thread's CPU time per image in the loader, per round
        feeder_us: list[float] = []       # the DALI loader's feeding thread's, per round

        def run_input(marks):
            thread_s: list[float] = []
            fed = None
            for k, (images, targets) in enumerate(timed(run.batches(), warmup, steps, device, marks, thread_s)):
                if k == warmup:         # the feeding thread is a batch or two ahead, past building the pipeline
                    fed = getattr(run.loader, "feeder_cpu_s", None)
                stage(images, targets)
            thread_us.append(1e6 * sum(thread_s) / (steps * run.batch))
            if fed is not None:
                feeder_us.append(1e6 * (run.loader.feeder_cpu_s - fed) / (steps * run.batch))

        staged = stage(*next(run.batches()))

        def run_step(marks):
            run.steps(timed(itertools.repeat(staged), warmup, steps, device, marks), staged=True, at_target=True)

        def run_loop(marks):
            run.steps(timed(run.batches(), warmup, steps, device, marks), at_target=True)

        cases = {"input": run_input, "step": run_step, "loop": run_loop}
        rates: dict[str, list[float]] = {k: [] for k in cases}
        for r in range(rounds):
            for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
                marks: list[float] = []
                cases[name](marks)
                rates[name].append(steps * run.world_batch / (marks[1] - marks[0]))
                log(f"round {r + 1}/{rounds}: {name} {rates[name][-1]:.1f} img/s")
        med = {k: statistics.median(v) for k, v in rates.items()}
        cores = cpu_cores(run.loader)
        t, d, m = trainer.config["train"], trainer.config["data"], trainer.config["model"]
        res = {
            "input_img_s": med["input"], "step_img_s": med["step"], "loop_img_s": med["loop"],
            "input_img_s_per_core": med["input"] / cores if cores else None, "input_cores": cores,
            "input_thread_us_per_img": statistics.median(thread_us), "input_thread_us": thread_us,
            "input_feeder_us_per_img": statistics.median(feeder_us) if feeder_us else None,
            "input_over_step": med["input"] / med["step"], "loop_over_step": med["loop"] / med["step"],
            "limited_by": "input" if med["input"] < med["step"] else "step",
            "rates": rates, "loader": d.get("loader", "torch"), "dataset": d["dataset"], "augment": t["augment"],
            "model": f"{m['method']} {m['arch']}",
            "parameters": describe_method(m["method"], method_params(m)), "batch_size": run.world_batch,
            "amp": t["amp"], "compile": t["compile"], "device": device_name(device),
            "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup, "rounds": rounds,
        }
    return res


def table(res: dict) -> str:
    """The result as a Markdown table and a sentence on what limits the loop."""
    cores = res["input_cores"]
    per_core = f"{res['input_img_s_per_core']:.1f} ({cores} core{'s' * (cores != 1)})" if cores else ""
    rows = [
        ("input pipeline alone (loader + batch stage)", res["input_img_s"], per_core, res["input_over_step"]),
        ("training step on a batch held on the device", res["step_img_s"], "", 1.0),
        ("`evit train` loop, end to end", res["loop_img_s"], "", res["loop_over_step"]),
    ]
    lines = ["| what | img/s | img/s per core | / step |", "|---|---:|---:|---:|"]
    lines += [f"| {what} | {rate:.1f} | {core} | {ratio:.2f} |" for what, rate, core, ratio in rows]
    lines += ["", f"The loader took {res['input_thread_us_per_img']:.1f} us of the training thread's CPU time "
              "per image." + ("" if res["input_feeder_us_per_img"] is None else
                              f" DALI's feeding thread took {res['input_feeder_us_per_img']:.1f} us per image, off "
                              "the training thread (its Python parts hold the GIL).")]
    limit = ("the input pipeline: the device waits for data" if res["limited_by"] == "input"
             else "the training step: the input pipeline keeps up")
    return "\n".join(lines) + (
        f"\n\n{res['model']} ({res['parameters'] or 'no parameters'}), {res['dataset']} / {res['augment']} augment, "
        f"loader {res['loader']}, batch {res['batch_size']}, amp {res['amp']}, compile {res['compile']}, "
        f"{res['device']}, {res['threads']} threads; medians of {res['rounds']} rounds of {res['steps']} batches.\n"
        f"Limited by {limit}; the loop runs at {100 * res['loop_over_step']:.0f} % of the step's rate.")


def _cmd_bench_input(args) -> int:
    raw = apply_overrides(load_config(args.config), args.set)
    res = bench_input(raw, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                      log=lambda m: print(m, flush=True))
    print(table(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-input", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (YAML-parsed); repeatable")
    p.add_argument("--steps", type=int, default=20, help="timed batches per rate and round")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first, in every round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--out", help="also write the result as JSON here")
    p.set_defaults(func=_cmd_bench_input)
