"""The study runner: plan every (stage, variant) cell of a config, run what the results database lacks, and
record each cell in its own transaction. A rerun after a kill or a crash skips finished cells and retries failed
ones; `force` redoes everything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ropescope.study.config import StudyConfig
from ropescope.study.context import StageContext, Variant, plan_variants
from ropescope.study.execution import Recorder, is_finished, recorded_rows_reader, run_local
from ropescope.study.plan import Cell, plan_cells
from ropescope.study.stages import STAGES, Stage
from ropescope.study.store import DATABASE, ResultStore

__all__ = ["DATABASE", "Cell", "Variant", "plan_cells", "plan_variants", "run_study"]


def run_study(
    config: StudyConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
    stages: Sequence[Stage] = STAGES,
) -> dict:
    """Run every cell the database lacks; returns counts {'done', 'skipped', 'failed', 'blocked'}.

    stop_after: run at most this many cells, then return (for tests that interrupt a study).
    stages: the stage registry (tests replace a stage's `run`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = plan_cells(config, stages)
    with ResultStore(out / DATABASE) as store:
        store.set_meta("config", config.to_dict())
        store.set_meta("original_max_position_embeddings", config.model.original_max_position_embeddings)
        todo = [cell for cell in cells if force or not is_finished(store, out, cell)]
        recorder = Recorder(store, len(cells), len(cells) - len(todo), log)
        context = StageContext(config, out, recorded_rows_reader(store), progress)
        run_local(todo, context, recorder, force=force, stop_after=stop_after)
    return recorder.counts
