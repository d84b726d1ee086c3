"""Shared pytest fixtures."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

SLURM_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_cluster.sh"


def _slurm_cluster_cmd(action: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SLURM_SCRIPT), action], capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running SLURM cluster of two nodes, n1 and n2, on this machine (scripts/slurm_cluster.sh).

    Uses a cluster that is already up and leaves it up; otherwise runs `start`,
    and stops the cluster at the end of the session if its daemons were not
    running before. When it cannot be started here (exit 3: not root, no
    apt/dpkg) the test is skipped, unless EVIT_REQUIRE_SLURM=1, as in CI, where
    that is a failure. Yields the cluster's state directory.
    """
    state_dir = Path(os.environ.get("EVIT_SLURM_DIR", "/tmp/evit-slurm"))
    status = _slurm_cluster_cmd("status").returncode  # 0 up, 1 a daemon down, 4 node not ready
    if status != 0:
        started = _slurm_cluster_cmd("start")
        if started.returncode != 0:
            output = (started.stdout + started.stderr).strip()
            if started.returncode == 3 and os.environ.get("EVIT_REQUIRE_SLURM") != "1":
                pytest.skip(f"no SLURM cluster: {output}")
            pytest.fail(f"slurm_cluster.sh start failed (exit {started.returncode}):\n{output}")
    yield state_dir
    if status == 1:  # this session started the daemons
        _slurm_cluster_cmd("stop")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from 2 threads, and OpenMP threads on a shared 2-core machine stall badly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
