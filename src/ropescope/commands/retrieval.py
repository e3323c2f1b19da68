"""`ropescope retrieval`, `passkey`, `needle` and `tasks`: any registered retrieval task, from a model name to
out/<task>.csv and out/<task>.png. Passkey and needle are retrieval tasks like any other; their commands keep
their own defaults (needle: one haystack per point and its own texts)."""

from __future__ import annotations

import functools
from pathlib import Path

from ropescope.eval.retrieval import case_builder, evaluate_retrieval
from ropescope.io.data import load_corpus
from ropescope.io.plots import plot_retrieval
from ropescope.io.results import write_rows
from ropescope.model.load import ModelOptions, extension_specs, load, load_tokenizer
from ropescope.model.resolve import resolve_model
from ropescope.rope import RopeSpec
from ropescope.tasks.cases import RetrievalTask, needs_documents
from ropescope.tasks.haystack import check_haystack
from ropescope.tasks.needle import ANSWER, NEEDLE, QUESTION, check_needle_text, needle_task
from ropescope.tasks.registry import TASKS, get_task


def run_retrieval(task: str | RetrievalTask = "passkey", model: str = "default", method: str | RopeSpec = "default",
                  *, lengths=(256, 512, 1024), depths=(0, 25, 50, 75, 100), trials: int = 5, seed: int = 0,
                  factor: float | None = None, original_max_position_embeddings: int | None = None, corpus=None,
                  split: str = "validation", independent_haystacks: bool = False, max_new_tokens: int | None = None,
                  batch_size: int | None = None, options: ModelOptions | None = None, out: str | Path | None = None,
                  progress: bool | None = None) -> list[dict]:
    """`ropescope retrieval --task NAME`: load the model (extended by `method`) and the corpus where the task needs
    one, run the grid, and write out/<task>.csv and out/<task>.png (out: results/<task> by default).

    task: a registered name (`ropescope tasks`) or a `RetrievalTask`. The shortest and the longest prompt are
    built before the weights load, so a too-short length or a too-small corpus fails first.
    """
    task = get_task(task) if isinstance(task, str) else task
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


# `ropescope passkey`: the passkey task with the retrieval command's own defaults (5 keys per point)
run_passkey = functools.partial(run_retrieval, "passkey", out="results/passkey")


def run_needle(model: str = "default", method: str | RopeSpec = "default", *, needle: str = NEEDLE,
               question: str = QUESTION, answer: str = ANSWER, lengths=(256, 512, 1024),
               depths=(0, 25, 50, 75, 100), trials: int = 1, seed: int = 0, factor: float | None = None,
               original_max_position_embeddings: int | None = None, corpus=None, split: str = "validation",
               independent_haystacks: bool = False, max_new_tokens: int | None = None, batch_size: int | None = None,
               options: ModelOptions | None = None, out="results/needle", progress: bool | None = None) -> list[dict]:
    """`ropescope needle`: `run_retrieval` of the needle task with these texts (checked before anything loads);
    one haystack per point by default."""
    check_needle_text(needle, question, answer)
    return run_retrieval(needle_task(needle, question, answer), model, method, lengths=lengths, depths=depths,
                         trials=trials, seed=seed, factor=factor,
                         original_max_position_embeddings=original_max_position_embeddings, corpus=corpus,
                         split=split, independent_haystacks=independent_haystacks, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, options=options, out=out, progress=progress)


def list_tasks() -> str:
    """`ropescope tasks`: one line per registered task, its name and summary."""
    width = max(map(len, TASKS))
    return "\n".join(f"{task.name:<{width}}  {task.summary}" for task in TASKS.values())
