"""How the results' throughput was measured, as the tables' notes and the figures' titles say it: the precisions
it was measured at, the setup (device, threads, precision, batch size, compilation), when and with which torch and
timm, and whether the bench ran alone on its machine."""
from __future__ import annotations

import pandas as pd

SETUP = ["device", "threads", "dtype", "batch_size", "compile", "cuda_graphs"]  # how the throughput was measured
PROVENANCE = [*SETUP, "bench_date", "torch", "timm"]
ISOLATION = {  # the bench CSV's `isolation` (evit.benchmark.isolation) -> the tables' note
    "exclusive node": "ran alone on an exclusive SLURM node", "after the runs": "ran after every run on its machine",
    "shared": "may have shared its machine with other jobs", "not recorded": "did not record whether it ran alone",
}


def precisions_of(rows: pd.DataFrame) -> list[str]:
    """The precisions the throughput was measured at: the first one's (`dtype`), then those of img_s_P."""
    return [rows["dtype"].iloc[0], *(c.removeprefix("img_s_") for c in rows.columns
                                     if c.startswith("img_s_") and c not in ("img_s_q1", "img_s_q3"))]


def _hardware(r) -> str:
    compiled = ", torch.compile with CUDA graphs" if r.cuda_graphs else ", torch.compile" if r.compile else ""
    return f"{r.device} ({r.threads} threads), {r.dtype}, batch {r.batch_size}{compiled}"


def provenance(rows: pd.DataFrame, full: bool = True) -> str:
    """Where (and, if `full`, when and with which torch/timm) the throughput was measured, per distinct setup."""
    setups = rows[PROVENANCE if full else SETUP].drop_duplicates()
    return "; ".join(_hardware(r) + (f", measured {r.bench_date}, torch {r.torch}, timm {r.timm}" if full else "")
                     for r in setups.itertuples())
