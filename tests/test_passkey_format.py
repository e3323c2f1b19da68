"""The one passkey prompt builder: evaluation prompts are the tokenization of their own text; training examples
vary the layout around the same format and end with the answer."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoTokenizer

from ropescope.model.resolve import default_model_path
from ropescope.tasks.passkey import FILLER, FILLER_SENTENCES, KEY_LINE, QUESTION, PasskeyPrompts


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("length, depth", [(256, 0), (256, 50), (300, 37.5), (1024, 100), (2048, 75)])
def test_evaluation_prompt_is_filler_then_key_line_then_whole_sentences_then_question(tokenizer, length, depth):
    key = "48213"
    ids, needle_start, needle_end = PasskeyPrompts(tokenizer).evaluation_prompt(length, depth, key, prefix=[7])
    assert len(ids) == length and ids[0] == 7
    # Before the key: the tail of the tokenized text of whole FILLER repetitions.
    stream = _ids(tokenizer, " " + " ".join([FILLER] * (length // 10)))
    before = ids[1:needle_start]
    assert before == stream[len(stream) - len(before):]
    # From the key on: the tokenization of the text it decodes to, which is the key line, whole filler sentences
    # continuing the cycle from its start, and the question.
    text = tokenizer.decode(ids[needle_start:])
    assert ids[needle_start:] == _ids(tokenizer, text)
    assert tokenizer.decode(ids[needle_start:needle_end]) == " " + KEY_LINE.format(key=key)
    after = text[len(" " + KEY_LINE.format(key=key)) : -len(" " + QUESTION)]
    sentences = re.findall(r" [^.]+\.", after)
    assert "".join(sentences) == after and text.endswith(" " + QUESTION)
    assert sentences == [" " + FILLER_SENTENCES[i % len(FILLER_SENTENCES)] for i in range(len(sentences))]
    # The key sits within one sentence of the depth asked for.
    filler = length - 1 - (needle_end - needle_start) - len(_ids(tokenizer, " " + QUESTION))
    assert abs(len(before) - depth / 100 * filler) <= max(len(_ids(tokenizer, " " + s)) for s in FILLER_SENTENCES)


def test_a_training_example_on_a_corpus_haystack_holds_its_text_around_the_key_and_no_filler(tokenizer):
    prompts = PasskeyPrompts(tokenizer)
    haystack = _ids(tokenizer, " ".join(f"Line {index} of a long, varied text about rivers." for index in range(60)))
    source = tokenizer.decode(haystack)
    filler = set(_ids(tokenizer, " " + FILLER)) - set(_ids(tokenizer, " " + QUESTION + " " + KEY_LINE + " 12345"))
    text_before = text_after = 0
    for seed in range(20):
        ids, answer_length = prompts.training_example(200, torch.Generator().manual_seed(seed), haystack)
        assert len(ids) == 200 and not filler & set(ids)
        key = tokenizer.decode(ids[-answer_length:]).strip()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        at = text.index(KEY_LINE.format(key=key))
        # before the key line: the haystack's start; after it: the haystack's text that follows, then the question
        assert source.startswith(text[:at].rstrip())
        after = text[at + len(KEY_LINE.format(key=key)) :]
        assert after.rstrip().endswith(f"{QUESTION} {key}")
        text_before += at > 20
        text_after += "Line" in after
    assert text_before >= 10 and text_after >= 10
    # the same draws as with filler: only the text around the key changes
    plain, _ = prompts.training_example(200, torch.Generator().manual_seed(0))
    on_corpus, _ = prompts.training_example(200, torch.Generator().manual_seed(0), haystack)
    assert plain[-8:] == on_corpus[-8:] and plain != on_corpus


def test_a_prompt_too_short_for_the_format_is_refused(tokenizer):
    from ropescope.errors import RopescopeError

    with pytest.raises(RopescopeError, match="length=20 is too short for a passkey prompt; it needs at least"):
        PasskeyPrompts(tokenizer).evaluation_prompt(20, 50, "48213")


def test_training_examples_vary_the_layout_and_end_with_the_answer(tokenizer):
    prompts = PasskeyPrompts(tokenizer)
    generator = torch.Generator().manual_seed(0)
    seen_separators, leading, depths = set(), 0, []
    for _ in range(40):
        ids, answer_length = prompts.training_example(200, generator)
        assert len(ids) == 200 and answer_length == 6  # " " and one token per digit
        text = tokenizer.decode(ids)
        key = tokenizer.decode(ids[-answer_length:]).strip()
        assert len(key) == 5 and key.isdigit()
        match = re.search(r"(\s*)The pass key is (\d{5})\. Remember it\. \2 is the pass key\.(\s*)", text)
        assert match and match.group(2) == key
        question = re.search(r"(\s+)" + re.escape(QUESTION) + f" {key}$", text)
        assert question
        seen_separators |= {match.group(3), question.group(1)}
        leading += ids[0] == tokenizer.eos_token_id
        depths.append(match.start() / len(text))
    assert {" ", "\n", "\n\n"} <= seen_separators and 5 < leading < 35
    assert min(depths) < 0.2 and max(depths) > 0.6

    again = torch.Generator().manual_seed(0)
    first = prompts.training_example(200, again)
    assert first == prompts.training_example(200, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("offset", [1, 3, 4])
def test_an_offset_starts_the_filler_cycle_later_and_changes_nothing_else(tokenizer, offset):
    key, length, depth = "48213", 512, 50
    prompts = PasskeyPrompts(tokenizer)
    plain, plain_start, plain_end = prompts.evaluation_prompt(length, depth, key, prefix=[7])
    ids, needle_start, needle_end = prompts.evaluation_prompt(length, depth, key, prefix=[7], offset=offset)
    assert len(ids) == length and ids != plain and ids[-8:] == plain[-8:]
    assert ids[needle_start:needle_end] == plain[plain_start:plain_end]
    text = tokenizer.decode(ids[needle_end:])
    sentences = re.findall(r" [^.]+\.", text[: -len(" " + QUESTION)])
    cycle = len(FILLER_SENTENCES)
    assert sentences == [" " + FILLER_SENTENCES[(offset + i) % cycle] for i in range(len(sentences))]
    # the filler before the key ends with the sentence before the offset one
    before = tokenizer.decode(ids[1:needle_start])
    assert before.endswith(FILLER_SENTENCES[(offset - 1) % cycle])
    assert prompts.evaluation_prompt(length, depth, key, prefix=[7], offset=cycle) == (plain, plain_start, plain_end)
