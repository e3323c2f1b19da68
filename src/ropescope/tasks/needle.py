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
from pathlib import Path

from ropescope.errors import RopescopeError
from ropescope.tasks.cases import CaseRequest, PromptCase, RetrievalTask, Score, single_needle_case
from ropescope.eval.decoding import encode, special_prefix
from ropescope.tasks.haystack import haystack_ids, independent_haystack_ids, insert_facts
from ropescope.eval.retrieval import evaluate_retrieval, run_retrieval
from ropescope.model.load import ModelOptions
from ropescope.rope import RopeSpec

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


def evaluate_needle(model, tokenizer, documents: list[str], lengths, depths=(0, 25, 50, 75, 100), trials: int = 1,
                    seed: int = 0, needle: str = NEEDLE, question: str = QUESTION, answer: str = ANSWER,
                    max_new_tokens: int | None = None, batch_size: int = 4, labels: dict | None = None,
                    progress: bool | None = None) -> list[dict]:
    """Needle retrieval over lengths x depths x trials on a loaded model; one `RetrievalRow` per trial, as a dict.

    The texts and the haystack's size are as `check_needle_text` and `check_haystack` accept them.
    """
    return evaluate_retrieval(model, tokenizer, needle_task(needle, question, answer), lengths, depths, trials, seed,
                              documents, max_new_tokens=max_new_tokens, batch_size=batch_size, labels=labels,
                              progress=progress)


def check_needle_text(needle: str, question: str, answer: str) -> None:
    """Needle, question and answer are non-empty, and the answer has words to score."""
    for name, text in (("needle", needle), ("question", question), ("answer", answer)):
        if not text.strip():
            raise RopescopeError(f"{name}={text!r} is empty; give a non-empty sentence")
    if not _words(answer):
        raise RopescopeError(f"answer={answer!r} has no words or digits to score")


def run_needle(model: str = "default", method: str | RopeSpec = "default", *, lengths=(256, 512, 1024),
               depths=(0, 25, 50, 75, 100), trials: int = 1, seed: int = 0, factor: float | None = None,
               original_max_position_embeddings: int | None = None, corpus=None, split: str = "validation",
               independent_haystacks: bool = False, needle: str = NEEDLE, question: str = QUESTION,
               answer: str = ANSWER, max_new_tokens: int | None = None, batch_size: int = 4,
               options: ModelOptions | None = None, out="results/needle", progress: bool | None = None) -> list[dict]:
    """`ropescope needle`: load model and corpus, run the grid, and write out/needle.csv and out/needle.png.
    The texts and the haystack's size are checked before the weights load."""
    check_needle_text(needle, question, answer)
    return run_retrieval(needle_task(needle, question, answer), model, method, lengths=lengths, depths=depths,
                         trials=trials, seed=seed, factor=factor,
                         original_max_position_embeddings=original_max_position_embeddings, corpus=corpus,
                         split=split, independent_haystacks=independent_haystacks, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, options=options, out=Path(out), progress=progress)
