"""Perplexity against length, by the two protocols of the PI / YaRN evaluations.

- truncated: each document of at least the longest length is cut to its first L tokens and scored in one forward
  pass (the L - 1 predicted tokens).
- sliding: each of those documents, cut to the longest length, is scored with a window of L tokens moved by
  `stride`; each window scores only the tokens no earlier window scored (Press et al. 2022; the Hugging Face
  perplexity guide), so with stride < L every token is scored once, with at least L - stride tokens of context.

The loss never materialises `length x vocab` logits: the decoder runs once to its final hidden states, and the
output head plus log-softmax run over chunks of positions (at 128K tokens and a 32K vocabulary the full logits
alone are 16 GB).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ropescope.errors import RopescopeError
from ropescope.eval.nll import logit_transform, token_nll
from ropescope.io.rows import PerplexityRow
from ropescope.tasks.text import encode, special_prefix

PROTOCOLS = ("truncated", "sliding")
DEFAULT_CHUNK = 1024


def chunked_nll(hidden: torch.Tensor, targets: torch.Tensor, output_head, chunk_size: int = DEFAULT_CHUNK,
                logit_transform=None) -> float:
    """Sum of -log p(target) over positions, the head applied `chunk_size` positions at a time.

    hidden: [n, hidden_size] final hidden states of the positions that predict; targets: LongTensor[n].
    output_head: maps [m, hidden_size] -> [m, vocab] logits. Returns the sum in float64.
    """
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = output_head(hidden[start : start + chunk_size]).float()
        if logit_transform is not None:
            logits = logit_transform(logits)
        total += token_nll(logits, targets[start : start + chunk_size], reduction="sum").double().cpu()
    return float(total)


@torch.inference_mode()
def window_nll(model, input_ids: torch.Tensor, score_from: int = 1, chunk_size: int = DEFAULT_CHUNK) -> tuple[float, int]:
    """(sum of NLL, tokens scored) for tokens `score_from`..end of each row of `input_ids`, context = the row.

    input_ids: LongTensor[batch, window] or [window]. Token t is predicted from the hidden state at t - 1.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    score_from = max(1, score_from)
    window = input_ids.shape[1]
    if score_from >= window:
        return 0.0, 0
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    predicting = hidden[:, score_from - 1 : window - 1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, score_from:].reshape(-1)
    total = chunked_nll(predicting, targets, model.get_output_embeddings(), chunk_size, logit_transform(model.config))
    return total, int(targets.numel())


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of the sliding protocol as (begin, end, score_from), end exclusive, score_from within the window.

    Each window scores its tokens past the previous window's end, all with context: with stride < window every
    token but the first is scored exactly once; with stride == window (non-overlapping) a window's first token,
    which has no context, is not scored.
    """
    spans = []
    previous_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        spans.append((begin, end, max(1, previous_end - begin)))
        previous_end = end
        if end == num_tokens:
            break
    return spans


def sliding_window_nll(model, tokens: torch.Tensor, window: int, stride: int,
                       chunk_size: int = DEFAULT_CHUNK) -> tuple[float, int]:
    """(sum of NLL, tokens scored) of a 1-D token sequence under the sliding protocol."""
    total, count = 0.0, 0
    for begin, end, score_from in sliding_windows(int(tokens.shape[0]), window, stride):
        nll, scored = window_nll(model, tokens[begin:end], score_from, chunk_size)
        total, count = total + nll, count + scored
    return total, count


def check_stride(stride: int | None, lengths) -> None:
    """A sliding stride no longer than the shortest window (each window must advance past the previous one)."""
    if stride is not None and stride > min(lengths):
        raise RopescopeError(f"stride={stride} is longer than the shortest length {min(lengths)}; use <= {min(lengths)}")


def long_documents(tokenizer, documents: list[str], longest: int, max_documents: int | None) -> list[torch.Tensor]:
    """The first `max_documents` documents of at least `longest` tokens, each cut to `longest` tokens."""
    prefix = special_prefix(tokenizer)
    selected, longest_seen = [], 0
    for document in documents:
        ids = prefix + encode(tokenizer, document)
        longest_seen = max(longest_seen, len(ids))
        if len(ids) >= longest:
            selected.append(torch.tensor(ids[:longest], dtype=torch.long))
            if max_documents is not None and len(selected) == max_documents:
                break
    if not selected:
        raise RopescopeError(
            f"the corpus has no document of at least {longest} tokens (its longest has {longest_seen}); "
            "give shorter lengths or a corpus with longer documents"
        )
    return selected


def evaluate_perplexity(model, tokenizer, documents: list[str], lengths, protocols=PROTOCOLS, stride: int | None = None,
                        max_documents: int | None = 4, head_chunk_size: int = DEFAULT_CHUNK,
                        labels: dict | None = None, progress: bool | None = None) -> list[dict]:
    """Perplexity at each length by each protocol; one `PerplexityRow` per (protocol, length), as a dict.

    lengths: increasing positive token counts; protocols: some of PROTOCOLS. stride: the sliding protocol's step
    (None: half the window; at most the shortest length, see `check_stride`). max_documents: how many long
    documents to use. head_chunk_size: positions whose logits the output head computes at once. labels: fields
    every row starts with.
    """
    lengths = list(lengths)
    texts = long_documents(tokenizer, documents, max(lengths), max_documents)
    model.eval()

    def forward_tokens(protocol, length):
        step = stride or max(1, length // 2)
        per_document = length if protocol == "truncated" else sum(end - begin for begin, end, _ in
                                                                    sliding_windows(max(lengths), length, step))
        return per_document * len(texts)

    plan = [(protocol, length) for protocol in protocols for length in lengths]
    rows = []
    total_tokens = sum(forward_tokens(protocol, length) for protocol, length in plan)
    with tqdm(total=total_tokens, desc="perplexity", unit="tok", unit_scale=True,
              disable=None if progress is None else not progress) as bar:
        for protocol, length in plan:
            step = stride or max(1, length // 2)
            total, count, document_nll = 0.0, 0, []
            for tokens in texts:
                if protocol == "truncated":
                    nll, scored = window_nll(model, tokens[:length], 1, head_chunk_size)
                else:
                    nll, scored = sliding_window_nll(model, tokens, length, step, head_chunk_size)
                total, count = total + nll, count + scored
                document_nll.append(nll / scored)
                bar.update(forward_tokens(protocol, length) // len(texts))
            mean_nll = total / count
            rows.append(PerplexityRow(
                protocol=protocol, length=length, stride=step if protocol == "sliding" else None,
                documents=len(texts), tokens_scored=count, nll=mean_nll, perplexity=math.exp(mean_nll),
                document_nll=document_nll,
            ).to_dict(labels))
    return rows

