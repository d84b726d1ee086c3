"""Process groups from the environment that torchrun, submitit or srun sets; the device of each process.

One process of a (possibly) distributed job: `dist_env` reads rank / world size / local rank, `init_distributed`
joins the group (NCCL on GPU, gloo on CPU), and the collectives are no-ops for a single process.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from evit.errors import ConfigError



@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"     # "torchrun" (RANK/WORLD_SIZE env, also set by submitit), "slurm" or "single"
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list such as ``gpu[003-005,010],cpu1`` -> ``gpu003``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.groups()
    return prefix if not ranges else prefix + ranges.split(",")[0].split("-")[0]


def dist_env(environ=None) -> DistInfo:
    """Rank / world size / local rank from torchrun's env vars, else SLURM's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        return DistInfo(rank, world, local, "torchrun" if world > 1 else "single")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                        "slurm")
    return DistInfo()


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU (cuda:LOCAL_RANK) when CUDA is available, else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: torch.device | None = None, info: DistInfo | None = None,
                     timeout_min: float = 30) -> DistInfo:
    """Join the process group described by the environment (NCCL on GPU, gloo on CPU). No-op for 1 process."""
    info = info or dist_env()
    if not info.distributed or (dist.is_available() and dist.is_initialized()):
        return info
    if info.source == "slurm":
        os.environ.setdefault("MASTER_ADDR", first_slurm_host(
            os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        os.environ.setdefault("MASTER_PORT", str(10000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 50000))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"distributed run ({info.world_size} processes) but {', '.join(missing)} not set")
    device = device or resolve_device("auto", info.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(minutes=timeout_min))
    info.initialized_here = True
    return info


def cleanup_distributed(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
        info.initialized_here = False


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
