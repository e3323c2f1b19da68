"""The ppl, passkey and needle commands end to end on a tiny saved model folder, with and without an extension."""

import json

import pytest

from tests.helpers import tiny_folders
from ropescope.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("tiny"), max_position_embeddings=64)


def test_ppl_command(folders, tmp_path, capsys):
    out = tmp_path / "ppl.csv"
    assert main(["ppl", "--model", str(folders / "model"), "--corpus", str(folders / "corpus"), "--split", "train",
                 "--lengths", "32,64", "--stride", "16", "--documents", "1", "--out", str(out),
                 "--plot", str(tmp_path / "ppl.png")]) == 0
    printed = capsys.readouterr().out
    assert "truncated  length      32" in printed and "sliding  length      64" in printed
    assert out.read_text().splitlines()[0].startswith("model,method,factor,original_length,task,protocol")
    assert (tmp_path / "ppl.png").stat().st_size > 1000


def test_passkey_command_with_extension(folders, tmp_path):
    out = tmp_path / "passkey.json"
    assert main(["passkey", "--model", str(folders / "model"), "--method", "ntk", "--factor", "2",
                 "--lengths", "70,90", "--depths", "0,100", "--trials", "2", "--out", str(out),
                 "--plot", str(tmp_path / "passkey.png")]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 8
    assert {(row["method"], row["factor"], row["original_length"]) for row in rows} == {("ntk", 2.0, 64)}
    assert (tmp_path / "passkey.png").is_file()


def test_needle_command(folders, tmp_path):
    out = tmp_path / "needle.json"
    assert main(["needle", "--model", str(folders / "model"), "--corpus", str(folders / "corpus"), "--split", "train",
                 "--lengths", "80", "--depths", "50", "--answer", "honey", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["task"] == "needle" and row["answer"] == "honey" and row["method"] == "default"


@pytest.mark.parametrize("argv,message", [
    (["ppl", "--lengths", "64,32"], "lengths [64, 32] are not strictly increasing"),
    (["ppl", "--lengths", "32,100000"], "the corpus has no document of at least 100000 tokens (its longest has"),
    (["needle", "--lengths", "100000"], "the haystack corpus is"),
    (["passkey", "--method", "warp"], "unknown RoPE method 'warp'"),
    (["passkey", "--factor", "2"], "factor/original_length given without method"),
    (["passkey", "--lengths", "10,100"], "length=10 is too short for a passkey prompt"),
])
def test_command_errors_are_one_line_and_write_nothing(folders, tmp_path, capsys, argv, message):
    out = tmp_path / "rows.json"
    extra = ["--model", str(folders / "model"), "--out", str(out)]
    if argv[0] != "passkey":
        extra += ["--corpus", str(folders / "corpus"), "--split", "train"]
    assert main(argv + extra) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not out.exists()
