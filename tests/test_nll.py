"""The one NLL: per token, per next token, over answers, and the unigram baseline, against float64 brute force."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from ropescope.nll import answer_nll, answer_weighted_loss, next_token_nll, token_nll, unigram_perplexity
from tests.helpers import DOCUMENTS, tiny_tokenizer


def _brute_force(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    log_probabilities = torch.log_softmax(logits.double(), dim=-1)
    return -log_probabilities.gather(-1, targets[..., None])[..., 0]


def test_token_nll_matches_log_softmax_in_every_reduction():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator).to(torch.bfloat16)  # upcast inside
    targets = torch.randint(0, 11, (3, 5), generator=generator)
    expected = _brute_force(logits.float(), targets)
    got = token_nll(logits, targets)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert token_nll(logits, targets, reduction="sum").item() == pytest.approx(expected.sum().item(), rel=1e-5)
    assert token_nll(logits, targets, reduction="mean").item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_next_token_and_answer_nll():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 7, generator=generator)
    input_ids = torch.randint(0, 7, (2, 6), generator=generator)
    per_token = next_token_nll(logits, input_ids)
    expected = _brute_force(logits[:, :-1], input_ids[:, 1:])  # column j predicts position j + 1
    torch.testing.assert_close(per_token.double(), expected, rtol=1e-5, atol=1e-6)

    is_answer = torch.zeros(2, 6, dtype=torch.bool)
    assert answer_nll(per_token, is_answer) is None
    is_answer[0, 0] = True  # position 0 has no prediction
    assert answer_nll(per_token, is_answer) is None
    is_answer[0, 4:] = True
    is_answer[1, 5] = True
    answers = [expected[0, 3], expected[0, 4], expected[1, 4]]
    assert answer_nll(per_token, is_answer).item() == pytest.approx(sum(answers).item() / 3, rel=1e-5)


def test_answer_weighted_loss_is_the_mean_nll_plus_the_weighted_answer_mean():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 7, generator=generator)
    input_ids = torch.randint(0, 7, (2, 6), generator=generator)
    expected = _brute_force(logits[:, :-1], input_ids[:, 1:])
    is_answer = torch.zeros(2, 6, dtype=torch.bool)
    is_answer[1, 3:5] = True  # predicted by columns 2 and 3
    loss = answer_weighted_loss(logits, input_ids, is_answer, 0.5).item()
    assert loss == pytest.approx((expected.mean() + 0.5 * expected[1, 2:4].mean()).item(), rel=1e-5)
    for no_answer_term in [(None, 0.5), (is_answer, 0.0), (torch.zeros_like(is_answer), 0.5)]:
        loss = answer_weighted_loss(logits, input_ids, *no_answer_term).item()
        assert loss == pytest.approx(expected.mean().item(), rel=1e-5)


def test_unigram_perplexity_is_add_one_smoothed_counts():
    tokenizer = tiny_tokenizer(False)
    counts = Counter(token for document in DOCUMENTS[:2] for token in tokenizer(document)["input_ids"])
    tokens = torch.tensor(tokenizer(DOCUMENTS[2])["input_ids"][:50])
    total = sum(counts.values()) + len(tokenizer)
    expected = math.exp(-sum(math.log((counts[t] + 1) / total) for t in tokens.tolist()) / len(tokens))
    assert unigram_perplexity(tokenizer, DOCUMENTS[:2], tokens) == pytest.approx(expected, rel=1e-9)
