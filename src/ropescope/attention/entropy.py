"""Streaming attention statistics: entropy and attention mass per key distance, never the full attention matrix.

Attention of query i over keys j is the softmax of the scores s_ij = scale * q_i . k_j (softcapped as
softcap * tanh(s / softcap) in Gemma 2; with a learned sink logit per head as one more outcome in gpt-oss). Its
entropy (natural log), the paper's measure of attention uncertainty
(arXiv 2406.13282, Section 4), is

    H_i = logsumexp_j(s_ij) - sum_j softmax(s_i)_j * s_ij,   with sum_j p_ij s_ij = scale * q_i . sum_j p_ij k_j.

Two ways to compute it, picked by `choose_kernel`:
- a fused attention kernel (PyTorch's flash or memory-efficient attention, on CUDA or CPU) run with values = keys:
  it returns logsumexp(s) and softmax(s) @ k in one pass at the speed of the model's own attention
  (`fused_entropy`);
- a blocked online softmax (as in flash attention), for what no kernel offers (distance bins, softcapping,
  some masks): a running maximum m, Z = sum exp(s - m) and sum exp(s - m) * [k | s], rescaled whenever m grows, so
  that only one block of scores (query block x key block) exists at a time. The attention mass per key-distance
  bin is accumulated the same way.
This module imports only torch and math.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

DEFAULT_CHUNK_SIZE = 512  # 512 x 512 scores per head: a few MB per block, big enough for fast matmuls on CPU


class AttentionStatistics(NamedTuple):
    """What one streaming pass returns.

    entropy: [batch, heads, q_len], natural log, float32 (float64 for float64 inputs).
    distance_mass: [batch, heads, q_len, n_bins] float32 (float64 for float64 inputs), each query's attention mass per key-distance bin
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


KERNELS = ("cuda_flash", "cuda_efficient", "cpu_flash", "blocks")  # in order of preference


def kernel_applies(
    kernel: str,
    device_type: str,
    dtype: torch.dtype,
    *,
    head_dim: int,
    causal: bool,
    q_len: int,
    k_len: int,
    sliding_window: int | None = None,
    softcap: float | None = None,
    distance_mass: bool = False,
    flash_available: bool = True,
) -> bool:
    """Whether `kernel` (one of `KERNELS`) computes the statistics asked for, on tensors of this device and dtype.

    A fused kernel returns the log-sum-exp and softmax @ k in one pass (see `fused_entropy`); it gives the
    entropy alone, of plain (not softcapped) scores, under the masks it has:
    - "cuda_flash": CUDA, float16 / bfloat16, head_dim a multiple of 8 up to 256, a GPU that runs flash
      attention (`flash_available`); causal aligned to the last query and sliding windows are the kernel's own;
    - "cuda_efficient": CUDA up to float32, head_dim a multiple of 8, no window, causal only with q_len == k_len
      (its causal mask starts at the first query);
    - "cpu_flash": CPU up to float32 (half precision computed in float32), the same masks as cuda_efficient.
    "blocks", the blocked online softmax, computes everything (distance bins, softcapping, float64, any device).
    """
    if kernel == "blocks":
        return True
    if distance_mass or softcap is not None or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    top_left_masks = sliding_window is None and (not causal or q_len == k_len)
    if kernel == "cuda_flash":
        return device_type == "cuda" and dtype != torch.float32 and flash_available and head_dim % 8 == 0 \
            and head_dim <= 256
    if kernel == "cuda_efficient":
        return device_type == "cuda" and head_dim % 8 == 0 and top_left_masks
    return kernel == "cpu_flash" and device_type == "cpu" and top_left_masks


def choose_kernel(device_type: str, dtype: torch.dtype, **options) -> str:
    """The first of `KERNELS` that applies (`kernel_applies`, same arguments): a fused kernel where one does,
    else the blocked loop."""
    return next(kernel for kernel in KERNELS if kernel_applies(kernel, device_type, dtype, **options))


def _flash_available(device: torch.device) -> bool:
    # PyTorch's flash attention (FlashAttention 2) runs on Ampere and Hopper GPUs: compute capability 8.x or 9.0.
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(device) in {
        (8, 0), (8, 6), (8, 7), (8, 9), (9, 0)
    }


