"""Entropy profiles: mean attention entropy per layer, head and query-position bin, averaged over samples."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from tqdm.auto import tqdm

from ropescope.attention.capture import layer_entropies
from ropescope.attention.entropy import DEFAULT_CHUNK_SIZE
from ropescope.errors import RopescopeError
from ropescope.io.rows import SLIDING_LAYER_TYPE, EntropyProfileRow
from ropescope.model.attention import layer_types


def position_bins(length: int, bin_size: int) -> list[tuple[int, int]]:
    """Consecutive query-position bins [start, end) of `bin_size` tokens covering 0..length (the last may be short)."""
    return [(start, min(start + bin_size, length)) for start in range(0, length, bin_size)]


def bin_positions(values: torch.Tensor, bin_size: int) -> torch.Tensor:
    """Sum of `values` [..., length] over consecutive position bins: [..., n_bins]."""
    length = values.shape[-1]
    index = torch.arange(length, device=values.device) // bin_size
    summed = torch.zeros(*values.shape[:-1], int(index[-1]) + 1, dtype=torch.float64, device=values.device)
    return summed.index_add_(-1, index, values.to(torch.float64))


def one_length_samples(samples: Iterable, what: str, desc: str, progress: bool | None) -> Iterator[torch.Tensor]:
    """Each sample as a 1-D token block, all of one length, with a progress bar; at least one, or one error line."""
    length = None
    for sample in tqdm(samples, desc=desc, unit="sample", disable=None if progress is None else not progress):
        sample = torch.as_tensor(sample)
        if sample.dim() != 1:
            raise RopescopeError(f"a sample has shape {tuple(sample.shape)}; expected one token block [length]")
        if length is None:
            length = len(sample)
        elif len(sample) != length:
            raise RopescopeError(f"samples have lengths {length} and {len(sample)}; one {what} needs one length")
        yield sample
    if length is None:
        raise RopescopeError(f"no samples: the {what} needs at least one token block")


def entropy_profile(
    model,
    samples: Iterable[torch.Tensor],
    *,
    position_bin_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    labels: Mapping | None = None,
    progress: bool | None = None,
) -> list[dict]:
    """Mean attention entropy per (layer, head, query-position bin) over `samples`.

    samples: LongTensor[length] token blocks, all of one length (unpadded); each is one forward pass.
    position_bin_size: tokens per query-position bin (default: length / 64, at least 1).
    labels: fields copied into every row (model, method, factor, ...). progress: tqdm bar (None: only on a terminal).
    Returns `EntropyProfileRow`s as dicts, labels first: entropy in nats, the mean over the bin's queries and the
    samples; head_sample_entropy, each sample's mean over all the head's queries; entropy_max = mean of log(visible
    keys): position + 1, at most the window on a sliding-window layer (layer_type "sliding_attention"), the entropy
    of uniform attention over the visible keys, for scale.
    """
    sums = None
    head_means = []  # per sample: [layers, heads], the mean over all queries
    count = 0
    length = None
    for sample in one_length_samples(samples, "profile", "entropy", progress):
        if length is None:
            length = len(sample)
            position_bin_size = position_bin_size or max(1, length // 64)
        entropy = layer_entropies(model, sample[None], chunk_size=chunk_size)[:, 0]  # [layers, heads, length]
        binned = bin_positions(entropy, position_bin_size)
        sums = binned if sums is None else sums + binned
        head_means.append(entropy.double().mean(-1))
        count += 1
    bins = position_bins(length, position_bin_size)
    visible = torch.arange(1, length + 1, dtype=torch.float64)
    rows = []
    layers, heads, _ = sums.shape
    types = layer_types(model)
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    head_samples = torch.stack(head_means, dim=-1).tolist()  # [layers][heads][samples]
    for layer in range(layers):
        # a sliding-window layer's queries see at most `window` keys
        seen = visible.clamp(max=window) if window and types[layer] == SLIDING_LAYER_TYPE else visible
        uniform = bin_positions(torch.log(seen), position_bin_size)
        for head in range(heads):
            for index, (start, end) in enumerate(bins):
                rows.append(EntropyProfileRow(
                    length=length, layer=layer, layer_type=types[layer], head=head, position_start=start,
                    position_end=end,
                    entropy=float(sums[layer, head, index]) / (count * (end - start)),
                    entropy_max=float(uniform[index]) / (end - start), samples=count,
                    head_sample_entropy=head_samples[layer][head],
                ).to_dict(labels))
    return rows
