"""The one NLL: per token, per next token, over answers, and the unigram baseline, against float64 brute force."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from ropescope.eval.nll import (
    LOSS_CHUNK_MIN_ELEMENTS,
    answer_nll,
    answer_weighted_loss,
    causal_lm_loss,
    logit_transform,
    loss_chunk_size,
    next_token_nll,
    token_nll,
    unigram_perplexity,
)
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


@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere", "granite"])  # plain, softcapped, scaled, divided
@pytest.mark.parametrize("with_answers", [False, True])
def test_the_chunked_loss_has_the_unchunked_loss_and_gradients(family, with_answers):
    """causal_lm_loss (backbone, then head and cross-entropy over chunks recomputed in the backward) against
    answer_weighted_loss over the model's own full logits, which apply the family's logit transform themselves."""
    from transformers import AutoModelForCausalLM

    from tests.test_families import VOCAB, family_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family)).float()
    input_ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(3))
    is_answer = None
    if with_answers:
        is_answer = torch.zeros_like(input_ids, dtype=torch.bool)
        is_answer[0, 20:25] = True
        is_answer[1, 36] = True

    def loss_and_gradients(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected, expected_gradients = loss_and_gradients(
        lambda: answer_weighted_loss(model(input_ids=input_ids).logits, input_ids, is_answer, 0.5))
    for chunk_size in (5, 74, None):  # chunks that do not divide the 2 x 37 positions, one chunk, the default
        loss, gradients = loss_and_gradients(lambda: causal_lm_loss(model, input_ids, is_answer, 0.5, chunk_size))
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        assert gradients.keys() == expected_gradients.keys()
        for name, gradient in gradients.items():
            torch.testing.assert_close(gradient, expected_gradients[name], rtol=1e-5, atol=1e-5, msg=name)


def test_the_family_logit_transform_is_what_the_model_applies():
    from transformers import AutoModelForCausalLM

    from tests.test_families import VOCAB, family_config

    for family in ("llama", "gemma2", "cohere", "granite"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(family_config(family)).eval()
        input_ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            hidden = model.base_model(input_ids=input_ids).last_hidden_state
            logits = model.get_output_embeddings()(hidden)
            transform = logit_transform(model.config)
            assert (transform is None) == (family == "llama")
            torch.testing.assert_close(logits if transform is None else transform(logits),
                                       model(input_ids=input_ids).logits)


def test_a_loss_chunk_holds_about_as_many_logits_as_there_are_hidden_state_elements():
    assert loss_chunk_size(8192, 64, 128_256) * 128_256 <= max(8192 * 64, LOSS_CHUNK_MIN_ELEMENTS)
    assert loss_chunk_size(8192, 64, 128_256) == LOSS_CHUNK_MIN_ELEMENTS // 128_256  # the floor: 130 positions
    assert loss_chunk_size(131_072, 4096, 128_256) == 131_072 * 4096 // 128_256  # grows with tokens x hidden size
    assert loss_chunk_size(100, 128, 4096) == 100  # never more positions than there are
    assert loss_chunk_size(10, 8, 10**9) == 1
