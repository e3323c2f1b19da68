"""Passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key hidden in repeated filler, asked for at the end.

A grid of lengths (tokens of the model's own tokenizer) x depths (percent of the filler before the key), N trials
per cell, each trial a different random key; greedy decoding of a few tokens, the first integer compared exactly.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from ropescope.eval.cases import PromptCase
from ropescope.eval.decoding import first_integer, retrieval_grid, special_prefix
from ropescope.models import ModelOptions
from ropescope.passkey_format import KEY_DIGITS, PasskeyPrompts
from ropescope.rope import RopeSpec
from ropescope.rows import PasskeyRow


def passkey_key(trial: int, seed: int = 0) -> str:
    """The key of a trial: KEY_DIGITS random digits, no leading zero; the same for every cell of the grid."""
    rng = random.Random(f"passkey:{seed}:{trial}")
    return str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))


def passkey_case(tokenizer, length: int, depth_percent: float, trial: int, seed: int = 0) -> PromptCase:
    """The passkey prompt of exactly `length` tokens with the key line at `depth_percent` of the filler.

    The layout is `PasskeyPrompts.evaluation_prompt`'s, after the tokenizer's special prefix (a BOS token).
    """
    key = passkey_key(trial, seed)
    ids, needle_start, needle_end = PasskeyPrompts(tokenizer).evaluation_prompt(length, depth_percent, key,
                                                                                special_prefix(tokenizer))
    return PromptCase(input_ids=torch.tensor(ids, dtype=torch.long), answer=key, needle_start=needle_start,
                      needle_end=needle_end, question_position=len(ids) - 1)


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
