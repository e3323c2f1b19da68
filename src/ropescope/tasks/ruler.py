"""RULER's synthetic tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", Section 3 and Appendix B) on the task registry, in our own words but RULER's structure:

- niah_*: an instruction, a haystack holding "special magic" needles `key -> value`, a question naming the key(s),
  and an answer prefix the model continues. Haystacks: `noise` (one repeated sentence, passkey's filler), `essay`
  (corpus text) and `needles` (the haystack is itself made of needles with other keys). Keys are adjective-noun
  words or UUIDs; values 7-digit numbers, words or UUIDs. single_1..3, multikey_1..3 (distractor needles with
  other keys), multivalue (four values of one key), multiquery (four keys asked at once), as RULER's table lists.
- vt (variable tracking): a chain `VAR A = 12345. VAR B = VAR A. ...` (four hops) in the noise haystack; the
  answer is every variable the chain assigns the value to.
- cwe (common-words extraction): a numbered list of corpus words where ten words appear many times and the rest
  a few times; the answer is the ten.
- fwe (frequent-words extraction): coded words drawn with Zipf frequencies (alpha 2) with the most frequent shown as
  dots; the answer is the next three.

Every task is scored by RULER's string_match_all: the share of expected strings found in the continuation (case
ignored); `correct` when all are. Each prompt (length, depth, trial, seed) draws its own keys, values and words;
the depth places the first asked needle (niah) or the start of the chain (vt); cwe and fwe ignore it for placement
(their prompts are independent draws). A prompt is exactly `length` tokens: where whole pieces (list entries,
needles) leave a gap, newlines after the special prefix fill it.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ropescope.errors import RopescopeError
from ropescope.tasks.cases import DISTRACTOR, NEEDLE, CaseRequest, Fact, PromptCase, RetrievalTask, Score
from ropescope.tasks.haystack import haystack_ids, independent_haystack_ids, insert_facts
from ropescope.tasks.passkey import FILLER
from ropescope.tasks.text import encode, special_prefix

ADJECTIVES = ("amber", "bitter", "brave", "bright", "calm", "clever", "crisp", "curious", "dark", "eager", "early",
              "faint", "fancy", "fierce", "gentle", "giant", "golden", "grumpy", "hollow", "humble", "icy", "jolly",
              "kind", "lazy", "little", "lively", "lucky", "mighty", "misty", "noble", "odd", "pale", "proud", "quick",
              "quiet", "rapid", "rough", "rusty", "shy", "silent", "silver", "sleepy", "smooth", "sour", "steady",
              "swift", "tender", "tiny", "wild", "witty")
NOUNS = ("anchor", "apple", "badger", "basket", "beacon", "bottle", "bridge", "candle", "canyon", "castle", "cedar",
         "comet", "copper", "cradle", "dolphin", "falcon", "feather", "forest", "garden", "glacier", "harbor",
         "hammer", "island", "jacket", "kettle", "ladder", "lantern", "marble", "meadow", "mirror", "needle",
         "orchard", "otter", "pebble", "pepper", "pillow", "planet", "pocket", "rabbit", "river", "saddle", "shadow",
         "spider", "statue", "thunder", "tiger", "tunnel", "valley", "violin", "walrus", "willow", "zebra")
KINDS = {"numbers": "number", "words": "word", "uuids": "UUID"}  # plural as asked, singular as stated


def string_match_all(continuation: str, references: Sequence[str]) -> float:
    """RULER's score: the share of references found in the continuation, case ignored."""
    text = continuation.lower()
    return sum(reference.lower() in text for reference in references) / len(references)


def score_all(continuation: str, case: PromptCase) -> Score:
    share = string_match_all(continuation, case.answers)
    return Score(share, share == 1.0, continuation.strip())


def _rng(name: str, request: CaseRequest) -> random.Random:
    return random.Random(f"ruler:{name}:{request.seed}:{request.length}:{float(request.depth_percent)}:"
                         f"{request.trial}")


def _value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randrange(10**6, 10**7))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _distinct(kind: str, count: int, rng: random.Random, taken: set[str] = frozenset()) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = _value(kind, rng)
        if value not in values and value not in taken:
            values.append(value)
    return values


def _assemble(tokenizer, length: int, before: list[int], body: list[int], after: list[int],
              facts_in_body: list[Fact], answers: Sequence[str], task: str) -> PromptCase:
    """[special prefix][newline padding][before][body][after], exactly `length` tokens; body facts shifted."""
    prefix = special_prefix(tokenizer)
    gap = length - len(prefix) - len(before) - len(body) - len(after)
    if gap < 0:
        raise RopescopeError(f"length={length} is too short for {task}; it needs at least {length - gap} tokens")
    padding = encode(tokenizer, "\n")[-1:] * gap
    offset = len(prefix) + len(padding) + len(before)
    ids = prefix + padding + before + body + after
    facts = tuple(Fact(fact.start + offset, fact.end + offset, fact.role) for fact in facts_in_body)
    return PromptCase(torch.tensor(ids, dtype=torch.long), tuple(answers), facts, len(ids) - 1)


