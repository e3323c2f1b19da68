"""The study runner: plan every (stage, variant) cell of a config, run what the results database lacks, and
record each cell in its own transaction. A rerun after a kill or a crash skips finished cells and retries failed
ones; `force` redoes everything. Cells run here one after another (executor "local") or as Ray tasks ("ray").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ropescope.errors import RopescopeError
from ropescope.study.config import EXECUTORS, StudyConfig
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
    executor: str | None = None,
    address: str | None = None,
    stages: Sequence[Stage] = STAGES,
) -> dict:
    """Run every cell the database lacks; returns counts {'done', 'skipped', 'failed', 'blocked'}.

    executor: "local" or "ray"; None: the config's [execution] executor. address: the Ray cluster to join (None:
    the config's, else RAY_ADDRESS or a new local instance). stop_after: run at most this many cells, then return
    (for tests that interrupt a study). stages: the stage registry (tests replace a stage's `run`).
    """
    executor = executor or config.execution.executor
    if executor not in EXECUTORS:
        raise RopescopeError(f"executor {executor!r} is unknown; accepted: {', '.join(EXECUTORS)}")
    check_resources(config, stages)
    cells = plan_cells(config, stages)
    out = Path(out).resolve()  # Ray workers have their own working directory
    if executor == "ray":
        return _run_with_ray(config, out, cells, force=force, progress=progress, stop_after=stop_after, log=log,
                             address=address or config.execution.address)
    out.mkdir(parents=True, exist_ok=True)
    with ResultStore(out / DATABASE) as store:
        recorder, todo = _start(config, out, cells, store, force, log)
        context = StageContext(config, out, recorded_rows_reader(store), progress)
        run_local(todo, context, recorder, force=force, stop_after=stop_after)
    return recorder.counts


def _start(config: StudyConfig, out: Path, cells: list[Cell], store: ResultStore, force: bool,
           log) -> tuple[Recorder, list[Cell]]:
    """Record the config in the database; the recorder and the cells still to run."""
    store.set_meta("config", config.to_dict())
    store.set_meta("original_max_position_embeddings", config.model.original_max_position_embeddings)
    todo = [cell for cell in cells if force or not is_finished(store, out, cell)]
    return Recorder(store, len(cells), len(cells) - len(todo), log), todo


def _run_with_ray(config: StudyConfig, out: Path, cells: list[Cell], *, force: bool, progress: bool | None,
                  stop_after: int | None, log, address: str | None) -> dict:
    try:
        from ropescope.study import ray_executor
    except ModuleNotFoundError as error:
        if error.name.split(".")[0] != "ray":
            raise
        raise RopescopeError("the Ray executor needs Ray: pip install 'ropescope[ray]'") from None
    with ray_executor.connected(address):
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            ray_executor.check_shared_storage(out)
        except RopescopeError:
            if created:
                out.rmdir()  # nothing written: the folder was new and the marker is gone
            raise
        with ResultStore(out / DATABASE) as store:
            recorder, todo = _start(config, out, cells, store, force, log)
            ray_executor.run_ray(todo, config, out, store, recorder, force=force, stop_after=stop_after,
                                 progress=progress)
    return recorder.counts


def check_resources(config: StudyConfig, stages: Sequence[Stage]) -> None:
    """[execution.resources] names stages of the registry (the registry is where stage names live)."""
    names = [stage.name for stage in stages]
    for stage in config.execution.resources:
        if stage not in names:
            raise RopescopeError(f"unknown stage 'execution.resources.{stage}'; accepted: {', '.join(names)}")
