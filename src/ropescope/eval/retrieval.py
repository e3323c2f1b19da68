"""Any retrieval task over lengths x depths x trials: greedy decoding, the task's score, one `RetrievalRow` each.

`evaluate_retrieval` runs a task on a loaded model; `run_retrieval` is a command's whole run (load, evaluate,
write out/<task>.csv and out/<task>.png). Tasks are `RetrievalTask`s (eval/cases.py); the registry by name is
eval/tasks.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ropescope.tasks.cases import CaseRequest, PromptCase, RetrievalTask
from ropescope.eval.decoding import retrieval_grid
from ropescope.model.load import ModelOptions
from ropescope.rope import RopeSpec
from ropescope.io.rows import RetrievalRow


def case_builder(task: RetrievalTask, tokenizer, seed: int = 0, documents: Sequence[str] | None = None,
                 independent_haystacks: bool = False):
    """build(length, depth, trial) -> PromptCase: the task's prompt of one grid cell."""
    def build(length: int, depth_percent: float, trial: int) -> PromptCase:
        return task.build(CaseRequest(tokenizer, length, depth_percent, trial, seed, documents,
                                      independent_haystacks))

    return build


def needs_documents(task: RetrievalTask, independent_haystacks: bool) -> bool:
    return task.uses_corpus or independent_haystacks


def retrieval_row(task: RetrievalTask, case: PromptCase, continuation: str, depth_percent: float, trial: int,
                  seed: int, independent_haystacks: bool = False, labels: dict | None = None) -> dict:
    """The row of one answered prompt, scored by its task."""
    score = task.score(continuation, case)
    return RetrievalRow(
        task=task.name, length=case.length, answer=case.answer, needle_start=case.needle_start,
        needle_end=case.needle_end, question_position=case.question_position, depth_percent=depth_percent,
        trial=trial, seed=seed, score=float(score.score), correct=bool(score.correct), prediction=score.prediction,
        facts=[[fact.start, fact.end, fact.role] for fact in case.facts],
        independent_haystacks=independent_haystacks,
    ).to_dict(labels)


def evaluate_retrieval(model, tokenizer, task: RetrievalTask, lengths, depths=(0, 25, 50, 75, 100),
                       trials: int = 5, seed: int = 0, documents: Sequence[str] | None = None,
                       independent_haystacks: bool = False, max_new_tokens: int | None = None,
                       batch_size: int = 8, labels: dict | None = None, progress: bool | None = None) -> list[dict]:
    """`task` over lengths x depths x trials on a loaded model; one `RetrievalRow` per trial, as a dict.

    lengths: positive token counts; depths: percents in 0..100. max_new_tokens: None takes the task's own (the
    most any prompt of a batch needs). labels: fields every row starts with.
    """
    build = case_builder(task, tokenizer, seed, documents, independent_haystacks)
    grid = retrieval_grid(model, tokenizer, lengths, depths, trials, build,
                          max_new_tokens or (lambda case: task.max_new_tokens(tokenizer, case)),
                          batch_size, task.name, progress)
    return [retrieval_row(task, case, continuation, depth, trial, seed, independent_haystacks, labels)
            for depth, trial, case, continuation in grid]


def run_retrieval(task: RetrievalTask, model: str = "default", method: str | RopeSpec = "default", *,
                  lengths=(256, 512, 1024), depths=(0, 25, 50, 75, 100), trials: int = 5, seed: int = 0,
                  factor: float | None = None, original_max_position_embeddings: int | None = None, corpus=None,
                  split: str = "validation", independent_haystacks: bool = False, max_new_tokens: int | None = None,
                  batch_size: int = 8, options: ModelOptions | None = None, out: str | Path | None = None,
                  progress: bool | None = None) -> list[dict]:
    """Load the model (extended by `method`) and the corpus where the task needs one, run the grid, and write
    out/<task>.csv and out/<task>.png (out: results/<task> by default). The shortest and the longest prompt are
    built before the weights load, so a too-short length or a too-small corpus fails first."""
    from ropescope.io.data import load_corpus
    from ropescope.tasks.haystack import check_haystack
    from ropescope.model.load import extension_specs, load, load_tokenizer
    from ropescope.model.resolve import resolve_model
    from ropescope.io.plots import plot_retrieval
    from ropescope.io.results import write_rows

    source = resolve_model(model)
    (spec,) = extension_specs(source, [method], factor, original_max_position_embeddings)
    tokenizer = load_tokenizer(source)
    documents = load_corpus(corpus, split=split) if needs_documents(task, independent_haystacks) else None
    if documents is not None:
        check_haystack(tokenizer, documents, max(lengths))
    build = case_builder(task, tokenizer, seed, documents, independent_haystacks)
    build(min(lengths), depths[0], 0)
    build(max(lengths), depths[-1], trials - 1)
    loaded = load(source, spec, options)
    rows = evaluate_retrieval(loaded.model, loaded.tokenizer, task, lengths, depths, trials, seed, documents,
                              independent_haystacks, max_new_tokens, batch_size, labels=loaded.labels.to_dict(),
                              progress=progress)
    out = Path(out or f"results/{task.name}")
    write_rows(rows, out / f"{task.name}.csv")
    plot_retrieval(rows, out / f"{task.name}.png", title=f"{task.name}: {source.name}, {loaded.labels.method}")
    return rows
