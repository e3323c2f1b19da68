"""Answering-query entropy, needle and distractor mass against eager weights; AUROC against a brute-force pair
count."""

import math
import pytest
import torch

from tests.helpers import VOCAB, tiny_model
from ropescope.attention.uncertainty import answer_attention, failure_summary, retrieval_attention
from ropescope.errors import RopescopeError
from ropescope.tasks.cases import Fact, PromptCase


def make_case(length, needle_start, seed, extra=()):
    ids = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))
    return PromptCase(ids, ("42",), (Fact(needle_start, needle_start + 4), *extra), length - 1)


def brute_force_auroc(scores, positives):
    pairs = [(s_p, s_n) for s_p, p in zip(scores, positives) if p for s_n, n in zip(scores, positives) if not n]
    if not pairs:
        return math.nan
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


@pytest.mark.parametrize("extra", [(), (Fact(20, 23, "needle"), Fact(14, 16, "distractor"), Fact(16, 19, "distractor"),
                                          Fact(30, 39, "distractor"))])
def test_answer_attention_matches_eager(extra):
    model = tiny_model("llama")
    case = make_case(40, 10, seed=1, extra=extra)  # abutting and separate facts of both roles
    statistics = answer_attention(model, case, chunk_size=7)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        weights = torch.stack(model(case.input_ids[None], output_attentions=True).attentions)[:, 0].double()
    model.set_attn_implementation("sdpa")
    answer_row = weights[:, :, case.question_position]  # [layers, heads, keys]
    entropy = -torch.where(answer_row > 0, answer_row * answer_row.log(), 0.0).sum(-1)
    def mass(role):
        keys = torch.zeros(answer_row.shape[-1], dtype=torch.bool)
        for fact in case.facts:
            if fact.role == role:
                keys[fact.start : fact.end] = True
        return answer_row[:, :, keys].sum(-1)

    torch.testing.assert_close(statistics["entropy"].double(), entropy, atol=1e-4, rtol=0)
    torch.testing.assert_close(statistics["needle_mass"].double(), mass("needle"), atol=1e-5, rtol=0)
    torch.testing.assert_close(statistics["distractor_mass"].double(), mass("distractor"), atol=1e-5, rtol=0)


def test_retrieval_attention_rows_and_summary():
    model = tiny_model("llama")
    cases = [make_case(30, start, seed) for seed, start in enumerate([2, 10, 20, 5])]
    cases[0] = make_case(30, 2, 0, extra=(Fact(12, 15, "distractor"),))  # one correct cell with a distractor
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
    assert out[0]["distractor_mass"] > 0 and out[1]["distractor_mass"] is None
    assert mean["distractor_mass_correct"] == pytest.approx(out[0]["distractor_mass"])
    assert math.isnan(mean["distractor_mass_failed"])  # no failed cell had a distractor
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
        answer_attention(tiny_model("llama"), PromptCase(torch.zeros(10, dtype=torch.long), ("",), (Fact(8, 12),), 9))
    with pytest.raises(RopescopeError, match="no needle"):
        answer_attention(tiny_model("llama"), PromptCase(torch.zeros(10, dtype=torch.long), ("",),
                                                         (Fact(2, 4, "distractor"),), 9))
