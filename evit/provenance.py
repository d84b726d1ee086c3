"""Where a result came from: the code's commit, the device, the library versions, the host.

One place for the device's name and the provenance record, shared by training, evaluation and the bench.
"""
from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch


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
    """The GPU's name, or ``cpu: <model name>``."""
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
    return f"cpu: {name}"


def environment(device: torch.device) -> dict:
    """The code, software and hardware a result was computed with (training, evaluation, the bench)."""
    import timm

    return {
        "git_commit": git_commit(),
        "torch": str(torch.__version__),  # a TorchVersion would need torch to unpickle
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "host": socket.gethostname(),
    }


def provenance(*, config_hash: str | None, device: torch.device, world_size: int) -> dict:
    """Where a training or evaluation result came from (metrics.json, eval.json)."""
    return {
        **environment(device),
        "config_hash": config_hash,
        "world_size": world_size,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
