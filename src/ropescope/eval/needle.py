"""Needle in a haystack (after gkamradt's LLMTest_NeedleInAHaystack): a sentence hidden in real text, asked about.

The haystack is corpus text (documents joined by blank lines) cut to fill the prompt exactly; the needle goes
in at the sentence boundary at or before `depth_percent` of the haystack; the prompt ends with the question,
worded so a base model completes it with the answer. Scores: `correct` when the answer appears in the greedy
continuation (case and punctuation ignored), and `score`, the ROUGE-1 recall of the answer's words in the
continuation (each answer word counted at most as often as it appears in the continuation).
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from pathlib import Path

import torch

from ropescope.errors import RopescopeError
from ropescope.eval.cases import PromptCase
from ropescope.eval.decoding import encode, retrieval_grid, special_prefix
from ropescope.models import ModelOptions
from ropescope.rope import RopeSpec
from ropescope.rows import NeedleRow

NEEDLE = "The secret ingredient of the king's pie is a spoonful of wild honey."
QUESTION = "What is the secret ingredient of the king's pie? The secret ingredient of the king's pie is"
ANSWER = "a spoonful of wild honey"

DOCUMENT_SEPARATOR = "\n\n"
QUESTION_SEPARATOR = "\n\n"
SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")
SENTENCE_SEARCH_TOKENS = 200  # how far back from the exact depth to look for a sentence end


@functools.lru_cache(maxsize=256)
def _document_ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(encode(tokenizer, text + DOCUMENT_SEPARATOR))


def haystack_ids(tokenizer, documents: list[str], start_document: int, needed: int) -> list[int]:
    """`needed` tokens of the documents joined by blank lines, from `start_document` on (wrapping round)."""
    ids: list[int] = []
    for step in range(len(documents)):
        ids.extend(_document_ids(tokenizer, documents[(start_document + step) % len(documents)]))
        if len(ids) >= needed:
            return ids[:needed]
    raise RopescopeError(
        f"the haystack corpus has {len(ids)} tokens in all; a prompt of this length needs {needed} of haystack"
    )


def corpus_token_count(tokenizer, documents: list[str], needed: int) -> int:
    """Tokens of the documents joined (counting stops once `needed` is reached)."""
    total = 0
    for document in documents:
        total += len(_document_ids(tokenizer, document))
        if total >= needed:
            break
    return total


def _sentence_boundary(tokenizer, ids: list[int], target: int) -> int:
    """The index at or before `target` that follows a sentence end (`target` itself if none is near)."""
    if target <= 0 or target >= len(ids):
        return max(0, min(target, len(ids)))
    for index in range(target, max(0, target - SENTENCE_SEARCH_TOKENS), -1):
        if SENTENCE_END.search(tokenizer.decode(ids[index - 1 : index])):
            return index
    return target


def needle_case(tokenizer, haystack_documents: list[str], length: int, depth_percent: float, trial: int,
                seed: int = 0, needle: str = NEEDLE, question: str = QUESTION, answer: str = ANSWER) -> PromptCase:
    """The needle prompt of exactly `length` tokens: [special prefix] haystack with the needle at depth, question.

    The trial (and seed) picks the document the haystack starts from, so trials see different text.
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
    start_document = random.Random(f"needle:{seed}:{trial}").randrange(len(haystack_documents))
    haystack = haystack_ids(tokenizer, haystack_documents, start_document, haystack_length)
    insert_at = _sentence_boundary(tokenizer, haystack, round(haystack_length * depth_percent / 100))
    ids = prefix + haystack[:insert_at] + needle_ids + haystack[insert_at:] + question_ids
    needle_start = len(prefix) + insert_at
    return PromptCase(
        input_ids=torch.tensor(ids, dtype=torch.long),
        answer=answer.strip(),
        needle_start=needle_start,
        needle_end=needle_start + len(needle_ids),
        question_position=len(ids) - 1,
    )


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


