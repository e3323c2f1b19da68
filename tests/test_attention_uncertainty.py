"""Answering-query entropy and needle mass against eager weights; AUROC against a brute-force pair count."""

import math
from dataclasses import dataclass

import pytest
import torch

from tests.helpers import VOCAB, tiny_model
from ropescope.attention.uncertainty import answer_attention, failure_summary, retrieval_attention
from ropescope.errors import RopescopeError


@dataclass
class Case:
    input_ids: torch.Tensor
    answer: str
    needle_start: int
    needle_end: int
    question_position: int


def make_case(length, needle_start, seed):
    ids = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))
    return Case(ids, "42", needle_start, needle_start + 4, length - 1)


def brute_force_auroc(scores, positives):
    pairs = [(s_p, s_n) for s_p, p in zip(scores, positives) if p for s_n, n in zip(scores, positives) if not n]
    if not pairs:
        return math.nan
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def test_answer_attention_matches_eager():
    model = tiny_model("llama")
    case = make_case(40, 10, seed=1)
    statistics = answer_attention(model, case, chunk_size=7)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        weights = torch.stack(model(case.input_ids[None], output_attentions=True).attentions)[:, 0].double()
    model.set_attn_implementation("sdpa")
    answer_row = weights[:, :, case.question_position]  # [layers, heads, keys]
    entropy = -torch.where(answer_row > 0, answer_row * answer_row.log(), 0.0).sum(-1)
    needle = answer_row[:, :, case.needle_start : case.needle_end].sum(-1)
    torch.testing.assert_close(statistics["entropy"].double(), entropy, atol=1e-4, rtol=0)
    torch.testing.assert_close(statistics["needle_mass"].double(), needle, atol=1e-5, rtol=0)


def test_retrieval_attention_rows_and_summary():
    model = tiny_model("llama")
    cases = [make_case(30, start, seed) for seed, start in enumerate([2, 10, 20, 5])]
    rows = [
        {"model": "tiny", "method": "default", "factor": None, "task": "passkey", "length": 30,
         "depth_percent": depth, "trial": 0, "correct": correct, "needle_start": case.needle_start,
         "needle_end": case.needle_end, "question_position": case.question_position}
        for case, depth, correct in zip(cases, [0, 25, 50, 75], [True, "False", "True", False])
    ]
    out = retrieval_attention(model, cases, rows, progress=False)
    assert len(out) == 4 and out[0]["depth_percent"] == 0
    for row in out:
        assert row["entropy"] == pytest.approx((row["entropy_layer_0"] + row["entropy_layer_1"]) / 2)
        assert 0 <= row["needle_mass"] <= 1 and 0 <= row["entropy"] <= row["entropy_max"] + 1e-6
    summary = failure_summary(out)
    assert [row["layer"] for row in summary] == ["mean", 0, 1]
    mean = summary[0]
    assert mean["cells"] == 4 and mean["failures"] == 2
    assert mean["entropy_failed"] == pytest.approx((out[1]["entropy"] + out[3]["entropy"]) / 2)
    entropies = [row["entropy"] for row in out]
    assert mean["auroc_entropy_predicts_failure"] == pytest.approx(
        brute_force_auroc(entropies, [False, True, False, True])
    )
    rows[1]["needle_start"] = 99
    with pytest.raises(RopescopeError, match="needle_start=99"):
        retrieval_attention(model, cases, rows, progress=False)
    with pytest.raises(RopescopeError, match="pair up"):
        retrieval_attention(model, cases[:2], rows, progress=False)


def test_needle_after_question_is_refused():
    with pytest.raises(RopescopeError, match="needle span"):
        answer_attention(tiny_model("llama"), Case(torch.zeros(10, dtype=torch.long), "", 8, 12, 9))
