"""The `ropescope` command: argument parsing and calls into the API, nothing else.

Every subcommand has an `_add_<name>(subparsers)` that declares its arguments and sets `func` to a `_run_<name>(args)`
that calls the library. User mistakes arrive as `RopescopeError` and leave as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from ropescope.errors import RopescopeError


def _method_list(values: list[str] | None, default: str) -> list[str]:
    """`--method a,b --method c` -> [a, b, c]."""
    return [name.strip() for value in (values or [default]) for name in value.split(",") if name.strip()]


def _add_rope_arguments(parser: argparse.ArgumentParser) -> None:
    """The knobs shared by every command that applies an extension."""
    parser.add_argument("--factor", type=float, help="extension factor s = target length / pretrained length")
    parser.add_argument("--original-length", type=int, dest="original_length",
                        help="the pretrained context length (original_max_position_embeddings)")


def _add_methods(subparsers) -> None:
    parser = subparsers.add_parser("methods", help="list the RoPE methods and their parameters")
    parser.set_defaults(func=_run_methods)


def _run_methods(args) -> int:
    from ropescope.rope import METHODS, REQUIRED

    for method in METHODS.values():
        origin = f"transformers rope_type {method.transformers_type!r}" if method.transformers_type else "ropescope"
        print(f"{method.name:<13} {method.summary}  [{origin}]")
        for name, default in method.params.items():
            print(f"{'':<15}{name} = {'(required)' if default is REQUIRED else repr(default)}")
    return 0


def _add_freqs(subparsers) -> None:
    parser = subparsers.add_parser("freqs", help="per-pair wavelengths of several methods, side by side")
    parser.add_argument("--method", action="append", help="methods, comma-separated or repeated "
                        "(default: default,linear,ntk,yarn,llama3)")
    _add_rope_arguments(parser)
    parser.add_argument("--head-dim", type=int, default=64, dest="head_dim")
    parser.add_argument("--base", type=float, default=10000.0)
    parser.add_argument("--seq-len", type=int, dest="seq_len", help="current length, for dynamic methods")
    parser.add_argument("--plot", help="write the figure here (PNG)")
    parser.add_argument("--csv", help="write the rows here")
    parser.set_defaults(func=_run_freqs, factor=4.0, original_length=256)


def _run_freqs(args) -> int:
    from ropescope.frequencies import frequency_rows
    from ropescope.plots import plot_frequencies
    from ropescope.rope import simple_spec
    from ropescope.results import write_csv

    specs = [simple_spec(name, args.factor, args.original_length)
             for name in _method_list(args.method, "default,linear,ntk,yarn,llama3")]
    rows = frequency_rows(specs, args.head_dim, args.base, args.seq_len)
    print(f"{'pair':>4} " + " ".join(f"{spec.label():>14}" for spec in specs) + "   (wavelength in tokens)")
    for pair in range(args.head_dim // 2):
        print(f"{pair:>4} " + " ".join(f"{row['wavelength']:>14.1f}" for row in rows if row["pair"] == pair))
    if args.csv:
        print(f"rows: {write_csv(rows, args.csv)}")
    if args.plot:
        print(f"figure: {plot_frequencies(rows, args.plot, pretrained_length=args.original_length)}")
    return 0


def _add_study(subparsers) -> None:
    parser = subparsers.add_parser(
        "study", help="train, evaluate and analyse every method of a config, then write the report")
    parser.add_argument("config", nargs="?", help="study TOML (default: the shipped default study)")
    parser.add_argument("--quick", action="store_true", help="the small shipped plan (seconds to a minute)")
    parser.add_argument("--out", default="results", help="output folder: database, checkpoints, report")
    parser.add_argument("--force", action="store_true", help="redo every cell, even those already recorded")
    parser.set_defaults(func=_run_study)


def _run_study(args) -> int:
    from ropescope.study.config import load_config, quick_config_path
    from ropescope.study.report import build_report
    from ropescope.study.runner import run_study

    if args.quick and args.config:
        raise RopescopeError("give a config file or --quick, not both")
    config = load_config(quick_config_path() if args.quick else args.config)
    counts = run_study(config, args.out, force=args.force)
    paths = build_report(args.out)
    print(f"cells: {counts['done']} run, {counts['skipped']} already recorded, {counts['failed']} failed")
    print(f"report: {paths['html']}\nsummary: {paths['summary']}")
    print(paths["summary"].read_text().split("## Figures")[0])
    return 1 if counts["failed"] else 0


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser("report", help="rebuild a study's report from its results database")
    parser.add_argument("out", help="the study's output folder")
    parser.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from ropescope.study.report import build_report

    paths = build_report(args.out)
    print(f"report: {paths['html']}\nsummary: {paths['summary']}")
    return 0


SUBCOMMANDS: list = [_add_methods, _add_freqs, _add_study, _add_report]  # the `_add_*` functions, in the order `--help` lists them


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
