"""Running cells: what every executor shares (running one cell, recording its outcome with a progress line) and
the local executor, which runs the cells one after another in this process.
"""

from __future__ import annotations

import shutil
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ropescope.errors import RopescopeError
from ropescope.study.context import CellPieces, StageContext, Variant, cell_name, checkpoint_dir
from ropescope.study.cells import Cell
from ropescope.study.run.store import ResultStore


def execute_cell(cell: Cell, context: StageContext) -> list[dict]:
    """Run a cell's stage and label its rows with the variant and the cell."""
    rows = cell.stage.run(context, cell.variant)
    labels = context.labels(cell.variant).to_dict()
    return [{**labels, **row, "cell": cell.name} for row in rows]


def is_finished(store: ResultStore, out: Path, cell: Cell) -> bool:
    """Recorded with the same fingerprint, and a training cell's checkpoint still on disk."""
    if not store.is_done(cell.name, cell.fingerprint):
        return False
    return not cell.stage.writes_checkpoint or (checkpoint_dir(out, cell.variant) / "config.json").is_file()


def still_to_run(store: ResultStore, out: Path, cells: Sequence[Cell], variants: Sequence[str],
                 force: bool = False) -> list[Cell]:
    """The cells a run executes (all of them under `force`), variant by variant in the order of `variants` (the
    study's): each fine-tune followed by its own cells, so that a study stopped after any cell has lost at most one
    fine-tune's work. Without `force`: the cells not recorded under their fingerprint, and a recorded fine-tune
    whose checkpoint is gone (a published database holds none) only where one of those requires it."""
    unrecorded = {cell.name for cell in cells if force or not store.is_done(cell.name, cell.fingerprint)}
    required = {name for cell in cells if cell.name in unrecorded for name in cell.requires}
    todo = [cell for cell in cells
            if cell.name in unrecorded or (cell.name in required and not is_finished(store, out, cell))]
    order = {name: index for index, name in enumerate(variants)}
    return sorted(todo, key=lambda cell: order[cell.variant.name])  # stable: registry order within a variant


def prepare(cell: Cell, out: Path, force: bool) -> None:
    """A forced training cell starts from an empty checkpoint folder."""
    if force and cell.stage.writes_checkpoint:
        shutil.rmtree(checkpoint_dir(out, cell.variant), ignore_errors=True)


def cell_pieces(store: ResultStore, cell: Cell, force: bool) -> CellPieces:
    """The cell's pieces finished by an interrupted run (none under --force), and where each new one is kept."""
    saved = {} if force else store.pieces(cell.name, cell.fingerprint)
    return CellPieces(saved, lambda key, rows: store.keep_piece(cell.name, cell.fingerprint, key, rows))


def recorded_rows_reader(store: ResultStore) -> Callable[[str, Variant], list[dict]]:
    """`required_rows` for a StageContext that reads the recorded rows of a required cell from the database."""
    def required_rows(stage: str, variant: Variant) -> list[dict]:
        name = cell_name(stage, variant)
        rows = store.cell_rows(name)
        if not rows:
            raise RuntimeError(f"{name} has no recorded rows: it must finish before the cells that require it")
        return rows

    return required_rows


def cell_time_left(remaining: Mapping[str, int], timed: Mapping[str, Sequence[float]]) -> tuple[float, list[str]]:
    """Seconds of cell time the remaining cells should take, and the stages among them with no cell timed yet
    (left out of the sum, so the estimate is then a lower bound).

    remaining: stage -> cells of it still to finish. timed: stage -> seconds of its recorded cells. Each stage's
    remaining cells count at the mean of its timed ones: a stage's cells cost alike, stages do not (a fine-tune
    takes a minute, a pattern cell seconds).
    """
    left, untimed = 0.0, []
    for stage, count in remaining.items():
        if count <= 0:
            continue
        if timed.get(stage):
            left += count * sum(timed[stage]) / len(timed[stage])
        else:
            untimed.append(stage)
    return left, untimed


