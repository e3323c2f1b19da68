"""Wall time of a study with the local executor against the Ray executor with N workers, and Ray's overhead per
cell (task start, argument and result transfer) against the cell's own time.

1. local: `run_study(config)` in this process, cells one after another, one torch thread (as a Ray task of one
   CPU has: the same thread count gives the same numbers).
2. ray: a local Ray instance of N CPUs (started first, its start reported apart), `run_study(..., executor="ray")`,
   twice: first on fresh worker processes (each imports torch and transformers), then again into a new folder on
   the warm workers.
3. overhead: every cell of (2) once more as a Ray task, one at a time on warm workers; a cell's overhead is the
   driver's submit-to-result time less the time the cell measured inside its task.
Both studies must give the same rows (checked, timing fields aside). Target: median overhead <= 5% of the median
cell time.

    PYTHONPATH=src python benchmarks/study_parallel.py                      # the quick study, 2 workers
    PYTHONPATH=src python benchmarks/study_parallel.py --config study.toml --workers 4
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

TIMING = {"tokens_per_s"}


def rows_by_cell(folder: Path) -> dict[str, list[dict]]:
    from ropescope.study.run.store import DATABASE

    with sqlite3.connect(folder / DATABASE) as connection:
        cells: dict[str, list[dict]] = {}
        for cell, data in connection.execute("SELECT cell, data FROM rows ORDER BY rowid"):
            cells.setdefault(cell, []).append({k: v for k, v in json.loads(data).items() if k not in TIMING})
    return cells


def cell_seconds(folder: Path) -> dict[str, float]:
    from ropescope.study.run.store import DATABASE

    with sqlite3.connect(folder / DATABASE) as connection:
        return dict(connection.execute("SELECT cell, seconds FROM cells"))


def serial_overheads(config, folder: Path) -> list[tuple[str, float, float]]:
    """(cell, seconds inside the task, driver-side seconds) for each cell run alone as a Ray task."""
    import ray

    from ropescope.study.cells import plan_cells
    from ropescope.study.run.ray import run_cell_task
    from ropescope.study.run.store import DATABASE, ResultStore

    remote = ray.remote(run_cell_task)
    results = []
    with ResultStore(folder / DATABASE) as store:
        for cell in plan_cells(config):
            required = {name: store.cell_rows(name) for name in cell.requires}
            started = time.perf_counter()
            outcome = ray.get(remote.remote(cell, config, str(folder), False, required))
            results.append((cell.name, outcome.seconds, time.perf_counter() - started))
    return results


def main() -> None:
    import ray
    import torch

    from ropescope.study.config import load_study_config, quick_config_path
    from ropescope.study.stages import STAGES
    from ropescope.study.run.runner import run_study

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="study TOML (default: the shipped quick study)")
    parser.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray instance")
    args = parser.parse_args()
    config = load_study_config(args.config or quick_config_path(), STAGES)
    with tempfile.TemporaryDirectory() as scratch:
        local, remote, warm = Path(scratch) / "local", Path(scratch) / "ray", Path(scratch) / "warm"
        torch.set_num_threads(1)
        started = time.perf_counter()
        run_study(config, local, log=lambda line: None)
        local_wall = time.perf_counter() - started

        started = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - started
        started = time.perf_counter()
        run_study(config, remote, executor="ray", log=lambda line: None)
        ray_wall = time.perf_counter() - started
        started = time.perf_counter()
        run_study(config, warm, executor="ray", log=lambda line: None)
        warm_wall = time.perf_counter() - started
        assert rows_by_cell(local) == rows_by_cell(remote) == rows_by_cell(warm), "Ray's rows differ from local's"
        overheads = serial_overheads(config, remote)
        ray.shutdown()
        cells = cell_seconds(local)

    median_cell = statistics.median(cells.values())
    per_cell = [driver - inside for _, inside, driver in overheads]
    median_overhead = statistics.median(per_cell)
    print(f"{len(cells)} cells; median cell {median_cell:.2f}s (local executor)\n")
    print("| run | wall time (s) |\n|---|---:|")
    print(f"| local executor | {local_wall:.1f} |")
    print(f"| Ray, {args.workers} workers, fresh worker processes (instance start {ray_start:.1f}s apart) "
          f"| {ray_wall:.1f} |")
    print(f"| Ray, {args.workers} workers, warm worker processes | {warm_wall:.1f} |")
    print(f"\nspeed-up {local_wall / ray_wall:.2f}x (fresh), {local_wall / warm_wall:.2f}x (warm)\n")
    print("| cell | inside the task (s) | submit to result (s) | overhead (s) |\n|---|---:|---:|---:|")
    for name, inside, driver in overheads:
        print(f"| {name} | {inside:.3f} | {driver:.3f} | {driver - inside:.3f} |")
    print(f"\nmedian overhead {median_overhead * 1000:.1f} ms = {100 * median_overhead / median_cell:.1f}% of the "
          f"median cell (target <= 5%); largest {max(per_cell) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
