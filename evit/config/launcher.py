"""The `launcher:` section of a run config (how `evit launch` submits it): its defaults, and `resolve_launcher`,
which checks each key. Imports no torch.
"""
from __future__ import annotations

from evit.errors import ConfigError

# The `launcher:` section of a run config (documented in evit/launch.py's docstring).
LAUNCHER_DEFAULTS = dict(
    backend="local", nodes=1, tasks_per_node=1, gpus_per_node=0, cpus_per_task=2, mem_gb=None, timeout_min=60,
    partition=None, account=None, qos=None, constraint=None, signal_delay_s=120, max_num_timeout=10,
    sbatch_extra={}, max_failures=2, exclusive=False,
)
BACKENDS = ("slurm", "local", "inline")


def resolve_launcher(section: dict | None, backend: str | None = None) -> dict:
    """The launcher options with defaults filled in; an unknown key or bad value is named (`ConfigError`)."""
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"launcher: expected a mapping, got {section!r}")
    section = dict(section or {})
    unknown = sorted(set(section) - set(LAUNCHER_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown launcher key(s) {unknown}; known: {sorted(LAUNCHER_DEFAULTS)}")
    opts = {**LAUNCHER_DEFAULTS, **section}
    if backend is not None:
        opts["backend"] = backend
    if opts["backend"] not in BACKENDS:
        raise ConfigError(f"launcher backend must be one of {list(BACKENDS)}, got {opts['backend']!r}")
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1:
            raise ConfigError(f"launcher {key} must be a positive integer, got {opts[key]!r}")
    for key in ("gpus_per_node", "signal_delay_s", "max_num_timeout", "max_failures"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 0:
            raise ConfigError(f"launcher {key} must be a non-negative integer, got {opts[key]!r}")
    if opts["mem_gb"] is not None and (isinstance(opts["mem_gb"], bool) or not isinstance(opts["mem_gb"], (int, float))
                                       or opts["mem_gb"] <= 0):
        raise ConfigError(f"launcher mem_gb must be a positive number or null, got {opts['mem_gb']!r}")
    for key in ("partition", "account", "qos", "constraint"):
        if opts[key] is not None and not isinstance(opts[key], str):
            raise ConfigError(f"launcher {key} must be a string or null, got {opts[key]!r}")
    if not isinstance(opts["exclusive"], bool):
        raise ConfigError(f"launcher exclusive must be true or false, got {opts['exclusive']!r}")
    if not isinstance(opts["sbatch_extra"], dict):
        raise ConfigError(f"launcher sbatch_extra must be a mapping of sbatch options, got {opts['sbatch_extra']!r}")
    if opts["backend"] != "slurm" and opts["nodes"] > 1:
        raise ConfigError(f"launcher nodes={opts['nodes']} needs the slurm backend, not {opts['backend']!r}")
    return opts


def resolve_bench_launcher(section: dict | None, backend: str | None = None) -> dict:
    """`resolve_launcher` for the benchmark job, which runs in one process (it is not distributed) and, on SLURM,
    on a node of its own unless its section says ``exclusive: false``."""
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"launcher: expected a mapping, got {section!r}")
    opts = resolve_launcher({"exclusive": True, **(section or {})}, backend)
    if opts["nodes"] * opts["tasks_per_node"] != 1:
        raise ConfigError("the benchmark runs in one process; set its launcher to nodes: 1 and tasks_per_node: 1")
    return opts

