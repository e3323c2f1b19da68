"""RULER's synthetic tasks: each prompt has RULER's structure (instruction, haystack with the facts where the case
says, question, answer prefix), exactly the asked length; string_match_all against hand-made answers."""

import re
from collections import Counter

import pytest
import torch

from ropescope.io.data import load_corpus
from ropescope.errors import RopescopeError
from ropescope.tasks.cases import CaseRequest
from ropescope.tasks.text import special_prefix
from ropescope.tasks.ruler import NIAH, TASKS, corpus_words, score_all, string_match_all
from ropescope.tasks.registry import get_task
from ropescope.model.load import load_tokenizer
from ropescope.model.resolve import resolve_model
from tests.helpers import tiny_tokenizer

NAMES = [task.name for task in TASKS]
NUMBER, UUID, WORD = r"\d{7}", r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", r"[a-z]+-[a-z]+"
FORMS = {"numbers": NUMBER, "uuids": UUID, "words": WORD}


CORPUS = load_corpus(None, split="validation")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("default"))


def build(tokenizer, name, length=1024, depth=50, trial=0, documents=CORPUS, **options):
    return get_task(name).build(CaseRequest(tokenizer, length, depth, trial, 0, documents, **options))


def text_of(tokenizer, case, fact=None):
    ids = case.input_ids.tolist() if fact is None else case.input_ids[fact.start : fact.end].tolist()
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_every_task_is_registered_and_fills_the_length_exactly(tokenizer):
    assert NAMES == [*NIAH, "vt", "cwe", "fwe"]
    for name in NAMES:
        for length in (400, 1500):
            case = build(tokenizer, name, length)
            assert case.length == length and case.question_position == length - 1 and case.input_ids.dtype == torch.long
            assert case.input_ids[: len(special_prefix(tokenizer))].tolist() == special_prefix(tokenizer)
            assert case.needles and all(0 <= f.start < f.end <= case.question_position for f in case.facts)
            assert [f.start for f in case.facts] == sorted(f.start for f in case.facts)
            assert all(a.end <= b.start for a, b in zip(case.facts, case.facts[1:]))  # facts never overlap
        assert torch.equal(case.input_ids, build(tokenizer, name, 1500).input_ids)  # deterministic
        assert build(tokenizer, name, 1500, trial=1).answers != case.answers  # each point its own draw


@pytest.mark.parametrize("name", list(NIAH))
def test_niah_structure(tokenizer, name):
    variant = NIAH[name]
    case = build(tokenizer, name, 2048, depth=30)
    text = text_of(tokenizer, case)
    plural = variant.value_kind
    needle = re.compile(rf"A special magic \w+ for ({FORMS[variant.key_kind]}) is: ({FORMS[plural]})\.")
    facts = [needle.fullmatch(text_of(tokenizer, case, fact).strip()) for fact in case.facts]
    assert all(facts), [text_of(tokenizer, case, fact) for fact in case.facts]
    asked_keys = {match.group(1) for match, fact in zip(facts, case.facts) if fact.role == "needle"}
    other_keys = {match.group(1) for match, fact in zip(facts, case.facts) if fact.role == "distractor"}
    assert len(asked_keys) == variant.queries and not asked_keys & other_keys
    assert sorted(match.group(2) for match, fact in zip(facts, case.facts) if fact.role == "needle") == sorted(
        case.answers)
    assert len(case.answers) == variant.values * variant.queries
    # instruction first, then the haystack, then the question naming every asked key and the answer prefix
    assert text.lstrip("\n").startswith(f"Special magic {plural} are hidden in the text below.")
    question = text.rsplit("\n", 1)[1]
    assert question.startswith(f"What are all the special magic {plural} for ")
    assert question.endswith("mentioned in the text are") and all(key in question for key in asked_keys)
    if variant.haystack == "needles":  # the haystack is needles alone, with other keys
        assert len(other_keys) > 3
        body = text[text.index("afterwards.\n") + len("afterwards.\n") : text.rindex("\nWhat are all")]
        assert needle.sub("", body).strip() == ""
    else:
        assert len(other_keys) == variant.keys - variant.queries
        first = next(fact for fact in case.facts if fact.role == "needle")
        assert abs(first.start / case.length - 0.3) < 0.12  # the first asked needle near the asked depth
    if variant.haystack == "noise":
        assert "The grass is green. The sky is blue." in text
    elif variant.haystack == "essay":  # corpus text, whole lines of it
        lines = [line for line in text.splitlines()[2:-2] if len(line) > 30 and "special magic" not in line]
        assert len(lines) > 5 and all(any(line in document for document in CORPUS) for line in lines)


