"""The streaming statistics against a float64 brute-force softmax over the full score matrix."""

import math

import pytest
import torch

from ropescope.attention.entropy import (
    attention_entropy,
    attention_statistics,
    distance_bin_edges,
    distance_bins,
)


def brute_force(q, k, *, causal, scale=None, softcap=None, sliding_window=None, edges=None, distance_scale=1.0):
    """Full softmax in float64: entropy [b, h, q_len] and mass per distance bin [b, h, q_len, n_bins]."""
    q, k = q.double(), k.double()
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    scale = head_dim**-0.5 if scale is None else scale
    scores = scale * q @ k.transpose(-1, -2)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    query_positions = torch.arange(k_len - q_len, k_len)[:, None]
    key_positions = torch.arange(k_len)[None, :]
    visible = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        visible &= key_positions <= query_positions
    if sliding_window is not None:
        visible &= (query_positions - key_positions).abs() < sliding_window
    scores = scores.masked_fill(~visible, -math.inf)
    probabilities = scores.softmax(-1)
    entropy = -torch.where(probabilities > 0, probabilities * probabilities.log(), 0.0).sum(-1)
    if edges is None:
        return entropy, None
    distance = (query_positions - key_positions).abs()
    bins = torch.bucketize(distance.double() / distance_scale, edges.double(), right=True) - 1
    mass = torch.zeros(batch, heads, q_len, len(edges), dtype=torch.float64)
    for b in range(len(edges)):
        mass[..., b] = (probabilities * (bins == b)).sum(-1)
    return entropy, mass


