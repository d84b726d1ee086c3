"""MACs and inference throughput of timm ViTs and token-reduction models (`evit macs`, `evit bench`).

The workflow's bench job measures each experiment's model built from its run config's ``model:`` section by
the one model factory (`evit.models.factory.build_model`). On the command line, models are named by spec
strings instead: a timm model name, optionally followed by `:key=value,...` keyword arguments for
`timm.create_model`, e.g. `evit_deit_small_patch16_224:keep_rate=0.7,fuse_token=true`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import re
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import timm
import torch
import yaml
from timm.layers import to_2tuple
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from evit.methods import METHODS
from evit.errors import ConfigError
from evit.config.launcher import resolve_bench_launcher
from evit.engine import AUTOCAST_DTYPES
from evit.models.base import extra_macs, token_counts
from evit.models.factory import build_model, register_models
from evit.provenance import environment

PAPER_MACS_SPECS = [
    "deit_small_patch16_224",
    *[f"evit_deit_small_patch16_224:keep_rate={r},fuse_token=true" for r in (0.9, 0.8, 0.7, 0.6, 0.5)],
    "evit_deit_small_patch16_272:keep_rate=0.7,fuse_token=true",
    "evit_deit_small_patch16_288:keep_rate=0.6,fuse_token=true",
    "evit_deit_small_patch16_304:keep_rate=0.5,fuse_token=true",
    "deit_base_patch16_224",
    "evit_deit_base_patch16_224:keep_rate=0.7,fuse_token=true",
]
DEFAULT_BENCH_SPECS = [
    "deit_small_patch16_224",
    "evit_deit_small_patch16_224:keep_rate=0.7,fuse_token=true",
    "evit_deit_small_patch16_224:keep_rate=0.5,fuse_token=true",
]
PRECISIONS = ("fp32", *AUTOCAST_DTYPES)   # `evit bench --amp`: full precision, or an autocast dtype


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """`arch[:key=value,...]` -> (arch, kwargs); arch may carry a pretrained tag (`name.tag`); values are parsed as
    YAML (numbers, booleans, lists)."""
    register_models()  # every method's timm models
    arch, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad model spec {spec!r}: expected key=value, got {item!r}")
        kwargs[key.strip()] = yaml.safe_load(value)
    if not timm.is_model(arch):  # a pretrained tag (name.tag) included
        raise ConfigError(f"bad model spec {spec!r}: unknown timm model {arch!r}")
    return arch, kwargs


def create_model(spec: str, **overrides) -> nn.Module:
    arch, kwargs = parse_model_spec(spec)
    return timm.create_model(arch, **{**kwargs, **overrides})


def count_macs(model: nn.Module, **override) -> int:
    """Multiply-accumulates of one image's forward pass, attention matmuls included, at ``override`` (a method's
    per-pass parameter, e.g. ``keep_rate=0.5``; else the model's own).

    Analytic: patch embedding, qkv/proj/MLP linears, QK^T and AV at each block's token counts, what the method
    spends on reducing tokens (`TokenReducer.extra_macs`: EViT's CLS attention row and fused token, ToMe's
    matching similarities), and the head.
    """
    pe = model.patch_embed.proj
    macs = model.patch_embed.num_patches * pe.out_channels * pe.in_channels * math.prod(pe.kernel_size)
    dim = model.embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features
    for t in token_counts(model, **override):
        macs += t.attn * 4 * dim * dim + 2 * t.attn * t.attn * dim  # qkv + proj; QK^T + AV
        macs += extra_macs(model, t)
        macs += t.mlp * 2 * dim * hidden
    if isinstance(model.head, nn.Linear):
        macs += model.head.in_features * model.head.out_features
    return macs


def any_macs(model: nn.Module, x: torch.Tensor) -> int:
    """`count_macs` for timm's ViTs (and the token-reduction models built on them); any other model (a Swin, an
    EfficientNet) is counted by torch's FlopCounterMode over one forward pass of `x` (one image)."""
    if isinstance(model, VisionTransformer):
        return count_macs(model)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() // 2


def input_size(model: nn.Module) -> tuple[int, int]:
    """The (height, width) a model takes: its patch embedding's, else its pretrained config's (EfficientNet at
    its own resolution, e.g. 240 for b1)."""
    img = getattr(getattr(model, "patch_embed", None), "img_size", None) or model.pretrained_cfg["input_size"][1:]
    return tuple(to_2tuple(img))


