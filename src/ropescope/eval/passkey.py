"""Passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key hidden in repeated filler, asked for at the end.

A grid of lengths (tokens of the model's own tokenizer) x depths (percent of the filler before the key), N trials
per cell, each trial a different random key; greedy decoding of a few tokens, the first integer compared exactly.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from ropescope.errors import RopescopeError
from ropescope.eval.cases import PromptCase
from ropescope.eval.decoding import encode, first_integer, retrieval_grid, special_prefix
from ropescope.models import ModelOptions
from ropescope.passkey_format import FILLER, KEY_DIGITS, KEY_LINE, QUESTION
from ropescope.rope import RopeSpec
from ropescope.rows import PasskeyRow

FILLER_SENTENCES = [sentence + "." for sentence in re.split(r"\.\s*", FILLER) if sentence]


def passkey_key(trial: int, seed: int = 0) -> str:
    """The key of a trial: KEY_DIGITS random digits, no leading zero; the same for every cell of the grid."""
    rng = random.Random(f"passkey:{seed}:{trial}")
    return str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))


def _filler_sentence_ids(tokenizer) -> list[list[int]]:
    # Each sentence with its leading space, so concatenated ids equal the tokenization of the running text.
    return [encode(tokenizer, " " + sentence) for sentence in FILLER_SENTENCES]


def passkey_case(tokenizer, length: int, depth_percent: float, trial: int, seed: int = 0) -> PromptCase:
    """The passkey prompt of exactly `length` tokens with the key line at `depth_percent` of the filler.

    Layout: [special prefix] filler-before, key line, filler-after, question. The filler-after is whole filler
    sentences (so the question follows a complete sentence) and the filler-before ends with a complete FILLER
    repetition right before the key line; the filler-before is cut at its start to make the total exact, as a
    window into a longer document would be. The key sits within one sentence of the requested depth.
    """
    key = passkey_key(trial, seed)
    prefix = special_prefix(tokenizer)
    needle = encode(tokenizer, " " + KEY_LINE.format(key=key))
    question = encode(tokenizer, " " + QUESTION)
    filler_budget = length - len(prefix) - len(needle) - len(question)
    if filler_budget < 0:
        raise RopescopeError(
            f"length={length} is too short for a passkey prompt; it needs at least {length - filler_budget} tokens"
        )
    sentences = _filler_sentence_ids(tokenizer)

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

    ids = prefix + before + needle + after + question
    needle_start = len(prefix) + len(before)
    return PromptCase(
        input_ids=torch.tensor(ids, dtype=torch.long),
        answer=key,
        needle_start=needle_start,
        needle_end=needle_start + len(needle),
        question_position=len(ids) - 1,
    )


def score_passkey(continuation: str, key: str) -> tuple[str | None, bool]:
    """(first integer in the continuation, whether it equals the key exactly)."""
    predicted = first_integer(continuation)
    return predicted, predicted == key


def evaluate_passkey(model, tokenizer, lengths, depths=(0, 25, 50, 75, 100), trials: int = 5, seed: int = 0,
                     max_new_tokens: int = 8, batch_size: int = 8, labels: dict | None = None,
                     progress: bool | None = None) -> list[dict]:
    """Passkey accuracy over lengths x depths x trials on a loaded model; one `PasskeyRow` per trial, as a dict.

    lengths: positive token counts; depths: percents in 0..100. labels: fields every row starts with.
    """
    rows = []
    grid = retrieval_grid(model, tokenizer, lengths, depths, trials,
                          lambda length, depth, trial: passkey_case(tokenizer, length, depth, trial, seed),
                          max_new_tokens, batch_size, "passkey", progress)
    for depth, trial, case, continuation in grid:
        predicted, correct = score_passkey(continuation, case.answer)
        rows.append(PasskeyRow(
            length=case.length, answer=case.answer, needle_start=case.needle_start, needle_end=case.needle_end,
            question_position=case.question_position, depth_percent=depth, trial=trial, seed=seed,
            score=float(correct), correct=correct,
            prediction=predicted if predicted is not None else continuation.strip(),
        ).to_dict(labels))
    return rows


def run_passkey(model: str = "default", method: str | RopeSpec = "default", *, lengths=(256, 512, 1024),
                depths=(0, 25, 50, 75, 100), trials: int = 5, seed: int = 0, factor: float | None = None,
                original_max_position_embeddings: int | None = None, max_new_tokens: int = 8, batch_size: int = 8,
                options: ModelOptions | None = None, out="results/passkey",
                progress: bool | None = None) -> list[dict]:
    """`ropescope passkey`: load the model (extended by `method`), run the grid, and write out/passkey.csv and
    out/passkey.png. The shortest prompt is built before the weights load, so a too-short length fails first."""
    from ropescope.models import extension_specs, load, load_tokenizer, resolve_model
    from ropescope.plots import plot_retrieval_heatmap
    from ropescope.results import write_rows

    source = resolve_model(model)
    (spec,) = extension_specs(source, [method], factor, original_max_position_embeddings)
    passkey_case(load_tokenizer(source), min(lengths), 0, 0, seed)
    loaded = load(source, spec, options)
    rows = evaluate_passkey(loaded.model, loaded.tokenizer, lengths, depths, trials, seed, max_new_tokens,
                            batch_size, labels=loaded.labels.to_dict(), progress=progress)
    out = Path(out)
    write_rows(rows, out / "passkey.csv")
    plot_retrieval_heatmap(rows, out / "passkey.png", title=f"passkey: {source.name}, {loaded.labels.method}")
    return rows
