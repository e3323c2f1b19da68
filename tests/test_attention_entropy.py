"""The streaming statistics against a float64 brute-force softmax over the full score matrix."""

import math

import pytest
import torch

from ropescope.attention.entropy import (
    attention_entropy,
    attention_statistics,
    choose_kernel,
    distance_bin_edges,
    distance_bins,
    fused_entropy,
)


def brute_force(q, k, *, causal, scale=None, softcap=None, sinks=None, sliding_window=None, edges=None,
                distance_scale=1.0):
    """Full softmax in float64: entropy [b, h, q_len] and mass per distance bin [b, h, q_len, n_bins]; sinks add a
    last column of scores (one logit per head) that counts in the entropy and in no bin."""
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
    if sinks is not None:
        scores = torch.cat([scores, sinks.double().view(1, heads, 1, 1).expand(batch, heads, q_len, 1)], dim=-1)
    probabilities = scores.softmax(-1)
    entropy = -torch.where(probabilities > 0, probabilities * probabilities.log(), 0.0).sum(-1)
    probabilities = probabilities[..., :k_len]
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


@pytest.mark.parametrize("backend", ["blocks", "auto"])
@pytest.mark.parametrize("options", [{}, {"sliding_window": 5}, {"softcap": 2.0}, {"causal": False}])
def test_attention_sinks(backend, options):
    """gpt-oss's sinks: one more outcome per head, with a learned logit and no key."""
    generator = torch.Generator().manual_seed(13)
    q = 2 * torch.randn(2, 6, 21, 8, generator=generator)
    k = torch.randn(2, 2, 21, 8, generator=generator)
    sinks = torch.linspace(-2.0, 3.0, 6)  # from a negligible sink to one that takes most of the mass
    options = {"causal": True, **options}
    expected, mass = brute_force(q, k, sinks=sinks, edges=distance_bin_edges(20), **options)
    without_sinks, _ = brute_force(q, k, **options)
    assert (expected - without_sinks).abs().max() > 0.1
    result = attention_statistics(q, k, sinks=sinks, chunk_size=4, query_chunk_size=5, backend=backend, **options)
    torch.testing.assert_close(result.entropy.double(), expected, atol=1e-4, rtol=0)
    binned = attention_statistics(q, k, sinks=sinks, chunk_size=4, distance_edges=distance_bin_edges(20), **options)
    torch.testing.assert_close(binned.distance_mass.double(), mass, atol=1e-5, rtol=0)  # sums to 1 - sink mass


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


# --- the kernel choice and the fused paths ----------------------------------------------------------------------

HALF = (torch.float16, torch.bfloat16)
HALF_TOLERANCE = 0.05  # nats: a half-precision kernel rounds softmax @ k to 8 bits of mantissa
PLAIN = dict(head_dim=128, causal=True, q_len=64, k_len=64)
KERNEL_CHOICES = [
    # device, dtype, options, expected
    ("cuda", torch.bfloat16, {}, "cuda_flash"),
    ("cuda", torch.float16, {"sliding_window": 16}, "cuda_flash"),  # windows are flash's own
    ("cuda", torch.bfloat16, {"q_len": 1}, "cuda_flash"),  # so is causal aligned to the last query
    ("cuda", torch.bfloat16, {"head_dim": 12}, "blocks"),  # both CUDA kernels want multiples of 8
    ("cuda", torch.float32, {"head_dim": 12}, "blocks"),
    ("cuda", torch.bfloat16, {"head_dim": 512}, "cuda_efficient"),  # flash goes up to 256
    ("cuda", torch.bfloat16, {"flash_available": False}, "cuda_efficient"),  # a GPU older than Ampere
    ("cuda", torch.float32, {}, "cuda_efficient"),  # flash has no float32
    ("cuda", torch.float32, {"causal": False, "q_len": 8}, "cuda_efficient"),
    ("cuda", torch.float32, {"sliding_window": 16}, "blocks"),  # the efficient kernel has no window
    ("cuda", torch.float32, {"q_len": 8}, "blocks"),  # its causal mask starts at the first query
    ("cuda", torch.bfloat16, {"softcap": 50.0}, "blocks"),  # sum p s is no longer q . sum p k
    ("cuda", torch.bfloat16, {"distance_mass": True}, "blocks"),
    ("cuda", torch.float64, {}, "blocks"),
    ("cpu", torch.float32, {}, "cpu_flash"),
    ("cpu", torch.bfloat16, {}, "cpu_flash"),  # computed in float32
    ("cpu", torch.float32, {"causal": False, "q_len": 8}, "cpu_flash"),
    ("cpu", torch.float32, {"q_len": 8}, "blocks"),
    ("cpu", torch.float32, {"sliding_window": 16}, "blocks"),
    ("cpu", torch.float32, {"softcap": 50.0}, "blocks"),
    ("cpu", torch.float64, {}, "blocks"),
    ("mps", torch.float32, {}, "blocks"),
]


