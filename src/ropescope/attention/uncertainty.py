"""Attention uncertainty against retrieval errors (arXiv 2406.13282, Section 4: errors where entropy is high).

For each passkey / needle cell, the answering query (the last prompt token, `question_position`) is run once
and its attention over the context is summarised per layer and head: entropy in nats, and the attention mass
on the needle tokens [needle_start, needle_end). Over cells: mean entropy on correct vs failed cells and the
AUROC of entropy as a predictor of failure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from tqdm.auto import tqdm

from ropescope.attention.capture import LayerAttention, capture_attention, forward_for_statistics
from ropescope.attention.entropy import DEFAULT_CHUNK_SIZE
from ropescope.errors import RopescopeError
from ropescope.study.statistics import auroc  # the package's one AUROC; imported here for failure_summary

CELL_FIELDS = ("model", "method", "factor", "task", "length", "depth_percent", "trial")
GROUP_FIELDS = ("model", "method", "factor", "task")


class PromptCaseLike(Protocol):
    input_ids: torch.Tensor  # [length], the whole prompt
    needle_start: int
    needle_end: int
    question_position: int


def answer_attention(model, case: PromptCaseLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, torch.Tensor]:
    """Entropy and needle mass of the answering query's attention, per layer and head.

    Returns {"entropy": [layers, heads], "needle_mass": [layers, heads]} float32 (entropy in nats).
    """
    input_ids = torch.as_tensor(case.input_ids)
    position, start, end = int(case.question_position), int(case.needle_start), int(case.needle_end)
    if input_ids.dim() != 1 or not 0 <= position < len(input_ids):
        raise RopescopeError(f"question_position={position} is outside the prompt of {input_ids.shape} tokens")
    if not 0 <= start < end <= position:
        raise RopescopeError(f"needle span [{start}, {end}) must be non-empty and before question_position={position}")
    # For the one query at `position`, the needle is the band of key distances (position - end, position - start]:
    # three distance bins (after the needle, the needle, before it) give its mass from the streaming pass.
    edges = torch.tensor([0, position - end + 1, position - start + 1])
    entropy: dict[int, torch.Tensor] = {}
    needle_mass: dict[int, torch.Tensor] = {}

    def record(attention: LayerAttention) -> None:
        statistics = attention.statistics(1, chunk_size=chunk_size, distance_edges=edges)
        entropy[attention.layer] = statistics.entropy[0, :, 0].cpu()
        needle_mass[attention.layer] = statistics.distance_mass[0, :, 0, 1].cpu()

    with capture_attention(model, record):
        # Causal attention: tokens after the answering query cannot change what it attends to.
        forward_for_statistics(model, input_ids[: position + 1][None])
    return {
        "entropy": torch.stack([entropy[layer] for layer in sorted(entropy)]),
        "needle_mass": torch.stack([needle_mass[layer] for layer in sorted(needle_mass)]),
    }


def retrieval_attention(
    model,
    cases: Sequence[PromptCaseLike],
    rows: Sequence[Mapping],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool | None = None,
) -> list[dict]:
    """One row per evaluation cell: the evaluation row plus the answering query's attention statistics.

    cases[i] is the prompt of rows[i] (rebuilt with `rebuild_cases` or the evaluation's case builders); where a
    row carries needle_start / needle_end / question_position they must agree with the case.
    Added fields: entropy and needle_mass (means over layers and heads), entropy_max (log of the number of keys
    the query sees: the entropy of uniform attention), and entropy_layer_<i> / needle_mass_layer_<i> (means
    over heads).
    """
    if len(cases) != len(rows):
        raise RopescopeError(f"{len(cases)} prompt cases for {len(rows)} evaluation rows; they must pair up")
    out = []
    pairs = list(zip(cases, rows))
    for case, row in tqdm(pairs, desc="uncertainty", unit="cell", disable=None if progress is None else not progress):
        for field in ("needle_start", "needle_end", "question_position"):
            if row.get(field) not in (None, "") and int(row[field]) != int(getattr(case, field)):
                raise RopescopeError(
                    f"{field}={row[field]} in the row but {getattr(case, field)} in the rebuilt prompt "
                    f"(length={row.get('length')}, depth_percent={row.get('depth_percent')}, trial={row.get('trial')})"
                )
        statistics = answer_attention(model, case, chunk_size=chunk_size)
        entropy, needle_mass = statistics["entropy"].double(), statistics["needle_mass"].double()
        result = {
            **row,
            "entropy": float(entropy.mean()),
            "needle_mass": float(needle_mass.mean()),
            "entropy_max": math.log(int(case.question_position) + 1),
        }
        for layer in range(entropy.shape[0]):
            result[f"entropy_layer_{layer}"] = float(entropy[layer].mean())
        for layer in range(entropy.shape[0]):
            result[f"needle_mass_layer_{layer}"] = float(needle_mass[layer].mean())
        out.append(result)
    return out


def rebuild_cases(tokenizer, rows: Sequence[Mapping], *, haystack_documents: Sequence[str] | None = None,
                  seed: int = 0) -> list:
    """The prompt of every evaluation row, rebuilt deterministically by the evaluation's case builders.

    A row's own `seed` wins over `seed`; needle rows need the haystack documents the evaluation used.
    """
    cases = []
    for row in rows:
        task = row.get("task")
        row_seed = row.get("seed")
        arguments = dict(length=int(row["length"]), depth_percent=float(row["depth_percent"]),
                         trial=int(row["trial"]), seed=seed if row_seed in (None, "") else int(row_seed))
        if task == "passkey":
            from ropescope.eval.passkey import passkey_case

            cases.append(passkey_case(tokenizer, **arguments))
        elif task == "needle":
            from ropescope.eval.needle import needle_case

            if haystack_documents is None:
                raise RopescopeError("needle rows need haystack documents to rebuild their prompts")
            cases.append(needle_case(tokenizer, haystack_documents, **arguments))
        else:
            raise RopescopeError(f"task={task!r} cannot be rebuilt; accepted: passkey, needle")
    return cases


def as_bool(value) -> bool:
    """A `correct` field from JSON (bool, number) or CSV (text)."""
    if isinstance(value, str):
        if value.strip().lower() in ("true", "1", "yes"):
            return True
        if value.strip().lower() in ("false", "0", "no", ""):
            return False
        raise RopescopeError(f"correct={value!r} is not a truth value; accepted: true/false/1/0")
    return bool(value)


def failure_summary(rows: Sequence[Mapping]) -> list[dict]:
    """Per (model, method, factor, task) and per statistic (the mean over layers, then each layer): mean
    entropy and needle mass on correct vs failed cells, and the AUROC of entropy as a predictor of failure."""
    groups: dict[tuple, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(field) for field in GROUP_FIELDS), []).append(row)
    summary = []
    for key, group in groups.items():
        failed = [not as_bool(row["correct"]) for row in group]
        layer_fields = sorted(
            (field for field in group[0] if field.startswith("entropy_layer_")), key=lambda f: int(f.rsplit("_", 1)[1])
        )
        for entropy_field in ["entropy", *layer_fields]:
            layer = "mean" if entropy_field == "entropy" else int(entropy_field.rsplit("_", 1)[1])
            mass_field = "needle_mass" if layer == "mean" else f"needle_mass_layer_{layer}"
            entropies = [float(row[entropy_field]) for row in group]
            masses = [float(row[mass_field]) for row in group]

            def mean_where(values, wanted):
                chosen = [v for v, f in zip(values, failed) if f == wanted]
                return sum(chosen) / len(chosen) if chosen else math.nan

            summary.append({
                **dict(zip(GROUP_FIELDS, key)),
                "layer": layer,
                "cells": len(group),
                "failures": sum(failed),
                "entropy_correct": mean_where(entropies, False),
                "entropy_failed": mean_where(entropies, True),
                "needle_mass_correct": mean_where(masses, False),
                "needle_mass_failed": mean_where(masses, True),
                "auroc_entropy_predicts_failure": auroc(entropies, failed),
            })
    return summary
