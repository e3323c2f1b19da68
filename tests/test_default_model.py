"""The shipped model loads with plain transformers and its model card's claims hold (on small samples)."""

from itertools import islice
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ropescope
from ropescope.io.data import load_corpus, token_blocks
from ropescope.eval.retrieval import evaluate_retrieval
from ropescope.tasks import passkey
from ropescope.model.resolve import default_model_path
from ropescope.eval.nll import blocks_nll, perplexity_from_nll, unigram_perplexity

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def validation_blocks(tokenizer, length: int, count: int) -> list[torch.Tensor]:
    return list(islice(token_blocks(tokenizer, load_corpus(None, "validation"), length), count))


def accuracy(rows: list[dict]) -> float:
    return sum(row["score"] for row in rows) / len(rows)


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_path())


def test_shipped_files_are_small_hf_files():
    folder = default_model_path()
    assert folder == Path(ropescope.__file__).resolve().parent / "default" / "model"
    assert all((folder / name).is_file() for name in MODEL_FILES)
    assert sum(file.stat().st_size for file in folder.iterdir()) < 25 * 2**20


def test_shipped_model_is_a_small_llama_with_original_rope(shipped):
    model, tokenizer = shipped
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and config.max_position_embeddings == 256
    assert config.rope_parameters["rope_type"] == "default"
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 5e6
    assert len(tokenizer) == config.vocab_size and tokenizer.eos_token_id == config.eos_token_id
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(" 48213", add_special_tokens=False)["input_ids"])
    assert tokens[-5:] == list("48213")  # one token per digit: a key is copied digit by digit


def test_perplexity_at_256_beats_unigram_and_collapses_beyond(shipped):
    model, tokenizer = shipped
    blocks_256 = validation_blocks(tokenizer, 256, 16)
    model_256 = perplexity_from_nll(blocks_nll(model, blocks_256))
    # Unigram counts from part of the train split: close to the full-split baseline and quick to compute.
    unigram = unigram_perplexity(tokenizer, load_corpus(None, "train")[:40], torch.cat(blocks_256))
    assert model_256 < 0.5 * unigram
    blocks_1024 = validation_blocks(tokenizer, 1024, 4)
    # MODEL_CARD: 63 at 256; at 1,024, 114 over whole blocks and 138 over the tokens past position 256.
    nll_1024 = blocks_nll(model, blocks_1024)
    assert perplexity_from_nll(nll_1024) > 1.4 * model_256
    assert perplexity_from_nll(nll_1024, from_position=256) > 1.8 * model_256


def test_perplexity_from_a_position_scores_only_the_later_tokens():
    torch.manual_seed(0)
    vocabulary, length = 7, 12
    logits = torch.randn(2, length, vocabulary)

    class FixedLogits(torch.nn.Module):
        def forward(self, input_ids):
            return type("Output", (), {"logits": logits[: input_ids.shape[0]]})

    blocks = [torch.randint(0, vocabulary, (length,)) for _ in range(2)]
    log_probabilities = torch.log_softmax(logits, dim=-1)
    for start in (0, 1, 5, 11):
        scored = [-log_probabilities[b, p - 1, blocks[b][p]].item() for b in range(2) for p in range(max(start, 1), length)]
        expected = torch.tensor(scored, dtype=torch.float64).mean().exp().item()
        got = perplexity_from_nll(blocks_nll(FixedLogits(), blocks), from_position=start)
        assert got == pytest.approx(expected, rel=1e-5)


def test_passkey_retrieval_within_256(shipped):
    model, tokenizer = shipped
    within = evaluate_retrieval(model, tokenizer, passkey.TASK, [256], depths=(0, 20, 40, 60, 80, 100), trials=2,
                                seed=1, progress=False)
    assert len(within) == 12 and all(row["length"] == 256 for row in within)
    assert accuracy(within) >= 0.9


def test_passkey_retrieval_collapses_at_1024(shipped):
    model, tokenizer = shipped
    beyond = evaluate_retrieval(model, tokenizer, passkey.TASK, [1024], depths=(0, 25, 50, 75, 100), trials=1,
                                seed=1, progress=False)
    assert len(beyond) == 5 and all(row["length"] == 1024 for row in beyond)
    assert accuracy(beyond) <= 0.2
