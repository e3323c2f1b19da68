"""Attention against key distance (the paper's Figure 2 view) and the pattern preservation score.

Distances are measured on the pretrained scale. In a sequence of `length` tokens from a model pretrained at
L0 = `original_max_position_embeddings` tokens, a key at distance d = i - j from query i is placed at the
rescaled distance d * L0 / length, i.e. d divided by the length ratio r = length / L0 (r = 1 at the pretrained
length). The rescaled distances fall into log-spaced bins with integer left edges 0, 1, 2, 4, ...
(`distance_bin_edges(L0 - 1)`, the last bin ending at L0): bin b holds keys with edges[b] <= d / r < edges[b + 1].
At 4x the pretrained length, bin [4, 8) thus holds distances 16..31. The queries are the last `query_fraction`
of the positions, which see (nearly) the whole sequence; their mass per bin is averaged over queries and samples.

The pattern preservation score (arXiv 2406.13282, Section 3: extensions that keep the pretrained attention
pattern extrapolate) is the Jensen-Shannon divergence, in nats (0 .. ln 2), between a model's distribution at a
length and a reference distribution (by default the original model at the pretrained length), per layer and
head, averaged over heads per layer and over layers overall. Lower means the pattern was kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from ropescope.attention.capture import LayerAttention, capture_attention, forward_for_statistics
from ropescope.attention.entropy import DEFAULT_CHUNK_SIZE, distance_bin_edges
from ropescope.attention.profiles import one_length_samples
from ropescope.errors import RopescopeError
from ropescope.io.rows import FULL_LAYER_TYPE, DistanceRow, PreservationRow
from ropescope.model.attention import layer_types

def distance_distribution(
    model,
    samples: Iterable[torch.Tensor],
    *,
    original_max_position_embeddings: int,
    query_fraction: float = 0.125,
    bins_per_octave: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    labels: Mapping | None = None,
    progress: bool | None = None,
) -> list[dict]:
    """Attention mass per rescaled key-distance bin of the last queries, per layer and head, over `samples`.

    samples: LongTensor[length] token blocks of one length (unpadded). See the module docstring for the
    rescaling and the bins (query_fraction in (0, 1], bins_per_octave >= 1, original_max_position_embeddings
    >= 2). Returns `DistanceRow`s as dicts, labels first; per (layer, head) the masses sum to 1.
    """
    edges = distance_bin_edges(original_max_position_embeddings - 1, bins_per_octave)
    length = None
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for sample in one_length_samples(samples, "distribution", "distance", progress):
        if length is None:
            length = len(sample)
            queries = max(1, math.ceil(query_fraction * length))
            distance_scale = length / original_max_position_embeddings

        def record(attention: LayerAttention) -> None:
            mass = attention.statistics(
                queries, chunk_size=chunk_size, distance_edges=edges, distance_scale=distance_scale,
            ).distance_mass  # [1, heads, queries, bins]
            mean = mass[0].double().mean(dim=1).cpu()
            sums[attention.layer] = sums[attention.layer] + mean if attention.layer in sums else mean

        with capture_attention(model, record):
            forward_for_statistics(model, sample[None])
        count += 1
    ends = edges.tolist()[1:] + [original_max_position_embeddings]
    rows = []
    types = layer_types(model)
    for layer in sorted(sums):
        for head, masses in enumerate(sums[layer] / count):
            for index, (start, end) in enumerate(zip(edges.tolist(), ends)):
                rows.append(DistanceRow(
                    length=length, original_max_position_embeddings=original_max_position_embeddings,
                    distance_scale=distance_scale, layer=layer, layer_type=types[layer], head=head, bin=index,
                    distance_start=start, distance_end=end, mass=float(masses[index]), queries=queries, samples=count,
                ).to_dict(labels))
    return rows


def jensen_shannon(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Jensen-Shannon divergence in nats between distributions along `dim` (each sums to 1): 0 .. ln 2.

    JS(p, q) = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2; zero-probability terms contribute 0.
    p, q: same shape [..., n, ...]. Returns the shape without `dim`, float64.
    """
    p, q = p.to(torch.float64), q.to(torch.float64)
    middle = (p + q) / 2

    def kl_to_middle(x: torch.Tensor) -> torch.Tensor:
        ratio = torch.where(x > 0, x / torch.where(middle > 0, middle, 1.0), 1.0)
        return (x * torch.log(ratio)).sum(dim)

    return ((kl_to_middle(p) + kl_to_middle(q)) / 2).clamp(min=0.0)


def distribution_tensor(rows: list[dict]) -> tuple[torch.Tensor, list[int]]:
    """Rows of one distribution -> (mass [layers, heads, bins] float64, left bin edges)."""
    if not rows:
        raise RopescopeError("no distribution rows")
    layers = 1 + max(row["layer"] for row in rows)
    heads = 1 + max(row["head"] for row in rows)
    bins = 1 + max(row["bin"] for row in rows)
    mass = torch.full((layers, heads, bins), math.nan, dtype=torch.float64)
    edges = [0] * bins
    for row in rows:
        mass[row["layer"], row["head"], row["bin"]] = float(row["mass"])
        edges[row["bin"]] = int(row["distance_start"])
    if torch.isnan(mass).any():
        raise RopescopeError("distribution rows are incomplete: some (layer, head, bin) is missing")
    return mass, edges


def pattern_preservation(reference_rows: list[dict], rows: list[dict], labels: Mapping | None = None) -> list[dict]:
    """Jensen-Shannon divergence of a distribution (`rows`) from a reference one, per layer and averaged.

    Both are rows of one `distance_distribution` each, with the same pretrained length and bins (so distances
    are already on the same rescaled axis). Returns one row per layer {**labels, length, reference_length,
    layer, layer_type, js_divergence (mean over heads), js_divergence_max_head} and a last row with layer "mean"
    (layer_type "all").
    """
    reference, reference_edges = distribution_tensor(reference_rows)
    mass, edges = distribution_tensor(rows)
    if edges != reference_edges or mass.shape != reference.shape:
        raise RopescopeError(
            f"distributions differ in shape {tuple(mass.shape)} vs {tuple(reference.shape)} or bins {edges} vs "
            f"{reference_edges}: compute both with the same original_max_position_embeddings and bins_per_octave"
        )
    divergence = jensen_shannon(mass, reference)  # [layers, heads]
    lengths = {"length": rows[0]["length"], "reference_length": reference_rows[0]["length"]}
    types = {row["layer"]: row.get("layer_type", FULL_LAYER_TYPE) for row in rows}  # rows before the column: one type
    per_layer = [(layer, types[layer], values) for layer, values in enumerate(divergence)]
    per_layer.append(("mean", "all", divergence))
    return [
        PreservationRow(**lengths, layer=layer, layer_type=layer_type, js_divergence=float(values.mean()),
                        js_divergence_max_head=float(values.max())).to_dict(labels)
        for layer, layer_type, values in per_layer
    ]