def evaluate_needle(model, tokenizer, documents: list[str], lengths, depths=(0, 25, 50, 75, 100), trials: int = 1,
                    seed: int = 0, needle: str = NEEDLE, question: str = QUESTION, answer: str = ANSWER,
                    max_new_tokens: int | None = None, batch_size: int = 4, labels: dict | None = None,
                    progress: bool | None = None) -> list[dict]:
    """Needle retrieval over lengths x depths x trials on a loaded model; one `NeedleRow` per trial, as a dict.

    The texts and the haystack's size are as `check_needle_text` and `check_haystack` accept them.
    """
    if max_new_tokens is None:
        max_new_tokens = len(encode(tokenizer, " " + answer)) + 8
    rows = []
    grid = retrieval_grid(
        model, tokenizer, lengths, depths, trials,
        lambda length, depth, trial: needle_case(tokenizer, documents, length, depth, trial, seed, needle, question,
                                                 answer),
        max_new_tokens, batch_size, "needle", progress)
    for depth, trial, case, continuation in grid:
        exact, recall = score_needle(continuation, case.answer)
        rows.append(NeedleRow(
            length=case.length, answer=case.answer, needle_start=case.needle_start, needle_end=case.needle_end,
            question_position=case.question_position, depth_percent=depth, trial=trial, seed=seed, score=recall,
            correct=exact, prediction=continuation.strip(), needle=needle, question=question,
        ).to_dict(labels))
    return rows


def check_needle_text(needle: str, question: str, answer: str) -> None:
    """Needle, question and answer are non-empty, and the answer has words to score."""
    for name, text in (("needle", needle), ("question", question), ("answer", answer)):
        if not text.strip():
            raise RopescopeError(f"{name}={text!r} is empty; give a non-empty sentence")
    if not _words(answer):
        raise RopescopeError(f"answer={answer!r} has no words or digits to score")


def check_haystack(tokenizer, documents: list[str], longest: int) -> None:
    """The corpus must hold at least `longest` tokens of haystack in all."""
    if not documents:
        raise RopescopeError("the haystack corpus has no documents")
    total = corpus_token_count(tokenizer, documents, longest)
    if total < longest:
        raise RopescopeError(
            f"the haystack corpus is {total} tokens long; the longest length {longest} needs at least {longest}"
        )


def run_needle(model: str = "default", method: str | RopeSpec = "default", *, lengths=(256, 512, 1024),
               depths=(0, 25, 50, 75, 100), trials: int = 1, seed: int = 0, factor: float | None = None,
               original_max_position_embeddings: int | None = None, corpus=None, split: str = "validation",
               needle: str = NEEDLE, question: str = QUESTION, answer: str = ANSWER,
               max_new_tokens: int | None = None, batch_size: int = 4, options: ModelOptions | None = None,
               out="results/needle", progress: bool | None = None) -> list[dict]:
    """`ropescope needle`: load model and corpus, run the grid, and write out/needle.csv and out/needle.png.
    The texts and the haystack's size are checked before the weights load."""
    from ropescope.data import load_corpus
    from ropescope.models import extension_specs, load, load_tokenizer, resolve_model
    from ropescope.plots import plot_retrieval_heatmap
    from ropescope.results import write_rows

    source = resolve_model(model)
    (spec,) = extension_specs(source, [method], factor, original_max_position_embeddings)
    check_needle_text(needle, question, answer)
    documents = load_corpus(corpus, split=split)
    check_haystack(load_tokenizer(source), documents, max(lengths))
    loaded = load(source, spec, options)
    rows = evaluate_needle(loaded.model, loaded.tokenizer, documents, lengths, depths, trials, seed, needle,
                           question, answer, max_new_tokens, batch_size, labels=loaded.labels.to_dict(),
                           progress=progress)
    out = Path(out)
    write_rows(rows, out / "needle.csv")
    plot_retrieval_heatmap(rows, out / "needle.png", title=f"needle: {source.name}, {loaded.labels.method}")
    return rows
