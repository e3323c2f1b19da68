"""The `ropescope` command: argument parsing and calls into the API, nothing else.

Every subcommand has an `_add_<name>(subparsers)` that declares its arguments and sets `func` to a `_run_<name>(args)`
that calls the library. User mistakes arrive as `RopescopeError` and leave as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import os
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



# ---------------------------------------------------------------------------------------------------------------
# Evaluation: ppl, passkey, needle


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 256,512,1024")


def _number_list(text: str) -> list[float]:
    try:
        return [float(item) if "." in item else int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0,25,50,75,100")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default' (the shipped model) or a local model folder")
    parser.add_argument("--method", default=None, help="RoPE extension applied at evaluation (see `ropescope methods`)")
    _add_rope_arguments(parser)
    parser.add_argument("--out", default=None, help="rows file, .json or .csv")
    parser.add_argument("--plot", default=None, help="figure file, e.g. out.png")


def _print_cells(rows: list[dict], value: str) -> None:
    cells: dict = {}
    for row in rows:
        cells.setdefault((row["length"], row["depth_percent"]), []).append(float(row[value]))
    for (length, depth), scores in sorted(cells.items()):
        print(f"length {length:>7}  depth {depth:>5g}%  {value} {sum(scores) / len(scores):.3f}  (n={len(scores)})")


def _add_ppl(subparsers) -> None:
    parser = subparsers.add_parser("ppl", help="perplexity against length (truncated and sliding-window protocols)")
    _add_model_arguments(parser)
    parser.add_argument("--lengths", type=_int_list, default=[256, 512, 1024, 2048])
    parser.add_argument("--corpus", default=None, help="corpus path (default: the shipped corpus)")
    parser.add_argument("--split", default="validation", help="split of the shipped corpus")
    parser.add_argument("--protocol", choices=["truncated", "sliding", "both"], default="both")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: half the window)")
    parser.add_argument("--documents", type=int, default=4, help="how many long documents to evaluate")
    parser.add_argument("--chunk-size", type=int, default=1024, help="positions per output-head chunk")
    parser.set_defaults(func=_run_ppl)


def _run_ppl(args) -> int:
    from ropescope.eval.perplexity import PROTOCOLS, run_perplexity

    rows = run_perplexity(args.model, args.lengths, PROTOCOLS if args.protocol == "both" else [args.protocol],
                          args.stride, args.method, args.factor, args.original_length, args.corpus, args.split,
                          args.documents, args.chunk_size, out=args.out, plot=args.plot)
    for row in rows:
        print(f"{row['protocol']:>9}  length {row['length']:>7}  ppl {row['perplexity']:10.3f}  "
              f"nll {row['nll']:.4f}  tokens {row['tokens_scored']}")
    return 0


def _add_passkey(subparsers) -> None:
    parser = subparsers.add_parser("passkey", help="passkey retrieval accuracy over lengths x depths")
    _add_model_arguments(parser)
    parser.add_argument("--lengths", type=_int_list, default=[256, 512, 1024])
    parser.add_argument("--depths", type=_number_list, default=[0, 25, 50, 75, 100], help="depth percents, 0..100")
    parser.add_argument("--trials", type=int, default=5, help="keys per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.set_defaults(func=_run_passkey)


def _run_passkey(args) -> int:
    from ropescope.eval.passkey import run_passkey

    rows = run_passkey(args.model, args.lengths, args.depths, args.trials, args.seed, args.method, args.factor,
                       args.original_length, batch_size=args.batch_size, out=args.out, plot=args.plot)
    _print_cells(rows, "score")
    return 0


def _add_needle(subparsers) -> None:
    from ropescope.eval.needle import ANSWER, NEEDLE, QUESTION

    parser = subparsers.add_parser("needle", help="needle-in-a-haystack retrieval over lengths x depths")
    _add_model_arguments(parser)
    parser.add_argument("--lengths", type=_int_list, default=[256, 512, 1024])
    parser.add_argument("--depths", type=_number_list, default=[0, 25, 50, 75, 100], help="depth percents, 0..100")
    parser.add_argument("--trials", type=int, default=1, help="haystacks per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", default=None, help="haystack corpus path (default: the shipped corpus)")
    parser.add_argument("--split", default="validation", help="split of the shipped corpus")
    parser.add_argument("--needle", default=NEEDLE)
    parser.add_argument("--question", default=QUESTION, help="ends where the answer should start")
    parser.add_argument("--answer", default=ANSWER)
    parser.set_defaults(func=_run_needle)


def _run_needle(args) -> int:
    from ropescope.eval.needle import run_needle

    rows = run_needle(args.model, args.lengths, args.depths, args.trials, args.seed, args.method, args.factor,
                      args.original_length, args.corpus, args.split, args.needle, args.question, args.answer,
                      out=args.out, plot=args.plot)
    _print_cells(rows, "score")
    return 0




def _add_analysis_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default' (the shipped model) or a local model folder")
    parser.add_argument("--chunk-size", type=int, default=512, help="queries / keys per block of the streaming pass")


def _add_analysis_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--original-length", type=int, dest="original_length",
                        help="the pretrained context length (default: from the model's config)")
    parser.add_argument("--corpus", default=None, help="corpus path (default: the shipped corpus)")
    parser.add_argument("--split", default="validation", choices=["train", "validation", "test"])


def _add_entropy(subparsers) -> None:
    parser = subparsers.add_parser("entropy", help="attention entropy against position, per method (streamed)")
    _add_analysis_model_arguments(parser)
    parser.add_argument("--method", action="append", help="RoPE extension (repeatable); default: default (none)")
    parser.add_argument("--factor", type=float, default=4.0, help="extension factor (default 4)")
    parser.add_argument("--lengths", type=_int_list, help="sequence lengths, e.g. 256,512,1024 (default: 1x, 2x, 4x "
                        "pretrained)")
    parser.add_argument("--samples", type=int, default=4, help="token blocks per length (default 4)")
    _add_analysis_corpus_arguments(parser)
    parser.add_argument("--position-bin-size", type=int, help="query positions per bin (default length / 64)")
    parser.add_argument("--out", default="results/entropy", help="folder for entropy.csv and entropy.png")
    parser.set_defaults(func=_run_entropy)


def _run_entropy(args) -> int:
    from ropescope.attention.runs import run_entropy

    run_entropy(args.model, args.method or ["default"], args.factor, args.lengths, args.samples, args.out,
                original_length=args.original_length, corpus=args.corpus, split=args.split,
                chunk_size=args.chunk_size, position_bin_size=args.position_bin_size)
    print(f"wrote {args.out}/entropy.csv and entropy.png")
    return 0


def _add_patterns(subparsers) -> None:
    parser = subparsers.add_parser("patterns", help="attention against key distance and pattern preservation")
    _add_analysis_model_arguments(parser)
    parser.add_argument("--method", action="append", help="RoPE extension (repeatable); the original is always included")
    parser.add_argument("--factor", type=float, default=4.0, help="extension factor (default 4)")
    parser.add_argument("--length", type=int, help="extended length (default factor x pretrained)")
    parser.add_argument("--samples", type=int, default=4, help="token blocks per length (default 4)")
    _add_analysis_corpus_arguments(parser)
    parser.add_argument("--query-fraction", type=float, default=0.125, help="last fraction of positions used as queries")
    parser.add_argument("--bins-per-octave", type=int, default=1, help="distance bins per doubling (default 1)")
    parser.add_argument("--out", default="results/patterns", help="folder for the rows and plots")
    parser.set_defaults(func=_run_patterns)


def _run_patterns(args) -> int:
    from ropescope.attention.runs import run_patterns

    scores = run_patterns(args.model, args.method or [], args.factor, args.length, args.samples, args.out,
                          original_length=args.original_length, corpus=args.corpus, split=args.split,
                          query_fraction=args.query_fraction,
                          bins_per_octave=args.bins_per_octave, chunk_size=args.chunk_size)
    for row in scores:
        if row["layer"] == "mean":
            print(f"{row['method']:>14} @ {row['length']:>6}: JS from pretrained pattern {row['js_divergence']:.4f}")
    return 0


def _add_uncertainty(subparsers) -> None:
    parser = subparsers.add_parser("uncertainty", help="answering-query entropy against passkey / needle errors")
    _add_analysis_model_arguments(parser)
    parser.add_argument("rows", help="evaluation rows (.csv or .json) from passkey / needle evaluation")
    parser.add_argument("--method", action="append", help="only rows of this method (repeatable)")
    parser.add_argument("--factor", type=float, help="only rows of this factor")
    parser.add_argument("--corpus", default=None, help="haystack corpus of needle rows (default: the shipped corpus)")
    parser.add_argument("--split", default="validation", choices=["train", "validation", "test"],
                        help="corpus split the needle haystacks were drawn from")
    parser.add_argument("--out", default="results/uncertainty", help="folder for the rows, summary and heatmap")
    parser.set_defaults(func=_run_uncertainty)


def _run_uncertainty(args) -> int:
    from ropescope.attention.runs import run_uncertainty

    summary = run_uncertainty(args.rows, args.model, args.out, methods=args.method, factor=args.factor,
                              corpus=args.corpus, split=args.split, chunk_size=args.chunk_size)
    for row in summary:
        if row["layer"] == "mean":
            print(f"{row['method']} {row['task']}: entropy correct {row['entropy_correct']:.3f} vs failed "
                  f"{row['entropy_failed']:.3f}, AUROC {row['auroc_entropy_predicts_failure']:.3f} "
                  f"({row['failures']}/{row['cells']} failed)")
    return 0


def _add_train(subparsers) -> None:
    from ropescope.train import MIXED_PRECISION, SCHEDULES, TrainConfig

    defaults = TrainConfig(out="")
    parser = subparsers.add_parser(
        "train", help="continual pretraining with a RoPE extension (also under `accelerate launch`)",
        description="Fine-tune a model with a RoPE extension on blocks of --length tokens; write a Hugging Face "
                    "checkpoint that loads with the extension active. Runs under `accelerate launch` as it is.")
    parser.add_argument("--model", default=defaults.model, help="'default' (the shipped model) or a local folder")
    parser.add_argument("--method", default=defaults.method, help="extension method (see `ropescope methods`)")
    parser.add_argument("--factor", type=float, default=defaults.factor)
    parser.add_argument("--original-length", type=int, default=None,
                        help="original_max_position_embeddings (default: the model's max_position_embeddings)")
    parser.add_argument("--length", type=int, default=defaults.length, help="tokens per training block")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--corpus", default=None, help="corpus path (default: the shipped corpus)")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="blocks per process per micro-step")
    parser.add_argument("--grad-accum", type=int, default=defaults.grad_accum, help="micro-steps per optimizer step")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate")
    parser.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm, help="0 = no clipping")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=defaults.mixed_precision,
                        help="auto = bf16 on a GPU that supports it, else float32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help="0 = full fine-tune")
    parser.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha)
    parser.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                        help="steps between resumable checkpoints (0 = none)")
    parser.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    parser.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from ropescope.train import TrainConfig, train

    config = TrainConfig(
        out=args.out, model=args.model, method=args.method, factor=args.factor,
        original_length=args.original_length, length=args.length, steps=args.steps, corpus=args.corpus,
        batch_size=args.batch_size, grad_accum=args.grad_accum, learning_rate=args.lr, schedule=args.schedule,
        warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, seed=args.seed, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, overwrite=args.overwrite)
    out = train(config)
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, one line, not one per process
        print(out)
    return 0


# the `_add_*` functions, in the order `ropescope --help` lists them
SUBCOMMANDS: list = [
    _add_study, _add_report, _add_methods, _add_freqs, _add_train, _add_ppl, _add_passkey, _add_needle,
    _add_entropy, _add_patterns, _add_uncertainty,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ropescope", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # ropescope's own bars say what is going on
    try:
        return args.func(args) or 0
    except RopescopeError as error:
        print(f"ropescope {args.command}: error: {error}", file=sys.stderr)
        return 2


def _add_pretrain(subparsers) -> None:
    from ropescope.pretrain import PretrainConfig

    defaults = PretrainConfig(output="")
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain a small Llama with original RoPE (the defaults rebuild the shipped model)",
        description="Pretrain a small LlamaForCausalLM with original RoPE at a short context, with a share of "
        "synthetic passkey examples. The defaults rebuild the shipped default model.",
    )
    parser.add_argument("--output", required=True, help="folder to write the model and tokenizer into")
    parser.add_argument("--corpus", default=None, help="local corpus (default: the shipped corpus); its train split is used")
    for name, kind in (("seed", int), ("steps", int), ("batch_size", int), ("context_length", int),
                       ("learning_rate", float), ("warmup_steps", int), ("passkey_share", float),
                       ("vocab_size", int), ("hidden_size", int), ("num_layers", int), ("num_heads", int),
                       ("intermediate_size", int), ("threads", int), ("checkpoint_every", int), ("log_every", int)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name),
                            help=f"(default: {getattr(defaults, name)})")
    parser.add_argument("--checkpoint-dir", default=None, help="where periodic checkpoints go (default: OUTPUT.checkpoint)")
    parser.set_defaults(func=_run_pretrain)


def _run_pretrain(args) -> int:
    from ropescope.pretrain import PretrainConfig, pretrain

    fields = {field for field in PretrainConfig.__dataclass_fields__}
    config = PretrainConfig(**{key: value for key, value in vars(args).items() if key in fields})
    output = pretrain(config)
    print(f"wrote {output}")
    return 0


SUBCOMMANDS.append(_add_pretrain)