SHAPES = [
    # batch, heads, kv_heads, q_len, k_len, head_dim, chunk_size, query_chunk_size
    (1, 2, 2, 16, 16, 8, 4, None),  # chunk divides the length
    (2, 4, 2, 37, 37, 16, 8, 5),  # GQA, chunks that do not divide
    (1, 6, 2, 23, 23, 8, 64, None),  # one chunk bigger than everything
    (2, 4, 1, 7, 40, 16, 6, 3),  # q_len < k_len: the last 7 positions, multi-query attention
    (1, 3, 3, 1, 33, 8, 5, None),  # one decoding query
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["blocks", "auto"])
def test_entropy_equals_float64_brute_force(shape, causal, backend):
    batch, heads, kv_heads, q_len, k_len, head_dim, chunk, query_chunk = shape
    generator = torch.Generator().manual_seed(hash((shape, causal)) % 2**31)
    # Large scores (x3) make peaked distributions, where a naive formula loses precision.
    q = 3 * torch.randn(batch, heads, q_len, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator)
    expected, _ = brute_force(q, k, causal=causal)
    streamed = attention_statistics(
        q, k, causal=causal, chunk_size=chunk, query_chunk_size=query_chunk, backend=backend
    ).entropy
    assert streamed.shape == (batch, heads, q_len)
    assert streamed.dtype == torch.float32
    torch.testing.assert_close(streamed.double(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        attention_entropy(q, k, causal=causal, chunk_size=chunk, backend=backend).double(), expected, atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("backend", ["blocks", "auto"])
def test_random_shapes_against_brute_force(backend):
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        kv_heads = int(torch.randint(1, 3, (1,), generator=generator))
        heads = kv_heads * int(torch.randint(1, 4, (1,), generator=generator))
        k_len = int(torch.randint(1, 60, (1,), generator=generator))
        q_len = int(torch.randint(1, k_len + 1, (1,), generator=generator))
        head_dim = int(torch.randint(1, 5, (1,), generator=generator)) * 4
        chunk = int(torch.randint(1, 20, (1,), generator=generator))
        causal = bool(torch.randint(0, 2, (1,), generator=generator))
        scale = float(torch.rand(1, generator=generator)) * 2
        q = torch.randn(2, heads, q_len, head_dim, generator=generator)
        k = torch.randn(2, kv_heads, k_len, head_dim, generator=generator)
        expected, _ = brute_force(q, k, causal=causal, scale=scale)
        streamed = attention_entropy(q, k, causal=causal, scale=scale, chunk_size=chunk, backend=backend)
        torch.testing.assert_close(streamed.double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 5, 12])
def test_sliding_window(causal, window):
    generator = torch.Generator().manual_seed(window)
    q = 2 * torch.randn(1, 4, 30, 8, generator=generator)
    k = torch.randn(1, 2, 30, 8, generator=generator)
    expected, _ = brute_force(q, k, causal=causal, sliding_window=window)
    streamed = attention_statistics(q, k, causal=causal, sliding_window=window, chunk_size=7, query_chunk_size=4)
    torch.testing.assert_close(streamed.entropy.double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("window", [None, 6])
def test_softcapped_scores(window):
    """Gemma 2's logit softcapping: the entropy of softmax(softcap * tanh(scale * q . k / softcap))."""
    generator = torch.Generator().manual_seed(11)
    q = 4 * torch.randn(2, 4, 25, 8, generator=generator)
    k = torch.randn(2, 2, 25, 8, generator=generator)
    expected, _ = brute_force(q, k, causal=True, scale=0.3, softcap=2.0, sliding_window=window)
    uncapped, _ = brute_force(q, k, causal=True, scale=0.3, sliding_window=window)
    assert (expected - uncapped).abs().max() > 0.1  # the cap matters at these scores
    for query_chunk in (None, 7):
        streamed = attention_statistics(
            q, k, scale=0.3, softcap=2.0, sliding_window=window, chunk_size=6, query_chunk_size=query_chunk
        ).entropy
        torch.testing.assert_close(streamed.double(), expected, atol=1e-4, rtol=0)


def test_bin_edges_are_log_spaced():
    assert distance_bin_edges(100).tolist() == [0, 1, 2, 4, 8, 16, 32, 64]
    assert distance_bin_edges(0).tolist() == [0]
    assert distance_bin_edges(8, bins_per_octave=2).tolist() == [0, 1, 2, 4, 5, 8]
    edges = distance_bin_edges(1000)
    assert distance_bins(torch.tensor([0, 1, 2, 3, 4, 7, 8, 999]), edges).tolist() == [0, 1, 2, 2, 3, 3, 4, 10]
    # Rescaling: distance 8 at four times the length is distance 2 on the pretrained scale.
    assert distance_bins(torch.tensor([3, 4, 8, 31, 32]), edges, distance_scale=4.0).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("distance_scale", [1.0, 2.5])
def test_distance_mass_sums_to_one_and_matches_brute_force(shape, causal, distance_scale):
    batch, heads, kv_heads, q_len, k_len, head_dim, chunk, query_chunk = shape
    generator = torch.Generator().manual_seed(7)
    q = 2 * torch.randn(batch, heads, q_len, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator)
    edges = distance_bin_edges(k_len, bins_per_octave=2)
    expected_entropy, expected_mass = brute_force(q, k, causal=causal, edges=edges, distance_scale=distance_scale)
    result = attention_statistics(
        q, k, causal=causal, chunk_size=chunk, query_chunk_size=query_chunk,
        distance_edges=edges, distance_scale=distance_scale,
    )
    assert result.distance_mass.shape == (batch, heads, q_len, len(edges))
    ones = torch.ones(batch, heads, q_len, dtype=torch.float64)
    torch.testing.assert_close(result.distance_mass.sum(-1).double(), ones, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.distance_mass.double(), expected_mass, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.entropy.double(), expected_entropy, atol=1e-4, rtol=0)


def test_half_precision_inputs_are_computed_in_float32():
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 20, 8, generator=generator).to(torch.bfloat16)
    k = torch.randn(1, 2, 20, 8, generator=generator).to(torch.bfloat16)
    expected, _ = brute_force(q.float(), k.float(), causal=True)
    torch.testing.assert_close(attention_entropy(q, k, chunk_size=6).double(), expected, atol=1e-4, rtol=0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple"):
        attention_entropy(torch.zeros(1, 3, 4, 8), torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match="backend='fast'"):
        attention_entropy(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), backend="fast")
    with pytest.raises(ValueError, match="q_len=5"):
        attention_entropy(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 4, 8))
