"""The study runner: plan every (stage, variant) cell of a config, run what the results database lacks, and
record each cell in its own transaction. A rerun after a kill or a crash skips finished cells and retries failed
ones; `force` redoes everything. Cells run here one after another (executor "local") or as Ray tasks ("ray").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from ropescope.errors import RopescopeError
from ropescope.io.results import check_output_folder, remove_stale_temporaries
from ropescope.model.load import ModelOptions, float32_for_want_of_bfloat16, load_tokenizer
from ropescope.model.resolve import read_model_config, resolve_model
from ropescope.model.patch import pretrained_rope, pretrained_rope_parameters, rotary_dim
from ropescope.study.cells import Cell, plan_cells
from ropescope.study.config import EXECUTORS, StudyConfig
from ropescope.study.context import StageContext, Variant, plan_variants, repeated_extensions
from ropescope.study.report.page import build_report
from ropescope.study.run.local import Recorder, recorded_rows_reader, run_local, still_to_run
from ropescope.study.run import ray as ray_executor
from ropescope.study.run.lock import folder_lock
from ropescope.study.run.store import DATABASE, ResultStore, check_database_file, remove_database, unpack_published
from ropescope.study.stage import Stage
from ropescope.study.stages import STAGES

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
    report: bool = False,
) -> dict:
    """Run every cell the database lacks; returns counts {'done', 'skipped', 'failed', 'blocked'}.

    executor: "local" or "ray"; None: the config's [execution] executor. address: the Ray cluster to join (None:
    the config's, else RAY_ADDRESS or a new local instance). stop_after: run at most this many cells, then return
    (for tests that interrupt a study). stages: the stage registry (tests replace a stage's `run`). report: build
    the report at the end, still holding the folder's lock.
    """
    executor = executor or config.execution.executor
    if executor not in EXECUTORS:
        raise RopescopeError(f"executor {executor!r} is unknown; accepted: {', '.join(EXECUTORS)}")
    check_resources(config, stages)
    cells = plan_cells(config, stages)
    out = Path(out).resolve()  # Ray workers have their own working directory
    # Check, then write: nothing exists in `out` before the model, the corpus and the folder are known good.
    check_inputs(config, stages)
    check_output_folder(out)
    if not force:
        unpack_published(out)  # a committed study resumes from its published copy
        check_database_file(out / DATABASE)
    if executor == "ray":
        return _run_with_ray(config, out, cells, force=force, progress=progress, stop_after=stop_after, log=log,
                             address=address or config.execution.address, report=report, stages=stages)
    out.mkdir(parents=True, exist_ok=True)
    with _opened(out, force) as store:
        recorder, todo = _start(config, out, cells, store, force, log)
        context = StageContext(config, out, recorded_rows_reader(store), progress)
        check_evaluation_dtype(context, store, log)
        run_local(todo, context, recorder, force=force, stop_after=stop_after)
        _report(out, report, log, stages)
    return recorder.counts


@contextmanager
def _opened(out: Path, force: bool):
    """The study folder's lock, held while its database is open: one writer per folder. `force` starts over
    with an empty database (a damaged one included)."""
    with folder_lock(out):
        remove_stale_temporaries(out)  # a killed run's; no one else writes here now
        if force:
            remove_database(out / DATABASE)
        with ResultStore(out / DATABASE) as store:
            yield store


def _report(out: Path, report: bool, log: Callable[[str], None], stages: Sequence[Stage]) -> None:
    """Build the report while the lock is held, so no other study writes the folder meanwhile."""
    if report:
        log(f"report: writing {out / 'report'} ...")
        build_report(out, stages)


def check_inputs(config: StudyConfig, stages: Sequence[Stage] = STAGES) -> None:
    """The model (config, tokenizer, weight headers) and every stage's inputs (each corpus split a stage reads,
    long enough for the longest length it is cut to) are readable: a bad input is one error line before any file
    is written, never a column of failed cells."""
    source = resolve_model(config.model.path)
    model_config = read_model_config(source)
    base, _ = pretrained_rope(model_config)
    dim = rotary_dim(model_config, pretrained_rope_parameters(model_config))
    repeated = repeated_extensions(config, dim, base)
    if repeated:
        first, second = repeated[0]
        raise RopescopeError(
            f"[methods.{first}] and [methods.{second}] are the same extension on this model (equal rotary "
            f"frequencies and scale at rotary dimension {dim}, base {base:g}): one model would count as two "
            f"variants; change or drop [methods.{second}]")
    tokenizer = load_tokenizer(source)
    context = StageContext(config, Path(), required_rows=lambda stage, variant: [])
    # the training stage's check last: it tokenizes the train split, the slowest check, and the validation split's
    # problems are the ones every variant meets
    for stage in sorted(stages, key=lambda stage: stage.writes_checkpoint):
        if stage.check_inputs:
            stage.check_inputs(config, context, tokenizer)


def _start(config: StudyConfig, out: Path, cells: list[Cell], store: ResultStore, force: bool,
           log) -> tuple[Recorder, list[Cell]]:
    """Record the config in the database; the recorder and the cells still to run."""
    store.set_meta("config", config.to_dict())
    store.set_meta("original_max_position_embeddings", config.model.original_max_position_embeddings)
    todo = still_to_run(store, out, cells, [variant.name for variant in plan_variants(config)], force)
    names = {cell.name for cell in todo}
    recorder = Recorder(store, len(cells), [cell for cell in cells if cell.name in names], log)  # stages in order
    if todo:
        log(f"{len(cells)} cells, {len(todo)} to run ({recorder.time_left()})")
    return recorder, todo


def check_evaluation_dtype(context: StageContext, store: ResultStore, log: Callable[[str], None]) -> None:
    """Say when this CPU evaluates the model in float32 for want of a native bfloat16 product (the configs' timings
    were measured with one), and warn when recorded perplexity or retrieval rows were computed in another dtype
    than this machine's (a study resumed elsewhere): the cells still to run would mix dtypes in one report."""
    dtype = context.evaluation_dtype
    if float32_for_want_of_bfloat16(context.config.model.path, ModelOptions(device=context.device)):
        log("note: this CPU has no native bfloat16 product (AVX512-BF16 or AMX), so the model evaluates in float32, "
            "slower than the timings the configs and docs give (a 16K forward of SmolLM2-135M: 2.8x)")
    others = sorted({row["dtype"] for kind in ("perplexity", "retrieval") for row in store.rows(kind)
                     if row.get("dtype")} - {dtype})
    if others:
        log(f"warning: recorded perplexity or retrieval rows were computed in {', '.join(others)}, and this machine "
            f"evaluates in {dtype}: new cells write {dtype} rows beside them (every row names its dtype); "
            f"--force reruns the study in one dtype")


def _run_with_ray(config: StudyConfig, out: Path, cells: list[Cell], *, force: bool, progress: bool | None,
                  stop_after: int | None, log, address: str | None, report: bool, stages: Sequence[Stage]) -> dict:
    with ray_executor.connected(address):  # imports Ray, which only this path needs
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            ray_executor.check_shared_storage(out)
        except RopescopeError:
            if created:
                out.rmdir()  # nothing written: the folder was new and the marker is gone
            raise
        with _opened(out, force) as store:
            recorder, todo = _start(config, out, cells, store, force, log)
            ray_executor.run_ray(todo, config, out, store, recorder, force=force, stop_after=stop_after,
                                 progress=progress)
            _report(out, report, log, stages)
    return recorder.counts


def check_resources(config: StudyConfig, stages: Sequence[Stage]) -> None:
    """[execution.resources] names stages of the registry (the registry is where stage names live)."""
    names = [stage.name for stage in stages]
    for stage in config.execution.resources:
        if stage not in names:
            raise RopescopeError(f"unknown stage 'execution.resources.{stage}'; accepted: {', '.join(names)}")