@pytest.mark.parametrize("device, dtype, options, expected", KERNEL_CHOICES)
def test_kernel_choice(device, dtype, options, expected):
    assert choose_kernel(device, dtype, **{**PLAIN, **options}) == expected


def reference_flash(q, k, v, cum_q, cum_k, max_q, max_k, dropout, causal, debug, *, scale, window_size_left,
                    window_size_right):
    """What PyTorch's CUDA `_flash_attention_forward` computes, written out: [batch, seq, heads, head_dim] layout,
    grouped key heads, causal and windows aligned to the last query, output rounded to the input dtype."""
    assert cum_q is None and cum_k is None and dropout == 0.0 and max_q == q.shape[1] and max_k == k.shape[1]
    output, logsumexp = _reference_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, causal, window_size_left, window_size_right
    )
    return output.transpose(1, 2), logsumexp, None, None, None


def reference_efficient(q, k, v, bias, compute_log_sumexp, dropout, causal, *, scale):
    """What PyTorch's CUDA `_scaled_dot_product_efficient_attention` computes: [batch, heads, seq, head_dim], one
    head count for q, k and v, causal from the first query, log-sum-exp padded to a multiple of 32 queries."""
    assert bias is None and compute_log_sumexp and dropout == 0.0 and q.shape[1] == k.shape[1] == v.shape[1]
    output, logsumexp = _reference_attention(q, k, v, scale, causal and q.shape[2] == k.shape[2], -1, -1)
    if causal and q.shape[2] != k.shape[2]:
        raise AssertionError("the efficient kernel's causal mask is top-left aligned")
    padding = -q.shape[2] % 32
    return output, torch.nn.functional.pad(logsumexp, (0, padding), value=float("nan")), None, None


def _reference_attention(q, k, v, scale, causal, left, right):
    dtype = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q_len, k_len = q.shape[2], k.shape[2]
    query_positions = torch.arange(k_len - q_len, k_len)[:, None]
    key_positions = torch.arange(k_len)[None, :]
    visible = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        visible &= key_positions <= query_positions
    if left >= 0:
        visible &= key_positions >= query_positions - left
    if right >= 0:
        visible &= key_positions <= query_positions + right
    scores = (scale * q @ k.transpose(-1, -2)).masked_fill(~visible, -math.inf)
    return (scores.softmax(-1) @ v).to(dtype), scores.logsumexp(-1).float()


FUSED_CASES = [
    # kernel, batch, heads, kv_heads, q_len, k_len, head_dim, causal, window
    ("cpu_flash", 2, 4, 2, 37, 37, 16, True, None),  # GQA
    ("cpu_flash", 1, 3, 1, 9, 40, 12, False, None),  # multi-query, head_dim not a multiple of 8
    ("cuda_efficient", 2, 6, 2, 45, 45, 24, True, None),  # GQA repeated; log-sum-exp padded past q_len
    ("cuda_efficient", 1, 2, 2, 5, 33, 8, False, None),
    ("cuda_flash", 2, 4, 2, 37, 37, 16, True, None),
    ("cuda_flash", 2, 8, 2, 7, 40, 16, True, None),  # the last 7 queries: causal from the bottom right
    ("cuda_flash", 1, 4, 1, 30, 30, 8, True, 5),  # sliding window
    ("cuda_flash", 1, 4, 2, 6, 30, 8, False, 4),  # both-sided window without causal masking
]


def _fused_inputs(case, dtype):
    _, batch, heads, kv_heads, q_len, k_len, head_dim, _, _ = case
    generator = torch.Generator().manual_seed(q_len * k_len)
    q = 3 * torch.randn(batch, heads, q_len, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator) + 2.0  # keys share an offset, as in LLMs
    return q.to(dtype), k.to(dtype)


