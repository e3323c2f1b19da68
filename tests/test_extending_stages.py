"""The worked example of extending a study: a new stage is one module and one registry entry, with no file of the
package changed. The stage below lives in a module written to a temporary folder; it declares its own config
table, requires the retrieval cells, and draws its own report figure. It runs in the quick study, its cells are
fingerprinted and skipped on a rerun, and its rows reach the report."""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
import tomllib

import pytest

from ropescope.errors import RopescopeError
from ropescope.study.cells import plan_cells
from ropescope.study.config import parse_config, quick_config_path
from ropescope.study.run.runner import DATABASE, run_study
from ropescope.study.stages import STAGES

# The whole new stage: its config table ([accuracy]), its settings (the fingerprint), its run and rows, and its
# figure. A reader adding a stage to ropescope writes this module under study/stages/ and adds `accuracy.STAGE` to
# `STAGES`.
STAGE_MODULE = '''
from collections import defaultdict
from dataclasses import dataclass, field
from statistics import mean

import matplotlib.pyplot as plt

from ropescope.errors import RopescopeError
from ropescope.io import plots
from ropescope.study.config import ConfigTable, check_fraction
from ropescope.study.stage import Stage, StageFigure


@dataclass(frozen=True)
class AccuracySection:
    threshold: float = field(default=0.5, metadata={"check": check_fraction})  # the accuracy a length must keep
    lengths: list[int] = field(default_factory=lambda: [256, 512])


def check_accuracy(section, source):
    if len(section.lengths) > 8:
        raise RopescopeError(f"{source}: 'accuracy.lengths' holds {len(section.lengths)} lengths; at most 8")


def settings(config, variant):
    return {"threshold": config.accuracy.threshold, "lengths": config.accuracy.lengths}


def run(context, variant):
    """Retrieval accuracy per length of this variant's retrieval cell, and whether it keeps the threshold."""
    scores = defaultdict(list)
    for row in context.required_rows("retrieval", variant):
        scores[row["length"]].append(float(row["score"]))
    threshold = context.config.accuracy.threshold
    return [{"length": length, "accuracy": mean(scores[length]), "kept": mean(scores[length]) >= threshold}
            for length in context.config.accuracy.lengths if scores[length]]


def draw(rows, path):
    figure, axis = plt.subplots(figsize=(5, 3))
    by_variant = defaultdict(list)
    for row in rows:
        by_variant[row["variant"]].append((row["length"], row["accuracy"]))
    for variant, points in by_variant.items():
        axis.plot(*zip(*sorted(points)), marker="o", label=variant)
    axis.set(xlabel="context length (tokens)", ylabel="retrieval accuracy")
    axis.legend(fontsize=8)
    return plots.save_figure(figure, path)


def figures(report):
    rows = report.rows["accuracy"]
    if not rows:
        return []
    return [StageFigure("accuracy", "Retrieval accuracy per length", "Mean score per length and variant.",
                        lambda path: draw(rows, path))]


STAGE = Stage("accuracy", run, settings, requires=("train", "retrieval"),
              table=ConfigTable("accuracy", AccuracySection, check=check_accuracy), figures=figures)
'''


@pytest.fixture(scope="module")
def accuracy(tmp_path_factory):
    """The new stage's module, imported from a temporary folder."""
    path = tmp_path_factory.mktemp("extension") / "accuracy_stage.py"
    path.write_text(STAGE_MODULE)
    spec = importlib.util.spec_from_file_location("accuracy_stage", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["accuracy_stage"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["accuracy_stage"]


@pytest.fixture(scope="module")
def stages(accuracy):
    return (*STAGES, accuracy.STAGE)  # the registry with one entry more


def quick_config(stages, table: str = "[accuracy]\nthreshold = 0.75\n"):
    return parse_config(tomllib.loads(quick_config_path().read_text() + table), stages, source="quick.toml")


def test_the_stage_declares_its_config_table(stages):
    config = quick_config(stages)
    assert config.accuracy.threshold == 0.75 and config.accuracy.lengths == [256, 512]
    assert list(config.to_dict())[:9] == ["model", "corpus", "methods", "training", "evaluation", "retrieval",
                                           "analysis", "intervention", "accuracy"]
    with pytest.raises(RopescopeError, match=r"'accuracy.threshold' = 2 must be a number in \[0, 1\)"):
        quick_config(stages, "[accuracy]\nthreshold = 2\n")
    with pytest.raises(RopescopeError, match="unknown key 'accuracy.colour'; accepted: threshold, lengths"):
        quick_config(stages, "[accuracy]\ncolour = 1\n")
    with pytest.raises(RopescopeError, match="'accuracy.lengths' holds 9 lengths; at most 8"):
        quick_config(stages, "[accuracy]\nlengths = [1, 2, 3, 4, 5, 6, 7, 8, 9]\n")
    # without the stage in the registry, its table is an unknown key
    with pytest.raises(RopescopeError, match="unknown key 'accuracy'"):
        quick_config(STAGES)


def test_its_cells_are_fingerprinted_by_its_settings_alone(stages):
    before = {cell.name: cell.fingerprint for cell in plan_cells(quick_config(stages), stages)}
    assert [name for name in before if name.startswith("accuracy/")] == ["accuracy/original", "accuracy/yarn@512"]
    # the cells of the registered stages keep the fingerprints they have without the new stage
    assert {name: value for name, value in before.items() if not name.startswith("accuracy/")} == {
        cell.name: cell.fingerprint for cell in plan_cells(quick_config(STAGES, ""), STAGES)}
    after = {cell.name: cell.fingerprint
             for cell in plan_cells(quick_config(stages, "[accuracy]\nthreshold = 0.25\n"), stages)}
    assert {name for name in before if before[name] != after[name]} == {"accuracy/original", "accuracy/yarn@512"}


def test_it_runs_in_the_quick_study_and_reaches_the_report(stages, tmp_path):
    config = quick_config(stages)
    lines = []
    counts = run_study(config, tmp_path, stages=stages, log=lines.append, report=True)
    assert counts["failed"] == 0 and counts["done"] == len(plan_cells(config, stages))
    with sqlite3.connect(tmp_path / DATABASE) as db:
        recorded = dict(db.execute("SELECT cell, config_hash FROM cells WHERE cell LIKE 'accuracy/%'").fetchall())
        rows = db.execute("SELECT COUNT(*) FROM rows WHERE kind = 'accuracy'").fetchone()[0]
    assert recorded == {cell.name: cell.fingerprint for cell in plan_cells(config, stages)
                        if cell.stage.name == "accuracy"}
    assert rows == 4  # two variants, two lengths
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "![Retrieval accuracy per length](figures/accuracy.png)" in summary
    assert (tmp_path / "report" / "figures" / "accuracy.png").stat().st_size > 0

    # a rerun finds every cell, the new stage's included, and runs none
    again = run_study(config, tmp_path, stages=stages, log=lines.append)
    assert again["done"] == 0 and again["skipped"] == counts["done"]
    # a change to its table reruns its cells alone
    changed = run_study(quick_config(stages, "[accuracy]\nthreshold = 0.25\n"), tmp_path, stages=stages,
                        log=lines.append)
    assert changed["done"] == 2 and changed["skipped"] == counts["done"] - 2
