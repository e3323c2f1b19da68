"""The ppl, passkey and needle commands end to end on a tiny saved model folder, with and without an extension."""

import pytest

from tests.helpers import tiny_folders
from ropescope.cli import main
from ropescope.io.results import read_rows
from ropescope.io.rows import PerplexityRow, RetrievalRow, RunLabels


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("tiny"), max_position_embeddings=64)


def test_ppl_command(folders, tmp_path, capsys):
    out = tmp_path / "ppl"
    assert main(["ppl", "--model", str(folders / "model"), "--corpus", str(folders / "corpus"), "--split", "train",
                 "--lengths", "32,64", "--stride", "16", "--documents", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "truncated  length      32" in printed and "sliding  length      64" in printed
    rows = read_rows(out / "perplexity.csv")
    assert list(rows[0]) == RunLabels.keys() + PerplexityRow.keys()
    assert {(row["model"], row["revision"], row["device"], row["dtype"], row["method"],
             row["original_max_position_embeddings"]) for row in rows} == {
        (str(folders / "model"), None, "cpu", "float32", "default", 64)}
    assert (out / "perplexity.png").stat().st_size > 1000


def test_passkey_command_with_extension(folders, tmp_path):
    out = tmp_path / "passkey"
    assert main(["passkey", "--model", str(folders / "model"), "--method", "ntk", "--factor", "2",
                 "--lengths", "70,90", "--depths", "0,100", "--trials", "2", "--out", str(out)]) == 0
    rows = read_rows(out / "passkey.csv")
    assert len(rows) == 8 and all(RetrievalRow.from_dict(row).task == "passkey" for row in rows)
    assert {(row["method"], row["factor"], row["original_max_position_embeddings"], row["rope"]) for row in rows} == {
        ("ntk", 2.0, 64, "ntk:factor=2.0")}
    assert (out / "passkey.png").is_file()


def test_needle_command(folders, tmp_path):
    out = tmp_path / "needle"
    assert main(["needle", "--model", str(folders / "model"), "--corpus", str(folders / "corpus"), "--split", "train",
                 "--lengths", "80", "--depths", "50", "--answer", "honey", "--out", str(out)]) == 0
    (row,) = read_rows(out / "needle.csv")
    assert list(row) == RunLabels.keys() + RetrievalRow.keys()
    assert row["task"] == "needle" and row["answer"] == "honey" and row["method"] == "default"
    assert (out / "needle.png").is_file()


@pytest.mark.parametrize("argv,message", [
    (["ppl", "--lengths", "64,32"], "ropescope ppl: error: argument --lengths: lengths [64, 32] are not strictly "
                                    "increasing"),
    (["ppl", "--lengths", "32", "--stride", "40"], "stride=40 is longer than the shortest length 32"),
    (["ppl", "--protocol", "rolling"], "argument --protocol: invalid choice: 'rolling'"),
    (["ppl", "--lengths", "32,100000"], "the corpus has no document of at least 100000 tokens (its longest has"),
    (["needle", "--lengths", "100000"], "the haystack corpus is"),
    (["passkey", "--method", "warp"], "unknown RoPE method 'warp'"),
    (["passkey", "--factor", "2"], "factor 2 is given but no method takes one"),
    (["passkey", "--method", "yarn"], "yarn needs 'factor'"),
    (["passkey", "--lengths", "10,100"], "length=10 is too short for a passkey prompt"),
    (["passkey", "--depths", "0,101"], "ropescope passkey: error: argument --depths: depth_percent=101 is outside "
                                       "0..100"),
    (["passkey", "--trials", "0"], "argument --trials: 0 is not a positive integer"),
    (["needle", "--answer", " "], "argument --answer: is empty"),
])
def test_command_errors_are_one_line_and_write_nothing(folders, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    extra = ["--model", str(folders / "model"), "--out", str(out)]
    if argv[0] != "passkey":
        extra += ["--corpus", str(folders / "corpus"), "--split", "train"]
    assert main(argv + extra) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not out.exists()
