"""Passkey: the case builder puts the key where it says, at the exact length; scoring; grid rows; bad input."""

import json

import pytest
import torch

from tests.helpers import tiny_llama, tiny_tokenizer
from ropescope.cli import main
from ropescope.errors import RopescopeError
from ropescope.model.load import load
from ropescope.eval.decoding import greedy_continuations
from ropescope.commands.retrieval import run_passkey
from ropescope.eval.retrieval import evaluate_retrieval
from ropescope.tasks.passkey import TASK, passkey_case, passkey_key, score_passkey
from ropescope.tasks.passkey import KEY_DIGITS, KEY_LINE, QUESTION
from ropescope.io.plots import plot_retrieval
from ropescope.io.rows import RetrievalRow


@pytest.mark.parametrize("with_bos", [True, False])
@pytest.mark.parametrize("length", [80, 131, 256])
def test_case_puts_the_key_where_it_says(with_bos, length):
    tokenizer = tiny_tokenizer(with_bos)
    starts = []
    for depth in (0, 10, 25, 50, 75, 90, 100):
        case = passkey_case(tokenizer, length, depth, trial=3, seed=7)
        ids = case.input_ids.tolist()
        assert case.length == length and case.input_ids.dtype == torch.long
        assert tokenizer.decode(ids[case.needle_start : case.needle_end]).strip() == KEY_LINE.format(key=case.answer)
        assert case.question_position == length - 1
        assert tokenizer.decode(ids[case.needle_end :]).endswith(QUESTION)
        assert tokenizer.decode(ids).endswith(QUESTION) and case.answer not in tokenizer.decode(ids[case.needle_end :])
        assert (ids[0] == tokenizer.bos_token_id) == with_bos
        filler = length - (case.needle_end - case.needle_start) - len(tokenizer(" " + QUESTION,
                                                                                 add_special_tokens=False).input_ids)
        # the key sits within one filler sentence (at most 8 tokens here) of the requested depth
        assert abs((case.needle_start - int(with_bos)) - depth / 100 * (filler - int(with_bos))) <= 8
        starts.append(case.needle_start)
    assert starts == sorted(starts)


def test_case_is_deterministic_and_keys_vary():
    tokenizer = tiny_tokenizer()
    first, again = passkey_case(tokenizer, 128, 40, 2), passkey_case(tokenizer, 128, 40, 2)
    assert torch.equal(first.input_ids, again.input_ids) and first.answer == again.answer
    keys = {passkey_key(trial) for trial in range(20)}
    assert len(keys) == 20 and all(len(key) == KEY_DIGITS and key[0] != "0" for key in keys)
    assert passkey_key(0, seed=1) != passkey_key(0, seed=0)


def test_scoring_takes_the_first_integer_exactly():
    assert score_passkey(" 48213. Remember it.", "48213") == ("48213", True)
    assert score_passkey(" 4821 3", "48213") == ("4821", False)
    assert score_passkey(" 482130", "48213") == ("482130", False)
    assert score_passkey(" the grass", "48213") == (None, False)


def test_grid_rows_and_heatmap(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    rows = evaluate_retrieval(model, tokenizer, TASK, [80, 120], depths=[0, 50, 100], trials=2, batch_size=2,
                              labels={"model": "tiny", "method": "ntk", "factor": 2.0}, progress=False)
    assert len(rows) == 2 * 3 * 2
    for row in rows:
        assert list(row) == ["model", "method", "factor", *RetrievalRow.keys()]
        assert row["task"] == "passkey" and row["method"] == "ntk"
        case = passkey_case(tokenizer, row["length"], row["depth_percent"], row["trial"])
        assert (row["needle_start"], row["needle_end"], row["answer"]) == (case.needle_start, case.needle_end,
                                                                           case.answer)
        assert row["score"] == float(row["correct"] is True)
    json.dumps(rows)
    assert plot_retrieval(rows, tmp_path / "passkey.png").stat().st_size > 1000


def test_model_folder_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RopescopeError, match="has no tokenizer"):
        run_passkey(model=str(tmp_path), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RopescopeError, match="is not a folder; give .default., a local"):
        run_passkey(model=str(tmp_path / "missing"))


def test_too_short_length_and_cli_error_line(tmp_path, capsys):
    with pytest.raises(RopescopeError, match="too short for a passkey prompt; it needs at least"):
        passkey_case(tiny_tokenizer(), 20, 50, 0)
    assert main(["passkey", "--model", str(tmp_path), "--depths", "0,101", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == ("ropescope passkey: error: argument --depths: depth_percent=101 is "
                                               "outside 0..100")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def shipped_accuracy():
    """Original RoPE on the shipped model: passkey accuracy at the pretrained length (256) and at 4x it."""
    loaded = load("default")
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = evaluate_retrieval(model, tokenizer, TASK, [256, 1024], depths=[0, 25, 50, 75, 100], trials=4,
                              batch_size=10, progress=False)
    return {length: sum(r["score"] for r in rows if r["length"] == length) / 20 for length in (256, 1024)}


def test_shipped_model_retrieves_within_its_pretrained_length_and_collapses_beyond(shipped_accuracy):
    # MODEL_CARD: 100% at 256 and 0% at 1,024 over 11 depths x 5 trials.
    assert shipped_accuracy[256] >= 0.9, shipped_accuracy
    assert shipped_accuracy[1024] <= 0.1, shipped_accuracy


def test_greedy_decoding_equals_transformers_generate():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), seed=3)
    prompts = torch.stack([passkey_case(tokenizer, 90, depth, 0).input_ids for depth in (0, 60)])
    expected = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id)[:, prompts.shape[1] :]
    assert torch.equal(greedy_continuations(model, prompts, 6), expected)


def test_independent_keys_give_every_point_its_own_key_and_filler_start_and_rebuild_the_same():
    from ropescope.tasks.registry import rebuild_cases

    tokenizer = tiny_tokenizer()
    points = [(length, depth) for length in (96, 128) for depth in (0, 50, 100)]
    shared = {passkey_case(tokenizer, length, depth, trial=1).answer for length, depth in points}
    own = [passkey_case(tokenizer, length, depth, trial=1, independent_keys=True) for length, depth in points]
    assert len(shared) == 1 and len({case.answer for case in own}) == len(points)
    again = passkey_case(tokenizer, 128, 50, trial=1, independent_keys=True)
    assert torch.equal(again.input_ids, own[4].input_ids)
    # the filler's start varies too: the same key placed by both layouts differs around it in some prompt
    starts = set()
    for trial in range(8):
        case = passkey_case(tokenizer, 128, 50, trial, independent_keys=True)
        starts.add(tokenizer.decode(case.input_ids[case.needle_end:case.needle_end + 3].tolist()))
    assert len(starts) > 1
    model = tiny_llama(len(tokenizer))
    rows = evaluate_retrieval(model, tokenizer, TASK, [96], depths=[0, 100], trials=2, progress=False,
                              independent_keys=True)
    assert all(row["independent_keys"] for row in rows)
    for row, case in zip(rows, rebuild_cases(tokenizer, rows)):
        assert case.answer == row["answer"] and case.needle_start == row["needle_start"]
        assert torch.equal(case.input_ids, passkey_case(tokenizer, 96, row["depth_percent"], row["trial"],
                                                        independent_keys=True).input_ids)
