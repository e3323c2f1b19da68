"""Distance distributions against eager attention weights; Jensen-Shannon against a brute-force formula."""

import math

import pytest
import torch

from tests.helpers import VOCAB, tiny_model
from ropescope.attention.entropy import distance_bin_edges
from ropescope.attention.patterns import distance_distribution, jensen_shannon, pattern_preservation
from ropescope.errors import RopescopeError
from ropescope.io.rows import DistanceRow, PreservationRow


def brute_force_js(p, q):
    total = 0.0
    for a, b in zip(p, q):
        m = (a + b) / 2
        if a > 0:
            total += 0.5 * a * math.log(a / m)
        if b > 0:
            total += 0.5 * b * math.log(b / m)
    return total


def test_jensen_shannon_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    for size in (1, 2, 5, 17):
        p = torch.rand(size, generator=generator)
        q = torch.rand(size, generator=generator)
        if size > 2:
            p[0] = 0.0  # zero-probability bins contribute nothing
            q[1] = 0.0
        p, q = p / p.sum(), q / q.sum()
        assert float(jensen_shannon(p, q)) == pytest.approx(brute_force_js(p.tolist(), q.tolist()), abs=1e-12)
    assert float(jensen_shannon(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(math.log(2))
    assert float(jensen_shannon(torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7]))) == 0.0
    batched = jensen_shannon(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    assert batched.shape == (2,) and batched[0] == 0


def eager_distance_mass(model, sample, original_max_position_embeddings, queries, edges):
    """Mass per rescaled distance bin from transformers' eager attention weights: [layers, heads, bins]."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        weights = torch.stack(model(sample[None], output_attentions=True).attentions)[:, 0].double()
    model.set_attn_implementation("sdpa")
    length = len(sample)
    positions = torch.arange(length)
    distance = (positions[:, None] - positions[None, :]).clamp(min=0).double() * original_max_position_embeddings / length
    bins = torch.bucketize(distance, edges.double(), right=True) - 1
    mass = torch.stack([(weights * (bins == b)).sum(-1) for b in range(len(edges))], dim=-1)
    return mass[:, :, -queries:].mean(dim=2)


@pytest.mark.parametrize("length", [32, 80])
def test_distance_distribution_matches_eager(length):
    model = tiny_model("llama")
    sample = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(length))
    rows = distance_distribution(model, [sample], original_max_position_embeddings=32, query_fraction=0.25, chunk_size=16,
                                 labels={"method": "default"}, progress=False)
    edges = distance_bin_edges(31)
    assert {row["method"] for row in rows} == {"default"}
    assert len(rows) == 2 * 4 * len(edges)
    assert rows[0]["distance_scale"] == length / 32 and rows[0]["queries"] == length // 4
    assert rows[-1]["distance_end"] == 32
    expected = eager_distance_mass(model, sample, 32, length // 4, edges)
    for row in rows:
        assert row["mass"] == pytest.approx(float(expected[row["layer"], row["head"], row["bin"]]), abs=1e-5)
    for layer in range(2):
        for head in range(4):
            total = sum(row["mass"] for row in rows if row["layer"] == layer and row["head"] == head)
            assert total == pytest.approx(1.0, abs=1e-5)


def test_pattern_preservation_is_zero_against_itself_and_positive_otherwise():
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(5)
    short = [torch.randint(0, VOCAB, (32,), generator=generator)]
    long = [torch.randint(0, VOCAB, (64,), generator=generator)]
    reference = distance_distribution(model, short, original_max_position_embeddings=32, progress=False)
    extended = distance_distribution(model, long, original_max_position_embeddings=32, progress=False)
    same = pattern_preservation(reference, reference)
    assert [row["layer"] for row in same] == [0, 1, "mean"]
    assert all(row["js_divergence"] == 0 for row in same)
    scores = pattern_preservation(reference, extended, labels={"method": "default"})
    assert scores[-1]["length"] == 64 and scores[-1]["reference_length"] == 32 and scores[-1]["method"] == "default"
    assert 0 < scores[-1]["js_divergence"] <= math.log(2)
    assert scores[-1]["js_divergence"] == pytest.approx(sum(row["js_divergence"] for row in scores[:2]) / 2)
    other_bins = distance_distribution(model, short, original_max_position_embeddings=32, bins_per_octave=2,
                                       progress=False)
    with pytest.raises(RopescopeError, match="bins"):
        pattern_preservation(reference, other_bins)


def test_rows_are_typed():
    model = tiny_model("llama")
    sample = [torch.arange(32, dtype=torch.long) % VOCAB]
    distribution = distance_distribution(model, sample, original_max_position_embeddings=16, progress=False,
                                         labels={"method": "default"})
    assert all(list(row) == ["method", *DistanceRow.keys()] for row in distribution)
    assert {row["distance_scale"] for row in distribution} == {2.0}
    scores = pattern_preservation(distribution, distribution)
    assert all(list(row) == PreservationRow.keys() for row in scores) and scores[-1]["layer"] == "mean"
