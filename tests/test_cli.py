"""The thin CLI: each command calls the library, prints what it wrote, and turns user mistakes into one line."""

import csv

import pytest

from ropescope.cli import main


def test_methods_lists_every_method_with_its_parameters(capsys):
    from ropescope import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name} " in "\n" + out
    assert "original_max_position_embeddings = (required)" in out and "beta_fast = 32.0" in out


def test_freqs_writes_rows_and_a_figure(tmp_path, capsys):
    plot, table = tmp_path / "freqs.png", tmp_path / "freqs.csv"
    assert main(["freqs", "--method", "default,linear", "--method", "yarn", "--factor", "8", "--head-dim", "32",
                 "--original-length", "256", "--plot", str(plot), "--csv", str(table)]) == 0
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 3 * 16
    linear = [row for row in rows if row["method"] == "linear x8"]
    assert all(float(row["ratio"]) == pytest.approx(8.0) for row in linear)
    yarn = [float(row["ratio"]) for row in rows if row["method"] == "yarn x8"]
    assert yarn[0] == pytest.approx(1.0) and yarn[-1] == pytest.approx(8.0)
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


@pytest.mark.parametrize("argv,message", [
    (["freqs", "--method", "nope"], "ropescope freqs: error: unknown RoPE method 'nope'"),
    (["freqs", "--factor", "0.5"], "factor=0.5 must be >= 1"),
    (["freqs", "--head-dim", "33"], "head_dim=33 must be a positive even integer"),
])
def test_bad_input_is_one_line_with_exit_code_2(argv, message, capsys, tmp_path):
    assert main(argv + ["--plot", str(tmp_path / "never.png")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "never.png").exists()
