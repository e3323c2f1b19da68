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


def _add_pretrain(subparsers) -> None:
    from ropescope.pretrain import PretrainConfig

    defaults = PretrainConfig(output="")
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain a small Llama with original RoPE (the shipped model's recipe is in its MODEL_CARD)",
        description="Pretrain a small LlamaForCausalLM with original RoPE at a short context, with a share of "
        "synthetic passkey examples. The defaults are the first of the three stages that build the shipped model "
        "(src/ropescope/default/MODEL_CARD.md gives both commands).",
    )
    parser.add_argument("--output", required=True, help="folder to write the model and tokenizer into")
    parser.add_argument("--corpus", default=None, help="local corpus (default: the shipped corpus); its train split is used")
    for name, kind in (("seed", int), ("steps", int), ("batch_size", int), ("context_length", int),
                       ("learning_rate", float), ("warmup_steps", int), ("passkey_share", float),
                       ("answer_loss_weight", float), ("passkey_packed_share", float), ("passkey_min_length", int),
                       ("vocab_size", int), ("hidden_size", int), ("num_layers", int), ("num_heads", int),
                       ("intermediate_size", int), ("threads", int), ("checkpoint_every", int), ("log_every", int)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name),
                            help=f"(default: {getattr(defaults, name)})")
    parser.add_argument("--init-from", default=None, help="continue from this saved model folder (and its tokenizer)")
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