def test_variable_tracking_chain(tokenizer):
    case = build(tokenizer, "vt", 1500, depth=20)
    statements = [text_of(tokenizer, case, fact).strip() for fact in case.facts]
    assert len(statements) == 5 and all(fact.role == "needle" for fact in case.facts)
    value = re.fullmatch(r"VAR ([A-Z]{5}) = (\d{5})\.", statements[0]).group(2)
    names = [re.match(r"VAR ([A-Z]{5}) =", statement).group(1) for statement in statements]
    for previous, statement in zip(names, statements[1:]):
        assert statement.endswith(f"= VAR {previous}.")  # each hop names the one before
    assert list(case.answers) == names and len(set(names)) == 5
    text = text_of(tokenizer, case)
    assert text.lstrip("\n").startswith("Track every chain of variable assignments")
    assert text.endswith(f"5 variables are assigned the value {value}, they are:")
    assert abs(case.facts[0].start / case.length - 0.2) < 0.1


@pytest.mark.parametrize("length", [400, 1500, 4096])
def test_common_words_are_the_most_common(tokenizer, length):
    case = build(tokenizer, "cwe", length)
    text = text_of(tokenizer, case)
    listing = text[text.index("most often.\n") + len("most often.\n") : text.index("\nQuestion:")]
    entries = re.findall(r"(\d+)\. (\S+)", listing)
    assert [int(number) for number, _ in entries] == list(range(1, len(entries) + 1))
    counts = Counter(word for _, word in entries)
    assert len(case.answers) == 10 and set(case.answers) <= set(counts)
    least_common = min(counts[word] for word in case.answers)
    assert all(counts[word] < least_common for word in counts if word not in case.answers)
    if length >= 4096:  # RULER's frequencies: 30 for the common words, 3 for the rest
        assert {counts[word] for word in case.answers} == {30} and set(counts.values()) == {30, 3}
    assert len(case.facts) == sum(counts[word] for word in case.answers)
    assert all(text_of(tokenizer, case, fact).split(". ")[1] in case.answers for fact in case.facts)


@pytest.mark.parametrize("length", [256, 1500])
def test_frequent_words_follow_zipf_with_dots_first(tokenizer, length):
    case = build(tokenizer, "fwe", length)
    text = text_of(tokenizer, case)
    coded = text[text.index("most often.") + len("most often.") : text.index("\nQuestion:")].split()
    ranked = Counter(coded).most_common()
    assert ranked[0][0] == "...." and [word for word, _ in ranked[1:4]] == list(case.answers)
    counts = [count for _, count in ranked]
    assert counts[0] > counts[1] > counts[2] > counts[3] > counts[4]  # no tie decides the answer
    assert len(case.facts) == sum(counts[1:4])
    assert text.endswith("The 3 most frequent coded words are:")


def test_string_match_all_against_hand_made_answers(tokenizer):
    assert string_match_all(" 1234567 and 7654321.", ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)
    assert string_match_all(" APPLE, River", ["apple", "river"]) == 1.0
    assert string_match_all("", ["apple"]) == 0.0
    case = build(tokenizer, "niah_multivalue", 1500)
    half = " " + ", ".join(case.answers[:2])
    assert score_all(half, case).score == 0.5 and not score_all(half, case).correct
    full = score_all(" " + " ".join(reversed(case.answers)) + " and more", case)
    assert full.score == 1.0 and full.correct and full.prediction.endswith("and more")


