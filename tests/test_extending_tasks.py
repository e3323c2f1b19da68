"""The worked example of docs/tasks.md, as a user would add it: the colour task in a module of its own outside the
package (the documented module and one `register` call), with no file of the package changed, runs through
`ropescope retrieval`, a quick study's retrieval stage and the uncertainty readout of both."""

import importlib.util
import re
from pathlib import Path

import pytest

from ropescope.cli import main
from ropescope.io.results import read_rows
from ropescope.study.config import load_study_config, quick_config_path
from ropescope.study.stages import STAGES
from ropescope.study.run.runner import run_study
from ropescope.study.run.store import DATABASE, ResultStore
from ropescope.tasks.registry import TASKS

DOCS = Path(__file__).parents[1] / "docs" / "tasks.md"


@pytest.fixture
def colour_task(tmp_path):
    """The documented module, written where a user keeps a script, imported, registered; unregistered after (and
    any other task of that name put back, as tests/test_eval_tasks.py registers its own)."""
    source = DOCS.read_text().split("```python\n")[1].split("```")[0]
    module_path = tmp_path / "colour_task.py"
    module_path.write_text(source + "\nfrom ropescope.tasks.registry import register\n\nregister(TASK)\n")
    previous = TASKS.pop("colour", None)
    spec = importlib.util.spec_from_file_location("colour_task", module_path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        assert TASKS["colour"] is module.TASK
        yield module.TASK
    finally:
        TASKS.pop("colour", None)
        if previous is not None:
            TASKS["colour"] = previous


@pytest.mark.slow
def test_a_task_in_its_own_module_runs_through_the_command_the_study_and_the_readout(colour_task, tmp_path, capsys):
    out = tmp_path / "colour"
    assert main(["retrieval", "--task", "colour", "--lengths", "128,256", "--depths", "0,100", "--trials", "2",
                 "--out", str(out)]) == 0
    rows = read_rows(out / "colour.csv")
    assert len(rows) == 8 and {row["task"] for row in rows} == {"colour"} and (out / "colour.png").is_file()
    assert main(["uncertainty", str(out / "colour.csv"), "--out", str(tmp_path / "uncertainty")]) == 0
    attention = read_rows(tmp_path / "uncertainty" / "uncertainty.csv")
    assert len(attention) == 8 and all(0 < row["distractor_mass"] < 1 for row in attention)
    assert "default colour: entropy correct" in capsys.readouterr().out

    quick = quick_config_path().read_text()
    assert re.search(r'^tasks = \["passkey"\]$', quick, re.MULTILINE)
    config_path = tmp_path / "quick.toml"
    config_path.write_text(re.sub(r'^tasks = \["passkey"\]$', 'tasks = ["passkey", "colour"]', quick,
                                  flags=re.MULTILINE))
    study = tmp_path / "study"
    assert run_study(load_study_config(config_path, STAGES), study, log=lambda line: None, report=True)["failed"] == 0
    with ResultStore(study / DATABASE) as store:
        assert {row["task"] for row in store.rows("retrieval")} == {"passkey", "colour"}
        assert "colour" in {row["task"] for row in store.rows("uncertainty")}
    summary = (study / "report" / "summary.md").read_text()
    assert "colour@256" in summary and re.search(r"^\| colour \| \d+ \|", summary, re.MULTILINE)
    assert (study / "report" / "figures" / "colour.png").is_file()
