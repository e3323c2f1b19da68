"""Typed rows: the dict on disk is labels then fields in declared order; reading back names what is missing."""

import pytest

from ropescope.errors import RopescopeError
from ropescope.io.rows import PerplexityRow, RetrievalRow, RunLabels, as_bool, point_means


def passkey(**changes):
    fields = dict(length=80, answer="12345", needle_start=3, needle_end=9, question_position=79, depth_percent=50,
                  trial=0, seed=0, score=1.0, correct=True, prediction="12345")
    return RetrievalRow(**{"task": "passkey", **fields, **changes})


def test_to_dict_puts_labels_first_and_round_trips():
    labels = RunLabels(model="org/name", revision="abc", device="cpu", dtype="float32", method="yarn", factor=4.0,
                       original_max_position_embeddings=256)
    row = passkey().to_dict(labels)
    assert list(row) == [*RunLabels.keys(), *RetrievalRow.keys()] and row["task"] == "passkey"
    assert RunLabels.from_dict(row) == labels and RetrievalRow.from_dict(row) == passkey()
    assert PerplexityRow.keys()[0] == "task"
    assert RetrievalRow.keys()[-4:] == ["facts", "independent_haystacks", "independent_keys", "answer_attention"]


def test_from_dict_names_the_first_missing_field():
    row = passkey().to_dict()
    del row["trial"]
    with pytest.raises(RopescopeError, match="rows lack the field 'trial' of a retrieval row"):
        RetrievalRow.from_dict(row)


def test_point_means_against_a_hand_count():
    rows = [passkey(length=length, depth_percent=depth, trial=trial, score=score).to_dict()
            for length, depth, trial, score in [(80, 0, 0, 1.0), (80, 0, 1, 0.0), (80, 0, 2, 0.0), (80, 50, 0, 1.0),
                                                (40, 50, 0, 0.0)]]
    assert point_means(rows) == [
        {"length": 40, "depth_percent": 50, "score": 0.0, "trials": 1},
        {"length": 80, "depth_percent": 0, "score": pytest.approx(1 / 3), "trials": 3},
        {"length": 80, "depth_percent": 50, "score": 1.0, "trials": 1},
    ]


def test_as_bool_reads_json_and_csv_truth_values():
    assert [as_bool(value) for value in (True, 1, "True", "yes", " 1 ", False, 0, "False", "no", "")] == [
        True] * 5 + [False] * 5
    with pytest.raises(RopescopeError, match="correct='maybe' is not a truth value"):
        as_bool("maybe")
