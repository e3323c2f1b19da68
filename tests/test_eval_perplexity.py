"""Perplexity: chunked loss equals a float64 brute force over full logits; protocols agree where they must."""

import json
import math

import pytest
import torch

from tests.helpers import DOCUMENTS, tiny_llama, tiny_tokenizer
from ropescope.errors import RopescopeError
from ropescope.eval.perplexity import (
    evaluate_perplexity,
    sliding_window_nll,
    sliding_windows,
    window_nll,
)
from ropescope.io.results import write_rows
from ropescope.io.plots import plot_perplexity
from ropescope.io.rows import PerplexityRow


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer))


def brute_force_sliding(model, tokens, window, stride):
    """Token t is scored once, by the first window (begins 0, stride, ...) that reaches past it, with that window's
    tokens before t as context; log-probabilities from full logits in float64."""
    num_tokens = len(tokens)
    total, count = 0.0, 0
    scored = set()
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        with torch.no_grad():
            logits = model(input_ids=tokens[None, begin:end]).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        for position in range(begin + 1, end):  # a window's first token has no context in it
            if position not in scored:
                scored.add(position)
                total -= log_probs[position - begin - 1, tokens[position]].item()
                count += 1
        if end == num_tokens:
            break
    if stride < window:
        assert scored == set(range(1, num_tokens))
    return total, count


@pytest.mark.parametrize("window,stride,chunk", [(16, 5, 7), (16, 16, 3), (24, 8, 1024), (60, 7, 4)])
def test_sliding_nll_equals_brute_force(model, tokenizer, window, stride, chunk):
    torch.manual_seed(1)
    tokens = torch.randint(0, len(tokenizer), (53,))
    expected, expected_count = brute_force_sliding(model, tokens, window, stride)
    total, count = sliding_window_nll(model, tokens, window, stride, chunk)
    assert count == expected_count == (52 if stride < window else 52 - (52 // window))
    assert total == pytest.approx(expected, rel=1e-5)


def test_window_nll_equals_brute_force_in_batch(model, tokenizer):
    torch.manual_seed(2)
    batch = torch.randint(0, len(tokenizer), (3, 20))
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=batch).logits.double(), dim=-1)
    expected = -sum(log_probs[b, t - 1, batch[b, t]].item() for b in range(3) for t in range(5, 20))
    total, count = window_nll(model, batch, score_from=5, chunk_size=6)
    assert count == 45
    assert total == pytest.approx(expected, rel=1e-5)


def test_sliding_windows_score_every_token_once():
    for num_tokens, window, stride in [(100, 32, 8), (100, 32, 31), (31, 32, 8), (1000, 256, 100)]:
        covered = []
        for begin, end, score_from in sliding_windows(num_tokens, window, stride):
            assert end - begin <= window and 1 <= score_from
            covered.extend(range(begin + score_from, end))
        assert covered == list(range(1, num_tokens))
    # non-overlapping windows: a window's first token has no context, so it is not scored
    spans = sliding_windows(100, 32, 32)
    assert spans == [(0, 32, 1), (32, 64, 1), (64, 96, 1), (96, 100, 1)]


def test_protocols_agree_on_text_shorter_than_a_window(model, tokenizer):
    torch.manual_seed(3)
    tokens = torch.randint(0, len(tokenizer), (40,))
    single = window_nll(model, tokens)
    for stride in (8, 64):  # overlapping and non-overlapping
        total, count = sliding_window_nll(model, tokens, window=64, stride=stride)
        assert count == single[1] == 39
        assert total == pytest.approx(single[0], rel=1e-6)


def test_evaluate_perplexity_rows(model, tokenizer, tmp_path):
    rows = evaluate_perplexity(model, tokenizer, DOCUMENTS, [32, 64], stride=16, max_documents=2,
                               labels={"model": "tiny"}, progress=False)
    assert [(row["protocol"], row["length"]) for row in rows] == [
        ("truncated", 32), ("truncated", 64), ("sliding", 32), ("sliding", 64)]
    for row in rows:
        assert list(row) == ["model", *PerplexityRow.keys()]
        assert row["model"] == "tiny" and row["task"] == "perplexity" and row["documents"] == 2
        assert row["perplexity"] == pytest.approx(math.exp(row["nll"]))
        assert len(row["document_nll"]) == 2
    for row in rows[:2]:  # truncated: every document scores the same number of tokens
        assert sum(row["document_nll"]) / 2 == pytest.approx(row["nll"], rel=1e-9)
        assert row["document_nll"][0] != pytest.approx(row["document_nll"][1])
    for row in rows:
        # a random model is about uniform over the vocabulary
        assert 0.3 * len(tokenizer) < row["perplexity"] < 3 * len(tokenizer)
    assert [row["tokens_scored"] for row in rows] == [2 * 31, 2 * 63, 2 * 63, 2 * 63]
    # at the longest length the sliding protocol is one window: the truncated protocol
    assert rows[3]["nll"] == pytest.approx(rows[1]["nll"], rel=1e-6)
    write_rows(rows, tmp_path / "ppl.json")
    assert json.loads((tmp_path / "ppl.json").read_text()) == rows
    write_rows(rows, tmp_path / "ppl.csv")
    assert (tmp_path / "ppl.csv").read_text().splitlines()[0].startswith("model,task,protocol,length")
    assert plot_perplexity(rows, tmp_path / "ppl.png", 32).stat().st_size > 1000


@pytest.mark.parametrize("kwargs,message", [
    ({"lengths": [100_000]}, "no document of at least 100000 tokens (its longest has"),
])
def test_bad_input(model, tokenizer, kwargs, message):
    with pytest.raises(RopescopeError, match=None) as error:
        evaluate_perplexity(model, tokenizer, DOCUMENTS, progress=False, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)
