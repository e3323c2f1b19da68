"""The `ropescope` command: argument parsing and calls into the API, nothing else.

Every subcommand has an `_add_<name>(subparsers)` that declares its arguments and sets `func` to a `_run_<name>(args)`
that calls the library. User mistakes arrive as `RopescopeError` and leave as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from ropescope.errors import RopescopeError

SUBCOMMANDS: list = []  # the `_add_*` functions, in the order `ropescope --help` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ropescope", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except RopescopeError as error:
        print(f"ropescope {args.command}: error: {error}", file=sys.stderr)
        return 2
