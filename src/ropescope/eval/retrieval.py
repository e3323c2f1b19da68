"""Any retrieval task over lengths x depths x trials: greedy decoding, the task's score, one `RetrievalRow` each.

`evaluate_retrieval` runs a task on a loaded model (the command that loads one and writes the rows is
commands/retrieval.py). Tasks are `RetrievalTask`s (tasks/cases.py); the registry by name is tasks/registry.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ropescope.attention.uncertainty import AnswerReadout, layer_means
from ropescope.eval.decoding import retrieval_grid
from ropescope.io.rows import RetrievalRow
from ropescope.tasks.cases import CaseRequest, PromptCase, RetrievalTask


def case_builder(task: RetrievalTask, tokenizer, seed: int = 0, documents: Sequence[str] | None = None,
                 independent_haystacks: bool = False, independent_keys: bool = False):
    """build(length, depth, trial) -> PromptCase: the task's prompt of one point of the grid."""
    def build(length: int, depth_percent: float, trial: int) -> PromptCase:
        return task.build(CaseRequest(tokenizer, length, depth_percent, trial, seed, documents,
                                      independent_haystacks, independent_keys))

    return build


def build_cases(task: RetrievalTask, tokenizer, lengths, depths, trials: int, seed: int = 0,
                documents: Sequence[str] | None = None,
                independent_haystacks: bool = False,
                independent_keys: bool = False) -> dict[tuple[int, float, int], PromptCase]:
    """Every prompt of the grid by (length, depth, trial), as `evaluate_retrieval` would build them."""
    build = case_builder(task, tokenizer, seed, documents, independent_haystacks, independent_keys)
    return {(length, depth, trial): build(length, depth, trial)
            for length in lengths for depth in depths for trial in range(trials)}


def retrieval_row(task: RetrievalTask, case: PromptCase, continuation: str, depth_percent: float, trial: int,
                  seed: int, independent_haystacks: bool = False, labels: dict | None = None,
                  answer_attention: dict | None = None, independent_keys: bool = False) -> dict:
    """The row of one answered prompt, scored by its task; answer_attention: its answering query's attention as
    `attention.uncertainty.layer_means` gives it, where it was read."""
    score = task.score(continuation, case)
    return RetrievalRow(
        task=task.name, length=case.length, answer=case.answer, needle_start=case.needle_start,
        needle_end=case.needle_end, question_position=case.question_position, depth_percent=depth_percent,
        trial=trial, seed=seed, score=float(score.score), correct=bool(score.correct), prediction=score.prediction,
        facts=[[fact.start, fact.end, fact.role] for fact in case.facts],
        independent_haystacks=independent_haystacks, independent_keys=independent_keys,
        answer_attention=answer_attention,
    ).to_dict(labels)


def evaluate_retrieval(model, tokenizer, task: RetrievalTask, lengths, depths=(0, 25, 50, 75, 100),
                       trials: int = 5, seed: int = 0, documents: Sequence[str] | None = None,
                       independent_haystacks: bool = False, max_new_tokens: int | None = None,
                       batch_size: int | None = None, labels: dict | None = None, progress: bool | None = None,
                       read_attention: bool = False,
                       cases: Mapping[tuple[int, float, int], PromptCase] | None = None,
                       independent_keys: bool = False) -> list[dict]:
    """`task` over lengths x depths x trials on a loaded model; one `RetrievalRow` per trial, as a dict.

    lengths: positive token counts; depths: percents in 0..100. max_new_tokens: None takes the task's own (the
    most any prompt of a batch needs). batch_size: prompts per forward; None lets
    `eval.decoding.prompts_per_forward` choose by device and length. labels: fields every row starts with.
    read_attention: also read each prompt's answering-query attention (`answer_attention`'s numbers, as
    per-layer means) in the prefill that gives its first answer token, into the row's `answer_attention`: the
    uncertainty readout then needs no forward of its own. cases: the prompts by (length, depth, trial), built
    once (`build_cases`) when several models must answer the very same ones; None builds them. independent_keys:
    in the task's repeated filler, every (length, depth, trial) its own key and filler start (`CaseRequest`).
    """
    built = case_builder(task, tokenizer, seed, documents, independent_haystacks, independent_keys)

    def build(length: int, depth_percent: float, trial: int) -> PromptCase:
        return built(length, depth_percent, trial) if cases is None else cases[(length, depth_percent, trial)]

    grid = retrieval_grid(model, tokenizer, lengths, depths, trials, build,
                          max_new_tokens or (lambda case: task.max_new_tokens(tokenizer, case)),
                          batch_size, task.name, progress, AnswerReadout if read_attention else None)
    return [retrieval_row(task, case, continuation, depth, trial, seed, independent_haystacks, labels,
                          None if statistics is None else layer_means(statistics, case), independent_keys)
            for depth, trial, case, continuation, statistics in grid]

