"""Passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key hidden in repeated filler, asked for at the end.

A grid of lengths (tokens of the model's own tokenizer) x depths (percent of the filler before the key), N trials
per cell, each trial a different random key; greedy decoding of a few tokens, the first integer compared exactly.
"""

from __future__ import annotations

import random

import torch

from ropescope.eval.cases import PromptCase
from ropescope.eval.common import (
    check_depth,
    check_depths,
    check_lengths,
    check_output_path,
    check_plot_path,
    check_positive,
    first_integer,
    case_fields,
    retrieval_grid,
    load_eval_model,
    load_tokenizer,
    check_model_args,
    special_prefix,
)
from ropescope.results import write_rows
from ropescope.passkey_format import KEY_DIGITS, PasskeyPrompts


def passkey_key(trial: int, seed: int = 0) -> str:
    """The key of a trial: KEY_DIGITS random digits, no leading zero; the same for every cell of the grid."""
    rng = random.Random(f"passkey:{seed}:{trial}")
    return str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))


def passkey_case(tokenizer, length: int, depth_percent: float, trial: int, seed: int = 0) -> PromptCase:
    """The passkey prompt of exactly `length` tokens with the key line at `depth_percent` of the filler.

    The layout is `PasskeyPrompts.evaluation_prompt`'s, after the tokenizer's special prefix (a BOS token).
    """
    check_positive("length", length)
    check_depth(depth_percent)
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
    """Passkey accuracy over lengths x depths x trials on a loaded model; one row per trial.

    labels: fields every row carries (model, method, factor, ...), put first.
    """
    lengths = check_lengths(lengths)
    depths = check_depths(depths)
    check_positive("trials", trials)
    check_positive("max_new_tokens", max_new_tokens)
    check_positive("batch_size", batch_size)
    labels = dict(labels or {})  # the caller names the model; a study adds its own labels
    rows = []
    grid = retrieval_grid(model, tokenizer, lengths, depths, trials,
                          lambda length, depth, trial: passkey_case(tokenizer, length, depth, trial, seed),
                          max_new_tokens, batch_size, "passkey", progress)
    for depth, trial, case, continuation in grid:
        predicted, correct = score_passkey(continuation, case.answer)
        rows.append({
            **labels, "task": "passkey", **case_fields(case), "depth_percent": depth, "trial": trial, "seed": seed,
            "score": float(correct), "correct": correct,
            "prediction": predicted if predicted is not None else continuation.strip(),
        })
    return rows


def run_passkey(model: str = "default", lengths=(256, 512, 1024), depths=(0, 25, 50, 75, 100), trials: int = 5,
                seed: int = 0, method: str | None = None, factor: float | None = None,
                original_length: int | None = None, max_new_tokens: int = 8, batch_size: int = 8,
                out=None, plot=None, progress: bool | None = None) -> list[dict]:
    """`ropescope passkey`: load the model (with an extension if asked), run the grid, write rows and heatmap."""
    lengths = check_lengths(lengths)
    depths = check_depths(depths)
    check_positive("trials", trials)
    out, plot = check_output_path(out), check_plot_path(plot)
    check_model_args(model, method, factor, original_length)
    passkey_case(load_tokenizer(model), min(lengths), 0, 0, seed)  # the shortest prompt fits, before the weights load
    loaded = load_eval_model(model, method, factor, original_length)
    rows = evaluate_passkey(loaded.model, loaded.tokenizer, lengths, depths, trials, seed, max_new_tokens,
                            batch_size, labels=loaded.labels(), progress=progress)
    if out is not None:
        write_rows(rows, out)
    if plot is not None:
        from ropescope.plots import plot_retrieval_heatmap

        plot_retrieval_heatmap(rows, plot, title=f"passkey: {loaded.model_label}, {loaded.method}")
    return rows
