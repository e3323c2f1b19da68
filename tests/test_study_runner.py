"""The study runner on the shipped model with the quick plan: resumable after a kill, failed cells retried,
finished cells skipped, every cell recorded exactly once."""

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

import pytest

from ropescope.cli import main
from ropescope.errors import RopescopeError
from ropescope.study import stages
from ropescope.study.config import load_config, parse_config, quick_config_path
from ropescope.study.runner import DATABASE, plan_cells, plan_variants, run_study

QUICK = load_config(quick_config_path())


def row_counts(folder) -> Counter:
    with sqlite3.connect(folder / DATABASE) as connection:
        return Counter(cell for (cell,) in connection.execute("SELECT cell FROM rows"))


def cell_states(folder) -> dict:
    with sqlite3.connect(folder / DATABASE) as connection:
        return dict(connection.execute("SELECT cell, status FROM cells"))


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    counts = run_study(QUICK, folder, log=lambda line: None)
    return folder, counts


def test_quick_study_runs_every_cell(finished_study):
    folder, counts = finished_study
    cells = plan_cells(QUICK)
    assert counts == {"done": len(cells), "skipped": 0, "failed": 0}
    assert set(cell_states(folder).values()) == {"done"} and len(cell_states(folder)) == len(cells)
    assert [variant.name for variant in plan_variants(QUICK)] == ["original", "yarn@512"]
    assert (folder / "checkpoints" / "yarn@512" / "config.json").is_file()
    rows = row_counts(folder)
    evaluation = QUICK.evaluation
    assert rows["passkey/original"] == len(evaluation.passkey_lengths) * len(evaluation.passkey_depths) * evaluation.passkey_trials
    assert rows["uncertainty/yarn@512"] == rows["passkey/yarn@512"]
    assert rows["perplexity/original"] == len(evaluation.perplexity_lengths)


def test_rerun_skips_finished_cells(finished_study, tmp_path):
    folder, _ = finished_study
    before = row_counts(folder)
    counts = run_study(QUICK, folder, log=lambda line: None)
    assert counts == {"done": 0, "skipped": len(plan_cells(QUICK)), "failed": 0}
    assert row_counts(folder) == before


def test_killed_study_resumes_with_one_row_set_per_cell(finished_study, tmp_path):
    reference, _ = finished_study
    folder = tmp_path / "killed"
    command = [sys.executable, "-m", "ropescope", "study", "--quick", "--out", str(folder)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:  # kill it as soon as the second cell is recorded
        if (folder / DATABASE).exists() and sum(s == "done" for s in _states_or_empty(folder).values()) >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the study finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted = _states_or_empty(folder)
    assert 2 <= len(interrupted) < len(plan_cells(QUICK))
    counts = run_study(QUICK, folder, log=lambda line: None)
    assert counts["skipped"] >= 2 and counts["failed"] == 0
    assert counts["done"] + counts["skipped"] == len(plan_cells(QUICK))
    assert row_counts(folder) == row_counts(reference)
    with sqlite3.connect(folder / DATABASE) as connection, sqlite3.connect(reference / DATABASE) as other:
        query = "SELECT data FROM rows WHERE kind = 'perplexity' ORDER BY cell, rowid"
        ours = [json.loads(data)["perplexity"] for (data,) in connection.execute(query)]
        theirs = [json.loads(data)["perplexity"] for (data,) in other.execute(query)]
    assert ours == pytest.approx(theirs, rel=1e-4)  # the resumed study computes what an uninterrupted one does


def _states_or_empty(folder) -> dict:
    try:
        return cell_states(folder)
    except sqlite3.OperationalError:  # the runner is creating the database right now
        return {}


def test_a_crashing_cell_is_recorded_and_retried(finished_study, tmp_path, monkeypatch):
    folder = tmp_path / "crash"
    real = stages.perplexity
    calls = []

    def crash_once(study, variant):
        calls.append(variant.name)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(study, variant)

    monkeypatch.setattr(stages, "perplexity", crash_once)
    first = run_study(QUICK, folder, log=lambda line: None)
    assert first["failed"] == 1 and cell_states(folder)["perplexity/original"] == "failed"
    second = run_study(QUICK, folder, log=lambda line: None)
    assert second == {"done": 1, "skipped": len(plan_cells(QUICK)) - 1, "failed": 0}
    assert set(cell_states(folder).values()) == {"done"}


def test_force_redoes_every_cell(finished_study, tmp_path, monkeypatch):
    folder, _ = finished_study
    redone = []
    for stage in ("train", "perplexity", "passkey", "entropy", "patterns", "uncertainty"):
        monkeypatch.setattr(stages, stage, lambda study, variant, stage=stage: redone.append(stage) or [{"x": 1}])
    counts = run_study(QUICK, tmp_path / "forced", log=lambda line: None)
    assert counts["done"] == len(plan_cells(QUICK))
    redone.clear()
    counts = run_study(QUICK, tmp_path / "forced", force=True, log=lambda line: None)
    assert counts["done"] == len(plan_cells(QUICK)) and len(redone) == len(plan_cells(QUICK))


@pytest.mark.parametrize("text,message", [
    ("[trainig]\nsteps = 3", "unknown key 'trainig'; accepted: model, corpus, training"),
    ("[training]\nstepz = 3", "unknown key 'training.stepz'; accepted: lengths, steps"),
    ("[methods.a]\nmethod = 'warp'", "[methods.a]: unknown RoPE method 'warp'"),
    ("[methods.a]\nfactor = 2.0", "[methods.a] needs a 'method' key"),
    ("[training]\nlengths = [512, 0]", "'training.lengths' = [512, 0] must be a non-empty list of positive integers"),
    ("[evaluation]\nperplexity_lengths = [-256]", "'evaluation.perplexity_lengths' = [-256] must be"),
    ("[evaluation]\npasskey_depths = [0, 150]", "'evaluation.passkey_depths' = [0, 150] must be"),
    ("[training]\nsteps = 0", "'training.steps' = 0 must be a positive integer"),
    ("[evaluation]\npasskey_lengths = [1024, 512]", "must be sorted ascending"),
])
def test_bad_config_is_one_line_naming_the_key(text, message, tmp_path, capsys):
    path = tmp_path / "study.toml"
    path.write_text("[model]\npretrained_length = 256\n[methods.original]\nmethod = 'default'\n" + text)
    assert main(["study", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error
    assert not (tmp_path / "out").exists()


def test_config_parsing_fills_the_pretrained_length(tmp_path):
    config = parse_config({"model": {"pretrained_length": 512}, "methods": {"y": {"method": "yarn", "factor": 2.0}}})
    assert config.methods["y"].params["original_max_position_embeddings"] == 512
    with pytest.raises(RopescopeError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[model\n")
    with pytest.raises(RopescopeError, match="is not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_the_shipped_default_study_is_valid():
    config = load_config()
    assert set(config.methods) == {"original", "pi", "ntk", "yarn"}
    assert config.training.lengths == [512, 1024] and max(config.evaluation.perplexity_lengths) >= 4096
