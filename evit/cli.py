"""The `evit` command line. Each module contributes its subcommands through `add_commands(subparsers)`.

Only the module of the command that runs is imported: `evit launch`, which waits on a job for hours, then
loads no torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Each command and the module that defines it with `add_commands(subparsers)` (its subparser sets `func`).
COMMANDS = {
    "train": "evit.trainer", "eval": "evit.evaluate", "launch": "evit.launch", "macs": "evit.benchmark",
    "bench": "evit.benchmark", "bench-input": "evit.bench_input", "report": "evit.report", "visualize": "evit.visualize",
    "install-profile": "evit.profiles",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `command` alone (importing only its module), or of every command when it is None/unknown."""
    parser = argparse.ArgumentParser(prog="evit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as e:  # bad input (a model spec, an option, a config value): one line, no traceback
        print(f"evit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
