"""The task registry: a task defined and registered here, and nowhere else, runs through `ropescope tasks`,
`ropescope retrieval`, the study, its report and the uncertainty analysis."""

import pytest
import torch

from ropescope.cli import main
from ropescope.errors import RopescopeError
from ropescope.tasks.cases import DISTRACTOR, NEEDLE, CaseRequest, Fact, PromptCase, RetrievalTask, Score
from ropescope.tasks.text import encode, special_prefix
from ropescope.tasks.registry import TASKS, get_task, rebuild_cases, register
from ropescope.io.results import read_rows
from ropescope.study.config import parse_config
from ropescope.study.report.page import build_report
from ropescope.study.run.runner import run_study
from ropescope.study.run.store import DATABASE, ResultStore
from ropescope.study.stages import STAGES
from tests.helpers import tiny_tokenizer

WORDS = ("apple", "river", "stone", "cloud", "lamp", "glass")


def colour_case(request: CaseRequest) -> PromptCase:
    """Filler, a decoy line and the asked-for line at the depth, then the question: the colour of the asked name."""
    tokenizer = request.tokenizer
    asked, decoy = WORDS[request.trial % len(WORDS)], WORDS[(request.trial + 1) % len(WORDS)]
    needle = encode(tokenizer, f" The colour of {asked} is red.")
    distractor = encode(tokenizer, f" The colour of {decoy} is blue.")
    question = encode(tokenizer, f" What is the colour of {asked}? The colour of {asked} is")
    prefix = special_prefix(tokenizer)
    sentence = encode(tokenizer, " The grass is green.")
    filler_length = request.length - len(prefix) - len(needle) - len(distractor) - len(question)
    if filler_length < 0:
        raise RopescopeError(f"length={request.length} is too short for the colour task")
    filler = (sentence * (filler_length // len(sentence) + 1))[:filler_length]
    at = round(filler_length * request.depth_percent / 100)
    ids = prefix + distractor + filler[:at] + needle + filler[at:] + question
    start = len(prefix) + len(distractor) + at
    facts = (Fact(len(prefix), len(prefix) + len(distractor), DISTRACTOR), Fact(start, start + len(needle), NEEDLE))
    return PromptCase(torch.tensor(ids), ("red",), facts, len(ids) - 1)


def colour_score(continuation: str, case: PromptCase) -> Score:
    found = case.answer in continuation.lower()
    return Score(float(found), found, continuation.strip())


COLOUR = register(RetrievalTask(name="colour", summary="a colour asked for, beside a decoy", build=colour_case,
                                score=colour_score, max_new_tokens=lambda tokenizer, case: 3))


def test_registry_lists_finds_and_refuses_a_taken_name(capsys):
    assert get_task("colour") is COLOUR and register(COLOUR) is COLOUR
    assert list(TASKS)[:2] == ["passkey", "needle"]
    with pytest.raises(RopescopeError, match="already registered"):
        register(RetrievalTask(name="passkey", summary="", build=colour_case, score=colour_score))
    with pytest.raises(RopescopeError, match="unknown retrieval task 'colr'; accepted: passkey, needle"):
        get_task("colr")
    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split() == ["colour", *COLOUR.summary.split()] for line in lines)
    assert {line.split()[0] for line in lines} == set(TASKS)


def test_rebuilt_cases_equal_the_evaluated_ones():
    tokenizer = tiny_tokenizer()
    rows = [{"task": "colour", "length": 60, "depth_percent": depth, "trial": trial, "seed": 0}
            for depth in (0, 100) for trial in range(2)]
    for row, case in zip(rows, rebuild_cases(tokenizer, rows)):
        built = colour_case(CaseRequest(tokenizer, 60, row["depth_percent"], row["trial"]))
        assert torch.equal(case.input_ids, built.input_ids) and case.facts == built.facts
    with pytest.raises(RopescopeError, match="needle rows need the haystack documents"):
        rebuild_cases(tokenizer, [{"task": "needle", "length": 60, "depth_percent": 0, "trial": 0}])


@pytest.mark.slow
def test_a_task_registered_here_runs_through_every_path(tmp_path, capsys):
    out = tmp_path / "colour"
    assert main(["retrieval", "--task", "colour", "--lengths", "64,96", "--depths", "0,100", "--trials", "2",
                 "--out", str(out)]) == 0
    rows = read_rows(out / "colour.csv")
    assert len(rows) == 8 and {row["task"] for row in rows} == {"colour"} and (out / "colour.png").is_file()
    assert all(row["facts"].count("distractor") == 1 for row in rows)  # CSV holds the facts as text
    assert main(["uncertainty", str(out / "colour.csv"), "--out", str(tmp_path / "uncertainty")]) == 0
    attention = read_rows(tmp_path / "uncertainty" / "uncertainty.csv")
    assert len(attention) == 8 and all(0 < row["distractor_mass"] < 1 for row in attention)
    assert "default colour: entropy correct" in capsys.readouterr().out

    config = parse_config({
        "model": {"original_max_position_embeddings": 256}, "methods": {"original": {"method": "default"}},
        "evaluation": {"perplexity_lengths": [256], "perplexity_documents": 1},
        "retrieval": {"tasks": ["colour", "passkey"], "lengths": [256], "depths": [50], "trials": 2},
        "analysis": {"entropy_lengths": [256], "entropy_samples": 1, "pattern_length": 256},
    }, STAGES)
    study = tmp_path / "study"
    assert run_study(config, study, log=lambda line: None)["failed"] == 0
    with ResultStore(study / DATABASE) as store:
        assert [row["task"] for row in store.rows("retrieval")] == ["colour"] * 2 + ["passkey"] * 2
        assert [row["task"] for row in store.rows("uncertainty")] == ["colour"] * 2 + ["passkey"] * 2
    summary = build_report(study)["summary"].read_text()
    assert "| colour@256 | passkey@256 |" in summary and "| colour | 2 |" in summary
    assert (study / "report" / "figures" / "colour.png").is_file()


def test_the_worked_example_in_the_docs_builds_and_scores():
    from pathlib import Path

    from ropescope.tasks.haystack import haystack_ids

    text = (Path(__file__).parents[1] / "docs" / "tasks.md").read_text()
    source = text.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(source, "docs/tasks.md", "exec"), namespace)
    task = namespace["TASK"]
    tokenizer = tiny_tokenizer()
    documents = [("The king walked slowly through the garden. " * 40)]
    assert haystack_ids(tokenizer, documents, 0, 10)  # the corpus is long enough for the prompts below
    for depth in (10, 90):
        case = task.build(CaseRequest(tokenizer, 200, depth, trial=1, documents=documents))
        assert case.length == 200 and [fact.role for fact in sorted(case.facts, key=lambda f: f.start)] == (
            [NEEDLE, DISTRACTOR] if depth == 10 else [DISTRACTOR, NEEDLE])
        needle = next(fact for fact in case.facts if fact.role == NEEDLE)
        assert tokenizer.decode(case.input_ids[needle.start : needle.end].tolist()).strip() == \
            "The lantern is painted blue."
        assert task.score(" blue, with a", case).correct and not task.score(" green", case).correct
