#!/usr/bin/env python
"""Per-forward overhead of DeiT-S / EViT / ToMe: ops counted by the torch profiler, and inductor compile time.

Ops: one eager forward under `torch.inference_mode()` (and bf16 autocast by default) on the CPU, counted by the
profiler, views, allocations and other metadata-only ops left out. `calls` counts the ops the model's code calls
(on a GPU, each launches one kernel or more: the proxy for launch overhead); `all` adds the ops those call in
turn (autocast's casts, the GEMM under a linear...). The largest differences in calls to the first model are
listed by op.

Compile (`--compile`): each model in a fresh child process with an empty inductor cache, timing the first call of
`torch.compile(model)` (dynamo + inductor + the C++ compiler on the CPU, Triton on a GPU), with dynamo's graph, break
and recompilation counters over three passes and inductor's count of generated kernels. Compile workers run in
the process, so its CPU seconds (with the C++ compiler's) measure the compile's cost even on a busy machine.

    .venv/bin/python scripts/bench_overhead.py                      # ops: DeiT-S, EViT-S 0.7, ToMe-S r 13, bf16
    .venv/bin/python scripts/bench_overhead.py --compile --batch-size 4
    .venv/bin/python scripts/bench_overhead.py --compile --device cuda --batch-size 256   # on a GPU
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from contextlib import nullcontext

import torch

import evit.models  # noqa: F401  (registers the EViT and ToMe models with timm)
from evit.benchmark import PRECISIONS, create_model
from evit.engine import AUTOCAST_DTYPES

SPECS = [
    "deit_small_patch16_224",
    "evit_deit_small_patch16_224:keep_rate=0.7,fuse_token=true",
    "tome_deit_small_patch16_224:r=13",
]
NO_KERNEL = {  # aten ops that only make views or allocate: no kernel of their own
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::slice", "aten::select", "aten::expand",
    "aten::transpose", "aten::t", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::unbind",
    "aten::as_strided", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::empty", "aten::empty_strided",
    "aten::empty_like", "aten::new_empty", "aten::resize_", "aten::split", "aten::chunk", "aten::narrow",
    "aten::expand_as",
    "aten::contiguous", "aten::to", "aten::_to_copy", "aten::result_type", "aten::is_nonzero", "aten::item",
    "aten::_local_scalar_dense", "aten::flatten", "aten::view_as", "aten::_reshape_alias", "aten::set_",
    "aten::resolve_conj", "aten::resolve_neg", "aten::as_strided_", "aten::unsqueeze_", "aten::squeeze_",
    "aten::_has_compatible_shallow_copy_type",
}


def op_counts(spec: str, batch_size: int, amp: str) -> tuple[collections.Counter, int]:
    """(Counter of the top-level aten ops that compute, all aten ops that compute) in one eager forward."""
    model = create_model(spec).eval()
    x = torch.randn(batch_size, 3, *model.patch_embed.img_size)
    autocast = torch.autocast("cpu", dtype=AUTOCAST_DTYPES[amp]) if amp != "fp32" else nullcontext()
    with torch.inference_mode(), autocast:
        model(x)  # warm-up: lazy initializations stay out of the count
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(x)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = collections.Counter(
        e.name for e in events
        if (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        and (e.name not in NO_KERNEL or e.name == "aten::to" and e.cpu_children))  # a cast that copies
    return top, sum(e.name not in NO_KERNEL for e in events)


COMPILE_CHILD = """
import json, resource, sys, time, torch
from torch._dynamo.utils import counters
from torch._inductor import metrics
import evit.models
from evit.benchmark import create_model
from evit.engine import AUTOCAST_DTYPES
spec, batch, amp, passes, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
dev = torch.device(device)
model = create_model(spec).eval().to(dev)
x = torch.randn(batch, 3, *model.patch_embed.img_size, device=dev)
compiled = torch.compile(model)
ctx = torch.autocast(dev.type, dtype=AUTOCAST_DTYPES[amp]) if amp != "fp32" else torch.autocast(dev.type, enabled=False)
def cpu_seconds():
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
with torch.inference_mode(), ctx:
    t0, c0 = time.perf_counter(), cpu_seconds()
    compiled(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    first, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    for _ in range(passes - 1):
        compiled(x)
print(json.dumps(dict(seconds=first, cpu_seconds=cpu, graphs=counters["stats"]["unique_graphs"],
                      breaks=sum(counters["graph_break"].values()),
                      recompiles=counters["stats"]["unique_graphs"] - 1, kernels=metrics.generated_kernel_count)))
"""


def compile_time(spec: str, batch_size: int, amp: str, device: str = "cpu", passes: int = 3) -> dict:
    """Seconds of the first compiled call, in a child process with an empty inductor cache; dynamo's counters."""
    with tempfile.TemporaryDirectory() as cache:
        # compile workers in this process (the C++ compiler its waited-for child): its CPU time is the whole cost
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_COMPILE_THREADS="1")
        proc = subprocess.run([sys.executable, "-c", COMPILE_CHILD, spec, str(batch_size), amp, str(passes), device],
                              capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"compiling {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=SPECS, help="model specs, as for `evit bench`; the first is the base")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--amp", choices=PRECISIONS, default="bf16")
    p.add_argument("--compile", action="store_true", help="also time inductor's compile of each model")
    p.add_argument("--device", default="cpu", help="where to compile (cpu, cuda); ops are counted on the CPU")
    p.add_argument("--detail", type=int, default=12, help="list this many ops with the largest count differences")
    args = p.parse_args(argv)

    print(f"ops per eager forward, CPU, batch {args.batch_size}, {args.amp}, torch {torch.__version__}")
    print(f"{'model':60s} {'calls':>6s} {'all':>6s}")
    counts = {}
    for spec in args.models:
        calls, total = op_counts(spec, args.batch_size, args.amp)
        counts[spec] = calls
        print(f"{spec:60s} {sum(calls.values()):6d} {total:6d}", flush=True)
    for spec in args.models[1:]:
        diff = collections.Counter(counts[spec])
        diff.subtract(counts[args.models[0]])
        top = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:args.detail]
        print(f"  {spec}: " + ", ".join(f"{name[6:]} {n:+d}" for name, n in top if n))

    if args.compile:
        print(f"\ninductor compile (first call, empty cache), {args.device}, batch {args.batch_size}, {args.amp}, "
              f"{torch.get_num_threads()} threads")
        print(f"{'model':60s} {'seconds':>8s} {'CPU s':>8s} {'graphs':>6s} {'breaks':>6s} {'kernels':>7s}")
        for spec in args.models:
            r = compile_time(spec, args.batch_size, args.amp, args.device)
            print(f"{spec:60s} {r['seconds']:8.1f} {r['cpu_seconds']:8.1f} {r['graphs']:6d} {r['breaks']:6d} "
                  f"{r['kernels']:7d}", flush=True)


if __name__ == "__main__":
    main()