def format_duration(seconds: float) -> str:
    """`42 s`, `17 min`, `2 h 05 min`."""
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Recorder:
    """Records each finished cell in its own transaction and logs a line per cell with the study's counts and,
    on finished cells, the cell time left (`cell_time_left`, from every cell the database has timed).

    counts: done (run and recorded now), skipped (recorded before), failed (recorded as failed: retried on the
    next run), blocked (not run because a cell it requires failed now).
    """

    def __init__(self, store: ResultStore, total: int, todo: Sequence[Cell], log: Callable[[str], None]):
        self.store, self.total, self.log = store, total, log
        self.counts = {"done": 0, "skipped": total - len(todo), "failed": 0, "blocked": 0}
        self.running = 0
        self.unavailable: set[str] = set()  # cells that failed or were blocked in this run
        self.remaining = Counter(cell.stage.name for cell in todo)
        # earlier runs' cells too: a resumed study estimates from its first line
        self.timed: dict[str, list[float]] = defaultdict(list)
        for recorded in store.cells():
            if recorded["status"] == "done" and recorded["seconds"] is not None:
                self.timed[recorded["kind"]].append(recorded["seconds"])

    @property
    def pending(self) -> int:
        return self.total - sum(self.counts.values()) - self.running

    def status(self) -> str:
        recorded = self.counts["done"] + self.counts["skipped"]
        failed = self.counts["failed"] + self.counts["blocked"]
        return (f"running {self.running}, pending {self.pending}, done {recorded}/{self.total}"
                + (f", failed {failed}" if failed else ""))

    def time_left(self) -> str:
        seconds, untimed = cell_time_left(self.remaining, self.timed)
        if not untimed:
            return f"about {format_duration(seconds)} of cells left"
        not_timed = f"{', '.join(untimed)} not yet timed"
        timed_left = any(count > 0 and stage not in untimed for stage, count in self.remaining.items())
        return f"at least {format_duration(seconds)} of cells left, {not_timed}" if timed_left else not_timed

    def started(self, cell: Cell) -> None:
        self.running += 1
        self.log(f"{cell.name} ... ({self.status()})")

    def done(self, cell: Cell, rows: list[dict], seconds: float, where: str = "") -> None:
        """where: the machine that ran it, when not this process (" on node ...")."""
        self.store.record(cell.name, cell.stage.name, cell.variant.name, cell.fingerprint, rows, seconds)
        self.running -= 1
        self.counts["done"] += 1
        self.remaining[cell.stage.name] -= 1
        self.timed[cell.stage.name].append(seconds)
        left = f"; {self.time_left()}" if self.pending + self.running else ""
        self.log(f"{cell.name} done in {seconds:.1f}s{where} ({self.status()}{left})")

    def failed(self, cell: Cell, error: str, message: str, seconds: float) -> None:
        self.store.record_failure(cell.name, cell.stage.name, cell.variant.name, cell.fingerprint, error, seconds)
        self.running -= 1
        self.counts["failed"] += 1
        self.remaining[cell.stage.name] -= 1
        self.unavailable.add(cell.name)
        self.log(f"{cell.name} FAILED after {seconds:.1f}s: {message} ({self.status()})")

    def blocked(self, cell: Cell) -> bool:
        """True (and logged) when a cell this one requires failed or was blocked in this run: it is not run."""
        requirement = next((name for name in cell.requires if name in self.unavailable), None)
        if requirement is None:
            return False
        self.counts["blocked"] += 1
        self.remaining[cell.stage.name] -= 1
        self.unavailable.add(cell.name)
        self.log(f"{cell.name} not run: {requirement} failed ({self.status()})")
        return True

    def cancelled(self, cell: Cell) -> None:
        """A started cell that will not finish now (interrupted): nothing is recorded, the next run redoes it."""
        self.running -= 1


def run_local(cells: Sequence[Cell], context: StageContext, recorder: Recorder, *, force: bool,
              stop_after: int | None) -> None:
    """Run the cells in order in this process; a cell whose requirement failed in this run is not run."""
    for cell in cells:
        if stop_after is not None and recorder.counts["done"] + recorder.counts["failed"] >= stop_after:
            return
        if recorder.blocked(cell):
            continue
        prepare(cell, context.out, force)
        recorder.started(cell)
        started = time.perf_counter()
        context.pieces = cell_pieces(recorder.store, cell, force)
        try:
            rows = execute_cell(cell, context)
        except (KeyboardInterrupt, RopescopeError):
            recorder.cancelled(cell)
            raise
        except Exception as error:  # one broken cell must not sink the study; it is retried next run
            recorder.failed(cell, traceback.format_exc(), f"{type(error).__name__}: {error}",
                            time.perf_counter() - started)
            continue
        recorder.done(cell, rows, time.perf_counter() - started)
