"""What a retrieval task is: how it builds a prompt (`PromptCase`, with every inserted fact's token span) and how
it scores an answer (`Score`), declared once in a `RetrievalTask`. Task modules build on this; nothing else does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

NEEDLE, DISTRACTOR = "needle", "distractor"  # the roles of an inserted fact


@dataclass(frozen=True)
class Fact:
    """One inserted fact: its token span [start, end) in the prompt and its role (`NEEDLE`: the question asks for
    it; `DISTRACTOR`: looks alike, asked for by nothing)."""

    start: int
    end: int
    role: str = NEEDLE


@dataclass
class PromptCase:
    """One retrieval prompt with the exact token positions of what it hides and what it asks.

    input_ids: LongTensor[prompt_length], the whole prompt (special prefix tokens included), 1-D.
    answers: the strings a correct continuation contains (one for passkey and needle, several for multi-value).
    facts: every inserted fact, in prompt order; at least one is a `NEEDLE`.
    question_position: index of the last prompt token, whose next-token prediction starts the answer.
    """

    input_ids: torch.Tensor
    answers: tuple[str, ...]
    facts: tuple[Fact, ...]
    question_position: int

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def answer(self) -> str:
        """The expected answers as one text (a row's `answer`): the one answer, or several joined by ', '."""
        return ", ".join(self.answers)

    @property
    def needles(self) -> list[Fact]:
        return [fact for fact in self.facts if fact.role == NEEDLE]

    @property
    def needle_start(self) -> int:
        """Start of the first needle (the span a single-needle task hides)."""
        return self.needles[0].start

    @property
    def needle_end(self) -> int:
        return self.needles[0].end


def single_needle_case(ids: list[int], answer: str, needle_start: int, needle_end: int) -> PromptCase:
    """The case of a prompt that hides one needle at ids[needle_start:needle_end] and ends with its question."""
    return PromptCase(input_ids=torch.tensor(ids, dtype=torch.long), answers=(answer,),
                      facts=(Fact(needle_start, needle_end),), question_position=len(ids) - 1)


@dataclass(frozen=True)
class CaseRequest:
    """What a task's builder is asked for: one point of the grid and where its text may come from.

    documents: the haystack corpus (documents of text), for tasks that use one.
    independent_haystacks: every (length, depth, trial) gets its own haystack text from the corpus and its own
        values, instead of the task's usual haystack (tasks that have no usual one ignore it).
    independent_keys: in the task's usual (repeated) filler, every (length, depth, trial) gets its own values and
        its own start in the filler (passkey; tasks without such a filler ignore it).
    """

    tokenizer: object
    length: int
    depth_percent: float
    trial: int
    seed: int = 0
    documents: Sequence[str] | None = None
    independent_haystacks: bool = False
    independent_keys: bool = False


@dataclass(frozen=True)
class Score:
    """How one continuation scored: `score` in [0, 1], `correct` the task's pass/fail, `prediction` what was read."""

    score: float
    correct: bool
    prediction: str


@dataclass(frozen=True)
class RetrievalTask:
    """A retrieval task by name: `build(request) -> PromptCase` and `score(continuation, case) -> Score`.

    max_new_tokens(tokenizer, case): how many tokens greedy decoding generates for a case.
    uses_corpus: whether `build` always needs `request.documents` (every task needs them with independent
    haystacks).
    """

    name: str
    summary: str  # one line for `ropescope tasks`
    build: Callable[[CaseRequest], PromptCase]
    score: Callable[[str, PromptCase], Score]
    max_new_tokens: Callable[[object, PromptCase], int] = field(default=lambda tokenizer, case: 8)
    uses_corpus: bool = False


def needs_documents(task: RetrievalTask, independent_haystacks: bool) -> bool:
    """Whether building `task`'s prompts needs the haystack corpus: its own text comes from one, or every point of
    the grid takes its own window of one."""
    return task.uses_corpus or independent_haystacks