def _noise(tokenizer, count: int, start_sentence: int = 0) -> list[int]:
    """`count` tokens of the repeated noise sentence, whole sentences from `start_sentence`, cut at the start."""
    sentences = [encode(tokenizer, " " + sentence.strip() + ".") for sentence in FILLER.split(".") if sentence.strip()]
    ids: list[int] = []
    index = start_sentence
    while len(ids) < count:
        ids = sentences[index % len(sentences)] + ids
        index -= 1
    return ids[len(ids) - count :] if count else []


def _haystack(tokenizer, kind: str, count: int, request: CaseRequest, rng: random.Random) -> list[int]:
    if kind == "noise" and not request.independent_haystacks:
        return _noise(tokenizer, count)
    documents = request.documents or []
    if not documents:
        raise RopescopeError("this task's haystack is corpus text, and the corpus has no documents")
    if request.independent_haystacks:
        return independent_haystack_ids(tokenizer, documents, count, seed=request.seed, length=request.length,
                                        depth_percent=request.depth_percent, trial=request.trial)
    return haystack_ids(tokenizer, documents, rng.randrange(len(documents)), count)


def _listing(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


@dataclass(frozen=True)
class Niah:
    """One needle-in-a-haystack variant of RULER's table (defaults: niah_single_2)."""

    haystack: str = "essay"  # noise, essay or needles
    key_kind: str = "words"  # words or uuids
    value_kind: str = "numbers"  # numbers, words or uuids
    keys: int = 1  # needles with distinct keys; those not asked are distractors
    values: int = 1  # values per key
    queries: int = 1  # keys asked at once

    def build(self, name: str, request: CaseRequest) -> PromptCase:
        tokenizer, rng = request.tokenizer, _rng(name, request)
        plural, singular = self.value_kind, KINDS[self.value_kind]
        keys = _distinct(self.key_kind, max(self.keys, self.queries), rng)
        values = {key: _distinct(self.value_kind, self.values, rng) for key in keys}
        asked = keys[: self.queries]
        before = encode(tokenizer, f"Special magic {plural} are hidden in the text below. Memorize them; you will "
                                   f"be asked about the {plural} afterwards.\n")
        after = encode(tokenizer, f"\nWhat are all the special magic {plural} for {_listing(asked)} mentioned in "
                                  f"the text? The special magic {plural} for {_listing(asked)} mentioned in the text "
                                  f"are")

        def needle(key: str, value: str) -> list[int]:
            return encode(tokenizer, f" A special magic {singular} for {key} is: {value}.")

        inserts = []
        for key in keys:
            role = NEEDLE if key in asked else DISTRACTOR
            for value in values[key]:
                # the first asked needle at the point's depth, every other one where the draw puts it
                depth = request.depth_percent if not inserts else rng.uniform(0, 100)
                inserts.append((needle(key, value), depth, role))
        budget = request.length - len(special_prefix(tokenizer)) - len(before) - len(after) \
            - sum(len(ids) for ids, _, _ in inserts)
        if budget < 0:
            raise RopescopeError(f"length={request.length} is too short for {name}; it needs at least "
                                 f"{request.length - budget} tokens")
        if self.haystack == "needles":
            filled, taken = 0, set(keys)
            while True:  # the haystack is needles of other keys, as many as fit whole, at drawn depths
                (other,) = _distinct(self.key_kind, 1, rng, taken)
                piece = needle(other, _value(self.value_kind, rng))
                if filled + len(piece) > budget:
                    break
                taken.add(other)
                filled += len(piece)
                inserts.append((piece, rng.uniform(0, 100), DISTRACTOR))
            body, facts = _needle_haystack(inserts)
        else:
            body, facts = insert_facts(tokenizer, _haystack(tokenizer, self.haystack, budget, request, rng), inserts)
        answers = [value for key in asked for value in values[key]]
        return _assemble(tokenizer, request.length, before, body, after, facts, answers, name)


def _needle_haystack(inserts) -> tuple[list[int], list[Fact]]:
    """A haystack of needles alone: every insert in depth order (ties in insertion order), back to back."""
    ids: list[int] = []
    facts = []
    for piece, _, role in sorted(inserts, key=lambda insert: insert[1]):
        facts.append(Fact(len(ids), len(ids) + len(piece), role))
        ids += piece
    return ids, facts


VARIABLE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def variable_tracking(request: CaseRequest, hops: int = 4) -> PromptCase:
    """A chain of `hops` + 1 assignments in the noise haystack, from the point's depth spread evenly to the end."""
    tokenizer, rng = request.tokenizer, _rng("vt", request)
    value = str(rng.randrange(10**4, 10**5))
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(VARIABLE_LETTERS) for _ in range(5))
        if name not in names:
            names.append(name)
    statements = [f" VAR {names[0]} = {value}."] + [f" VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    depth = request.depth_percent
    inserts = [(encode(tokenizer, text), depth + (100 - depth) * index / (hops + 1), NEEDLE)
               for index, text in enumerate(statements)]
    before = encode(tokenizer, "Track every chain of variable assignments hidden in the text below.\n\n")
    after = encode(tokenizer, f"\nQuestion: Which variables are assigned the value {value} in the text above? "
                              f"Answer: Following the chain of assignments above, {hops + 1} variables are assigned "
                              f"the value {value}, they are:")
    budget = request.length - len(special_prefix(tokenizer)) - len(before) - len(after) \
        - sum(len(ids) for ids, _, _ in inserts)
    if budget < 0:
        raise RopescopeError(f"length={request.length} is too short for vt; it needs at least "
                             f"{request.length - budget} tokens")
    body, facts = insert_facts(tokenizer, _haystack(tokenizer, "noise", budget, request, rng), inserts)
    return _assemble(tokenizer, request.length, before, body, after, facts, names, "vt")


def corpus_words(documents: Sequence[str], limit: int = 5000) -> list[str]:
    """Distinct lowercase words of 4 to 12 letters from the documents, in order of first appearance."""
    words: dict[str, None] = {}
    for document in documents:
        for word in re.findall(r"\b[a-z]{4,12}\b", document):
            words.setdefault(word)
            if len(words) >= limit:
                return list(words)
    return list(words)


def common_words(request: CaseRequest, common: int = 10) -> PromptCase:
    """A numbered list where `common` corpus words appear often (30 times each from 4096 tokens, fewer below, as
    fits) and the rest rarely (3 times from 4096 tokens, once below); the answer is the common ones."""
    tokenizer, rng = request.tokenizer, _rng("cwe", request)
    vocabulary = corpus_words(request.documents or [])
    if len(vocabulary) < 2 * common:
        raise RopescopeError(f"the corpus has {len(vocabulary)} distinct words; cwe needs at least {2 * common}")
    rng.shuffle(vocabulary)
    chosen, rare = vocabulary[:common], vocabulary[common:]
    before = encode(tokenizer, "Below is a numbered list of words. Some of them appear more often than the others. "
                               "Memorize the ones that appear most often.\n")
    after = encode(tokenizer, f"\nQuestion: What are the {common} most common words in the list above? Answer: The "
                              f"{common} words that appear most often in the list are:")
    budget = request.length - len(special_prefix(tokenizer)) - len(before) - len(after)
    # an entry is its number piece " 12." then its word piece " word", so a list's length does not depend on its order
    word_ids = {word: encode(tokenizer, " " + word) for word in vocabulary}
    numbers = [encode(tokenizer, f" {index}.") for index in range(1, 4 * budget + 2)]
    short_entry = max(len(word_ids[word]) for word in chosen) + len(numbers[min(len(numbers), 99) - 1])
    common_times, rare_times = (30, 3) if request.length >= 4096 else (
        max(2, min(30, budget // short_entry // (2 * common))), 1)
    words = [word for word in chosen for _ in range(common_times)]
    used = sum(len(word_ids[word]) + len(numbers[index]) for index, word in enumerate(words))
    if used > budget:
        raise RopescopeError(f"length={request.length} is too short for cwe; it needs at least "
                             f"{request.length - budget + used} tokens")
    for word in rare:
        grown = used + sum(len(word_ids[word]) + len(numbers[len(words) + copy]) for copy in range(rare_times))
        if grown > budget:
            break
        words += [word] * rare_times
        used = grown
    rng.shuffle(words)
    body: list[int] = []
    facts = []
    for index, word in enumerate(words):
        start = len(body)
        body += numbers[index] + word_ids[word]
        if word in chosen:
            facts.append(Fact(start, len(body), NEEDLE))
    return _assemble(tokenizer, request.length, before, body, after, facts, chosen, "cwe")


def frequent_words(request: CaseRequest, asked: int = 3, alpha: float = 2.0) -> PromptCase:
    """Coded words with Zipf counts (rank r appears about C / r^alpha times, counts strictly falling over the
    first `asked` + 2 ranks); rank 1 is shown as dots and to be ignored; the answer is ranks 2 to `asked` + 1."""
    tokenizer, rng = request.tokenizer, _rng("fwe", request)
    before = encode(tokenizer, "Read the coded text below and count how often each coded word appears. Find the "
                               f"{asked} coded words that appear most often.")
    after = encode(tokenizer, f"\nQuestion: Ignore the dots '....'. What are the {asked} coded words that appear "
                              f"most often in the coded text above? Answer: The {asked} most frequent coded words "
                              f"are:")
    budget = request.length - len(special_prefix(tokenizer)) - len(before) - len(after)
    vocabulary: list[str] = []
    while len(vocabulary) < max(asked + 3, min(400, budget // 10)):  # fewer words in short prompts, to fit
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
        if word not in vocabulary:
            vocabulary.append(word)
    vocabulary[0] = "...."
    piece_of = {word: encode(tokenizer, " " + word) for word in vocabulary}
    for top in range(budget, 0, -1):  # the largest top count whose text fits
        # Zipf counts, but at least 1 + the ranks below it down to the first unasked rank, so that ranks 1 to
        # asked + 2 strictly fall and the answer is unambiguous even in a short prompt
        counts = [max(int(top / rank**alpha), asked + 3 - rank, 1) for rank in range(1, len(vocabulary) + 1)]
        for rank in range(1, asked + 2):
            counts[rank] = min(counts[rank], counts[rank - 1] - 1)
        counts[asked + 2 :] = [min(count, counts[asked + 1]) for count in counts[asked + 2 :]]
        if sum(count * len(piece_of[word]) for count, word in zip(counts, vocabulary)) <= budget:
            break
    else:
        raise RopescopeError(f"length={request.length} is too short for fwe")
    words = [word for word, count in zip(vocabulary, counts) for _ in range(count)]
    rng.shuffle(words)
    answers = vocabulary[1 : asked + 1]
    body: list[int] = []
    facts = []
    for word in words:
        if word in answers:
            facts.append(Fact(len(body), len(body) + len(piece_of[word]), NEEDLE))
        body += piece_of[word]
    return _assemble(tokenizer, request.length, before, body, after, facts, answers, "fwe")


NIAH = {  # RULER's table of NIAH variants
    "niah_single_1": Niah(haystack="noise", key_kind="words", value_kind="numbers"),
    "niah_single_2": Niah(haystack="essay", key_kind="words", value_kind="numbers"),
    "niah_single_3": Niah(haystack="essay", key_kind="words", value_kind="uuids"),
    "niah_multikey_1": Niah(haystack="essay", key_kind="words", value_kind="numbers", keys=4),
    "niah_multikey_2": Niah(haystack="needles", key_kind="words", value_kind="numbers"),
    "niah_multikey_3": Niah(haystack="needles", key_kind="uuids", value_kind="uuids"),
    "niah_multivalue": Niah(haystack="essay", key_kind="words", value_kind="numbers", values=4),
    "niah_multiquery": Niah(haystack="essay", key_kind="words", value_kind="numbers", keys=4, queries=4),
}


def _niah_task(name: str, variant: Niah) -> RetrievalTask:
    answers = variant.values * variant.queries
    tokens = {"numbers": 6, "words": 6, "uuids": 26}[variant.value_kind] * answers + 8
    return RetrievalTask(
        name=name, build=lambda request: variant.build(name, request), score=score_all,
        summary=(f"RULER NIAH: {variant.haystack} haystack, {variant.key_kind} keys -> {variant.value_kind}"
                 + (f", {variant.keys - variant.queries} distractor keys" if variant.keys > variant.queries else "")
                 + (f", {variant.values} values per key" if variant.values > 1 else "")
                 + (f", {variant.queries} keys asked" if variant.queries > 1 else "")
                 + ("; distractor needles fill the haystack" if variant.haystack == "needles" else "")),
        max_new_tokens=lambda tokenizer, case: tokens, uses_corpus=variant.haystack == "essay",
    )


TASKS: tuple[RetrievalTask, ...] = (
    *(_niah_task(name, variant) for name, variant in NIAH.items()),
    RetrievalTask(name="vt", summary="RULER variable tracking: every variable a 4-hop chain assigns the value to",
                  build=variable_tracking, score=score_all, max_new_tokens=lambda tokenizer, case: 30),
    RetrievalTask(name="cwe", summary="RULER common-words extraction: the 10 words a numbered list repeats most",
                  build=common_words, score=score_all, max_new_tokens=lambda tokenizer, case: 60, uses_corpus=True),
    RetrievalTask(name="fwe", summary="RULER frequent-words extraction: the 3 most frequent coded words (Zipf)",
                  build=frequent_words, score=score_all, max_new_tokens=lambda tokenizer, case: 30),
)
