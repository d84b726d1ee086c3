"""`evit install-profile`: install the project's Snakemake profile where `snakemake --profile NAME` finds it.

Snakemake looks a `--profile NAME` up in ./NAME, then $XDG_CONFIG_HOME/snakemake/NAME (default
~/.config/snakemake/NAME); never in the workflow's own profiles/ folder. So the slurm profile is copied to
$XDG_CONFIG_HOME/snakemake/slurm, its `configfile:` made absolute (Snakemake reads a profile's paths from the
working directory) and this checkout's Snakefile added (`snakefile:`), after which `snakemake --profile slurm all`
works in any directory (results/ and .snakemake/ go there).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import yaml

from evit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PROFILES_DIR = REPO / "workflow" / "profiles"


def profile_home() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "snakemake"


def installed_config(source: Path) -> str:
    """A profile's config.yaml as installed: its config files by absolute path, this checkout's Snakefile named."""
    text = source.read_text()
    files = yaml.safe_load(text).get("configfile")
    if files:
        absolute = str(REPO / files) if isinstance(files, str) else [str(REPO / f) for f in files]
        text = re.sub(r"(?m)^configfile:.*$", lambda _: f"configfile: {json.dumps(absolute)}", text)  # JSON is YAML
    return text + ("# written by `evit install-profile`: this checkout's workflow, in any directory\n"
                   f"snakefile: {REPO / 'Snakefile'}\n")


def install_profile(name: str = "slurm", force: bool = False) -> Path:
    """Install workflow/profiles/NAME as $XDG_CONFIG_HOME/snakemake/NAME/config.yaml (`installed_config`); an
    existing different one needs `force`."""
    source = PROFILES_DIR / name / "config.yaml"
    if not source.is_file():
        known = sorted(p.name for p in PROFILES_DIR.iterdir()) if PROFILES_DIR.is_dir() else []
        raise ConfigError(f"no profile {name!r} in {PROFILES_DIR} (known: {known}); "
                          "install-profile needs the repository checkout (pip install -e .)")
    target, config = profile_home() / name, installed_config(source)
    installed = target / "config.yaml"
    if target.exists() and not force:
        if sorted(os.listdir(target)) != ["config.yaml"] or installed.read_text() != config:
            raise ConfigError(f"{target} exists and differs from {source} as installed; pass --force to replace it")
        return target
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    installed.write_text(config)
    return target


def _cmd_install_profile(args) -> int:
    target = install_profile(args.name, force=args.force)
    print(f"installed Snakemake profile {args.name!r} at {target}: `snakemake --profile {args.name} all` now works "
          "in any directory")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install-profile")
    p.add_argument("name", nargs="?", default="slurm", help="profile in workflow/profiles/ (slurm or local)")
    p.add_argument("--force", action="store_true", help="replace an existing, different profile")
    p.set_defaults(func=_cmd_install_profile)
