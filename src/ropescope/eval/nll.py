"""Negative log-likelihood of next tokens: the one loss behind perplexity, pretraining and fine-tuning."""

from __future__ import annotations

import math
from collections import Counter

import torch


IGNORED = -100  # cross_entropy's ignore_index: a target that scores 0
# The training loss holds the logits of one chunk of positions at a time, at least this many (64 MB in float32):
# smaller chunks cost time (16 MB ones made a step at 8K tokens and Llama 3's vocabulary 1.6x slower on CPU), and
# glibc serves blocks under 32 MB from a heap that their churn fragments (benchmarks/memory_scaling.py).
LOSS_CHUNK_MIN_ELEMENTS = 1 << 24


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


def logit_transform(config):
    """The step some families add between the output head and the logits, as their modeling files apply it (Cohere's
    `logit_scale`, Granite's division by `logits_scaling`, Gemma 2's `final_logit_softcapping`); None for the rest.

    Returns a function [..., vocab] -> [..., vocab], or None.
    """
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if not scale and not divisor and not softcap:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale:
            logits = logits * scale
        if divisor:
            logits = logits / divisor
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return transform


def loss_chunk_size(positions: int, hidden_size: int, vocab_size: int) -> int:
    """Positions per chunk of the output head in the training loss: a chunk's logits hold about as many elements as
    all the hidden states (positions x hidden_size), so the loss's memory grows with tokens x hidden size, not tokens x
    vocabulary; never fewer than LOSS_CHUNK_MIN_ELEMENTS elements, never more positions than there are."""
    elements = max(positions * hidden_size, LOSS_CHUNK_MIN_ELEMENTS)
    return max(1, min(positions, elements // vocab_size))


def _token_weights(input_ids: torch.Tensor, is_answer: torch.Tensor | None,
                   answer_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, weights), both [batch, length]: position j predicts input_ids[:, j + 1] with weight 1 / (predicted
    tokens), plus answer_weight / (answer tokens) where that token is an answer; the last position predicts nothing
    (target IGNORED, weight 0). sum(weights * nll) is `answer_weighted_loss`."""
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=IGNORED)
    predicting = targets != IGNORED
    weights = predicting.float() / predicting.sum()
    if answer_weight and is_answer is not None:
        answer = torch.nn.functional.pad(is_answer[:, 1:], (0, 1), value=False)
        if answer.any():
            weights = weights + answer.float() * (answer_weight / answer.sum())
    return targets, weights


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, output_head,
                transform) -> torch.Tensor:
    """sum(weights * -log p(targets)) of one chunk, its logits in float32. hidden: [m, hidden_size]; targets,
    weights: [m]."""
    logits = output_head(hidden).float()
    if transform is not None:
        logits = transform(logits)
    nll = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORED, reduction="none")
    return (nll * weights).sum()


class _ChunkedHeadLoss(torch.autograd.Function):
    """The loss over chunks of positions with its gradients computed chunk by chunk in the forward (as fused
    linear-cross-entropy kernels do): the backward only scales them. Nothing of size [chunk x vocab] outlives its
    chunk, and the head's weight gradient accumulates in one buffer: with autograd's per-chunk gradients (a
    recomputed chunk each), the glibc heap kept up to 3x the step's memory on CPU."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, transform, chunk_size):
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            logits = torch.nn.functional.linear(hidden[chunk], weight, bias).float().requires_grad_()
            with torch.enable_grad():
                loss = _chunk_loss(logits, targets[chunk], weights[chunk], lambda x: x, transform)
            total += loss.detach()
            if needs_hidden or needs_weight or needs_bias:
                (grad_logits,) = torch.autograd.grad(loss, logits)
                if needs_hidden:
                    grad_hidden[chunk] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
                if needs_weight:
                    grad_weight.addmm_(grad_logits.T, hidden[chunk].float())
                if needs_bias:
                    grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scaled = [None if grad is None else grad * grad_output for grad in (grad_hidden, grad_weight, grad_bias)]
        if scaled[1] is not None:
            scaled[1] = scaled[1].to(weight_dtype)
        if scaled[2] is not None:
            scaled[2] = scaled[2].to(bias_dtype)
        return *scaled, None, None, None, None


def chunked_answer_weighted_loss(hidden: torch.Tensor, input_ids: torch.Tensor, is_answer: torch.Tensor | None,
                                 answer_weight: float, output_head, transform=None,
                                 chunk_size: int | None = None) -> torch.Tensor:
    """`answer_weighted_loss` from the final hidden states, never holding more than one chunk's logits, forward or
    backward: the output head (an nn.Linear), `transform` and cross-entropy run `chunk_size` positions at a time,
    each chunk's gradients computed at once (`_ChunkedHeadLoss`), the sum accumulated in float32.

    hidden: [batch, length, hidden_size]; input_ids: LongTensor[batch, length]; is_answer: bool [batch, length] or
    None; output_head: [m, hidden_size] -> [m, vocab]; chunk_size: positions per chunk (None: `loss_chunk_size`).
    Returns a float32 scalar.
    """
    targets, weights = _token_weights(input_ids, is_answer, answer_weight)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets, weights = targets.reshape(-1).to(hidden.device), weights.reshape(-1).to(hidden.device)
    if chunk_size is None:
        chunk_size = loss_chunk_size(hidden.shape[0], hidden.shape[1], output_head.out_features)
    # autocast's dtype, as the head's own forward would run under it
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedHeadLoss.apply(hidden.to(dtype), output_head.weight.to(dtype),
                                          None if output_head.bias is None else output_head.bias.to(dtype),
                                          targets, weights, transform, chunk_size)
    return _ChunkedHeadLoss.apply(hidden, output_head.weight, output_head.bias, targets, weights, transform,
                                  chunk_size)


def _causal_lm(model):
    """The transformers causal LM inside a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_lm_loss(model, input_ids: torch.Tensor, is_answer: torch.Tensor | None = None, answer_weight: float = 0.0,
                   chunk_size: int | None = None) -> torch.Tensor:
    """The training loss of any transformers causal LM (or a peft model around one) without its [tokens x vocab]
    logits: the backbone (`base_model`) to the final hidden states, then `chunked_answer_weighted_loss` over the
    output head (`get_output_embeddings`) with the family's `logit_transform`. Equal to
    `answer_weighted_loss(model(input_ids).logits, ...)`, and without is_answer to transformers' own causal-LM loss.

    input_ids: LongTensor[batch, length]; is_answer: bool [batch, length] or None. Returns a float32 scalar.
    """
    lm = _causal_lm(model)
    hidden = lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    return chunked_answer_weighted_loss(hidden, input_ids, is_answer, answer_weight, lm.get_output_embeddings(),
                                        logit_transform(lm.config), chunk_size)


class CausalLMLoss(torch.nn.Module):
    """A causal LM whose forward returns `causal_lm_loss`: what a training loop hands to accelerate, so that DDP and
    FSDP see the output head's chunks inside a forward of the module they wrap (the backbone alone would bypass
    their hooks). `lm` is the model, to save."""

    def __init__(self, lm, answer_weight: float = 0.0, chunk_size: int | None = None):
        super().__init__()
        self.lm = lm
        self.answer_weight = answer_weight
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, is_answer: torch.Tensor | None = None) -> torch.Tensor:
        return causal_lm_loss(self.lm, input_ids, is_answer, self.answer_weight, self.chunk_size)


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
