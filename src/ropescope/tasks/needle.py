"""Needle in a haystack (after gkamradt's LLMTest_NeedleInAHaystack): a sentence hidden in real text, asked about.

The haystack is corpus text (documents joined by blank lines) cut to fill the prompt exactly; the needle goes
in at the sentence boundary at or before `depth_percent` of the haystack; the prompt ends with the question,
worded so a base model completes it with the answer. Scores: `correct` when the answer appears in the greedy
continuation (case and punctuation ignored), and `score`, the ROUGE-1 recall of the answer's words in the
continuation (each answer word counted at most as often as it appears in the continuation).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence

from ropescope.errors import RopescopeError
from ropescope.tasks.cases import CaseRequest, PromptCase, RetrievalTask, Score, single_needle_case
from ropescope.tasks.haystack import haystack_ids, independent_haystack_ids, insert_facts
from ropescope.tasks.text import encode, special_prefix

NEEDLE = "The secret ingredient of the king's pie is a spoonful of wild honey."
QUESTION = "What is the secret ingredient of the king's pie? The secret ingredient of the king's pie is"
ANSWER = "a spoonful of wild honey"

QUESTION_SEPARATOR = "\n\n"


def needle_case(tokenizer, haystack_documents: Sequence[str], length: int, depth_percent: float, trial: int,
                seed: int = 0, needle: str = NEEDLE, question: str = QUESTION, answer: str = ANSWER,
                independent_haystacks: bool = False) -> PromptCase:
    """The needle prompt of exactly `length` tokens: [special prefix] haystack with the needle at depth, question.

    The trial (and seed) picks the document the haystack starts from, so trials see different text; with
    independent haystacks, each trial has its own window of the corpus (`independent_haystack_ids`).
    """
    if not haystack_documents:
        raise RopescopeError("the haystack corpus has no documents")
    prefix = special_prefix(tokenizer)
    needle_ids = encode(tokenizer, " " + needle.strip())
    question_ids = encode(tokenizer, QUESTION_SEPARATOR + question.strip())
    haystack_length = length - len(prefix) - len(needle_ids) - len(question_ids)
    if haystack_length < 0:
        raise RopescopeError(
            f"length={length} is too short for the needle and question; it needs at least "
            f"{length - haystack_length} tokens"
        )
    if independent_haystacks:
        haystack = independent_haystack_ids(tokenizer, haystack_documents, haystack_length, seed=seed, length=length,
                                            depth_percent=depth_percent, trial=trial)
    else:
        start_document = random.Random(f"needle:{seed}:{trial}").randrange(len(haystack_documents))
        haystack = haystack_ids(tokenizer, haystack_documents, start_document, haystack_length)
    body, (fact,) = insert_facts(tokenizer, haystack, [(needle_ids, depth_percent, "needle")], len(prefix))
    return single_needle_case(prefix + body + question_ids, answer.strip(), fact.start, fact.end)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def score_needle(continuation: str, answer: str) -> tuple[bool, float]:
    """(exact: the answer's words appear in order in the continuation, ROUGE-1 recall of the answer's words)."""
    answer_words, continuation_words = _words(answer), _words(continuation)
    if not answer_words:
        return False, 0.0
    exact = f" {' '.join(answer_words)} " in f" {' '.join(continuation_words)} "
    overlap = Counter(answer_words) & Counter(continuation_words)
    return exact, sum(overlap.values()) / len(answer_words)


def needle_task(needle: str = NEEDLE, question: str = QUESTION, answer: str = ANSWER) -> RetrievalTask:
    """The needle task with these texts (the registered one has the defaults)."""
    def build(request: CaseRequest) -> PromptCase:
        return needle_case(request.tokenizer, request.documents or [], request.length, request.depth_percent,
                           request.trial, request.seed, needle, question, answer, request.independent_haystacks)

    def score(continuation: str, case: PromptCase) -> Score:
        exact, recall = score_needle(continuation, case.answer)
        return Score(recall, exact, continuation.strip())

    return RetrievalTask(
        name="needle", summary="a sentence hidden in corpus text; correct when its answer's words appear in order",
        build=build, score=score, uses_corpus=True,
        max_new_tokens=lambda tokenizer, case: len(encode(tokenizer, " " + case.answer)) + 8,
    )


TASK = needle_task()


def check_needle_text(needle: str, question: str, answer: str) -> None:
    """Needle, question and answer are non-empty, and the answer has words to score."""
    for name, text in (("needle", needle), ("question", question), ("answer", answer)):
        if not text.strip():
            raise RopescopeError(f"{name}={text!r} is empty; give a non-empty sentence")
    if not _words(answer):
        raise RopescopeError(f"answer={answer!r} has no words or digits to score")

