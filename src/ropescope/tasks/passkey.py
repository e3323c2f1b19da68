"""Passkey retrieval (Mohtashami & Jaggi 2023; the YaRN and PI evaluations): a 5-digit key hidden in repeated
filler, asked for at the end. The prompt format and the task, in one place.

One definition and one prompt builder (`PasskeyPrompts`), shared by the synthetic examples mixed into training
(`ropescope pretrain`, `ropescope train --retrieval-mix`) and by the evaluation, so that a model is asked exactly
what it was taught. The evaluation prompt has one fixed layout; a training example varies the layout around it
(separators, where the filler is cut, a leading end-of-text token) so a model does not overfit to one exact
layout of the evaluation prompt.

The task (`TASK`): a grid of lengths (tokens of the model's own tokenizer) x depths (percent of the filler before
the key), N trials per point, each trial a different random key; greedy decoding of a few tokens, the first
integer compared exactly. With independent keys, every (length, depth, trial) has its own key and starts the
filler's cycle at its own sentence, so prompts share only the five filler sentences and the question (the task
itself). With independent haystacks, every (length, depth, trial) has its own key and its own corpus text as filler.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

import torch

from ropescope.errors import RopescopeError
from ropescope.tasks.cases import CaseRequest, PromptCase, RetrievalTask, Score, single_needle_case
from ropescope.tasks.haystack import independent_haystack_ids, insert_facts
from ropescope.tasks.text import encode, first_integer, special_prefix

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5
FILLER_SENTENCES = [sentence.strip() + "." for sentence in FILLER.split(".") if sentence.strip()]
# Separators a training example puts around the key line and before the question.
TRAINING_SEPARATORS = (" ", "\n", "\n\n")
# The text around the key of a training example: the filler sentences, or a corpus haystack the caller gives.
RETRIEVAL_HAYSTACKS = ("filler", "corpus")


class PasskeyPrompts:
    """Passkey prompts as token ids of one tokenizer; the filler sentences are tokenized once.

    Pieces are joined at token level; each piece inside running text starts with its separator (" " + sentence),
    so the joined ids equal the tokenization of the running text for the usual BPE tokenizers.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.sentences = [self.ids(sentence) for sentence in FILLER_SENTENCES]  # at the start of a text
        self.spaced_sentences = [self.ids(" " + sentence) for sentence in FILLER_SENTENCES]  # after a sentence

    def ids(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def evaluation_prompt(self, length: int, depth_percent: float, key: str,
                          prefix: list[int] = (), offset: int = 0) -> tuple[list[int], int, int]:
        """(ids, needle_start, needle_end): the evaluation prompt of exactly `length` tokens.

        Layout: prefix (the tokenizer's special tokens), filler-before, key line, filler-after, question. The
        filler-after is whole filler sentences (so the question follows a complete sentence) and the filler-before
        ends with a complete FILLER repetition right before the key line; the filler-before is cut at its start to
        make the total exact, as a window into a longer document would be. The key line sits within one sentence
        of `depth_percent` of the filler; its tokens are ids[needle_start:needle_end]. `offset`: the filler's cycle
        starts `offset` sentences later (the filler-after starts at that sentence, the filler-before ends just
        before it), which changes the text around the key and nothing else.
        """
        prefix = list(prefix)
        needle = self.ids(" " + KEY_LINE.format(key=key))
        question = self.ids(" " + QUESTION)
        filler_budget = length - len(prefix) - len(needle) - len(question)
        if filler_budget < 0:
            raise RopescopeError(
                f"length={length} is too short for a passkey prompt; it needs at least {length - filler_budget} tokens"
            )
        offset %= len(self.spaced_sentences)
        sentences = self.spaced_sentences[offset:] + self.spaced_sentences[:offset]

        # Filler after the key: whole sentences continuing the cycle, as many as brings the key nearest the depth.
        target_after = filler_budget - round(filler_budget * depth_percent / 100)
        after: list[int] = []
        index = 0
        while True:
            sentence = sentences[index % len(sentences)]
            grown = len(after) + len(sentence)
            if grown > filler_budget or abs(grown - target_after) >= abs(len(after) - target_after):
                break
            after.extend(sentence)
            index += 1

        # Filler before the key: the tail of a stream of full FILLER repetitions ending at the key line.
        before_length = filler_budget - len(after)
        before: list[int] = []
        while len(before) < before_length:
            before = [token for sentence in sentences for token in sentence] + before
        before = before[len(before) - before_length :] if before_length else []

        needle_start = len(prefix) + len(before)
        return prefix + before + needle + after + question, needle_start, needle_start + len(needle)

    @functools.cached_property
    def whole_example_length(self) -> int:
        """The fewest tokens a training example needs to hold the whole key line (shorter ones are cut at the
        start, the key line with them): the widest separators and a leading end-of-text token included."""
        widest = max(TRAINING_SEPARATORS, key=lambda separator: len(self.ids(separator)))
        return max(1 + len(self.ids(widest + KEY_LINE.format(key=key) + widest)) + len(self.ids(widest + QUESTION))
                   + len(self.ids(" " + key)) for key in ("10000", "12345", "54321", "99999"))

    def _training_filler(self, count: int, start_sentence: int, at_sentence: bool) -> list[int]:
        """`count` filler tokens starting at sentence `start_sentence`; cut at a sentence end if `at_sentence`."""
        ids: list[int] = []
        index = start_sentence
        while len(ids) < count:
            pieces = self.spaced_sentences if ids else self.sentences
            sentence = pieces[index % len(pieces)]
            if at_sentence and len(ids) + len(sentence) > count:
                break
            ids.extend(sentence)
            index += 1
        return ids[:count]

    def training_example(self, length: int, generator: torch.Generator,
                         haystack: Sequence[int] | None = None) -> tuple[list[int], int]:
        """(ids, answer_length): one training example of exactly `length` tokens (at most, if `length` is shorter
        than the key line, question and answer together) whose last `answer_length` tokens are the answer " <key>".

        Filler, the key line at a random depth, filler, the question, the answer; the key, the depth, the
        separators, where the filler starts and whether it is cut at a sentence or any token are drawn from
        `generator`, in a fixed order (a seeded generator gives the same example). With `haystack` (token ids of
        at least `length`), the text around the key line is its start instead of the repeated filler sentences,
        as in an evaluation with independent haystacks.
        """

        def randint(low: int, high: int) -> int:  # inclusive bounds
            return int(torch.randint(low, high + 1, (1,), generator=generator))

        key = str(randint(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS - 1))
        separator_before = TRAINING_SEPARATORS[randint(0, 2)]
        separator_after = TRAINING_SEPARATORS[randint(0, 2)]
        separator_question = TRAINING_SEPARATORS[randint(0, 2)]
        answer = self.ids(" " + key)
        question = self.ids(separator_question + QUESTION)
        leading = [self.eos] if randint(0, 1) and self.eos is not None else []
        filler_budget = length - len(leading) - len(question) - len(answer)
        depth = randint(0, 1000) / 1000
        at_sentence = bool(randint(0, 1))
        start_sentence = 0 if randint(0, 2) else randint(0, len(self.sentences) - 1)
        needle = self.ids(KEY_LINE.format(key=key))
        before_count = round(depth * max(filler_budget - len(needle) - 2, 0))
        if haystack is None:
            before = self._training_filler(before_count, start_sentence, at_sentence)
        else:
            before = list(haystack[:before_count])
        if before:
            needle = self.ids(separator_before + KEY_LINE.format(key=key))
        needle = needle + self.ids(separator_after)
        after_count = max(filler_budget - len(before) - len(needle), 0)
        if haystack is None:
            after = self._training_filler(after_count, start_sentence + len(before), False)
        else:
            after = list(haystack[len(before) : len(before) + after_count])
        ids = leading + before + needle + after + question + answer
        return (ids[-length:] if len(ids) > length else ids), len(answer)

    def training_row(self, length: int, generator: torch.Generator, packed: bool, min_length: int,
                     haystack: Sequence[int] | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, answer_spans): passkey examples for one training row of `length` tokens, each followed by the
        end-of-text token: one example of `min_length`..`length` tokens, or, `packed`, several short ones of
        `min_length`..2 x `min_length` tokens back to back (many retrievals per row, at short distances, where a
        retrieval circuit forms first). The ids may fall short of `length` (the caller fills the rest with corpus
        text) or pass it by the last end-of-text token (cut); answer_spans are the (start, end) of each answer.
        With `haystack` (token ids, at least `length`), the examples take their text from it in turn.
        """
        if packed:
            lengths: list[int] = []
            while sum(lengths) + len(lengths) + 2 * min_length + 1 <= length:
                lengths.append(int(torch.randint(min_length, 2 * min_length + 1, (1,), generator=generator)))
        else:
            lengths = [int(torch.randint(min_length, length + 1, (1,), generator=generator))]
        ids: list[int] = []
        spans = []
        used = 0
        for example_length in lengths:
            text = None if haystack is None else haystack[used : used + example_length]
            example, answer_length = self.training_example(example_length, generator, text)
            used += example_length
            ids += example
            spans.append((len(ids) - answer_length, len(ids)))
            if self.eos is not None:
                ids.append(self.eos)
        return ids, spans


def passkey_key(trial: int, seed: int = 0, point: tuple = ()) -> str:
    """The key of a trial: KEY_DIGITS random digits, no leading zero; the same at every point of the grid unless
    `point` (length, depth) is given, as independent haystacks give it."""
    rng = random.Random(":".join(["passkey", str(seed), *map(str, point), str(trial)]))
    return str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))


def filler_offset(trial: int, seed: int, point: tuple) -> int:
    """The sentence of the filler's cycle an independent-key prompt starts at: drawn per (length, depth, trial)."""
    rng = random.Random(":".join(["filler", str(seed), *map(str, point), str(trial)]))
    return rng.randrange(len(FILLER_SENTENCES))


def passkey_case(tokenizer, length: int, depth_percent: float, trial: int, seed: int = 0,
                 independent_keys: bool = False) -> PromptCase:
    """The passkey prompt of exactly `length` tokens with the key line at `depth_percent` of the filler.

    The layout is `PasskeyPrompts.evaluation_prompt`'s, after the tokenizer's special prefix (a BOS token). Without
    `independent_keys`, trial t has the same key and filler at every length and depth (one key per trial); with
    them, every (length, depth, trial) draws its own key and the sentence its filler's cycle starts at.
    """
    point = (length, float(depth_percent))
    key = passkey_key(trial, seed, point if independent_keys else ())
    offset = filler_offset(trial, seed, point) if independent_keys else 0
    ids, needle_start, needle_end = PasskeyPrompts(tokenizer).evaluation_prompt(length, depth_percent, key,
                                                                                special_prefix(tokenizer), offset)
    return single_needle_case(ids, key, needle_start, needle_end)


def independent_passkey_case(request: CaseRequest) -> PromptCase:
    """The passkey prompt with corpus text for filler, the trial's own window of it, and the point's own key."""
    tokenizer = request.tokenizer
    key = passkey_key(request.trial, request.seed, (request.length, float(request.depth_percent)))
    prefix = special_prefix(tokenizer)
    needle = encode(tokenizer, " " + KEY_LINE.format(key=key))
    question = encode(tokenizer, "\n\n" + QUESTION)
    budget = request.length - len(prefix) - len(needle) - len(question)
    if budget < 0:
        raise RopescopeError(f"length={request.length} is too short for a passkey prompt; it needs at least "
                             f"{request.length - budget} tokens")
    haystack = independent_haystack_ids(tokenizer, request.documents or [], budget, seed=request.seed,
                                        length=request.length, depth_percent=request.depth_percent,
                                        trial=request.trial)
    body, (fact,) = insert_facts(tokenizer, haystack, [(needle, request.depth_percent, "needle")], len(prefix))
    return single_needle_case(prefix + body + question, key, fact.start, fact.end)


def build(request: CaseRequest) -> PromptCase:
    if request.independent_haystacks:
        return independent_passkey_case(request)
    return passkey_case(request.tokenizer, request.length, request.depth_percent, request.trial, request.seed,
                        request.independent_keys)


def score_passkey(continuation: str, key: str) -> tuple[str | None, bool]:
    """(first integer in the continuation, whether it equals the key exactly)."""
    predicted = first_integer(continuation)
    return predicted, predicted == key


def score(continuation: str, case: PromptCase) -> Score:
    predicted, correct = score_passkey(continuation, case.answer)
    return Score(float(correct), correct, predicted if predicted is not None else continuation.strip())


TASK = RetrievalTask(
    name="passkey", summary="a 5-digit pass key in repeated filler; the first integer of the answer must equal it",
    build=build, score=score, max_new_tokens=lambda tokenizer, case: 8,
)
