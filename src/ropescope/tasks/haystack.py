"""Haystacks from corpus text, and facts inserted into them at depths: what the corpus-based tasks share.

A haystack is token ids of corpus documents joined by blank lines. `haystack_ids` takes it from one document on
(the needle task's trials differ by their starting document); `independent_haystack_ids` gives every trial of a
(length, depth) stratum its own disjoint window of a seeded shuffle of the corpus, so no two trials share text.
`insert_facts` puts facts at sentence boundaries near their depths and returns where each one landed.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence

from ropescope.errors import RopescopeError
from ropescope.tasks.cases import Fact
from ropescope.tasks.text import encode

DOCUMENT_SEPARATOR = "\n\n"
SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")
SENTENCE_SEARCH_TOKENS = 200  # how far back from the exact depth to look for a sentence end


@functools.lru_cache(maxsize=256)
def _document_ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(encode(tokenizer, text + DOCUMENT_SEPARATOR))


def _stream(tokenizer, documents: Sequence[str], order: Sequence[int], needed: int) -> list[int]:
    """The first `needed` tokens of the documents taken in `order` (wrapping round), joined by blank lines."""
    ids: list[int] = []
    for step in range(len(order)):
        ids.extend(_document_ids(tokenizer, documents[order[step]]))
        if len(ids) >= needed:
            return ids[:needed]
    raise RopescopeError(
        f"the haystack corpus has {len(ids)} tokens in all; a prompt of this length needs {needed} of haystack"
    )


def haystack_ids(tokenizer, documents: Sequence[str], start_document: int, needed: int) -> list[int]:
    """`needed` tokens of the documents joined by blank lines, from `start_document` on (wrapping round)."""
    order = [(start_document + step) % len(documents) for step in range(len(documents))]
    return _stream(tokenizer, documents, order, needed)


def independent_haystack_ids(tokenizer, documents: Sequence[str], needed: int, *, seed: int, length: int,
                             depth_percent: float, trial: int) -> list[int]:
    """`needed` (<= `length`) tokens of haystack for one trial, disjoint from every other trial's of its stratum.

    The stratum (seed, length, depth) shuffles the documents once; trial t reads tokens [t * length, t * length +
    needed) of the shuffled documents joined, so trials never overlap and no trial depends on the variant.
    """
    if not documents:
        raise RopescopeError("the haystack corpus has no documents")
    order = list(range(len(documents)))
    random.Random(f"haystack:{seed}:{length}:{float(depth_percent)}").shuffle(order)
    start = trial * length
    try:
        return _stream(tokenizer, documents, order, start + needed)[start:]
    except RopescopeError:
        total = corpus_token_count(tokenizer, documents, start + needed)
        raise RopescopeError(
            f"the haystack corpus has {total} tokens; {trial + 1} independent haystacks of {length} tokens need "
            f"{start + needed}: give fewer trials, shorter lengths or a larger corpus"
        ) from None


def corpus_token_count(tokenizer, documents: Sequence[str], needed: int) -> int:
    """Tokens of the documents joined (counting stops once `needed` is reached)."""
    total = 0
    for document in documents:
        total += len(_document_ids(tokenizer, document))
        if total >= needed:
            break
    return total


def check_haystack(tokenizer, documents: Sequence[str], needed: int) -> None:
    """The corpus must hold at least `needed` tokens of haystack in all."""
    if not documents:
        raise RopescopeError("the haystack corpus has no documents")
    total = corpus_token_count(tokenizer, documents, needed)
    if total < needed:
        raise RopescopeError(
            f"the haystack corpus is {total} tokens long; the longest length {needed} needs at least {needed}"
        )


def sentence_boundary(tokenizer, ids: Sequence[int], target: int) -> int:
    """The index at or before `target` that follows a sentence end (`target` itself if none is near)."""
    if target <= 0 or target >= len(ids):
        return max(0, min(target, len(ids)))
    for index in range(target, max(0, target - SENTENCE_SEARCH_TOKENS), -1):
        if SENTENCE_END.search(tokenizer.decode(ids[index - 1 : index])):
            return index
    return target


def insert_facts(tokenizer, haystack: list[int], inserts: Sequence[tuple[list[int], float, str]],
                 offset: int = 0) -> tuple[list[int], list[Fact]]:
    """(ids, facts): the haystack with each (ids, depth_percent, role) inserted at the sentence boundary at or
    before its depth of the haystack; facts in prompt order, their spans shifted by `offset` (what precedes)."""
    placed = sorted(((sentence_boundary(tokenizer, haystack, round(len(haystack) * depth / 100)), index)
                     for index, (_, depth, _) in enumerate(inserts)))
    ids: list[int] = []
    facts = []
    cursor = 0
    for at, index in placed:
        fact_ids, _, role = inserts[index]
        ids += haystack[cursor:at]
        facts.append(Fact(offset + len(ids), offset + len(ids) + len(fact_ids), role))
        ids += fact_ids
        cursor = at
    return ids + haystack[cursor:], facts
