"""One forward per retrieval prompt: the answering query's attention read in the retrieval's own prefill equals what
`answer_attention` reads in a forward of its own, on the shipped model in float32 (the uncertainty rows to 1e-5)."""

from __future__ import annotations

import math

import pytest
import torch

from ropescope.attention import uncertainty
from ropescope.attention.uncertainty import recorded_attention, retrieval_attention
from ropescope.eval.decoding import prompts_per_forward
from ropescope.eval.retrieval import evaluate_retrieval
from ropescope.io.data import load_corpus
from ropescope.model.load import ModelOptions, load
from ropescope.rope import parse_spec
from ropescope.study.stages.uncertainty import UNCERTAINTY_FIELDS
from ropescope.tasks.registry import get_task, rebuild_cases

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def shipped():
    loaded = load("default", options=ModelOptions(device="cpu", dtype="float32"))
    return loaded.model, loaded.tokenizer


def _assert_same_rows(one_forward: list[dict], two_forwards: list[dict]) -> None:
    assert len(one_forward) == len(two_forwards) > 0
    for new, old in zip(one_forward, two_forwards):
        assert list(new) == list(old)  # the same columns in the same order
        for key, value in old.items():
            if isinstance(value, float):
                assert new[key] == pytest.approx(value, abs=TOLERANCE, rel=0), key
            else:
                assert new[key] == value, key


@pytest.mark.parametrize("task_name, lengths", [("passkey", [256, 384]), ("niah_multikey_1", [300])])
def test_the_prefill_readout_equals_a_second_forward(shipped, task_name, lengths):
    model, tokenizer = shipped
    task = get_task(task_name)
    documents = load_corpus("default", split="validation")
    # batches of 2 of 3 trials: a full batch and a batch of one, each prompt read from its own row of the batch
    rows = evaluate_retrieval(model, tokenizer, task, lengths, depths=[0, 50, 100], trials=3, documents=documents,
                              batch_size=2, progress=False, read_attention=True)
    assert all(len(row["answer_attention"]["entropy"]) == model.config.num_hidden_layers for row in rows)
    plain = [{key: value for key, value in row.items() if key != "answer_attention"} for row in rows]
    cases = rebuild_cases(tokenizer, plain, documents=documents)
    two_forwards = retrieval_attention(model, cases, plain, progress=False)
    one_forward = recorded_attention(rows)
    _assert_same_rows(one_forward, two_forwards)
    distracted = [row["distractor_mass"] is not None for row in two_forwards]
    assert all(distracted) if task_name.startswith("niah_multikey") else not any(distracted)
    # the stage keeps the same columns either way
    assert [list({key: row[key] for key in UNCERTAINTY_FIELDS}) for row in one_forward] == \
        [list(UNCERTAINTY_FIELDS)] * len(rows)


@pytest.mark.parametrize("scale", [1.25, "logn"])
def test_the_prefill_readout_reads_the_scaled_attention_a_second_forward_reads(scale):
    # the intervention stage reads each scale's answering query in the retrieval's prefill
    spec = parse_spec("yarn:factor=2", original_max_position_embeddings=256).with_logit_scale(scale)
    loaded = load("default", spec, ModelOptions(device="cpu", dtype="float32"))
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = evaluate_retrieval(model, tokenizer, get_task("passkey"), [384], depths=[0, 50], trials=3,
                              batch_size=2, progress=False, read_attention=True)
    plain = [{key: value for key, value in row.items() if key != "answer_attention"} for row in rows]
    _assert_same_rows(recorded_attention(rows),
                      retrieval_attention(model, rebuild_cases(tokenizer, plain), plain, progress=False))


def test_a_cpu_batch_holds_about_4096_tokens_and_an_explicit_size_wins(shipped):
    model, _ = shipped
    assert [prompts_per_forward(model, length) for length in (256, 512, 1024, 2048, 8192, 16384)] == \
        [8, 8, 4, 2, 1, 1]
    assert prompts_per_forward(model, 8192, batch_size=3) == 3


def test_the_prefill_readout_runs_no_second_forward(shipped, monkeypatch):
    model, tokenizer = shipped
    rows = evaluate_retrieval(model, tokenizer, get_task("passkey"), [256], depths=[50], trials=2, progress=False,
                              read_attention=True)
    forwards = []
    monkeypatch.setattr(uncertainty, "forward_for_statistics", lambda *args: forwards.append(args))
    read = recorded_attention(rows)
    assert forwards == [] and len(read) == 2
    assert all(0 < row["entropy"] <= row["entropy_max"] + 1e-6 and 0 <= row["needle_mass"] <= 1 for row in read)
    assert read[0]["entropy_max"] == pytest.approx(math.log(rows[0]["question_position"] + 1))


def test_rows_without_a_readout_are_read_again():
    assert recorded_attention([{"answer_attention": None}, {"answer_attention": {"entropy": [1.0]}}]) is None
    assert recorded_attention([{"question_position": 3}]) is None


def test_without_read_attention_the_rows_carry_none_and_decoding_is_unchanged(shipped):
    model, tokenizer = shipped
    task = get_task("passkey")
    read = evaluate_retrieval(model, tokenizer, task, [256], depths=[0, 100], trials=2, progress=False,
                              read_attention=True)
    plain = evaluate_retrieval(model, tokenizer, task, [256], depths=[0, 100], trials=2, progress=False)
    assert all(row["answer_attention"] is None for row in plain)
    assert [row["prediction"] for row in read] == [row["prediction"] for row in plain]
    assert torch.is_grad_enabled()
