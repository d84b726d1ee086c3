"""The `evit` command line. Each module contributes its subcommands through `add_commands(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define `add_commands(subparsers)`; each subparser sets `func` to a callable taking the args.
COMMAND_MODULES = ("evit.benchmark", "evit.train", "evit.launch", "evit.profiles", "evit.visualize", "evit.report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as e:  # bad input (a model spec, an option, a config value): one line, no traceback
        print(f"evit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
