"""The retrieval stage: every configured retrieval task over one grid of lengths, depths and trials ([retrieval]).
Tasks need nothing here: they come from the task registry (tasks/registry.py); rows carry their task."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ropescope.eval.retrieval import evaluate_retrieval
from ropescope.io import plots
from ropescope.study.config import ConfigTable, StudyConfig, distinct_names
from ropescope.study.context import StageContext, Variant
from ropescope.study.stage import ReportInputs, Stage, StageFigure
from ropescope.tasks.cases import needs_documents
from ropescope.tasks.registry import TASKS, get_task


@dataclass(frozen=True)
class RetrievalSection:
    """The retrieval tasks every variant runs (`ropescope tasks` lists them) and their one grid."""

    tasks: list[str] = field(default_factory=lambda: ["passkey"],
                             metadata={"check": distinct_names(TASKS, "task names")})
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    depths: list[float] = field(default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0])
    trials: int = 4  # per task, length and depth
    # every (length, depth, trial) its own corpus text and values, so no two trials of a stratum share filler
    independent_haystacks: bool = False
    # in the repeated filler, every (length, depth, trial) its own key and its own start in the filler's cycle, so
    # that prompts share only the task's five sentences and question, not a key (passkey; ignored with haystacks)
    independent_keys: bool = False


def settings(config: StudyConfig, variant: Variant) -> dict:
    found = asdict(config.retrieval)
    if not found["independent_keys"]:
        del found["independent_keys"]  # the prompts as before the key existed: their cells keep their fingerprints
    return found


def run(context: StageContext, variant: Variant) -> list[dict]:
    """Every configured retrieval task over the retrieval grid; rows carry their task. Each (task, length, depth)
    point is one piece of the cell: its prompts form their own batches whether the grid runs whole or point by
    point, so a resumed cell gives the rows of an uninterrupted one."""
    model, tokenizer = context.load(variant)
    retrieval = context.config.retrieval
    rows = []
    for name in retrieval.tasks:
        task = get_task(name)
        documents = (context.documents("validation") if needs_documents(task, retrieval.independent_haystacks)
                     else None)
        for length in retrieval.lengths:
            for depth in retrieval.depths:
                key = f"{name} {length} {depth:g}"
                point = context.pieces.get(key)
                if point is None:
                    point = evaluate_retrieval(
                        model, tokenizer, task, [length], [depth], trials=retrieval.trials,
                        seed=context.config.seed, documents=documents,
                        independent_haystacks=retrieval.independent_haystacks, progress=context.progress,
                        read_attention=True,  # the uncertainty stage reads it: no second forward
                        independent_keys=retrieval.independent_keys)
                    context.pieces.put(key, point)
                rows += point
    return rows


def task_of(row: dict) -> str:
    """A retrieval row's task (rows written before the task registry are passkey rows)."""
    return row.get("task", "passkey")


def task_names(retrieval_rows: list[dict], config: dict | None = None) -> list[str]:
    """The retrieval tasks of the rows, in the recorded config's order where it names them."""
    configured = list(((config or {}).get("retrieval") or {}).get("tasks") or [])
    seen = list(dict.fromkeys(task_of(row) for row in retrieval_rows))
    return [task for task in configured if task in seen] + [task for task in seen if task not in configured]


def figures(report: ReportInputs) -> list[StageFigure]:
    """One figure per task: score per length and depth, one panel per variant."""
    rows = report.rows["retrieval"]
    found = []
    for task in task_names(rows, report.config):
        task_rows = [row for row in rows if task_of(row) == task]
        found.append(StageFigure(
            task, f"Retrieval: {task}", "Score per context length and depth, one panel per variant.",
            lambda path, task_rows=task_rows, task=task: plots.plot_retrieval(
                task_rows, path, title=f"{task}: score per length and depth")))
    return found


STAGE = Stage("retrieval", run, settings, requires=("train", "scale_fit"),
              table=ConfigTable("retrieval", RetrievalSection), figures=figures)
