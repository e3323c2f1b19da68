"""The retrieval tasks by name: `TASKS`. Adding a task is one module declaring a `RetrievalTask` (tasks/cases.py)
and one line in `_BUILT_IN` below; `register` adds one from anywhere else (a test, a user's script)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ropescope.errors import RopescopeError
from ropescope.tasks import needle
from ropescope.tasks import passkey
from ropescope.tasks import ruler
from ropescope.io.rows import as_bool
from ropescope.tasks.cases import CaseRequest, PromptCase, RetrievalTask, needs_documents

_BUILT_IN: tuple[RetrievalTask, ...] = (
    passkey.TASK,
    needle.TASK,
    *ruler.TASKS,
)

TASKS: dict[str, RetrievalTask] = {}


def register(task: RetrievalTask) -> RetrievalTask:
    """Add a task under its name (registering the same task again is allowed; another one under a taken name is
    refused); returns it, so a module can write `TASK = register(RetrievalTask(...))`."""
    if TASKS.get(task.name, task) is not task:
        raise RopescopeError(f"a retrieval task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


for _task in _BUILT_IN:
    register(_task)


def get_task(name: str) -> RetrievalTask:
    """The registered task `name`, or an error naming the accepted ones."""
    if name not in TASKS:
        raise RopescopeError(f"unknown retrieval task {name!r}; accepted: {', '.join(TASKS)}")
    return TASKS[name]


def rebuild_cases(tokenizer, rows: Sequence[Mapping], *, documents: Sequence[str] | None = None,
                  seed: int = 0) -> list[PromptCase]:
    """The prompt of every retrieval row, rebuilt deterministically by its task's builder.

    A row's own `seed` wins over `seed`; rows of corpus tasks (or independent haystacks) need the documents the
    evaluation used. Prompts are rebuilt with the task's own texts (`retrieval_attention` checks the spans).
    """
    cases = []
    for row in rows:
        task = get_task(row.get("task"))
        independent = as_bool(row.get("independent_haystacks") or False)
        if needs_documents(task, independent) and documents is None:
            raise RopescopeError(f"{task.name} rows need the haystack documents to rebuild their prompts")
        row_seed = row.get("seed")
        cases.append(task.build(CaseRequest(
            tokenizer, int(row["length"]), float(row["depth_percent"]), int(row["trial"]),
            seed if row_seed in (None, "") else int(row_seed), documents, independent,
            as_bool(row.get("independent_keys") or False))))
    return cases
