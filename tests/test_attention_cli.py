"""`ropescope entropy | patterns | uncertainty` end to end on a tiny saved model, its corpus, and rows from
`ropescope passkey` / `ropescope needle`."""

import json
import math

import pytest
import torch
import transformers

from tests.helpers import tiny_folders, tiny_tokenizer
from ropescope.io.results import read_rows, write_rows
from ropescope.commands.attention import evaluation_groups
from ropescope.cli import main
from ropescope.rope import RopeSpec, parse_spec
from ropescope.errors import RopescopeError
from ropescope.io.rows import EntropyProfileRow, RetrievalRow, RunLabels, UncertaintySummaryRow


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("tiny_attention"), max_position_embeddings=32)


def corpus_arguments(folders):
    return ["--model", str(folders / "model"), "--corpus", str(folders / "corpus"), "--split", "train"]


def test_entropy_command(folders, tmp_path):
    out = tmp_path / "entropy"
    assert main(["entropy", *corpus_arguments(folders), "--method", "default", "--method", "linear",
                 "--factor", "2", "--lengths", "32,64", "--samples", "2", "--out", str(out)]) == 0
    rows = read_rows(out / "entropy.csv")
    assert {(row["method"], row["factor"], row["length"]) for row in rows} == {
        ("default", None, 32), ("default", None, 64), ("linear", 2.0, 32), ("linear", 2.0, 64)}
    assert {row["original_max_position_embeddings"] for row in rows} == {32} and {row["samples"] for row in rows} == {2}
    assert list(rows[0]) == [*RunLabels.keys(), "split", *EntropyProfileRow.keys()]
    assert (out / "entropy.png").stat().st_size > 1000


def test_patterns_command(folders, tmp_path, capsys):
    out = tmp_path / "patterns"
    assert main(["patterns", *corpus_arguments(folders), "--method", "yarn", "--factor", "2", "--samples", "1",
                 "--out", str(out)]) == 0
    scores = read_rows(out / "patterns_preservation.csv")
    means = {(row["method"], row["length"]): row["js_divergence"] for row in scores if row["layer"] == "mean"}
    assert set(means) == {("default", 32), ("default", 64), ("yarn", 32), ("yarn", 64)}
    assert means[("default", 32)] == 0 and all(0 <= value <= 0.7 for value in means.values())
    distances = read_rows(out / "patterns_distance.csv")
    assert {row["distance_scale"] for row in distances} == {1.0, 2.0}
    assert (out / "attention_distance.png").exists() and (out / "pattern_preservation.png").exists()
    assert "JS from pretrained pattern" in capsys.readouterr().out


