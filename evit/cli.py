"""The `evit` command line: which module defines each command, and the one error handler of every command.

Only the module of the command that runs is imported (each defines its commands with `add_commands(subparsers)`):
`evit --help` imports no torch, and `evit launch`, which waits on a job for hours, loads none either.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from evit.errors import EvitError

# Each command: the module that defines it with `add_commands(subparsers)`, and its one-line help.
COMMANDS = {
    "train": ("evit.trainer", "train one run (resumes from RUN_DIR/checkpoint.pth)"),
    "eval": ("evit.evaluate", "top-1/top-5 of a checkpoint on the val split"),
    "launch": ("evit.launch", "run `evit train`/`evit eval` of one run on SLURM, locally or inline"),
    "macs": ("evit.benchmark", "GMACs per model, attention matmuls included"),
    "bench": ("evit.benchmark", "inference throughput, all models interleaved in one process"),
    "bench-input": ("evit.bench_input", "input pipeline vs training step vs the training loop, for a run config"),
    "preflight": ("evit.preflight", "the node check before a grid: versions, NCCL, DALI vs PIL, rates, the cost"),
    "report": ("evit.report", "the paper's tables (.md/.csv/.tex) and figures (.png/.pdf) from results"),
    "visualize": ("evit.visualize", "figure of the patches kept per reorganizing block (paper Fig. 3)"),
    "pack": ("evit.data.packed", "write an imagenet / folder dataset as shards + index (data.format: packed)"),
    "check": ("evit.check", "check a workflow plan's datasets, models, weights and boxes (before any job)"),
    "config": ("evit.config.reference", "the run config's reference: every key, its type, default and meaning"),
    "install-profile": ("evit.profiles", "install the Snakemake profile (default: slurm) for --profile NAME"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `command` alone (importing only its module), or the list of commands when it is None/unknown
    (importing none)."""
    parser = argparse.ArgumentParser(prog="evit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).add_commands(sub)
        for name, subparser in sub.choices.items():
            subparser.description = subparser.description or COMMANDS[name][1]
    else:
        for name, (_, help_line) in COMMANDS.items():
            sub.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; any `EvitError` (and a missing file) is one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return args.func(args) or 0
    except (EvitError, FileNotFoundError) as e:
        print(f"evit {args.subcommand}: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
