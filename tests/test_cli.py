"""The thin CLI: each command calls the library, prints what it wrote, and turns user mistakes into one line."""

import csv
import dataclasses

import pytest

from ropescope.cli import _add_config_fields, _HelpFormatter, _Parser, build_parser, main
from ropescope.rope import RopeSpec, parse_spec, yarn_correction_range
from ropescope.io.rows import FrequencyRow

COMMANDS = ["study", "report", "methods", "freqs", "engines", "pretrain", "train", "plan", "export", "ppl",
            "tasks", "retrieval", "passkey", "needle", "entropy", "patterns", "uncertainty", "fit-scale"]


def test_methods_lists_every_method_with_its_parameters(capsys):
    from ropescope import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name} " in "\n" + out
    assert "original_max_position_embeddings = (required)" in out and "beta_fast = 32.0" in out


def test_freqs_writes_rows_and_a_figure(tmp_path, capsys):
    out = tmp_path / "freqs"
    assert main(["freqs", "--method", "default", "--method", "linear", "--method", "yarn:beta_fast=16",
                 "--factor", "8", "--head-dim", "32", "--original-max-position-embeddings", "256",
                 "--out", str(out)]) == 0
    plot = out / "frequencies.png"
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((out / "frequencies.csv").open()))
    assert len(rows) == 3 * 16 and list(rows[0]) == FrequencyRow.keys()
    linear = [row for row in rows if row["method"] == "linear x8"]
    assert all(float(row["ratio"]) == pytest.approx(8.0) for row in linear)
    # yarn with beta_fast=16: the ramp starts where 16 rotations fit into 256 tokens, per the formula
    yarn = [float(row["ratio"]) for row in rows if row["method"] == "yarn x8"]
    low, high = yarn_correction_range(16, 1, 32, 10000.0, 256)
    assert all(ratio == pytest.approx(1.0) for ratio in yarn[:low])
    assert all(ratio == pytest.approx(8.0) for ratio in yarn[high:]) and yarn[low] < yarn[high - 1]
    printed = capsys.readouterr().out
    assert "linear x8" in printed and f"wrote {out}" in printed
    assert not list(out.glob(".*tmp*"))  # nothing half-written left behind


@pytest.mark.parametrize("argv,message", [
    (["freqs", "--method", "nope"], "ropescope freqs: error: unknown RoPE method 'nope'"),
    (["freqs", "--factor", "0.5"], "factor=0.5 must be >= 1"),
    (["freqs", "--head-dim", "33"], "head_dim=33 must be a positive even integer"),
    (["freqs", "--method", "yarn:beta_fast"], "'beta_fast' is not key=value"),
    (["freqs", "--method", "yarn:speed=2"], "yarn takes no parameter 'speed'"),
    (["freqs", "--head-dim", "-2"], "ropescope freqs: error: argument --head-dim: -2 is not a positive integer"),
    (["study", "plan.toml", "--quick"], "ropescope study: error: argument --quick: not allowed with argument config"),
    (["study", "missing.toml"], "study config 'missing.toml' does not exist"),
])
def test_bad_input_is_one_line_with_exit_code_2(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "never")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "never").exists()


def test_method_syntax_parses_parameters_as_json():
    assert parse_spec("default") == RopeSpec("default")
    assert parse_spec(" yarn : factor=4, beta_fast=32,truncate=false", original_max_position_embeddings=64) == (
        RopeSpec("yarn", factor=4, beta_fast=32, truncate=False, original_max_position_embeddings=64))
    longrope = parse_spec("longrope:short_factor=[1,1.5],long_factor=[2,3],factor=8", None, 16)
    assert (longrope.params["short_factor"], longrope.params["long_factor"]) == ([1.0, 1.5], [2.0, 3.0])
    spec = parse_spec("yarn:beta_fast=16", factor=4, original_max_position_embeddings=256)
    assert spec == RopeSpec("yarn", factor=4.0, original_max_position_embeddings=256, beta_fast=16.0)
    assert parse_spec(spec.to_text()) == spec and spec.to_text() == (
        "yarn:factor=4.0,original_max_position_embeddings=256,beta_fast=16.0")
    # parameters given in the name win over the shared --factor
    assert parse_spec("linear:factor=2", factor=8).params["factor"] == 2.0


@pytest.mark.parametrize("command", [action for action in COMMANDS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: ropescope {command}")
    if "--out" in text:  # one meaning everywhere: a folder, with the files written into it named
        assert "--out FOLDER" in text or command in ("train", "pretrain")
    if "--method" in text and command not in ("train", "pretrain"):
        assert "NAME[:KEY=VALUE,...]" in text


def test_every_out_is_a_folder():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == set(COMMANDS)
    for name, command in commands.items():
        for action in command._actions:
            if "--out" in action.option_strings and name not in ("train", "pretrain"):
                assert action.metavar == "FOLDER", name
        assert not any(option in ("--output", "--plot", "--csv") for action in command._actions
                       for option in action.option_strings), name


def test_passkey_and_needle_are_retrieval_with_their_own_defaults():
    commands = build_parser()._subparsers._group_actions[0].choices
    defaults = {name: {key: commands[name].get_default(key) for key in ("trials", "batch_size", "out", "lengths")}
                for name in ("retrieval", "passkey", "needle")}
    assert defaults["retrieval"] == {"trials": 5, "batch_size": None, "out": None, "lengths": [256, 512, 1024]}
    assert defaults["passkey"] == {"trials": 5, "batch_size": None, "out": "results/passkey", "lengths": [256, 512, 1024]}
    assert defaults["needle"] == {"trials": 1, "batch_size": None, "out": "results/needle", "lengths": [256, 512, 1024]}
    assert commands["retrieval"].get_default("task") == "passkey"


def test_config_flags_follow_the_dataclass_fields():
    @dataclasses.dataclass
    class Config:
        out: str = dataclasses.field(metadata={"help": "run folder"})
        retrieval_mix: float = dataclasses.field(default=0.0, metadata={"help": "share of retrieval examples"})
        steps: int = 10
        corpus: str | None = None
        resume: bool = False
        spec: dict | None = None

    parser = _Parser(prog="ropescope x", formatter_class=_HelpFormatter)
    _add_config_fields(parser, Config)
    args = parser.parse_args(["--out", "run", "--retrieval-mix", "0.25", "--resume"])
    assert Config(**vars(args)) == Config(out="run", retrieval_mix=0.25, steps=10, corpus=None, resume=True)
    assert "share of retrieval examples (default: 0.0)" in " ".join(parser.format_help().split())