def test_uncertainty_on_passkey_and_needle_rows(folders, tmp_path, capsys):
    model = str(folders / "model")
    assert main(["passkey", "--model", model, "--lengths", "70,90", "--depths", "0,50,100", "--trials", "2",
                 "--out", str(tmp_path / "passkey")]) == 0
    # a method with a parameter of its own: the uncertainty pass reloads it from the rows' `rope`
    assert main(["passkey", "--model", model, "--method", "yarn:beta_fast=16", "--factor", "2", "--lengths", "70",
                 "--depths", "50", "--trials", "1", "--out", str(tmp_path / "yarn")]) == 0
    assert main(["needle", *corpus_arguments(folders), "--lengths", "80", "--depths", "0,50", "--answer", "honey",
                 "--out", str(tmp_path / "needle")]) == 0
    combined = read_rows(tmp_path / "passkey" / "passkey.csv") + read_rows(tmp_path / "yarn" / "passkey.csv")
    combined += read_rows(tmp_path / "needle" / "needle.csv")
    (yarn_group,) = evaluation_groups(read_rows(tmp_path / "yarn" / "passkey.csv"))
    assert parse_spec(yarn_group[0]) == RopeSpec("yarn", factor=2.0, original_max_position_embeddings=32,
                                                  beta_fast=16.0)
    for row in combined:  # a random model fails every prompt; pretend trial 0 succeeded to have both classes
        row["correct"] = row["trial"] == 0
    rows_path = write_rows(combined, tmp_path / "all.json")
    out = tmp_path / "uncertainty"
    # without --model: the model the rows name
    assert main(["uncertainty", str(rows_path), *corpus_arguments(folders)[2:], "--out", str(out)]) == 0
    results = read_rows(out / "uncertainty.csv")
    assert len(results) == 12 + 1 + 2
    assert all(0 < row["entropy"] <= row["entropy_max"] + 1e-5 and 0 <= row["needle_mass"] <= 1 for row in results)
    summary = json.loads((out / "uncertainty_summary.json").read_text())
    assert {(row["method"], row["task"]) for row in summary} == {("default", "passkey"), ("yarn", "passkey"),
                                                                ("default", "needle")}
    assert {row["layer"] for row in summary} == {"mean", 0, 1}
    assert all(UncertaintySummaryRow.from_dict(row).cells >= 1 for row in summary)
    default_passkey = [row for row in summary if row["task"] == "passkey" and row["method"] == "default"]
    assert default_passkey[0]["failures"] == 6 and 0 <= default_passkey[0]["auroc_entropy_predicts_failure"] <= 1
    assert (out / "entropy_heatmap.png").stat().st_size > 1000
    assert "AUROC" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["entropy", "--method", "warp"], "unknown RoPE method 'warp'"),
    (["entropy", "--lengths", "100000"], "fewer than one block: block_length=100000"),
    (["entropy", "--samples", "0"], "argument --samples: 0 is not a positive integer"),
    (["entropy", "--method", "yarn"], "yarn needs 'factor'"),
    (["patterns", "--query-fraction", "0"], "argument --query-fraction: 0.0 is outside (0, 1]"),
])
def test_command_errors_are_one_line_and_write_nothing(folders, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main([*argv, *corpus_arguments(folders), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not out.exists()


def test_uncertainty_errors(folders, tmp_path, capsys):
    model = str(folders / "model")
    assert main(["uncertainty", str(tmp_path / "rows.txt"), "--model", model]) == 2
    write_rows([{"task": "passkey", "length": 70, "answer": "12345", "needle_start": 3}], tmp_path / "partial.csv")
    assert main(["uncertainty", str(tmp_path / "partial.csv"), "--model", model]) == 2
    write_rows([{"task": "passkey", "length": 70, "method": "ntk"}], tmp_path / "ntk.csv")
    assert main(["uncertainty", str(tmp_path / "ntk.csv"), "--model", model, "--only-method", "yarn"]) == 2
    trial = RetrievalRow(task="passkey", length=70, answer="12345", needle_start=3, needle_end=9, question_position=69,
                         depth_percent=50, trial=0, seed=0, score=0.0, correct=False, prediction="1")
    write_rows([trial.to_dict({"model": name}) for name in ("a", "b")], tmp_path / "two.csv")
    assert main(["uncertainty", str(tmp_path / "two.csv")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "come from 2 models (a, b); give --model" in errors[3]
    assert "must end in .json or .csv" in errors[0] and "lack the field 'needle_end' of a retrieval row" in errors[1]
    assert "no evaluation rows" in errors[2] and "method=['yarn']" in errors[2]
    assert not (tmp_path / "results").exists()


def test_rows_round_trip(tmp_path):
    rows = [{"a": 1, "b": 2.5, "c": True, "d": None, "e": "text"}, {"a": 2, "f": "new"}]
    for suffix in (".csv", ".json"):
        back = read_rows(write_rows(rows, tmp_path / f"rows{suffix}"))
        assert back[0]["a"] == 1 and back[0]["b"] == 2.5 and back[0]["c"] is True and back[0]["e"] == "text"
        assert back[0]["d"] is None
    with pytest.raises(RopescopeError, match="must end in"):
        write_rows(rows, tmp_path / "rows.txt")


@pytest.fixture(scope="module")
def gemma3_folders(tmp_path_factory):
    """A tiny random Gemma 3 (layer 0 sliding with an 8-token window, layer 1 global) with the tiny tokenizer and
    corpus: the readouts must keep its two layer types apart."""
    root = tiny_folders(tmp_path_factory.mktemp("tiny_gemma3"), max_position_embeddings=32)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=32, initializer_range=0.2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "gemma3")
    tokenizer.save_pretrained(root / "gemma3")
    return root


def test_readouts_of_a_model_with_two_layer_types_report_each_type_apart(gemma3_folders, tmp_path, capsys):
    arguments = ["--model", str(gemma3_folders / "gemma3"), "--corpus", str(gemma3_folders / "corpus"),
                 "--split", "train", "--samples", "1"]
    entropy_out, patterns_out = tmp_path / "entropy", tmp_path / "patterns"
    assert main(["entropy", *arguments, "--lengths", "48", "--out", str(entropy_out)]) == 0
    rows = read_rows(entropy_out / "entropy.csv")
    assert {(row["layer"], row["layer_type"]) for row in rows} == {(0, "sliding_attention"), (1, "full_attention")}
    printed = capsys.readouterr().out
    for layer, layer_type in [(0, "sliding_attention"), (1, "full_attention")]:
        # the printed mean is the plain mean of the layer's rows (every bin holds the same number of queries here)
        values = [row["entropy"] for row in rows if row["layer"] == layer]
        assert f"1 {layer_type} layers: {sum(values) / len(values):.3f}" in printed
        assert (entropy_out / f"entropy_{layer_type}.png").stat().st_size > 1000
    # the sliding layer sees at most its window: its entropy, and the uniform attention it is drawn against, stay
    # at or below log(8); the global layer's uniform bound is the mean of log(position + 1) over the bin
    for row in rows:
        start, end = row["position_start"], row["position_end"]
        window = 8 if row["layer_type"] == "sliding_attention" else end
        uniform = sum(math.log(min(position + 1, window)) for position in range(start, end)) / (end - start)
        assert row["entropy_max"] == pytest.approx(uniform, rel=1e-12)
        assert row["entropy"] <= row["entropy_max"] + 1e-6
    assert max(row["entropy"] for row in rows if row["layer"] == 0) <= math.log(8) + 1e-6
    assert main(["patterns", *arguments, "--method", "yarn", "--factor", "2", "--out", str(patterns_out)]) == 0
    preservation = read_rows(patterns_out / "patterns_preservation.csv")
    assert {(row["layer"], row["layer_type"]) for row in preservation} == {
        (0, "sliding_attention"), (1, "full_attention"), ("mean", "all")}
    distances = read_rows(patterns_out / "patterns_distance.csv")
    assert {(row["layer"], row["layer_type"]) for row in distances} == {(0, "sliding_attention"), (1, "full_attention")}
    assert "1 full_attention layers:" in capsys.readouterr().out
    for layer_type in ("sliding_attention", "full_attention"):
        assert (patterns_out / f"attention_distance_{layer_type}.png").exists()


def test_a_model_of_one_layer_type_gets_no_per_type_figures(folders, tmp_path):
    out = tmp_path / "entropy"
    assert main(["entropy", *corpus_arguments(folders), "--lengths", "32", "--samples", "1", "--out", str(out)]) == 0
    assert {row["layer_type"] for row in read_rows(out / "entropy.csv")} == {"full_attention"}
    assert sorted(path.name for path in out.iterdir()) == ["entropy.csv", "entropy.png"]
