"""The Ray executor: every cell a Ray task with its stage's resources, started as soon as the cells it requires
are recorded; independent cells run side by side as far as the cluster allows.

The driver (this process) is the only writer of the results database: a task returns its rows and the driver
records them in one transaction, as the local executor does. Tasks read and write checkpoints under the study
folder, which must therefore be on storage every node sees (checked before the first cell). A task whose worker
process or node dies is rerun by Ray up to `max_retries` times; an exception inside a stage is not retried (it
is recorded as a failed cell, like locally). A worker killed for memory (by Ray's memory monitor, which retries
such tasks by its own count, or by the OS) is recorded as a failed cell naming the memory its stage asked for and
the memory used, after at most `max_retries` reruns: each attempt is counted in a file under the study folder.
Ctrl-C cancels the outstanding tasks; recorded cells stay recorded.
"""

from __future__ import annotations

import re
import socket
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ropescope.errors import RopescopeError
from ropescope.study.cells import Cell
from ropescope.study.config import StudyConfig
from ropescope.study.context import StageContext, Variant, cell_name
from ropescope.study.run.local import Recorder, execute_cell, prepare
from ropescope.study.run.store import ResultStore
from ropescope.train.memory import peak_rss_bytes

# Ray is imported inside the functions that use it ("lazy"): an optional dependency, and a second of import time
# that a process which never runs a study on Ray should not pay. The runner imports this module at its top.

CONNECT_TIMEOUT_S = 10
ATTEMPTS_FOLDER = ".ropescope-attempts"  # one file per running cell: how many workers have started it
MARKER_TIMEOUT_S = 120  # a node that cannot start a zero-CPU task in this long is not answering


@contextmanager
def connected(address: str | None) -> Iterator[None]:
    """Inside: connected to the Ray instance this process already uses, or to `address` (None: RAY_ADDRESS or a
    new local instance), disconnected at the end when this call connected. Without Ray installed: a
    RopescopeError saying how to install it."""
    try:
        # lazy: Ray is optional, and only a study that runs on it imports it
        import ray
    except ModuleNotFoundError as error:
        if error.name.split(".")[0] != "ray":
            raise
        raise RopescopeError("the Ray executor needs Ray: pip install 'ropescope[ray]'") from None
    if ray.is_initialized():
        yield
        return
    _connect(address)
    try:
        yield
    finally:
        ray.shutdown()


def _connect(address: str | None) -> None:
    # lazy: Ray is optional, and only a study that runs on it imports it
    import ray

    if address and ":" in address:  # Ray retries an unreachable address without end: try it once first
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as error:
            raise RopescopeError(f"cannot reach a Ray cluster at {address!r}: {error}") from None
    try:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    except (ConnectionError, ValueError) as error:
        raise RopescopeError(f"cannot reach a Ray cluster at {address!r}: {error}") from None