REFERENCE_OPS = {"cuda_flash": reference_flash, "cuda_efficient": reference_efficient, "cpu_flash": None}


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda case: "-".join(map(str, case)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_fused_paths_equal_brute_force(case, dtype, with_sinks):
    """Each kernel's path (layout, grouped heads, masks, the padded log-sum-exp, dtypes, sinks) against the full
    float64 softmax; the CUDA kernels are stood in by reference implementations of what they compute."""
    kernel, causal, window = case[0], case[7], case[8]
    q, k = _fused_inputs(case, dtype)
    sinks = torch.linspace(-1.0, 4.0, q.shape[1]) if with_sinks else None
    expected, _ = brute_force(q, k, causal=causal, sliding_window=window, sinks=sinks)
    entropy = fused_entropy(q, k, scale=q.shape[-1] ** -0.5, causal=causal, sliding_window=window, sinks=sinks,
                            kernel=kernel, attention=REFERENCE_OPS[kernel])
    assert entropy.shape == q.shape[:3] and entropy.dtype == torch.float32
    # Half-precision kernels round their output (8 bits of mantissa): the stated tolerance there is 0.05 nats.
    tolerance = HALF_TOLERANCE if dtype in HALF and kernel != "cpu_flash" else 1e-4
    torch.testing.assert_close(entropy.double(), expected, atol=tolerance, rtol=0)


def test_centred_values_keep_half_precision_error_small():
    """Keys with a large shared offset: O = softmax @ (k - mean k) is small, so its bfloat16 rounding costs little;
    softmax @ k itself would carry an error of the offset's size."""
    case = ("cuda_flash", 1, 8, 2, 128, 128, 64, True, None)
    q, k = _fused_inputs(case, torch.float32)
    k = (k + 30.0).bfloat16()
    q = q.bfloat16()
    expected, _ = brute_force(q, k, causal=True)
    entropy = fused_entropy(q, k, scale=0.125, causal=True, kernel="cuda_flash", attention=reference_flash)
    error = (entropy.double() - expected).abs().max()
    scores_of_offset = 0.125 * (q.double() @ torch.full((64,), 30.0, dtype=torch.float64)).abs().max()
    assert error < HALF_TOLERANCE < 2**-8 * scores_of_offset  # far below what rounding softmax @ k would give


def test_auto_backend_follows_the_choice():
    q = torch.randn(1, 4, 20, 8, generator=torch.Generator().manual_seed(0))
    k = torch.randn(1, 2, 20, 8, generator=torch.Generator().manual_seed(1))
    for options in ({}, {"sliding_window": 4}, {"softcap": 1.0}):
        expected, _ = brute_force(q, k, causal=True, **options)
        chosen = choose_kernel("cpu", q.dtype, head_dim=8, causal=True, q_len=20, k_len=20, **options)
        forced = attention_statistics(q, k, backend=chosen, **options).entropy
        torch.testing.assert_close(attention_statistics(q, k, **options).entropy, forced, atol=0, rtol=0)
        torch.testing.assert_close(forced.double(), expected, atol=1e-4, rtol=0)
    for options in ({"softcap": 1.0}, {"sliding_window": 4}, {"distance_edges": distance_bin_edges(8)}):
        with pytest.raises(ValueError, match="backend='cpu_flash' does not compute this"):
            attention_statistics(q, k, backend="cpu_flash", **options)
    with pytest.raises(ValueError, match="backend='cuda_flash' does not compute this on cpu"):
        attention_statistics(q, k, backend="cuda_flash")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [
    # heads, kv_heads, q_len, k_len, head_dim, window
    (8, 2, 300, 300, 128, None),
    (8, 2, 300, 300, 128, 64),
    (8, 1, 17, 300, 64, None),
    (6, 3, 200, 200, 96, 33),
    (4, 4, 129, 129, 12, None),  # the blocked loop: no kernel takes head_dim 12
    (4, 2, 129, 129, 256, None),
])
def test_cuda_kernels_equal_brute_force(dtype, shape):
    """The real CUDA kernels, chosen by `auto`, against the float64 softmax of the same (rounded) inputs."""
    heads, kv_heads, q_len, k_len, head_dim, window = shape
    generator = torch.Generator().manual_seed(q_len + head_dim)
    q = (3 * torch.randn(2, heads, q_len, head_dim, generator=generator)).to(dtype)
    k = (torch.randn(2, kv_heads, k_len, head_dim, generator=generator) + 2.0).to(dtype)
    expected, _ = brute_force(q, k, causal=True, sliding_window=window)
    entropy = attention_entropy(q.cuda(), k.cuda(), sliding_window=window).cpu()
    tolerance = HALF_TOLERANCE if dtype in HALF else 1e-4
    torch.testing.assert_close(entropy.double(), expected, atol=tolerance, rtol=0)
    blocks = attention_entropy(q.cuda(), k.cuda(), sliding_window=window, backend="blocks", chunk_size=64).cpu()
    torch.testing.assert_close(blocks.double(), expected, atol=1e-4, rtol=0)  # the loop accumulates in float64


def test_fused_entropy_in_slices_of_queries(monkeypatch):
    """Long sequences reduce q . sum p k a slice of queries at a time; slices that do not divide the length."""
    import ropescope.attention.entropy as entropy_module

    case = ("cuda_flash", 2, 4, 2, 37, 37, 16, True, None)
    q, k = _fused_inputs(case, torch.float32)
    expected, _ = brute_force(q, k, causal=True)
    monkeypatch.setattr(entropy_module, "_MEAN_SCORE_ROWS", 5)
    for kernel in ("cpu_flash", "cuda_flash"):
        entropy = fused_entropy(q, k, scale=0.25, causal=True, kernel=kernel, attention=REFERENCE_OPS[kernel])
        torch.testing.assert_close(entropy.double(), expected, atol=1e-4, rtol=0)