def test_corpus_words_and_bad_input():
    assert corpus_words(["The king walked; the king's garden, x yy"]) == ["king", "walked", "garden"]
    with pytest.raises(RopescopeError, match="length=60 is too short for niah_single_1; it needs at least"):
        build(tiny_tokenizer(), "niah_single_1", 60)
    with pytest.raises(RopescopeError, match="cwe needs at least 20"):
        build(tiny_tokenizer(), "cwe", 400, documents=["one two three four"])
    with pytest.raises(RopescopeError, match="corpus has no documents"):
        build(tiny_tokenizer(), "niah_single_2", 400, documents=[])


def test_independent_haystacks_give_each_trial_its_own_text(tokenizer):
    # every sentence of this corpus is unique, so a sentence two prompts share is text they share
    unique = [" ".join(f"Line {document}-{line} ends here." for line in range(200)) for document in range(6)]
    for name in ("passkey", "needle", "niah_single_1", "niah_single_2", "vt"):
        cases = [build(tokenizer, name, 512, depth=50, trial=trial, documents=unique, independent_haystacks=True)
                 for trial in range(6)]
        lines = [set(re.findall(r"Line (\d+-\d+) ends", text_of(tokenizer, case))) for case in cases]
        assert all(len(found) > 20 for found in lines), name  # the haystack is corpus text
        for first in range(6):
            for second in range(first + 1, 6):
                assert not lines[first] & lines[second], (name, first, second)
        if name != "needle":  # the needle's sentence is the user's, the same in every prompt
            assert len({case.answer for case in cases}) == 6, name  # each its own values
    # the usual passkey filler is shared by every trial, its key by every point of a trial
    usual = [build(tokenizer, "passkey", 512, depth=depth, trial=0) for depth in (0, 50)]
    assert usual[0].answer == usual[1].answer


@pytest.mark.slow
def test_every_task_runs_on_the_shipped_model_from_the_cli_and_the_study(tmp_path, capsys):
    from ropescope.cli import main
    from ropescope.io.results import read_rows, write_rows
    from ropescope.study.config import parse_config
    from ropescope.study.report.page import build_report
    from ropescope.study.run.runner import run_study
    from ropescope.study.run.store import DATABASE, ResultStore
    from ropescope.study.stages import STAGES

    rows = []
    for name in NAMES:
        out = tmp_path / name
        assert main(["retrieval", "--task", name, "--lengths", "512", "--depths", "50", "--trials", "1",
                     "--out", str(out)]) == 0
        rows += read_rows(out / f"{name}.csv")
    assert [row["task"] for row in rows] == NAMES and all(0 <= row["score"] <= 1 for row in rows)
    write_rows(rows, tmp_path / "all.csv")
    assert main(["uncertainty", str(tmp_path / "all.csv"), "--out", str(tmp_path / "uncertainty")]) == 0
    attention = read_rows(tmp_path / "uncertainty" / "uncertainty.csv")
    assert [row["task"] for row in attention] == NAMES and all(0 < row["needle_mass"] < 1 for row in attention)
    distracted = {row["task"] for row in attention if row["distractor_mass"] is not None}
    assert distracted == {"niah_multikey_1", "niah_multikey_2", "niah_multikey_3"}

    config = parse_config({
        "model": {"original_max_position_embeddings": 256}, "methods": {"original": {"method": "default"}},
        "evaluation": {"perplexity_lengths": [256], "perplexity_documents": 1},
        "retrieval": {"tasks": NAMES, "lengths": [512], "depths": [50], "trials": 1},
        "analysis": {"entropy_lengths": [256], "entropy_samples": 1, "pattern_length": 256},
    }, STAGES)
    assert run_study(config, tmp_path / "study", log=lambda line: None)["failed"] == 0
    with ResultStore(tmp_path / "study" / DATABASE) as store:
        assert [row["task"] for row in store.rows("retrieval")] == NAMES
        assert [row["task"] for row in store.rows("uncertainty")] == NAMES
    summary = build_report(tmp_path / "study")["summary"].read_text()
    assert "| " + " | ".join(f"{name}@512" for name in NAMES) + " |" in summary
    assert all(f"| {name} | 1 | " in summary for name in NAMES)  # each task's readout line
