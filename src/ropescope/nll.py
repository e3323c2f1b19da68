"""Negative log-likelihood of next tokens: the one loss behind perplexity, pretraining and fine-tuning."""

from __future__ import annotations

import math
from collections import Counter

import torch


IGNORED = -100  # cross_entropy's ignore_index: a target that scores 0


def token_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """-log p(target) at each position, from logits upcast to float32.

    logits: [..., vocab]; targets: LongTensor[...] (same leading shape). Returns float32 [...] ("none") or the
    scalar sum ("sum") or mean ("mean") over positions.
    """
    # cross_entropy is the fused log-softmax + pick that the transformers loss uses too
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                            targets.reshape(-1).to(logits.device), reduction=reduction)
    return nll.reshape(targets.shape) if reduction == "none" else nll


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """NLL of each token given the ones before it: column j is the prediction of input_ids[:, j + 1].

    logits: [batch, length, vocab] of a causal LM on input_ids: LongTensor[batch, length]. Returns [batch, length - 1].
    """
    # The targets move left, not the logits: a slice of the logits would be copied whole by the reshape.
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=IGNORED)
    return token_nll(logits, targets)[:, :-1]


def answer_nll(per_token: torch.Tensor, is_answer: torch.Tensor) -> torch.Tensor | None:
    """Mean of `next_token_nll`'s output over the tokens marked in `is_answer` (the answers of passkey examples);
    None when no token is marked.

    per_token: [batch, length - 1]; is_answer: bool [batch, length] (position 0 has no prediction: never counted).
    """
    answer = is_answer[:, 1:]
    return per_token[answer].mean() if answer.any() else None


def answer_weighted_loss(logits: torch.Tensor, input_ids: torch.Tensor, is_answer: torch.Tensor | None,
                         answer_weight: float) -> torch.Tensor:
    """The training loss with passkey examples: mean next-token NLL over every token, plus `answer_weight` x the
    mean over the answer tokens marked in `is_answer` (when any), from one cross-entropy pass over the logits.

    logits: [batch, length, vocab]; input_ids: LongTensor[batch, length]; is_answer: bool [batch, length] or None.
    """
    per_token = next_token_nll(logits, input_ids)
    answer = answer_nll(per_token, is_answer) if answer_weight and is_answer is not None else None
    loss = per_token.mean()
    return loss if answer is None else loss + answer_weight * answer


@torch.no_grad()
def blocks_nll(model, blocks: list[torch.Tensor], batch_size: int = 4) -> torch.Tensor:
    """NLL of every predicted token of each block (LongTensor[length], all of one length), one forward pass per
    `batch_size` blocks: float64 [blocks, length - 1], column j the prediction of position j + 1."""
    rows = []
    for start in range(0, len(blocks), batch_size):
        batch = torch.stack(blocks[start : start + batch_size])
        rows.append(next_token_nll(model(input_ids=batch).logits, batch).double())
    return torch.cat(rows)


def perplexity_from_nll(nll: torch.Tensor, from_position: int = 0) -> float:
    """exp(mean NLL) over the tokens of `blocks_nll`'s output at positions >= `from_position` (0: every predicted
    token; the pretrained length: only the tokens past it, where original RoPE meets distances it never saw)."""
    return math.exp(nll[:, max(from_position, 1) - 1 :].mean().item())  # position 0 is never predicted


def unigram_perplexity(tokenizer, train_documents: list[str], tokens: torch.Tensor) -> float:
    """The baseline a language model must beat: perplexity on `tokens` (LongTensor[n]) of add-one smoothed
    unigram frequencies counted on `train_documents`."""
    counts: Counter = Counter()
    for document in train_documents:
        counts.update(tokenizer(document, add_special_tokens=False)["input_ids"])
    vocabulary = len(tokenizer)
    total = sum(counts.values()) + vocabulary
    log_probabilities = torch.tensor([math.log((counts[i] + 1) / total) for i in range(vocabulary)],
                                     dtype=torch.float64)
    return math.exp(-log_probabilities[tokens].mean().item())
