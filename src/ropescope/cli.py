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


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default' (the shipped model) or a local model folder")
    parser.add_argument("--chunk-size", type=int, default=512, help="queries / keys per block of the streaming pass")


def _add_entropy(subparsers) -> None:
    parser = subparsers.add_parser("entropy", help="attention entropy against position, per method (streamed)")
    _add_model_arguments(parser)
    parser.add_argument("--method", action="append", help="RoPE extension (repeatable); default: default (none)")
    parser.add_argument("--factor", type=float, default=4.0, help="extension factor (default 4)")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default: 1x, 2x, 4x pretrained)")
    parser.add_argument("--samples", type=int, default=4, help="token blocks per length (default 4)")
    parser.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    parser.add_argument("--position-bin-size", type=int, help="query positions per bin (default length / 64)")
    parser.add_argument("--out", default="results/entropy", help="folder for entropy.csv and entropy.png")
    parser.set_defaults(func=_run_entropy)


def _run_entropy(args) -> int:
    from ropescope.attention.runs import run_entropy

    run_entropy(args.model, args.method or ["default"], args.factor, args.lengths, args.samples, args.out,
                split=args.split, chunk_size=args.chunk_size, position_bin_size=args.position_bin_size)
    print(f"wrote {args.out}/entropy.csv and entropy.png")
    return 0


def _add_patterns(subparsers) -> None:
    parser = subparsers.add_parser("patterns", help="attention against key distance and pattern preservation")
    _add_model_arguments(parser)
    parser.add_argument("--method", action="append", help="RoPE extension (repeatable); the original is always included")
    parser.add_argument("--factor", type=float, default=4.0, help="extension factor (default 4)")
    parser.add_argument("--length", type=int, help="extended length (default factor x pretrained)")
    parser.add_argument("--samples", type=int, default=4, help="token blocks per length (default 4)")
    parser.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    parser.add_argument("--query-fraction", type=float, default=0.125, help="last fraction of positions used as queries")
    parser.add_argument("--bins-per-octave", type=int, default=1, help="distance bins per doubling (default 1)")
    parser.add_argument("--out", default="results/patterns", help="folder for the rows and plots")
    parser.set_defaults(func=_run_patterns)


def _run_patterns(args) -> int:
    from ropescope.attention.runs import run_patterns

    scores = run_patterns(args.model, args.method or [], args.factor, args.length, args.samples, args.out,
                          split=args.split, query_fraction=args.query_fraction,
                          bins_per_octave=args.bins_per_octave, chunk_size=args.chunk_size)
    for row in scores:
        if row["layer"] == "mean":
            print(f"{row['method']:>14} @ {row['length']:>6}: JS from pretrained pattern {row['js_divergence']:.4f}")
    return 0


def _add_uncertainty(subparsers) -> None:
    parser = subparsers.add_parser("uncertainty", help="answering-query entropy against passkey / needle errors")
    _add_model_arguments(parser)
    parser.add_argument("rows", help="evaluation rows (.csv or .json) from passkey / needle evaluation")
    parser.add_argument("--method", action="append", help="only rows of this method (repeatable)")
    parser.add_argument("--factor", type=float, help="only rows of this factor")
    parser.add_argument("--haystack-split", default="test", choices=["train", "validation", "test"],
                        help="corpus split the needle haystacks were drawn from")
    parser.add_argument("--out", default="results/uncertainty", help="folder for the rows, summary and heatmap")
    parser.set_defaults(func=_run_uncertainty)


def _run_uncertainty(args) -> int:
    from ropescope.attention.runs import run_uncertainty

    summary = run_uncertainty(args.rows, args.model, args.out, methods=args.method, factor=args.factor,
                              haystack_split=args.haystack_split, chunk_size=args.chunk_size)
    for row in summary:
        if row["layer"] == "mean":
            print(f"{row['method']} {row['task']}: entropy correct {row['entropy_correct']:.3f} vs failed "
                  f"{row['entropy_failed']:.3f}, AUROC {row['auroc_entropy_predicts_failure']:.3f} "
                  f"({row['failures']}/{row['cells']} failed)")
    return 0


SUBCOMMANDS += [_add_entropy, _add_patterns, _add_uncertainty]
