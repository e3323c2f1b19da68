"""A study killed at random moments (SIGKILL, and once Ctrl-C) and run again each time ends with every cell
recorded once and the report of an uninterrupted run."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import time

import pytest

from ropescope.study.run.store import DATABASE
from tests.helpers import TINY_STUDY, study_command

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # progress lines arrive as printed
VOLATILE = {"tokens_per_s"}  # wall-clock measurements: the only values two runs may differ in
ATTEMPTS = 7  # killed within 1.2 s of starting work; its 11 cells take about 3 s, its report 2 s


def _rows(folder) -> dict[str, list[dict]]:
    """{cell: its rows, volatile keys aside}, for the cells recorded as done."""
    with sqlite3.connect(folder / DATABASE) as connection:
        done = [cell for (cell,) in connection.execute("SELECT cell FROM cells WHERE status = 'done'")]
        rows = {cell: [] for cell in done}
        for cell, data in connection.execute("SELECT cell, data FROM rows ORDER BY rowid"):
            rows[cell].append({key: value for key, value in json.loads(data).items() if key not in VOLATILE})
    connection.close()
    return rows


def _cell_states(folder) -> list[tuple[str, str]]:
    with sqlite3.connect(folder / DATABASE) as connection:
        states = list(connection.execute("SELECT cell, status FROM cells ORDER BY cell"))
    connection.close()
    return states


def _run(config, out) -> subprocess.CompletedProcess:
    return subprocess.run(study_command(config, out), capture_output=True, text=True, timeout=300, env=ENV)


def test_a_study_killed_at_random_moments_ends_as_an_uninterrupted_one(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_STUDY)
    reference = _run(config, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    moments = random.Random(15)
    outcomes = []
    for attempt in range(ATTEMPTS):
        study = subprocess.Popen(study_command(config, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=ENV)
        study.stdout.readline()  # its cell count, its first cell or its report: the study holds the folder
        time.sleep(moments.uniform(0.0, 1.2))
        interrupt = attempt == 3  # once as Ctrl-C does, the other times without warning
        study.send_signal(signal.SIGINT if interrupt else signal.SIGKILL)
        _, err = study.communicate(timeout=120)
        outcomes.append((study.returncode, len(_cell_states(out)) if (out / DATABASE).exists() else 0))
        if interrupt and study.returncode == 130:
            assert err.strip().splitlines() == ["ropescope: interrupted; run the same command again to continue"]
    print("exit codes and cells recorded after each attempt:", outcomes)
    killed = [code for code, _ in outcomes if code in (-signal.SIGKILL, 130)]
    assert len(killed) >= 5, outcomes  # most moments fell while the study was still running

    final = _run(config, out)
    assert final.returncode == 0, final.stderr
    assert _cell_states(out) == _cell_states(tmp_path / "reference")
    assert all(status == "done" for _, status in _cell_states(out))
    assert _rows(out) == _rows(tmp_path / "reference")
    report = (out / "report" / "summary.md").read_text()
    assert report == (tmp_path / "reference" / "report" / "summary.md").read_text()
    assert not [path for path in out.rglob("*") if ".tmp" in path.name]  # no temporary left behind
