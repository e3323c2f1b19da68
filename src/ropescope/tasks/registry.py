"""The retrieval tasks by name: `TASKS`. Adding a task is one module declaring a `RetrievalTask` (eval/cases.py)
and one line in `_BUILT_IN` below; `register` adds one from anywhere else (a test, a user's script)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ropescope.errors import RopescopeError
from ropescope.tasks import needle
from ropescope.tasks import passkey
from ropescope.tasks import ruler
from ropescope.tasks.cases import CaseRequest, PromptCase, RetrievalTask
from ropescope.eval.retrieval import needs_documents, run_retrieval
from ropescope.io.rows import as_bool

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


def list_tasks() -> str:
    """One line per registered task: its name and summary (`ropescope tasks`)."""
    width = max(map(len, TASKS))
    return "\n".join(f"{task.name:<{width}}  {task.summary}" for task in TASKS.values())


def run_task(task: str = "passkey", model: str = "default", method="default", *, lengths=(256, 512, 1024),
             depths=(0, 25, 50, 75, 100), trials: int = 5, seed: int = 0, factor: float | None = None,
             original_max_position_embeddings: int | None = None, corpus=None, split: str = "validation",
             independent_haystacks: bool = False, max_new_tokens: int | None = None, batch_size: int = 8,
             options=None, out=None, progress: bool | None = None) -> list[dict]:
    """`ropescope retrieval --task NAME`: `run_retrieval` of the registered task (out: results/NAME by default)."""
    return run_retrieval(get_task(task), model, method, lengths=lengths, depths=depths, trials=trials, seed=seed,
                         factor=factor, original_max_position_embeddings=original_max_position_embeddings,
                         corpus=corpus, split=split, independent_haystacks=independent_haystacks,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, options=options, out=out,
                         progress=progress)


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
            seed if row_seed in (None, "") else int(row_seed), documents, independent)))
    return cases
