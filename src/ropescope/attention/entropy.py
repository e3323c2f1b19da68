"""Streaming attention statistics: entropy and attention mass per key distance, never the full attention matrix.

Attention of query i over keys j is the softmax of the scores s_ij = scale * q_i . k_j. Its entropy (natural log),
the paper's measure of attention uncertainty (arXiv 2406.13282, Section 4), is

    H_i = logsumexp_j(s_ij) - sum_j softmax(s_i)_j * s_ij.

Both terms are accumulated over blocks of keys with an online softmax (as in flash attention): a running maximum
m, Z = sum exp(s - m) and A = sum exp(s - m) * (s - m), rescaled whenever m grows, so that H = log Z - A / Z and
only one block of scores (query block x key block) exists at a time. The attention mass per key-distance bin
is accumulated the same way. This module imports only torch and math.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

DEFAULT_CHUNK_SIZE = 512  # 512 x 512 scores per head: a few MB per block, big enough for fast matmuls on CPU


class AttentionStatistics(NamedTuple):
    """What one streaming pass returns.

    entropy: [batch, heads, q_len], natural log, float32.
    distance_mass: [batch, heads, q_len, n_bins] float32, each query's attention mass per key-distance bin
        (sums to 1 over bins), or None when no bins were asked for.
    """

    entropy: torch.Tensor
    distance_mass: torch.Tensor | None


def distance_bin_edges(max_distance: int, bins_per_octave: int = 1) -> torch.Tensor:
    """Left edges of log-spaced key-distance bins covering distances 0..max_distance.

    Bin 0 is distance 0 (the query's own token); after it, `bins_per_octave` bins per doubling of the distance,
    with integer edges: bins_per_octave=1 gives [0, 1, 2, 4, 8, ...], so bin b >= 1 holds distances
    [2^(b-1), 2^b). The last bin is open-ended. Returns LongTensor[n_bins], strictly increasing.
    """
    if max_distance < 0:
        raise ValueError(f"max_distance={max_distance} must be >= 0")
    if bins_per_octave < 1:
        raise ValueError(f"bins_per_octave={bins_per_octave} must be >= 1")
    edges = [0]
    index = 0
    while True:
        edge = math.floor(2.0 ** (index / bins_per_octave) + 1e-9)
        if edge > max_distance:
            break
        if edge > edges[-1]:
            edges.append(edge)
        index += 1
    return torch.tensor(edges, dtype=torch.long)


def distance_bins(distances: torch.Tensor, edges: torch.Tensor, distance_scale: float = 1.0) -> torch.Tensor:
    """Bin index of each key distance: the bin b with edges[b] <= distance / distance_scale < edges[b + 1].

    distances: integer tensor of any shape (>= 0); edges: [n_bins] as from `distance_bin_edges`.
    distance_scale divides distances before binning (the length ratio when comparing an extended length with
    the pretrained one). Returns LongTensor of the shape of `distances`.
    """
    scaled = distances.to(torch.float64) / distance_scale
    return torch.bucketize(scaled, edges.to(torch.float64, copy=False), right=True) - 1


def attention_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    softcap: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_chunk_size: int | None = None,
    sliding_window: int | None = None,
    distance_edges: torch.Tensor | None = None,
    distance_scale: float = 1.0,
    backend: str = "auto",
) -> AttentionStatistics:
    """Exact attention entropy (and optionally mass per key-distance bin) of every query, block by block.

    q: [batch, heads, q_len, head_dim], rotated queries (Hugging Face layout).
    k: [batch, kv_heads, k_len, head_dim], rotated keys; heads must be a multiple of kv_heads (grouped-query
        attention: query head h reads key head h // (heads // kv_heads), as in transformers' `repeat_kv`).
    With q_len < k_len the queries are the last q_len positions (a decoding step over a cache).
    causal: query at position i sees keys j <= i; otherwise every key.
    scale: multiplies q . k; default head_dim ** -0.5.
    softcap: logit softcapping (Gemma 2): the scores are softcap * tanh(scale * q . k / softcap).
    chunk_size / query_chunk_size: keys / queries per block; at most one [batch, heads, query_chunk, chunk]
        block of scores is alive at a time.
    sliding_window: query i sees only keys with i - j < sliding_window (Mistral / Qwen2 convention).
    distance_edges: LongTensor[n_bins] of left bin edges (`distance_bin_edges`); the key distance is i - j
        (|i - j| without causal masking), divided by `distance_scale` before binning.
    backend: "blocks" runs the blocked online softmax below; "auto" (default) hands entropy-only requests on
        float32 CPU tensors (no sliding window; causal only with q_len == k_len) to PyTorch's CPU flash-attention
        kernel, which runs the same online softmax fused, with values [k | 1] (see `_fused_entropy`).
    Returns AttentionStatistics(entropy [batch, heads, q_len], distance_mass [batch, heads, q_len, n_bins] or None).
    """
    batch, heads, q_len, head_dim = q.shape
    k_batch, kv_heads, k_len, k_dim = k.shape
    if k_batch != batch or k_dim != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    if q_len > k_len:
        raise ValueError(f"q_len={q_len} > k_len={k_len}: queries must be the last q_len of the keys' positions")
    if chunk_size < 1 or (query_chunk_size is not None and query_chunk_size < 1):
        raise ValueError("chunk sizes must be >= 1")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be >= 1")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap} must be > 0")
    if backend not in ("auto", "blocks"):
        raise ValueError(f"backend={backend!r}; accepted: auto, blocks")
    scale = head_dim**-0.5 if scale is None else scale
    if sliding_window is not None and sliding_window >= k_len:
        sliding_window = None  # the window covers every key: plain causal attention
    if (
        backend == "auto" and distance_edges is None and sliding_window is None and softcap is None and q.device.type == "cpu"
        and q.dtype == torch.float32 and k.dtype == torch.float32 and (not causal or q_len == k_len)
    ):
        return AttentionStatistics(_fused_entropy(q, k, scale=scale, causal=causal), None)
    query_chunk_size = query_chunk_size or chunk_size
    group = heads // kv_heads
    device = q.device
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    k = k.to(compute_dtype)
    offset = k_len - q_len  # absolute position of query 0

    bin_of_distance = None
    n_bins = 0
    if distance_edges is not None:
        n_bins = len(distance_edges)
        # Bins depend only on the distance, so one lookup table serves every block.
        bin_of_distance = distance_bins(torch.arange(k_len, device=device), distance_edges.to(device), distance_scale)

    # sum_j p_j s_ij = q_i . sum_j p_j k_j: with a column of ones after k, one matmul P @ [k | 1] gives both the
    # softmax denominator and the score average, the way flash attention computes P @ V, instead of
    # elementwise passes over the block.
    keys_and_ones = torch.cat([k, torch.ones(*k.shape[:-1], 1, dtype=compute_dtype, device=device)], dim=-1)
    entropy = torch.empty(batch, heads, q_len, dtype=torch.float32, device=device)
    distance_mass = (
        torch.empty(batch, heads, q_len, n_bins, dtype=torch.float32, device=device) if n_bins else None
    )
    for q_start in range(0, q_len, query_chunk_size):
        q_end = min(q_start + query_chunk_size, q_len)
        rows = q_end - q_start
        first_position, last_position = offset + q_start, offset + q_end - 1
        # Grouped heads share a key head: fold the group into the query rows, [b, kv_heads, group * rows, d].
        q_block = (q[:, :, q_start:q_end].to(compute_dtype) * scale).reshape(batch, kv_heads, group * rows, head_dim)
        query_positions = torch.arange(first_position, last_position + 1, device=device)

        key_begin, key_end = 0, k_len
        if causal:
            key_end = last_position + 1
        if sliding_window is not None:
            key_begin = max(0, first_position - sliding_window + 1)
            if not causal:
                key_end = min(k_len, last_position + sliding_window)

        # Online softmax state per query row: running maximum m, and sum_j exp(s_j - m) * [k_j | 1].
        running_max = torch.full((batch, kv_heads, group * rows, 1), -math.inf, dtype=torch.float64, device=device)
        weighted_keys = torch.zeros(batch, kv_heads, group * rows, head_dim + 1, dtype=torch.float64, device=device)
        # With softcapping, sum p s is no longer q . sum p k: accumulate sum_j exp(s_j - m) * s_j itself.
        weighted_scores = torch.zeros_like(running_max) if softcap is not None else None
        mass = torch.zeros(batch, heads, rows, n_bins, dtype=torch.float64, device=device) if n_bins else None

        for k_start in range(key_begin, key_end, chunk_size):
            k_stop = min(k_start + chunk_size, key_end)
            scores = torch.matmul(q_block, k[:, :, k_start:k_stop].transpose(-1, -2))  # [b, kv, group*rows, keys]
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            # Only blocks that cross the diagonal or the window's edge need a mask.
            crosses_diagonal = causal and k_stop - 1 > first_position
            crosses_window = sliding_window is not None and (
                last_position - k_start >= sliding_window
                or (not causal and k_stop - 1 - first_position >= sliding_window)
            )
            relative = None
            if crosses_diagonal or crosses_window or mass is not None:
                relative = query_positions[:, None] - torch.arange(k_start, k_stop, device=device)[None, :]
            if crosses_diagonal or crosses_window:
                hidden = torch.zeros_like(relative, dtype=torch.bool)
                if crosses_diagonal:
                    hidden |= relative < 0
                if crosses_window:
                    hidden |= relative.abs() >= sliding_window
                scores.view(batch, heads, rows, -1).masked_fill_(hidden, -math.inf)

            new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True).to(torch.float64))
            # A row with no visible key yet keeps -inf; shift it by 0 so exp gives 0 rather than NaN.
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            correction = torch.exp(running_max - shift)
            if weighted_scores is not None:
                finite_scores = scores.masked_fill(torch.isinf(scores), 0.0)  # masked keys: weight 0, score 0
                probabilities = (scores - shift.to(compute_dtype)).exp_()
                weighted_scores = correction * weighted_scores + (probabilities * finite_scores).sum(
                    -1, keepdim=True, dtype=torch.float64
                )
            else:
                probabilities = scores.sub_(shift.to(compute_dtype)).exp_()
            block_sums = torch.matmul(probabilities, keys_and_ones[:, :, k_start:k_stop])
            weighted_keys = correction * weighted_keys + block_sums.to(torch.float64)
            running_max = new_max
            if mass is not None:
                distance = relative.abs() if not causal else relative.clamp(min=0)
                bins = bin_of_distance[distance].expand(batch, heads, rows, k_stop - k_start)
                block_mass = torch.zeros(batch, heads, rows, n_bins, dtype=compute_dtype, device=device)
                block_mass.scatter_add_(-1, bins, probabilities.view(batch, heads, rows, -1))
                mass = correction.view(batch, heads, rows, 1) * mass + block_mass.to(torch.float64)

        total = weighted_keys[..., -1:]
        # H = logsumexp(s) - sum p s / sum p, with logsumexp = m + log Z and sum p s = q . sum p k.
        if weighted_scores is not None:
            mean_score = weighted_scores / total
        else:
            mean_score = (q_block.to(torch.float64) * weighted_keys[..., :-1]).sum(-1, keepdim=True) / total
        block_entropy = running_max + torch.log(total) - mean_score
        entropy[:, :, q_start:q_end] = block_entropy.view(batch, heads, rows).to(torch.float32)
        if mass is not None:
            distance_mass[:, :, q_start:q_end] = (mass / total.view(batch, heads, rows, 1)).to(torch.float32)
    return AttentionStatistics(entropy, distance_mass)


def _fused_entropy(q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: bool) -> torch.Tensor:
    """Entropy through PyTorch's CPU flash-attention kernel: [batch, heads, q_len] float32.

    With values v = [k | 1] the kernel returns O = softmax(s) @ [k | 1] and logsumexp(s), blocked with an
    online softmax like the loop in `attention_statistics` but fused: H = logsumexp(s) - scale * q . O[..., :d].
    The kernel wants one head size for q, k and v, so q and k get a zero column (scores are unchanged).
    q_len == k_len when causal (the kernel's causal mask is aligned top-left).
    """
    batch, heads, q_len, head_dim = q.shape
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    zeros_q = q.new_zeros(batch, heads, q_len, 1)
    zeros_k = k.new_zeros(batch, heads, k.shape[2], 1)
    values = torch.cat([k, torch.ones_like(zeros_k)], dim=-1)
    output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        torch.cat([q, zeros_q], dim=-1), torch.cat([k, zeros_k], dim=-1), values, 0.0, causal, scale=scale
    )[:2]
    mean_score = torch.linalg.vecdot(q, output[..., :head_dim])  # float32 is enough: no cancellation here
    return logsumexp - scale * mean_score


def attention_entropy(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    softcap: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sliding_window: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Natural-log entropy of each query's attention distribution, streamed over key blocks.

    q: [batch, heads, q_len, head_dim], k: [batch, kv_heads, k_len, head_dim] (post-RoPE, GQA allowed; with
    q_len < k_len the queries are the last q_len positions). Returns float32 [batch, heads, q_len].
    Equal to the entropy of softmax(scale * q k^T) with the causal (and sliding-window) mask, without ever
    holding more than one [query chunk x key chunk] block of scores. See `attention_statistics`.
    """
    return attention_statistics(
        q, k, causal=causal, scale=scale, softcap=softcap, chunk_size=chunk_size, sliding_window=sliding_window,
        backend=backend,
    ).entropy
