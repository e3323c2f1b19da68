"""Needle in a haystack: the case builder puts the needle where it says; scoring; grid rows; bad input."""

import pytest
import torch

from tests.helpers import DOCUMENTS, tiny_llama, tiny_tokenizer
from ropescope.errors import RopescopeError
from ropescope.tasks.needle import (
    ANSWER,
    NEEDLE,
    QUESTION,
    TASK,
    check_needle_text,
    needle_case,
    score_needle,
)
from ropescope.eval.retrieval import evaluate_retrieval
from ropescope.tasks.haystack import check_haystack
from ropescope.io.rows import RetrievalRow


@pytest.mark.parametrize("with_bos", [True, False])
def test_case_puts_the_needle_where_it_says(with_bos):
    tokenizer = tiny_tokenizer(with_bos)
    prefix = int(with_bos)
    for length in (150, 300):
        starts = []
        for depth in (0, 25, 50, 75, 100):
            case = needle_case(tokenizer, DOCUMENTS, length, depth, trial=1)
            ids = case.input_ids.tolist()
            assert case.length == length and case.question_position == length - 1 and case.answer == ANSWER
            assert tokenizer.decode(ids[case.needle_start : case.needle_end]).strip() == NEEDLE
            assert tokenizer.decode(ids[case.needle_end :]).endswith(QUESTION)
            if 0 < depth < 100:  # inserted after a sentence end, not mid-sentence
                assert tokenizer.decode(ids[case.needle_start - 1 : case.needle_start]).rstrip()[-1] in ".!?"
            starts.append(case.needle_start)
        assert starts[0] == prefix  # depth 0: first thing after the special prefix
        assert starts == sorted(starts)
        last = needle_case(tokenizer, DOCUMENTS, length, 100, trial=1)
        assert tokenizer.decode(last.input_ids[last.needle_end :].tolist()).strip() == QUESTION


def test_case_is_deterministic_and_user_settable():
    tokenizer = tiny_tokenizer()
    first = needle_case(tokenizer, DOCUMENTS, 200, 50, trial=0)
    assert torch.equal(first.input_ids, needle_case(tokenizer, DOCUMENTS, 200, 50, trial=0).input_ids)
    custom = needle_case(tokenizer, DOCUMENTS, 200, 50, trial=0, needle="The code word is lantern.",
                         question="What is the code word? The code word is", answer="lantern")
    ids = custom.input_ids.tolist()
    assert tokenizer.decode(ids[custom.needle_start : custom.needle_end]).strip() == "The code word is lantern."
    assert custom.answer == "lantern"


def test_scores_exact_and_graded():
    assert score_needle(" a spoonful of wild honey, said the", ANSWER) == (True, 1.0)
    assert score_needle(" A Spoonful of Wild-Honey.", ANSWER) == (True, 1.0)
    assert score_needle(" a spoonful of sugar", ANSWER) == (False, 0.6)
    assert score_needle(" honey", ANSWER) == (False, 0.2)
    assert score_needle("", ANSWER) == (False, 0.0)


def test_grid_rows():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    rows = evaluate_retrieval(model, tokenizer, TASK, [100, 160], depths=[0, 100], trials=2, documents=DOCUMENTS,
                              max_new_tokens=3, progress=False)
    assert len(rows) == 8
    for row in rows:
        case = needle_case(tokenizer, DOCUMENTS, row["length"], row["depth_percent"], row["trial"])
        assert (row["needle_start"], row["needle_end"], row["question_position"]) == (
            case.needle_start, case.needle_end, case.question_position)
        assert list(row) == RetrievalRow.keys() and row["facts"] == [[case.needle_start, case.needle_end, "needle"]]
        assert row["task"] == "needle" and 0 <= row["score"] <= 1 and isinstance(row["correct"], bool)


def test_bad_input():
    tokenizer = tiny_tokenizer()
    with pytest.raises(RopescopeError, match=r"the haystack corpus is \d+ tokens long; the longest length 100000 "
                                             r"needs at least 100000"):
        check_haystack(tokenizer, DOCUMENTS, 100_000)
    with pytest.raises(RopescopeError, match="answer='' is empty"):
        check_needle_text(NEEDLE, QUESTION, "")
    with pytest.raises(RopescopeError, match="too short for the needle and question"):
        needle_case(tokenizer, DOCUMENTS, 30, 50, 0)