def _read_marker(path: str) -> str | None:
    """Runs on a node: the marker's text, or None when the node does not see the file."""
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_shared_storage(out: Path) -> None:
    """Refuse (RopescopeError) when a node of the cluster does not see `out`: the driver writes a marker file,
    and one task per alive node reads it."""
    # lazy: Ray is optional, and only a study that runs on it imports it
    import ray

    token = uuid.uuid4().hex
    marker = out / f".ropescope-marker-{token}"
    marker.write_text(token)
    try:
        reader = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
        nodes = [node for node in ray.nodes() if node["Alive"]]
        on_node = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy
        answers = [reader.options(scheduling_strategy=on_node(node["NodeID"], soft=False)).remote(str(marker))
                   for node in nodes]
        try:
            seen = ray.get(answers, timeout=MARKER_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RopescopeError(f"Ray nodes did not answer within {MARKER_TIMEOUT_S}s whether they see {out}")
        blind = [node["NodeManagerAddress"] for node, text in zip(nodes, seen) if text != token]
        if blind:
            raise RopescopeError(
                f"the study folder {out} is not visible on Ray node(s) {', '.join(blind)}: give --out a path on "
                f"storage every node mounts")
    finally:
        marker.unlink(missing_ok=True)


@dataclass(frozen=True)
class Outcome:
    """What a cell's task sends back to the driver: its rows, or the error that stopped it."""

    rows: list[dict] | None
    seconds: float
    node: str  # where it ran: the Ray node's id and address
    error: str | None = None  # the traceback
    message: str | None = None  # one line


def _attempts_file(out: Path, cell: Cell) -> Path:
    return out / ATTEMPTS_FOLDER / cell.name.replace("/", "--")


def _count_attempt(out: Path, cell: Cell) -> int:
    """Runs on a worker: this attempt's number (1 for the first), counted on the shared study folder."""
    path = _attempts_file(out, cell)
    path.parent.mkdir(exist_ok=True)
    try:
        attempt = int(path.read_text()) + 1
    except (OSError, ValueError):
        attempt = 1
    path.write_text(str(attempt))
    return attempt


def asked_memory(config: StudyConfig, cell: Cell) -> str:
    """The memory the cell's stage asks Ray for, in words."""
    asked = config.execution.resources.get(cell.stage.name, {}).get("memory")
    return f"{asked / 2**30:.2f} GiB" if asked else "none (no [execution.resources] memory for the stage)"


def memory_failure(config: StudyConfig, cell: Cell, used: str) -> str:
    """The one line of a cell that ran out of memory: what its stage asked for, what was used, what to change."""
    return (f"out of memory: the stage asked Ray for memory {asked_memory(config, cell)}, and {used}; set "
            f"[execution.resources.{cell.stage.name}] memory to more than that, or give the cell a larger node")


def oom_usage(message: str) -> str:
    """What Ray's OutOfMemoryError message says was used: the worker's memory and the node's."""
    worker = re.search(r"memory used=([\d.]+\s*[KMGT]?i?B)", message)
    node = re.search(r"was ([\d.]+\s*[KMGT]?i?B)(?: used)? / ([\d.]+\s*[KMGT]?i?B)", message)
    used = ([f"the worker used {worker.group(1)}"] if worker else []) + \
        ([f"its node {node.group(1)} of {node.group(2)}"] if node else [])
    return (", ".join(used) or "no usage in Ray's message") + " when Ray's memory monitor killed it"


def run_cell_task(cell: Cell, config: StudyConfig, out: str, progress: bool | None,
                  required: dict[str, list[dict]]) -> Outcome:
    """Runs on a worker. A task given a GPU evaluates on it. A RopescopeError (a user mistake) propagates."""
    # lazy: Ray is optional, and only a study that runs on it imports it
    import ray

    def required_rows(stage: str, variant: Variant) -> list[dict]:
        return required[cell_name(stage, variant)]

    device = "cuda" if ray.get_gpu_ids() else "cpu"
    context = StageContext(config, Path(out), required_rows, progress, device=device)
    node = f"{ray.get_runtime_context().get_node_id()[:8]} ({ray.util.get_node_ip_address()})"
    attempt = _count_attempt(Path(out), cell)
    if attempt > config.execution.max_retries + 1:
        # Ray reruns a task its memory monitor killed by a count of its own (RAY_task_oom_retries): stop here.
        return Outcome(None, 0.0, node, None, (
            f"its worker died {attempt - 1} times, not retried again (killed for memory? the stage asked Ray for "
            f"memory {asked_memory(config, cell)})"))
    started = time.perf_counter()
    try:
        rows = execute_cell(cell, context)
    except RopescopeError:
        raise
    except Exception as error:  # recorded as a failed cell, retried on the next run
        message = f"{type(error).__name__}: {error}"
        if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
            peak = peak_rss_bytes()
            message = memory_failure(config, cell, f"the worker's peak resident memory was {peak / 2**30:.2f} GiB "
                                                   f"({message})")
        return Outcome(None, time.perf_counter() - started, node, traceback.format_exc(), message)
    return Outcome(rows, time.perf_counter() - started, node)


def warn_unschedulable(cells: Sequence[Cell], resources: dict[str, dict], log) -> None:
    """A stage asking for more of a resource than any node has would wait forever (unless an autoscaler adds
    such a node): say so once."""
    # lazy: Ray is optional, and only a study that runs on it imports it
    import ray

    largest: dict[str, float] = {}
    for node in ray.nodes():
        if node["Alive"]:
            for name, amount in node["Resources"].items():
                largest[name] = max(largest.get(name, 0.0), amount)
    for stage in dict.fromkeys(cell.stage.name for cell in cells):
        options = resources.get(stage, {})
        asked = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0),
                 "memory": options.get("memory", 0), **options.get("resources", {})}
        for name, amount in asked.items():
            if amount and amount > largest.get(name, 0.0):
                log(f"warning: stage {stage} asks for {name}={amount:g} but the largest Ray node has "
                    f"{largest.get(name, 0.0):g}: its cells wait until such a node joins")