def macs_table(specs: list[str]) -> pd.DataFrame:
    rows = []
    for spec in specs:
        with torch.device("meta"):  # shapes only: no memory, no weight init
            model = create_model(spec)
        rows.append({
            "model": spec,
            "img_size": model.patch_embed.img_size[0],
            "gmacs": count_macs(model) / 1e9,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "tokens_per_block": " ".join(str(t.mlp - 1) for t in token_counts(model)),
        })
    return pd.DataFrame(rows)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of a list of measurements; a single value is all three."""
    return tuple(statistics.quantiles(values, n=4)) if len(values) > 1 else (values[0],) * 3


def timed_batches(model, x, iters: int, device: torch.device, autocast) -> float:
    """Seconds for `iters` forward passes, with the device synchronized at both ends."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with autocast:
            for _ in range(iters):
                model(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    with autocast:
        for _ in range(iters):
            model(x)
    return time.perf_counter() - t0


def benchmark(
    models: list[str | dict],
    labels: list[str] | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    amp: str = "fp32",
    compile: bool = False,
    cuda_graphs: bool = False,
    warmup: int = 2,
    rounds: int = 7,
    iters: int = 1,
    num_classes: int | None = None,
    log=print,
) -> pd.DataFrame:
    """Throughput of each model, measured interleaved (A B C A B C ...) in this one process.

    ``models``: spec strings, or resolved ``model:`` sections of run configs (built by `build_model`, with
    ``num_classes`` or the section's own). Each round times `iters` batches per model; the median and spread
    over rounds are reported, with the speedup of each model over the first one. ``cuda_graphs`` compiles each model
    for CUDA graphs (`cuda_graphed`); CUDA only.
    """
    specs = [m if isinstance(m, str) else _section_spec(m) for m in models]
    not_compiled = [m["method"] for m in models if compile and isinstance(m, dict) and not METHODS[m["method"]].compile]
    if not_compiled:
        raise ConfigError(f"compile: method {not_compiled[0]} does not support torch.compile")
    labels = labels or specs
    if len(labels) != len(specs):
        raise ConfigError(f"got {len(labels)} labels for {len(specs)} models")
    if amp not in PRECISIONS:
        raise ConfigError(f"amp must be one of {list(PRECISIONS)}, got {amp!r}")
    dev = torch.device(device)
    if cuda_graphs and dev.type != "cuda":
        raise ConfigError(f"cuda_graphs needs a CUDA device (CUDA graphs replay GPU kernels), got device {device!r}")
    if cuda_graphs and warmup < 2:
        raise ConfigError(f"cuda_graphs needs warmup >= 2 (a compiling pass, then a recording one), got {warmup}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    autocast = torch.autocast(dev.type, dtype=AUTOCAST_DTYPES[amp]) if amp != "fp32" else nullcontext()
    gen = torch.Generator().manual_seed(0)
    entries = []
    for item, spec, label in zip(models, specs, labels):
        model = (create_model(item) if isinstance(item, str)
                 else build_model(item, num_classes or item["num_classes"] or 1000)).eval().to(dev)
        img = input_size(model)
        x = torch.randn(batch_size, 3, *img, generator=gen).to(dev)
        entries.append(dict(
            label=label, spec=spec, x=x, raw=model,
            model=cuda_graphed(model) if cuda_graphs else torch.compile(model) if compile else model,
            img_size=img[0], times=[],
        ))
    with torch.inference_mode():
        log(f"warm-up: {warmup} batch(es) per model, batch {batch_size}, {device}, {amp}")
        for e in entries:
            timed_batches(e["model"], e["x"], warmup, dev, autocast)
        for r in range(rounds):
            for e in entries:
                e["times"].append(timed_batches(e["model"], e["x"], iters, dev, autocast))
            log(f"round {r + 1}/{rounds}: " + "  ".join(
                f"{e['label']} {batch_size * iters / e['times'][-1]:.1f}" for e in entries) + " img/s")
    meta = dict(
        **environment(dev), device_type=dev.type, batch_size=batch_size, dtype=amp, compile=compile or cuda_graphs,
        cuda_graphs=cuda_graphs, rounds=rounds,
        iters_per_round=iters, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    rows = []
    for e in entries:
        rates = [batch_size * iters / t for t in e["times"]]
        q1, median, q3 = quartiles(rates)
        rows.append(dict(
            label=e["label"], spec=e["spec"], img_size=e["img_size"], gmacs=any_macs(e["raw"], e["x"][:1]) / 1e9,
            img_s=median, img_s_q1=q1, img_s_q3=q3, img_s_min=min(rates),
            img_s_max=max(rates), **meta,
        ))
    df = pd.DataFrame(rows)
    df.insert(df.columns.get_loc("img_s_q1"), "speedup", df["img_s"] / df["img_s"].iloc[0])
    return df


def cuda_graphed(model: nn.Module):
    """`model` compiled for CUDA graphs (inductor's "reduce-overhead" mode), as a function of the input batch.

    After two warm-up passes (one compiles, one records) each forward replays one recorded graph: the host
    launches it once instead of every kernel, which at ViT token counts costs about as much as the kernels.
    """
    compiled = torch.compile(model, mode="reduce-overhead")

    def forward(x: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # each pass a new step: interleaved models share the graph pool
        return compiled(x)
    return forward


def _section_spec(section: dict) -> str:
    """A ``model:`` section as one spec line for the results' `spec` column: the method's timm model, then the
    keys that shape it."""
    keys = ("img_size", "patch_size", *METHODS[section["method"]].params, "kwargs")
    return METHODS[section["method"]].prefix + section["arch"] + ":" + ",".join(
        f"{k}={yaml.safe_dump(section[k], default_flow_style=True).strip().removesuffix('...').strip()}"
        for k in keys if section.get(k) is not None)


BENCH_CONFIG_KEYS = ("batch_size", "device", "amp", "compile", "cuda_graphs", "warmup", "rounds", "iters",
                     "num_classes")


def isolation(config: dict) -> str:
    """How the benchmark job of a bench config had its machine: ``exclusive node`` (SLURM, ``--exclusive``),
    ``after the runs`` (the workflow ran it after every run that would share this machine), or ``shared``."""
    opts = resolve_bench_launcher(config.get("launcher"))
    if opts["backend"] == "slurm":
        return "exclusive node" if opts["exclusive"] else "shared"
    return "after the runs" if config.get("after_runs") else "shared"


def bench_from_config(config: dict, out_dir: str | Path) -> dict:
    """The benchmark job of the workflow: ``models`` (``{label, model}``: a label and a run config's resolved
    ``model:`` section each; or ``{label, timm}``: a `comparison:` backbone by its timm name, built plainly at its
    pretrained input size) and benchmark() options -> out_dir/throughput.csv, one row per model and precision.

    ``amp`` may list precisions (e.g. ``[fp32, bf16]``): each is measured in turn, interleaved over the models.
    ``after_runs`` (set by the workflow) says the job runs after every run on its machine; the `isolation` column
    records it."""
    unknown = sorted(set(config) - {"models", "launcher", "after_runs", *BENCH_CONFIG_KEYS})
    if unknown:
        raise ConfigError(f"unknown bench config key(s) {unknown}; known: models, after_runs, "
                         f"{', '.join(BENCH_CONFIG_KEYS)}")
    if not config.get("models"):
        raise ConfigError("bench config has no `models` to measure")
    register_models()
    unknown = [m["timm"] for m in config["models"] if "timm" in m and not timm.is_model(m["timm"])]
    if unknown:  # before any model is built; a ConfigError: the launcher does not retry it
        raise ConfigError(f"bench config: timm has no model {unknown[0]!r} (a `comparison:` backbone?)")
    amps = config.get("amp", "fp32")
    amps = [amps] if isinstance(amps, str) else list(amps)
    if not amps or len(set(amps)) < len(amps):
        raise ConfigError(f"bench config amp: expected a precision or a list of distinct ones, got {config['amp']!r}")
    options = {k: config[k] for k in BENCH_CONFIG_KEYS if k in config and k != "amp"}
    models, labels = [m.get("timm") or m["model"] for m in config["models"]], [m["label"] for m in config["models"]]
    df = pd.concat([benchmark(models, labels=labels, amp=amp, log=lambda m: print(m, flush=True), **options)
                    for amp in amps], ignore_index=True)
    df["isolation"] = isolation(config)
    out = Path(out_dir) / "throughput.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(out)
    return {"throughput_csv": str(out), "models": len(df)}


def _cmd_macs(args) -> int:
    df = macs_table(args.models or PAPER_MACS_SPECS)
    print(df.to_markdown(index=False, floatfmt=".3f"))
    if args.out:
        _write_table(df, args.out)
    return 0


def _cmd_bench(args) -> int:
    df = benchmark(
        args.models or DEFAULT_BENCH_SPECS, labels=args.labels, batch_size=args.batch_size,
        device=args.device, amp=args.amp, compile=args.compile, cuda_graphs=args.cuda_graphs, warmup=args.warmup,
        rounds=args.rounds, iters=args.iters, log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    cols = ["label", "img_size", "gmacs", "img_s", "speedup", "img_s_q1", "img_s_q3"]
    print(df[cols].to_markdown(index=False, floatfmt=".2f"))
    print(f"\n{df['device'][0]}, {df['threads'][0]} threads, batch {args.batch_size}, {args.amp}, "
          f"torch {torch.__version__}, timm {timm.__version__}")
    if args.out:
        _write_table(df, args.out)
    return 0


def _write_table(df: pd.DataFrame, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        df.to_json(path, orient="records", indent=1)
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        raise ConfigError(f"--out {out}: expected a .csv or .json file")


def add_commands(sub: argparse._SubParsersAction) -> None:
    spec_help = "model specs ARCH[:key=value,...], e.g. evit_deit_small_patch16_224:keep_rate=0.7,fuse_token=true"
    p = sub.add_parser("macs")
    p.add_argument("models", nargs="*", help=spec_help + " (default: the paper's DeiT-S/B and EViT grid)")
    p.add_argument("--out", help="also write the table to this .csv or .json file")
    p.set_defaults(func=_cmd_macs)

    p = sub.add_parser("bench")
    p.add_argument("models", nargs="*",
                   help=spec_help + " (default: DeiT-S, EViT-S 0.7 and 0.5); the first is the baseline")
    p.add_argument("--labels", nargs="+", help="one name per model for the output (default: the specs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=PRECISIONS, default="fp32", help="autocast dtype (CPU or CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model first")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="compile each model for CUDA graphs (mode reduce-overhead): one launch per forward; CUDA only")
    p.add_argument("--warmup", type=int, default=2, help="batches per model before timing")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--iters", type=int, default=1, help="batches per model per round")
    p.add_argument("--out", help="also write one row per model to this .csv or .json file")
    p.set_defaults(func=_cmd_bench)
