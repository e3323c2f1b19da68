"""Attention uncertainty against retrieval errors (arXiv 2406.13282, Section 4: errors where entropy is high).

For each cell of any retrieval task, the answering query (the last prompt token, `question_position`) is run once
and its attention over the context is summarised per layer and head: entropy in nats, the attention mass on the
needles (every inserted fact the question asks for) and on the distractors (facts it does not ask for). Over
cells: mean entropy and masses on correct vs failed cells and the AUROC of entropy as a predictor of failure.
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
from ropescope.io.rows import as_bool
from ropescope.statistics import auroc  # the package's one AUROC; imported here for failure_summary

GROUP_FIELDS = ("model", "method", "factor", "task")
ROLES = ("needle", "distractor")


class FactLike(Protocol):
    start: int
    end: int
    role: str


class PromptCaseLike(Protocol):
    input_ids: torch.Tensor  # [length], the whole prompt
    facts: Sequence[FactLike]
    question_position: int


def _fact_bins(position: int, facts: Sequence[FactLike]) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """(left edges of key-distance bins, the bins each role covers) for the query at `position`.

    Key j is at distance position - j, so the fact [start, end) is the distance band [position - end + 1,
    position - start + 1): with every band's ends as bin edges, each bin lies wholly inside or outside each fact.
    """
    for fact in facts:
        if not 0 <= fact.start < fact.end <= position:
            raise RopescopeError(f"needle span [{fact.start}, {fact.end}) must be non-empty and before "
                                 f"question_position={position}")
        if fact.role not in ROLES:
            raise RopescopeError(f"fact role {fact.role!r}; accepted: {', '.join(ROLES)}")
    edges = sorted({0, *(position - fact.end + 1 for fact in facts), *(position - fact.start + 1 for fact in facts)})
    bins: dict[str, set[int]] = {role: set() for role in ROLES}
    for fact in facts:
        low, high = position - fact.end + 1, position - fact.start + 1
        bins[fact.role].update(index for index, edge in enumerate(edges) if low <= edge < high)
    return torch.tensor(edges), {role: sorted(indices) for role, indices in bins.items()}


def answer_attention(model, case: PromptCaseLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, torch.Tensor]:
    """Entropy, needle mass and distractor mass of the answering query's attention, per layer and head.

    Returns {"entropy", "needle_mass", "distractor_mass"}: each [layers, heads] float32 (entropy in nats; masses
    summed over every fact of the role, 0 where the case has none).
    """
    input_ids = torch.as_tensor(case.input_ids)
    position = int(case.question_position)
    if input_ids.dim() != 1 or not 0 <= position < len(input_ids):
        raise RopescopeError(f"question_position={position} is outside the prompt of {input_ids.shape} tokens")
    if not any(fact.role == "needle" for fact in case.facts):
        raise RopescopeError("the prompt case has no needle to measure attention on")
    edges, bins = _fact_bins(position, case.facts)
    masses: dict[str, dict[int, torch.Tensor]] = {role: {} for role in ROLES}
    entropy: dict[int, torch.Tensor] = {}

    def record(attention: LayerAttention) -> None:
        statistics = attention.statistics(1, chunk_size=chunk_size, distance_edges=edges)
        entropy[attention.layer] = statistics.entropy[0, :, 0].cpu()
        for role in ROLES:
            masses[role][attention.layer] = statistics.distance_mass[0, :, 0, bins[role]].sum(-1).cpu()

    with capture_attention(model, record):
        # Causal attention: tokens after the answering query cannot change what it attends to.
        forward_for_statistics(model, input_ids[: position + 1][None])
    layers = sorted(entropy)
    return {"entropy": torch.stack([entropy[layer] for layer in layers]),
            **{f"{role}_mass": torch.stack([masses[role][layer] for layer in layers]) for role in ROLES}}


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
    Added fields: entropy, needle_mass and distractor_mass (means over layers and heads), entropy_max (log of the
    number of keys the query sees: the entropy of uniform attention), and entropy_layer_<i> / needle_mass_layer_<i>
    (means over heads).
    """
    if len(cases) != len(rows):
        raise RopescopeError(f"{len(cases)} prompt cases for {len(rows)} evaluation rows; they must pair up")
    out = []
    pairs = list(zip(cases, rows))
    for case, row in tqdm(pairs, desc="uncertainty", unit="cell", disable=None if progress is None else not progress):
        needle = next(fact for fact in case.facts if fact.role == "needle")
        rebuilt = {"needle_start": needle.start, "needle_end": needle.end, "question_position": case.question_position}
        for field, value in rebuilt.items():
            if row.get(field) not in (None, "") and int(row[field]) != int(value):
                raise RopescopeError(
                    f"{field}={row[field]} in the row but {value} in the rebuilt prompt "
                    f"(length={row.get('length')}, depth_percent={row.get('depth_percent')}, trial={row.get('trial')})"
                )
        statistics = answer_attention(model, case, chunk_size=chunk_size)
        distracted = any(fact.role == "distractor" for fact in case.facts)
        entropy, needle_mass = statistics["entropy"].double(), statistics["needle_mass"].double()
        result = {
            **row,
            "entropy": float(entropy.mean()),
            "needle_mass": float(needle_mass.mean()),
            # None, not 0, where the prompt has no distractor: there was nothing to attend to
            "distractor_mass": float(statistics["distractor_mass"].double().mean()) if distracted else None,
            "entropy_max": math.log(int(case.question_position) + 1),
        }
        for layer in range(entropy.shape[0]):
            result[f"entropy_layer_{layer}"] = float(entropy[layer].mean())
        for layer in range(entropy.shape[0]):
            result[f"needle_mass_layer_{layer}"] = float(needle_mass[layer].mean())
        for layer in range(entropy.shape[0]):
            result[f"distractor_mass_layer_{layer}"] = (
                float(statistics["distractor_mass"][layer].double().mean()) if distracted else None)
        out.append(result)
    return out


def failure_summary(rows: Sequence[Mapping]) -> list[dict]:
    """Per (model, method, factor, task) and per statistic (the mean over layers, then each layer): mean
    entropy, needle mass and distractor mass on correct vs failed cells, and the AUROC of entropy as a predictor
    of failure (NaN where no cell of an outcome has the quantity: no failures, or no distractors)."""
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
            suffix = "" if layer == "mean" else f"_layer_{layer}"
            entropies = [float(row[entropy_field]) for row in group]
            masses = [float(row[f"needle_mass{suffix}"]) for row in group]
            distractors = [math.nan if row.get(f"distractor_mass{suffix}") in (None, "") else
                           float(row[f"distractor_mass{suffix}"]) for row in group]

            def mean_where(values, wanted):
                chosen = [v for v, f in zip(values, failed) if f == wanted and not math.isnan(v)]
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
                "distractor_mass_correct": mean_where(distractors, False),
                "distractor_mass_failed": mean_where(distractors, True),
                "auroc_entropy_predicts_failure": auroc(entropies, failed),
            })
    return summary
