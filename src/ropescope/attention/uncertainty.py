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
from ropescope.attention.entropy import DEFAULT_CHUNK_SIZE, attention_statistics
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


class AnswerReadout:
    """A capture callback (`capture_attention`) that reads the answering query's attention of each prompt of a
    batch during a forward over the batch's prompts: the retrieval's own prefill (`greedy_continuations`' first
    forward), or the forward `answer_attention` runs. Row b of the batch is cases[b]'s prompt, at least up to its
    question_position (keys past it are left out: attention is causal).

    `statistics()` then gives, per case, what `answer_attention` returns.
    """

    def __init__(self, cases: Sequence[PromptCaseLike], *, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.positions = [_answering_position(case) for case in cases]
        self.bins = [_fact_bins(position, case.facts) for position, case in zip(self.positions, cases)]
        self.chunk_size = chunk_size
        self.layers: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in cases]

    def __call__(self, attention: LayerAttention) -> None:
        for row, (position, (edges, bins)) in enumerate(zip(self.positions, self.bins)):
            statistics = attention_statistics(
                attention.query[row : row + 1, :, position : position + 1], attention.key[row : row + 1, :, : position + 1],
                scale=attention.scaling, softcap=attention.softcap, sinks=attention.sinks,
                sliding_window=attention.sliding_window, chunk_size=self.chunk_size, distance_edges=edges)
            self.layers[row][attention.layer] = {
                "entropy": statistics.entropy[0, :, 0].cpu(),
                **{f"{role}_mass": statistics.distance_mass[0, :, 0, bins[role]].sum(-1).cpu() for role in ROLES}}

    def statistics(self) -> list[dict[str, torch.Tensor]]:
        """Per case: {"entropy", "needle_mass", "distractor_mass"}, each [layers, heads] float32."""
        out = []
        for layers in self.layers:
            order = sorted(layers)
            out.append({name: torch.stack([layers[layer][name] for layer in order])
                        for name in ("entropy", *(f"{role}_mass" for role in ROLES))})
        return out


def _answering_position(case: PromptCaseLike) -> int:
    input_ids = torch.as_tensor(case.input_ids)
    position = int(case.question_position)
    if input_ids.dim() != 1 or not 0 <= position < len(input_ids):
        raise RopescopeError(f"question_position={position} is outside the prompt of {input_ids.shape} tokens")
    if not any(fact.role == "needle" for fact in case.facts):
        raise RopescopeError("the prompt case has no needle to measure attention on")
    return position


def answer_attention(model, case: PromptCaseLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, torch.Tensor]:
    """Entropy, needle mass and distractor mass of the answering query's attention, per layer and head, from a
    forward of its own over the prompt up to the answering query: the readout of one prompt on any model as it is
    (a retrieval records the same numbers from its own prefill: `evaluate_retrieval(..., read_attention=True)`).

    Returns {"entropy", "needle_mass", "distractor_mass"}: each [layers, heads] float32 (entropy in nats; masses
    summed over every fact of the role, 0 where the case has none).
    """
    readout = AnswerReadout([case], chunk_size=chunk_size)
    position = readout.positions[0]
    with capture_attention(model, readout):
        # Causal attention: tokens after the answering query cannot change what it attends to.
        forward_for_statistics(model, torch.as_tensor(case.input_ids)[: position + 1][None])
    return readout.statistics()[0]


def layer_means(statistics: Mapping[str, torch.Tensor], case: PromptCaseLike) -> dict[str, list[float] | None]:
    """`answer_attention`'s statistics as a retrieval row records them (its `answer_attention` field): per layer,
    the mean over heads of entropy, needle mass and distractor mass (None where the prompt has no distractor)."""
    distracted = any(fact.role == "distractor" for fact in case.facts)
    means = {name: [float(value) for value in statistics[name].double().mean(-1)]
             for name in ("entropy", "needle_mass", "distractor_mass")}
    return {**means, "distractor_mass": means["distractor_mass"] if distracted else None}


def uncertainty_row(row: Mapping, readout: Mapping[str, Sequence[float] | None], question_position: int) -> dict:
    """The evaluation row plus its answering query's attention fields, from the per-layer means of `layer_means`:
    entropy, needle_mass and distractor_mass (means over layers and heads; None where no distractor),
    entropy_max (log of the number of keys the query sees: the entropy of uniform attention), and
    entropy_layer_<i> / needle_mass_layer_<i> / distractor_mass_layer_<i> (means over heads)."""
    entropy, needle_mass, distractor_mass = (readout[name] for name in ("entropy", "needle_mass", "distractor_mass"))
    result = {
        **row,
        "entropy": math.fsum(entropy) / len(entropy),  # every layer has the same heads: the mean over both
        "needle_mass": math.fsum(needle_mass) / len(needle_mass),
        # None, not 0, where the prompt has no distractor: there was nothing to attend to
        "distractor_mass": None if distractor_mass is None else math.fsum(distractor_mass) / len(distractor_mass),
        "entropy_max": math.log(int(question_position) + 1),
    }
    for name, values in (("entropy", entropy), ("needle_mass", needle_mass), ("distractor_mass", distractor_mass)):
        for layer in range(len(entropy)):
            result[f"{name}_layer_{layer}"] = None if values is None else values[layer]
    return result


def recorded_attention(rows: Sequence[Mapping]) -> list[dict] | None:
    """`retrieval_attention`'s rows from the readouts the retrieval recorded in its own prefill (each row's
    `answer_attention`), with no forward; None when some row lacks one (rows of an older retrieval)."""
    if any(not row.get("answer_attention") for row in rows):
        return None
    return [uncertainty_row({key: value for key, value in row.items() if key != "answer_attention"},
                            row["answer_attention"], row["question_position"]) for row in rows]


def retrieval_attention(
    model,
    cases: Sequence[PromptCaseLike],
    rows: Sequence[Mapping],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool | None = None,
) -> list[dict]:
    """One row per evaluation cell: the evaluation row plus the answering query's attention statistics
    (`uncertainty_row`), each prompt read by `answer_attention` in a forward of its own.

    cases[i] is the prompt of rows[i] (rebuilt with `rebuild_cases` or the evaluation's case builders); where a
    row carries needle_start / needle_end / question_position they must agree with the case.
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
        means = layer_means(answer_attention(model, case, chunk_size=chunk_size), case)
        plain = {key: value for key, value in row.items() if key != "answer_attention"}
        out.append(uncertainty_row(plain, means, case.question_position))
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
