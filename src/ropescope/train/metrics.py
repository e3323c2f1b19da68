"""What each optimizer step reports (`StepRecord`), and metrics.csv, where `ropescope train` keeps one row a step."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from ropescope.io.results import write_atomically

METRICS_FIELDS = ["step", "loss", "lr", "tokens_per_s"]


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step: `step` counts the steps done (1-based); `loss` is the global batch's mean; `lr` the rate
    the step used; `tokens_per_s` the global batch over the wall time since the previous step ended."""

    step: int
    loss: float
    lr: float
    tokens_per_s: float


def metrics_rows(path: Path, up_to_step: int) -> list[dict]:
    """The rows of metrics.csv at `path` (as strings) up to step `up_to_step`; [] when there is no file."""
    if not path.exists():
        return []
    with path.open(newline="") as file:
        return [row for row in csv.DictReader(file) if int(row["step"]) <= up_to_step]


class MetricsFile:
    """metrics.csv, written as the run goes: a resumed run first rewrites it with the rows its checkpoint has
    already produced (`after_step`), so no step is lost or repeated."""

    def __init__(self, path: Path, after_step: int):
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=METRICS_FIELDS)
        writer.writeheader()
        writer.writerows(metrics_rows(path, after_step))
        write_atomically(path, buffer.getvalue())
        self.file = path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=METRICS_FIELDS)

    def write(self, record: StepRecord) -> None:
        self.writer.writerow({"step": record.step, "loss": repr(record.loss), "lr": repr(record.lr),
                              "tokens_per_s": f"{record.tokens_per_s:.1f}"})
        self.file.flush()

    def close(self) -> None:
        self.file.close()
