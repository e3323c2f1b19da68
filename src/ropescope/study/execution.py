"""Running cells: what every executor shares (running one cell, recording its outcome with a progress line) and
the local executor, which runs the cells one after another in this process.
"""

from __future__ import annotations

import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from ropescope.errors import RopescopeError
from ropescope.study.context import StageContext, Variant, cell_name, checkpoint_dir
from ropescope.study.plan import Cell
from ropescope.study.store import ResultStore


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


def prepare(cell: Cell, out: Path, force: bool) -> None:
    """A forced training cell starts from an empty checkpoint folder."""
    if force and cell.stage.writes_checkpoint:
        shutil.rmtree(checkpoint_dir(out, cell.variant), ignore_errors=True)


def recorded_rows_reader(store: ResultStore) -> Callable[[str, Variant], list[dict]]:
    """`required_rows` for a StageContext that reads the recorded rows of a required cell from the database."""
    def required_rows(stage: str, variant: Variant) -> list[dict]:
        name = cell_name(stage, variant)
        rows = store.cell_rows(name)
        if not rows:
            raise RuntimeError(f"{name} has no recorded rows: it must finish before the cells that require it")
        return rows

    return required_rows


class Recorder:
    """Records each finished cell in its own transaction and logs a line per cell with the study's counts.

    counts: done (run and recorded now), skipped (recorded before), failed (recorded as failed: retried on the
    next run), blocked (not run because a cell it requires failed now).
    """

    def __init__(self, store: ResultStore, total: int, skipped: int, log: Callable[[str], None]):
        self.store, self.total, self.log = store, total, log
        self.counts = {"done": 0, "skipped": skipped, "failed": 0, "blocked": 0}
        self.running = 0
        self.unavailable: set[str] = set()  # cells that failed or were blocked in this run

    @property
    def pending(self) -> int:
        return self.total - sum(self.counts.values()) - self.running

    def status(self) -> str:
        recorded = self.counts["done"] + self.counts["skipped"]
        failed = self.counts["failed"] + self.counts["blocked"]
        return (f"running {self.running}, pending {self.pending}, done {recorded}/{self.total}"
                + (f", failed {failed}" if failed else ""))

    def started(self, cell: Cell) -> None:
        self.running += 1
        self.log(f"{cell.name} ... ({self.status()})")

    def done(self, cell: Cell, rows: list[dict], seconds: float, where: str = "") -> None:
        """where: the machine that ran it, when not this process (" on node ...")."""
        self.store.record(cell.name, cell.stage.name, cell.variant.name, cell.fingerprint, rows, seconds)
        self.running -= 1
        self.counts["done"] += 1
        self.log(f"{cell.name} done in {seconds:.1f}s{where} ({self.status()})")

    def failed(self, cell: Cell, error: str, message: str, seconds: float) -> None:
        self.store.record_failure(cell.name, cell.stage.name, cell.variant.name, cell.fingerprint, error, seconds)
        self.running -= 1
        self.counts["failed"] += 1
        self.unavailable.add(cell.name)
        self.log(f"{cell.name} FAILED after {seconds:.1f}s: {message} ({self.status()})")

    def blocked(self, cell: Cell) -> bool:
        """True (and logged) when a cell this one requires failed or was blocked in this run: it is not run."""
        requirement = next((name for name in cell.requires if name in self.unavailable), None)
        if requirement is None:
            return False
        self.counts["blocked"] += 1
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
