"""`evit install-profile`: install the project's Snakemake profile where `snakemake --profile NAME` finds it.

Snakemake looks a `--profile NAME` up in ./NAME, then $XDG_CONFIG_HOME/snakemake/NAME (default
~/.config/snakemake/NAME); never in the workflow's own profiles/ folder. So the slurm profile is copied to
$XDG_CONFIG_HOME/snakemake/slurm, after which `snakemake --profile slurm all` works from the repo root.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
from pathlib import Path

from evit.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parents[1] / "workflow" / "profiles"


def profile_home() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "snakemake"


def install_profile(name: str = "slurm", force: bool = False) -> Path:
    """Copy workflow/profiles/NAME to $XDG_CONFIG_HOME/snakemake/NAME; an existing different one needs `force`."""
    source = PROFILES_DIR / name
    if not (source / "config.yaml").is_file():
        known = sorted(p.name for p in PROFILES_DIR.iterdir()) if PROFILES_DIR.is_dir() else []
        raise ConfigError(f"no profile {name!r} in {PROFILES_DIR} (known: {known}); "
                          "install-profile needs the repository checkout (pip install -e .)")
    target = profile_home() / name
    if target.exists() and not force:
        same = filecmp.dircmp(source, target)
        if same.left_only or same.right_only or same.diff_files:
            raise ConfigError(f"{target} exists and differs from {source}; pass --force to replace it")
        return target
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


def _cmd_install_profile(args) -> int:
    target = install_profile(args.name, force=args.force)
    print(f"installed Snakemake profile {args.name!r} at {target}: `snakemake --profile {args.name} all` now works")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install-profile")
    p.add_argument("name", nargs="?", default="slurm", help="profile in workflow/profiles/ (slurm or local)")
    p.add_argument("--force", action="store_true", help="replace an existing, different profile")
    p.set_defaults(func=_cmd_install_profile)