def _outcome(reference, cell: Cell, config: StudyConfig, recorder: Recorder) -> Outcome:
    """A finished task's outcome; a worker that died (for memory or otherwise) as a failed outcome; a user mistake
    in the cell raised, as the local executor does."""
    # lazy: Ray is optional, and only a study that runs on it imports it
    import ray

    try:
        return ray.get(reference)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, RopescopeError):
            recorder.cancelled(cell)
            raise error.cause from None
        raise
    except ray.exceptions.OutOfMemoryError as error:  # Ray's memory monitor killed it and gave up retrying
        return Outcome(None, 0.0, "", str(error), memory_failure(config, cell, oom_usage(str(error))))
    except ray.exceptions.RayError as error:  # the worker or its node died, max_retries times over
        return Outcome(None, 0.0, "", str(error), f"{type(error).__name__} (after "
                       f"{config.execution.max_retries} retries)")


def run_ray(cells: Sequence[Cell], config: StudyConfig, out: Path, store: ResultStore, recorder: Recorder, *,
            force: bool, stop_after: int | None, progress: bool | None) -> None:
    """Submit each cell once the cells it requires are recorded; record each result as it arrives."""
    # lazy: Ray is optional, and only a study that runs on it imports it
    import ray

    execution = config.execution
    remote = ray.remote(run_cell_task)
    warn_unschedulable(cells, execution.resources, recorder.log)
    waiting = list(cells)
    running: dict[ray.ObjectRef, Cell] = {}
    try:
        while waiting or running:
            unrecorded = {cell.name for cell in waiting} | {cell.name for cell in running.values()}
            for cell in list(waiting):
                if stop_after is not None and recorder.counts["done"] + recorder.counts["failed"] + len(running) \
                        >= stop_after:
                    waiting.clear()
                    break
                if recorder.blocked(cell):
                    waiting.remove(cell)
                elif not any(name in unrecorded for name in cell.requires):
                    waiting.remove(cell)
                    prepare(cell, out, force)
                    _attempts_file(out, cell).unlink(missing_ok=True)  # a new submission counts from zero
                    required = {name: store.cell_rows(name) for name in cell.requires}
                    # One rerun more than asked: the task counts its attempts and fails the last one itself, with
                    # a line that says why, where Ray would only say that a worker died.
                    options = {"max_retries": execution.max_retries + 1, "name": cell.name,
                               **execution.resources.get(cell.stage.name, {})}
                    running[remote.options(**options).remote(cell, config, str(out), progress, required)] = cell
                    recorder.started(cell)
            if not running:
                assert not waiting, "cells wait on cells that never run"  # a registry out of order: a bug
                continue
            finished, _ = ray.wait(list(running), num_returns=1)
            for reference in finished:
                cell = running.pop(reference)
                _attempts_file(out, cell).unlink(missing_ok=True)
                outcome = _outcome(reference, cell, config, recorder)
                if outcome.rows is None:
                    recorder.failed(cell, outcome.error, outcome.message, outcome.seconds)
                else:
                    recorder.done(cell, outcome.rows, outcome.seconds, f" on node {outcome.node}")
    finally:
        # Ctrl-C, or a user mistake in one cell: nothing outstanding is recorded; the next run redoes it. A task
        # that has already finished is not cancelled: cancelling one as it finishes can crash Ray's driver.
        finished = set(ray.wait(list(running), num_returns=len(running), timeout=0)[0]) if running else set()
        for reference, cell in running.items():
            if reference not in finished:
                ray.cancel(reference, force=True)
            recorder.cancelled(cell)
        if running:
            recorder.log(f"cancelled {len(running)} running cells; the next run redoes them")
