"""`evit preflight`: the node check, one short job before any training is queued (the workflow's first job).

On one node with the training launcher's GPUs, it checks and measures, and writes ``preflight.json``:

- ``environment``: torch, timm and DALI versions, free host memory and disk (of the results and the dataset);
- ``gpu``: the GPUs' model, driver, CUDA, cuDNN and NCCL versions and free memory;
- ``nccl``: an all-reduce across the node's GPUs, one process each, and its bus bandwidth (nccl-tests' busbw);
- ``decode_gpu``, ``decode_cpu``: DALI's decode (the ``mixed`` GPU decoder; the CPU one) against PIL's on the
  dataset's images, half from each split, evenly spaced over it: the mean and largest absolute level difference;
- ``rates``: for each measured run (``measure``), `evit bench-input`'s loop and step rates with the run's loader,
  batch, precision and compile;
- ``cost``: each trained experiment's device-hours, from its epochs and training images at the rate of the
  measured model nearest in GMACs, and the total.

Each check is ``passed``, ``failed`` or ``not run`` (with the reason): without a GPU the GPU checks are not run,
never passed. Any failed check is one `PreflightError` naming it, after the JSON is written.

    evit preflight --config results/preflight/config.yaml --out results/preflight

The config (written by the workflow, `evit.workflow.Workflow.preflight_config`): ``preflight`` (images, tolerance,
steps, warmup, rounds), ``measure`` (label -> a run config), ``grid`` (per trained experiment: name, model,
data, epochs, gpus) and ``launcher``.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
from functools import cache
from pathlib import Path

import yaml

from evit.errors import ConfigError, PreflightError

PASSED, FAILED, NOT_RUN = "passed", "failed", "not run"
GPU_CHECKS = ("gpu", "nccl", "decode_gpu")
OPTIONS = dict(images=256, tolerance=1.0, steps=20, warmup=5, rounds=3)
NCCL_MB, NCCL_ITERS = 256, 10


def check(status: str, reason: str | None = None, **fields) -> dict:
    return {"status": status, **({"reason": reason} if reason else {}), **fields}


def _gb(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


# --------------------------------------------------------------------------------------------- the node


def environment_check(paths: list[str]) -> dict:
    """Library versions, free host memory, and the free disk where each of ``paths`` lies."""
    import timm
    import torch

    try:
        import nvidia.dali as dali
        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    with open("/proc/meminfo") as f:
        available_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    return check(PASSED, torch=str(torch.__version__), timm=timm.__version__, dali=dali_version,
                 host=socket.gethostname(), cpus=len(os.sched_getaffinity(0)), memory_free_gb=_gb(available_kb * 1024),
                 disk_free_gb={p: _gb(shutil.disk_usage(p).free) for p in paths if Path(p).exists()})


def gpu_check() -> dict:
    import torch

    if not torch.cuda.is_available():
        return check(NOT_RUN, "no GPU")
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.split()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = None
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append({"name": torch.cuda.get_device_name(i), "memory_free_gb": _gb(free), "memory_gb": _gb(total)})
    return check(PASSED, gpus=gpus, driver=driver, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                 nccl=".".join(map(str, torch.cuda.nccl.version())))


def _all_reduce(rank: int, world: int, port: int, out: str) -> None:
    """One process of the NCCL check: all-reduce NCCL_MB of float32 NCCL_ITERS times; rank 0 writes the time."""
    import torch

    from evit.distributed import DistInfo, all_reduce_sum, cleanup_distributed, init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank)
    info = init_distributed(device, DistInfo(rank, world, rank, "torchrun"))
    x = torch.ones(NCCL_MB * 2**20 // 4, device=device)
    correct = bool((all_reduce_sum(x) == world).all())
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(NCCL_ITERS):
        all_reduce_sum(x)
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / NCCL_ITERS
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "correct": correct}))
    cleanup_distributed(info)


def nccl_check() -> dict:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        return check(NOT_RUN, "no GPU" if gpus == 0 else "one GPU: nothing to all-reduce across")
    with socket.socket() as s, tempfile.TemporaryDirectory(prefix="evit-nccl-") as tmp:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = Path(tmp) / "nccl.json"
        try:
            torch.multiprocessing.spawn(_all_reduce, args=(gpus, port, str(out)), nprocs=gpus)
        except Exception as e:  # a failed collective, whatever its type, is this check's result
            return check(FAILED, f"all-reduce across {gpus} GPUs: {str(e).strip().splitlines()[-1]}", gpus=gpus)
        res = json.loads(out.read_text())
    size = NCCL_MB * 2**20
    fields = dict(gpus=gpus, size_mb=NCCL_MB, iters=NCCL_ITERS, seconds=res["seconds"],
                  bus_bandwidth_gb_s=round(size * 2 * (gpus - 1) / gpus / res["seconds"] / 1e9, 1))
    if not res["correct"]:
        return check(FAILED, f"all-reduce across {gpus} GPUs summed wrongly", **fields)
    return check(PASSED, **fields)


# --------------------------------------------------------------------------------------------- decoding


@cache
def split_dataset(dataset: str, root: str | None, split: str, fmt: str = "folder"):
    """A split of the dataset (`evit.data.datasets.build_dataset`; ``fmt``: ``data.format``), built once per
    process."""
    from evit.data.datasets import build_dataset

    return build_dataset(dataset, root, split, pil=False, fmt=fmt)


def spread(n_items: int, n: int) -> list[int]:
    """``n`` of ``n_items`` indices, evenly spaced (every class of a sorted folder, not the first one's)."""
    n = min(n, n_items)
    return [i * n_items // n for i in range(n)]


def dali_decode(images: list[bytes], gpu: bool, batch_size: int = 32) -> list:
    """Encoded images decoded to RGB uint8 HWC arrays by DALI (``mixed`` on GPU 0, else its CPU decoder), with the
    training pipelines' decoder options."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def decode():
        return fn.decoders.image(fn.external_source(name="encoded", dtype=types.UINT8),
                                 device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False,
                                 jpeg_fancy_upsampling=True)

    pipe = decode(batch_size=batch_size, num_threads=min(4, len(os.sched_getaffinity(0))),
                  device_id=0 if gpu else None)
    pipe.build()
    decoded = []
    for start in range(0, len(images), batch_size):
        pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in images[start:start + batch_size]])
        (batch,) = pipe.run()
        batch = batch.as_cpu() if gpu else batch
        decoded += [np.array(batch.at(i)) for i in range(len(batch))]
    return decoded


def pil_decode(image: bytes):
    """An encoded image as the torch loader decodes it (PIL, converted to RGB), as a uint8 HWC array."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(image)) as im:
        return np.asarray(im.convert("RGB"))


def compare_decodes(names: list[str], images: list[bytes], dali_images: list, tolerance: float) -> dict:
    """DALI's decode of the ``images`` (named by ``names``) against PIL's: the mean and largest absolute level
    difference over all pixels, and the worst image (largest mean). Failed when an image's shape differs or its mean
    difference exceeds ``tolerance``."""
    import numpy as np

    total, pixels, largest, worst, reshaped = 0.0, 0, 0, {"mean": -1.0}, []
    for name, image, ours in zip(names, images, dali_images):
        theirs = pil_decode(image)
        if ours.shape != theirs.shape:
            reshaped.append(f"{name} (DALI {ours.shape}, PIL {theirs.shape})")
            continue
        diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
        total, pixels, largest = total + float(diff.sum()), pixels + diff.size, max(largest, int(diff.max()))
        if diff.mean() > worst["mean"]:
            worst = {"image": name, "mean": round(float(diff.mean()), 4), "max": int(diff.max())}
    fields = dict(images=len(names), mean_level_diff=round(total / max(pixels, 1), 4), max_level_diff=largest,
                  worst=worst if pixels else None, tolerance=tolerance)
    if reshaped:
        return check(FAILED, f"DALI and PIL decode {len(reshaped)} image(s) to other shapes: {reshaped[0]}", **fields)
    if worst["mean"] > tolerance:
        return check(FAILED, f"DALI's decode differs from PIL's by {worst['mean']} levels on average in "
                     f"{worst['image']} (largest {worst['max']}), beyond the tolerance {tolerance}", **fields)
    return check(PASSED, **fields)


def decode_check(data: dict, images: int, tolerance: float, gpu: bool) -> dict:
    """DALI's GPU (``gpu``) or CPU decode against PIL on ``images`` of the dataset's images, half from each split."""
    device = "gpu" if gpu else "cpu"
    if gpu:
        import torch

        if not torch.cuda.is_available():
            return check(NOT_RUN, "no GPU", device=device)
    if data["dataset"] not in ("imagenet", "folder"):
        return check(NOT_RUN, f"dataset {data['dataset']} has no encoded images to decode", device=device)
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return check(NOT_RUN, "DALI is not installed (pip install .[dali])", device=device)
    splits = [split_dataset(data["dataset"], data["root"], split, data["format"]) for split in ("train", "val")]
    chosen = [(ds, i) for ds in splits for i in spread(len(ds), math.ceil(images / 2))]
    names, encoded_images = [ds.describe(i) for ds, i in chosen], [ds.encoded(i)[0] for ds, i in chosen]
    try:
        decoded = dali_decode(encoded_images, gpu)
    except RuntimeError as e:
        return check(FAILED, f"DALI cannot decode the images: {str(e).strip().splitlines()[0]}", device=device)
    return {**compare_decodes(names, encoded_images, decoded, tolerance), "device": device}


# --------------------------------------------------------------------------------------------- rates and cost


def model_gmacs(model: dict, num_classes: int) -> float:
    """The analytic GMACs per image of a resolved ``model:`` section (built on the meta device: no weights)."""
    import torch

    from evit.benchmark import count_macs
    from evit.models.factory import build_model

    with torch.device("meta"):
        return count_macs(build_model(model, num_classes)) / 1e9


def num_classes(config: dict) -> int:
    """A resolved run config's class count: ``model.num_classes``, else its dataset's."""
    d = config["data"]
    if config["model"]["num_classes"]:
        return config["model"]["num_classes"]
    return len(split_dataset(d["dataset"], d["root"], "train", d["format"]).classes)


def train_images(config: dict) -> int:
    """The images one epoch of a resolved run config trains on: its dataset's, or its ``data.train_subset``."""
    d = config["data"]
    n = len(split_dataset(d["dataset"], d["root"], "train", d["format"]))
    return min(n, d["train_subset"] or n)


def measurable(config: dict, tmp: str, label: str) -> dict:
    """The run config, its ``train.init_checkpoint`` (a run the workflow has not trained yet) replaced by freshly
    initialized weights: a rate does not depend on them."""
    init = config["train"].get("init_checkpoint")
    if not init or Path(init).is_file():
        return config
    import torch

    from evit.models.factory import build_model

    path = Path(tmp) / f"{label}-init.pth"
    torch.save({"model": build_model(config["model"], num_classes(config)).state_dict()}, path)
    return {**config, "train": {**config["train"], "init_checkpoint": str(path)}}


def rates_check(measure: dict[str, dict], opts: dict, log) -> dict:
    """`evit bench-input`'s input, step and loop rates of each measured run, with its GMACs."""
    from evit.bench_input import bench_input
    from evit.config.schema import resolve_config

    keys = ("loop_img_s", "step_img_s", "input_img_s", "loop_over_step", "limited_by", "loader", "batch_size",
            "amp", "compile", "device", "model", "parameters")
    models = {}
    with tempfile.TemporaryDirectory(prefix="evit-preflight-") as tmp:
        for label, config in measure.items():
            config = resolve_config(config)
            log(f"measuring {label}: the loop against the step")
            res = bench_input(measurable(config, tmp, label), steps=opts["steps"], warmup=opts["warmup"],
                              rounds=opts["rounds"], log=log)
            models[label] = {**{k: res[k] for k in keys},
                             "gmacs": round(model_gmacs(config["model"], num_classes(config)), 4)}
    return check(PASSED, models=models)


def grid_cost(grid: list[dict], measured: dict[str, dict]) -> dict:
    """Each experiment's device-hours (``epochs`` x ``train_images`` at the loop rate of the measured model nearest
    in GMACs, named in ``measured_as``) and wall hours on its ``gpus``, and the totals; ``measured``: label ->
    {gmacs, loop_img_s}."""
    rows = []
    for exp in grid:
        label = min(measured, key=lambda m: abs(math.log(measured[m]["gmacs"] / exp["gmacs"])))
        hours = exp["epochs"] * exp["train_images"] / measured[label]["loop_img_s"] / 3600
        rows.append({**{k: exp[k] for k in ("name", "epochs", "train_images", "gmacs", "gpus")},
                     "measured_as": label, "img_s": measured[label]["loop_img_s"], "hours": hours,
                     "wall_hours": hours / exp["gpus"]})
    return check(PASSED, rows=rows, total_hours=sum(r["hours"] for r in rows),
                 total_wall_hours=sum(r["wall_hours"] for r in rows))


def cost_check(grid: list[dict], rates: dict) -> dict:
    if rates["status"] != PASSED:
        return check(NOT_RUN, "no measured rates")
    from evit.config.schema import resolve_config

    measured, rows = rates["models"], []
    for exp in grid:
        run = resolve_config({"model": exp["model"], "data": exp["data"], "train": exp["train"]})
        rows.append({**exp, "gmacs": model_gmacs(run["model"], num_classes(run)), "train_images": train_images(run)})
    device = next(iter(measured.values()))["device"]
    note = ("training only (no evaluation), each GPU of a run at the measured one-GPU rate" if "cpu" not in device
            else "measured on a CPU: the CPU's hours, not a GPU's")
    return {**grid_cost([{k: v for k, v in r.items() if k not in ("model", "data", "train")} for r in rows], measured),
            "device": device, "note": note}


# --------------------------------------------------------------------------------------------- the job


def check_options(config: dict) -> dict:
    """The preflight config's options with defaults; an unknown key or section is a `ConfigError`."""
    unknown = sorted(set(config) - {"preflight", "measure", "grid", "launcher"})
    extra = sorted(set(config.get("preflight") or {}) - set(OPTIONS))
    if unknown or extra:
        raise ConfigError(f"preflight config: unknown key(s) {unknown or extra}; known: preflight "
                          f"({', '.join(OPTIONS)}), measure, grid, launcher")
    if not config.get("measure"):
        raise ConfigError("preflight config: `measure` names no run to measure")
    return {**OPTIONS, **(config.get("preflight") or {})}


def preflight(config: dict, out_dir: str | Path, log=print) -> dict:
    """Every check, written to ``out_dir/preflight.json``; a failed check raises `PreflightError` after that."""
    import torch

    from evit.config.schema import resolve_config
    from evit.provenance import git_commit

    opts = check_options(config)
    data = resolve_config(next(iter(config["measure"].values())))["data"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checks = {"environment": environment_check([str(out), *([data["root"]] if data["root"] else [])]),
              "gpu": gpu_check(), "nccl": nccl_check()}
    for gpu in (True, False):
        log(f"decoding with DALI ({'GPU' if gpu else 'CPU'}) and PIL")
        checks[f"decode_{'gpu' if gpu else 'cpu'}"] = decode_check(data, opts["images"], opts["tolerance"], gpu)
    try:
        checks["rates"] = rates_check(config["measure"], opts, log)
    except (RuntimeError, ValueError, OSError) as e:  # what would stop the training run: this check failed
        checks["rates"] = check(FAILED, f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}")
    checks["cost"] = cost_check(config.get("grid") or [], checks["rates"])
    result = {"checks": checks, "gpu": torch.cuda.is_available(), "options": opts, "git_commit": git_commit(),
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (out / "preflight.json.tmp").write_text(json.dumps(result, indent=1))
    os.replace(out / "preflight.json.tmp", out / "preflight.json")
    for name, c in checks.items():
        log(f"{name}: {c['status']}" + (f" ({c['reason']})" if "reason" in c else ""))
    failed = [f"{name}: {c['reason']}" for name, c in checks.items() if c["status"] == FAILED]
    if failed:
        raise PreflightError(f"preflight failed ({out / 'preflight.json'}): " + "; ".join(failed))
    return result


def _cmd_preflight(args) -> int:
    config = yaml.safe_load(Path(args.config).read_text())
    preflight(config, args.out, log=lambda m: print(m, flush=True))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preflight", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True,
                   help="the preflight config (the workflow writes results/preflight/config.yaml)")
    p.add_argument("--out", default="results/preflight", help="writes OUT/preflight.json")
    p.set_defaults(func=_cmd_preflight)