def attention_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
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
    sinks: [heads] logits of attention sinks (gpt-oss): each head's softmax has one more outcome, with this
        score and no key; the entropy counts it, the distance mass does not (it then sums to 1 - sink mass).
    chunk_size / query_chunk_size: keys / queries per block; at most one [batch, heads, query_chunk, chunk]
        block of scores is alive at a time.
    sliding_window: query i sees only keys with i - j < sliding_window (Mistral / Qwen2 convention).
    distance_edges: LongTensor[n_bins] of left bin edges (`distance_bin_edges`); the key distance is i - j
        (|i - j| without causal masking), divided by `distance_scale` before binning.
    backend: "auto" (default) takes the kernel `choose_kernel` picks for these tensors and options: a fused
        kernel returning the log-sum-exp where one applies, else the blocked online softmax; or one of
        `KERNELS` by name ("blocks" forces the loop; a kernel that cannot compute the request raises ValueError).
    Half-precision inputs are computed in float32 (on CUDA the fused kernels round their output to the input
    dtype: within 0.05 nats), float64 inputs in float64; the blocked loop accumulates in float64.
    Returns AttentionStatistics(entropy [batch, heads, q_len], distance_mass [batch, heads, q_len, n_bins] or None).
    """
    _check_inputs(q, k, chunk_size, query_chunk_size, sliding_window, softcap, sinks, backend)
    k_len = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if sliding_window is not None and sliding_window >= k_len:
        sliding_window = None  # the window covers every key: plain causal attention
    options = dict(
        head_dim=q.shape[-1], causal=causal, q_len=q.shape[2], k_len=k_len, sliding_window=sliding_window,
        softcap=softcap, distance_mass=distance_edges is not None,
        flash_available=q.device.type == "cuda" and _flash_available(q.device),
    )
    kernel = choose_kernel(q.device.type, q.dtype, **options) if backend == "auto" else backend
    if not kernel_applies(kernel, q.device.type, q.dtype, **options):
        raise ValueError(f"backend={kernel!r} does not compute this on {q.device.type} {q.dtype} tensors with "
                         f"these options (see kernel_applies); use 'auto' or 'blocks'")
    if kernel != "blocks":
        entropy = fused_entropy(
            q, k, scale=scale, causal=causal, sliding_window=sliding_window, sinks=sinks, kernel=kernel
        )
        return AttentionStatistics(entropy, None)
    return _blocked_statistics(
        q, k, causal=causal, scale=scale, softcap=softcap, sinks=sinks, chunk_size=chunk_size,
        query_chunk_size=query_chunk_size or chunk_size, sliding_window=sliding_window,
        distance_edges=distance_edges, distance_scale=distance_scale,
    )


def _check_inputs(q, k, chunk_size, query_chunk_size, sliding_window, softcap, sinks, backend) -> None:
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
    if sinks is not None and tuple(sinks.shape) != (heads,):
        raise ValueError(f"sinks of shape {tuple(sinks.shape)}: one logit per head, ({heads},)")
    if backend != "auto" and backend not in KERNELS:
        raise ValueError(f"backend={backend!r}; accepted: auto, {', '.join(KERNELS)}")


# --- the fused kernels ----------------------------------------------------------------------------------------


def fused_entropy(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    kernel: str,
    attention=None,
) -> torch.Tensor:
    """Entropy through a fused attention kernel that returns the log-sum-exp: [batch, heads, q_len] float32.

    With values v = k - c (c: each key head's mean key, a constant shift) the kernel returns
    O = softmax(s) @ v and lse = logsumexp(s), so sum_j p_j s_j = scale * q . (O + c) and
    H = lse - scale * q . (O + c). Shifting the values leaves the weights alone but makes O small, so that a
    half-precision O (the kernel accumulates in float32 and rounds its output) carries a small absolute error.
    Sinks (one logit per head) join afterwards: lse' = logaddexp(lse, sink), and the mean score is the mix of
    the keys' and the sink's by their shares of the softmax.
    q: [batch, heads, q_len, head_dim]; k: [batch, kv_heads, k_len, head_dim]; dtypes and masks as
    `kernel_applies` allows for `kernel`. attention: the kernel's op, for tests that stand in a reference
    implementation of what it computes.
    """
    if kernel == "cpu_flash":
        q, k = q.float(), k.float()  # the CPU computes in float32 anyway; keeps O exact to float32
    center = k.float().mean(dim=2, keepdim=True).to(k.dtype)  # [batch, kv_heads, 1, head_dim]
    values = k - center
    if kernel == "cuda_flash":
        output, logsumexp = _flash(q, k, values, scale, causal, sliding_window, attention)
    else:
        # These kernels want one head count for q, k and v: repeat each key head for its group of query heads.
        group = q.shape[1] // k.shape[1]
        k, values, center = (tensor.repeat_interleave(group, dim=1) for tensor in (k, values, center))
        run = _cpu_flash if kernel == "cpu_flash" else _efficient
        output, logsumexp = run(q, k, values, scale, causal, attention)
    center = center.repeat_interleave(q.shape[1] // center.shape[1], dim=1)
    mean_score = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    # q . sum_j p_j k_j in float32 (no cancellation here), a slice of queries at a time: the float32 copies of a
    # long sequence's q and O would otherwise outweigh the kernel's own memory.
    for start in range(0, q.shape[2], _MEAN_SCORE_ROWS):
        rows = slice(start, start + _MEAN_SCORE_ROWS)
        mean_key = output[:, :, rows].float() + center.float()  # sum_j p_j k_j
        mean_score[:, :, rows] = scale * torch.linalg.vecdot(q[:, :, rows].float(), mean_key)
    logsumexp = logsumexp[..., : q.shape[2]].float()
    if sinks is not None:
        sink = sinks.to(device=q.device, dtype=torch.float32).view(1, -1, 1)
        with_sink = torch.logaddexp(logsumexp, sink)
        mean_score = torch.exp(logsumexp - with_sink) * mean_score + torch.exp(sink - with_sink) * sink
        logsumexp = with_sink
    return logsumexp - mean_score


_MEAN_SCORE_ROWS = 4096


def _flash(q, k, values, scale, causal, sliding_window, attention=None):
    """PyTorch's CUDA flash attention: [batch, seq, heads, head_dim] layout, grouped heads and bottom-right causal
    alignment (the queries are the last q_len positions) native; a window of w keys is w - 1 keys to the left."""
    attention = attention or torch.ops.aten._flash_attention_forward
    left = -1 if sliding_window is None else sliding_window - 1
    right = 0 if causal else left
    output, logsumexp = attention(
        q.transpose(1, 2), k.transpose(1, 2), values.transpose(1, 2), None, None, q.shape[2], k.shape[2], 0.0,
        causal, False, scale=scale, window_size_left=left, window_size_right=right,
    )[:2]
    return output.transpose(1, 2), logsumexp  # [batch, heads, q_len, head_dim], [batch, heads, q_len]


def _efficient(q, k, values, scale, causal, attention=None):
    """PyTorch's CUDA memory-efficient attention; its log-sum-exp may be padded past q_len."""
    attention = attention or torch.ops.aten._scaled_dot_product_efficient_attention
    output, logsumexp = attention(q, k, values, None, True, 0.0, causal, scale=scale)[:2]
    return output, logsumexp


def _cpu_flash(q, k, values, scale, causal, attention=None):
    """PyTorch's CPU flash attention (the same online softmax as the blocked loop below, fused)."""
    attention = attention or torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    output, logsumexp = attention(q, k, values, 0.0, causal, scale=scale)[:2]
    return output, logsumexp


# --- the blocked online softmax -------------------------------------------------------------------------------


def _blocked_statistics(
    q, k, *, causal, scale, softcap, sinks, chunk_size, query_chunk_size, sliding_window, distance_edges,
    distance_scale,
) -> AttentionStatistics:
    """The statistics one query block at a time (see the module docstring); arguments as `attention_statistics`."""
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    device = q.device
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    k = k.to(compute_dtype)
    bin_of_distance = None
    if distance_edges is not None:
        # Bins depend only on the distance, so one lookup table serves every block.
        bin_of_distance = distance_bins(torch.arange(k_len, device=device), distance_edges.to(device), distance_scale)
    n_bins = 0 if distance_edges is None else len(distance_edges)
    # sum_j p_j s_ij = q_i . sum_j p_j k_j: with a column of ones after k, one matmul P @ [k | 1] gives both the
    # softmax denominator and the score average, the way flash attention computes P @ V, instead of
    # elementwise passes over the block.
    keys_and_ones = torch.cat([k, torch.ones(*k.shape[:-1], 1, dtype=compute_dtype, device=device)], dim=-1)
    out_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32  # float64 in, float64 out
    entropy = torch.empty(batch, heads, q_len, dtype=out_dtype, device=device)
    distance_mass = torch.empty(batch, heads, q_len, n_bins, dtype=out_dtype, device=device) if n_bins else None
    for q_start in range(0, q_len, query_chunk_size):
        q_end = min(q_start + query_chunk_size, q_len)
        block = _QueryBlock(q, q_start, q_end, k, scale=scale, softcapped=softcap is not None, sinks=sinks,
                            n_bins=n_bins)
        for k_start, k_stop in _key_blocks(block, k_len, chunk_size, causal, sliding_window):
            scores = torch.matmul(block.queries, k[:, :, k_start:k_stop].transpose(-1, -2))  # [b, kv, group*rows, keys]
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            relative = _mask_block(scores, block, k_start, k_stop, causal, sliding_window, n_bins > 0)
            bins = None
            if bin_of_distance is not None:
                bins = bin_of_distance[relative.abs() if not causal else relative.clamp(min=0)]
            block.update(scores, keys_and_ones[:, :, k_start:k_stop], bins)
        entropy[:, :, q_start:q_end], block_mass = block.finish()
        if distance_mass is not None:
            distance_mass[:, :, q_start:q_end] = block_mass
    return AttentionStatistics(entropy, distance_mass)


def _key_blocks(block, k_len: int, chunk_size: int, causal: bool, sliding_window: int | None):
    """(start, stop) of each block of keys some query of `block` sees."""
    key_begin, key_end = 0, k_len
    if causal:
        key_end = block.last_position + 1
    if sliding_window is not None:
        key_begin = max(0, block.first_position - sliding_window + 1)
        if not causal:
            key_end = min(k_len, block.last_position + sliding_window)
    return [(start, min(start + chunk_size, key_end)) for start in range(key_begin, key_end, chunk_size)]


def _mask_block(scores, block, k_start, k_stop, causal, sliding_window, want_distances) -> torch.Tensor | None:
    """Set to -inf, in place, the scores of keys a query does not see; returns the query - key distances
    [rows, keys] where they were needed (masking, or distance bins), else None."""
    first, last = block.first_position, block.last_position
    # Only blocks that cross the diagonal or the window's edge need a mask.
    crosses_diagonal = causal and k_stop - 1 > first
    crosses_window = sliding_window is not None and (
        last - k_start >= sliding_window or (not causal and k_stop - 1 - first >= sliding_window)
    )
    if not (crosses_diagonal or crosses_window or want_distances):
        return None
    relative = block.positions[:, None] - torch.arange(k_start, k_stop, device=scores.device)[None, :]
    if crosses_diagonal or crosses_window:
        hidden = torch.zeros_like(relative, dtype=torch.bool)
        if crosses_diagonal:
            hidden |= relative < 0
        if crosses_window:
            hidden |= relative.abs() >= sliding_window
        batch, heads, rows = block.shape
        scores.view(batch, heads, rows, -1).masked_fill_(hidden, -math.inf)
    return relative


class _QueryBlock:
    """Online-softmax state of one block of queries (rows q_start..q_end - 1).

    Grouped heads share a key head, so the queries are laid out [batch, kv_heads, group * rows, head_dim]. Per
    query row: the running maximum m and, rescaled whenever m grows, sum_j exp(s_j - m) * [k_j | 1]; the part of
    sum_j exp(s_j - m) * s_j that q . sum p k does not give (a sink's term; every term for softcapped scores);
    and the mass per distance bin when bins are asked for. A sink starts the state as an outcome seen first.
    """

    def __init__(self, q, q_start, q_end, k, *, scale, softcapped, sinks, n_bins):
        batch, heads, q_len, head_dim = q.shape
        kv_heads, k_len = k.shape[1], k.shape[2]
        rows = q_end - q_start
        self.shape = (batch, heads, rows)
        self.first_position = k_len - q_len + q_start  # absolute position of the block's first query
        self.last_position = k_len - q_len + q_end - 1
        self.positions = torch.arange(self.first_position, self.last_position + 1, device=q.device)
        queries = q[:, :, q_start:q_end].to(k.dtype) * scale
        self.queries = queries.reshape(batch, kv_heads, heads // kv_heads * rows, -1)
        self.softcapped = softcapped
        folded = (batch, kv_heads, heads // kv_heads * rows)
        float64 = dict(dtype=torch.float64, device=q.device)
        self.running_max = torch.full((*folded, 1), -math.inf, **float64)
        self.weighted_keys = torch.zeros(*folded, head_dim + 1, **float64)
        self.weighted_scores = torch.zeros(*folded, 1, **float64)
        if sinks is not None:  # head h = kv_head * group + g sits in rows g * rows .. (g + 1) * rows - 1 of kv_head
            sink = sinks.to(**float64).view(kv_heads, heads // kv_heads, 1).expand(-1, -1, rows)
            sink = sink.reshape(1, kv_heads, heads // kv_heads * rows, 1).expand(*folded, 1)
            self.running_max = sink.clone()
            self.weighted_keys[..., -1:] = 1.0  # exp(sink - m) with m = sink
            self.weighted_scores = sink.clone()
        self.mass = torch.zeros(batch, heads, rows, n_bins, **float64) if n_bins else None

    def update(self, scores, keys_and_ones, bins) -> None:
        """Fold one masked block of scores [batch, kv_heads, group * rows, keys] into the state (scores are
        overwritten). keys_and_ones: [batch, kv_heads, keys, head_dim + 1]; bins: [rows, keys] or None."""
        batch, heads, rows = self.shape
        new_max = torch.maximum(self.running_max, scores.amax(dim=-1, keepdim=True).to(torch.float64))
        # A row with no visible key yet keeps -inf; shift it by 0 so exp gives 0 rather than NaN.
        shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        correction = torch.exp(self.running_max - shift)
        self.weighted_scores = correction * self.weighted_scores
        if self.softcapped:
            finite_scores = scores.masked_fill(torch.isinf(scores), 0.0)  # masked keys: weight 0, score 0
            probabilities = (scores - shift.to(scores.dtype)).exp_()
            self.weighted_scores += (probabilities * finite_scores).sum(-1, keepdim=True, dtype=torch.float64)
        else:
            probabilities = scores.sub_(shift.to(scores.dtype)).exp_()
        block_sums = torch.matmul(probabilities, keys_and_ones)
        self.weighted_keys = correction * self.weighted_keys + block_sums.to(torch.float64)
        self.running_max = new_max
        if self.mass is not None:
            block_mass = torch.zeros(self.mass.shape, dtype=scores.dtype, device=scores.device)
            block_mass.scatter_add_(-1, bins.expand(batch, heads, rows, -1), probabilities.view(batch, heads, rows, -1))
            self.mass = correction.view(batch, heads, rows, 1) * self.mass + block_mass.to(torch.float64)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(entropy [batch, heads, rows], mass per bin [batch, heads, rows, n_bins] or None), float32."""
        batch, heads, rows = self.shape
        total = self.weighted_keys[..., -1:]
        # H = logsumexp(s) - sum p s / sum p, with logsumexp = m + log Z and sum p s = q . sum p k.
        weighted_scores = self.weighted_scores
        if not self.softcapped:
            weighted_scores = weighted_scores + (self.queries.to(torch.float64) * self.weighted_keys[..., :-1]).sum(
                -1, keepdim=True
            )
        mean_score = weighted_scores / total
        entropy = (self.running_max + torch.log(total) - mean_score).view(batch, heads, rows).float()
        mass = None if self.mass is None else (self.mass / total.view(batch, heads, rows, 1)).float()
        return entropy, mass


def attention_entropy(q: torch.Tensor, k: torch.Tensor, **options) -> torch.Tensor:
    """Natural-log entropy of each query's attention distribution, never holding the full attention matrix.

    q: [batch, heads, q_len, head_dim], k: [batch, kv_heads, k_len, head_dim] (post-RoPE, GQA allowed; with
    q_len < k_len the queries are the last q_len positions). Returns float32 [batch, heads, q_len].
    Equal to the entropy of softmax(scale * q k^T) (softcapped where `softcap` is set, with one more outcome per
    head where `sinks` are given) with the causal (and sliding-window) mask: to float32 precision for float32
    inputs; within 0.05 nats where a half-precision kernel rounds its output (float16 / bfloat16 on CUDA).
    options: the keywords of `attention_statistics` (causal, scale, softcap, sinks, chunk_size, sliding_window,
    backend, ...), with its defaults.
    """
    return attention_statistics(q, k, **options).entropy
