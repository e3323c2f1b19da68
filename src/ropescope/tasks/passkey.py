"""Passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key hidden in repeated filler, asked for at the end.

A grid of lengths (tokens of the model's own tokenizer) x depths (percent of the filler before the key), N trials
per cell, each trial a different random key; greedy decoding of a few tokens, the first integer compared exactly.
With independent haystacks, every (length, depth, trial) has its own key and its own corpus text as filler.
"""

from __future__ import annotations

import random
from pathlib import Path

from ropescope.errors import RopescopeError
from ropescope.tasks.cases import CaseRequest, PromptCase, RetrievalTask, Score, single_needle_case
from ropescope.eval.decoding import encode, first_integer, special_prefix
from ropescope.tasks.haystack import independent_haystack_ids, insert_facts
from ropescope.eval.retrieval import evaluate_retrieval, run_retrieval
from ropescope.model.load import ModelOptions
from ropescope.tasks.passkey_format import KEY_DIGITS, KEY_LINE, QUESTION, PasskeyPrompts
from ropescope.rope import RopeSpec


def passkey_key(trial: int, seed: int = 0, cell: tuple = ()) -> str:
    """The key of a trial: KEY_DIGITS random digits, no leading zero; the same for every cell of the grid unless
    `cell` (length, depth) is given, as independent haystacks give it."""
    rng = random.Random(":".join(["passkey", str(seed), *map(str, cell), str(trial)]))
    return str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))


def passkey_case(tokenizer, length: int, depth_percent: float, trial: int, seed: int = 0) -> PromptCase:
    """The passkey prompt of exactly `length` tokens with the key line at `depth_percent` of the filler.

    The layout is `PasskeyPrompts.evaluation_prompt`'s, after the tokenizer's special prefix (a BOS token).
    """
    key = passkey_key(trial, seed)
    ids, needle_start, needle_end = PasskeyPrompts(tokenizer).evaluation_prompt(length, depth_percent, key,
                                                                                special_prefix(tokenizer))
    return single_needle_case(ids, key, needle_start, needle_end)


def independent_passkey_case(request: CaseRequest) -> PromptCase:
    """The passkey prompt with corpus text for filler, the trial's own window of it, and the cell's own key."""
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
    return passkey_case(request.tokenizer, request.length, request.depth_percent, request.trial, request.seed)


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


def evaluate_passkey(model, tokenizer, lengths, depths=(0, 25, 50, 75, 100), trials: int = 5, seed: int = 0,
                     max_new_tokens: int = 8, batch_size: int = 8, labels: dict | None = None,
                     progress: bool | None = None) -> list[dict]:
    """Passkey accuracy over lengths x depths x trials on a loaded model; one `RetrievalRow` per trial, as a dict."""
    return evaluate_retrieval(model, tokenizer, TASK, lengths, depths, trials, seed, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, labels=labels, progress=progress)


def run_passkey(model: str = "default", method: str | RopeSpec = "default", *, lengths=(256, 512, 1024),
                depths=(0, 25, 50, 75, 100), trials: int = 5, seed: int = 0, factor: float | None = None,
                original_max_position_embeddings: int | None = None, corpus=None, split: str = "validation",
                independent_haystacks: bool = False, max_new_tokens: int = 8, batch_size: int = 8,
                options: ModelOptions | None = None, out="results/passkey",
                progress: bool | None = None) -> list[dict]:
    """`ropescope passkey`: load the model (extended by `method`), run the grid, and write out/passkey.csv and
    out/passkey.png. The shortest prompt is built before the weights load, so a too-short length fails first."""
    return run_retrieval(TASK, model, method, lengths=lengths, depths=depths, trials=trials, seed=seed,
                         factor=factor, original_max_position_embeddings=original_max_position_embeddings,
                         corpus=corpus, split=split, independent_haystacks=independent_haystacks,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, options=options, out=Path(out),
                         progress=progress)
