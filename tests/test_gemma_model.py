"""Gemma-3-270M-it from its split GGUF packages: the second real family, with two kinds of layers.

Its 15 sliding-window layers (512-token window, RoPE base 1e4) and 3 global layers (base 1e6) are checked apart:
the converted folder against transformers' own GGUF loading, the capture against float64 eager attention on both
layer types (at a length past the window, so the window shows), and an extension that changes the global layers
only, saved and reloaded by plain transformers. The packages are fetched by the README's test command; without
them these tests skip, unless ROPESCOPE_REQUIRE_REAL_MODEL=1 (CI) makes that a failure.
"""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from ropescope import RopeSpec, extend
from ropescope.attention.capture import layer_entropies
from ropescope.attention.profiles import entropy_profile
from ropescope.io.data import load_corpus
from ropescope.io.rows import layer_type_means
from ropescope.model.gguf import read_header
from ropescope.model.resolve import resolve_model
from tests.helpers import against_gguf_loading, eager_entropies, packaged_in_float32, packaged_or_skip

NAME = "gemma3-270m"
LAYERS, SLIDING, GLOBAL = 18, 15, 3
WINDOW = 512


@pytest.fixture(scope="module")
def gguf_file():
    return packaged_or_skip(NAME)


@pytest.fixture(scope="module")
def gemma(gguf_file):
    return packaged_in_float32(NAME)


def _text_ids(tokenizer, length: int, document: int = 0) -> torch.Tensor:
    text = load_corpus("default:works", split="validation")[document][:20 * length]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]
    assert ids.shape[1] == length
    return ids


def test_the_packages_give_one_model_of_two_layer_types_each_with_its_own_rope(gguf_file, gemma):
    assert (read_header(gguf_file).architecture, read_header(gguf_file).quantization) == ("gemma3", "Q4_K_M")
    assert re.fullmatch(r"gguf Q4_K_M sha256:[0-9a-f]{12}", resolve_model(NAME).revision)
    config = gemma[0].config
    assert config.num_hidden_layers == LAYERS and config.sliding_window == WINDOW
    assert config.layer_types.count("sliding_attention") == SLIDING
    assert config.layer_types.count("full_attention") == GLOBAL
    rope = config.rope_parameters
    assert (rope["sliding_attention"]["rope_theta"], rope["full_attention"]["rope_theta"]) == (1e4, 1e6)
    assert config.max_position_embeddings == 32768


def test_the_converted_folder_gives_the_logits_of_transformers_own_gguf_loading(gguf_file, gemma):
    model, tokenizer, _ = gemma
    ids, ours, theirs = against_gguf_loading(model, tokenizer, gguf_file)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert ids[0, 0] == tokenizer.bos_token_id  # Gemma reads garbage without its <bos>
    top = [tokenizer.decode(index).strip() for index in ours[0, -1].topk(5).indices]
    assert "Paris" in top, top


def test_capture_entropy_equals_float64_eager_attention_on_both_layer_types(gemma):
    _, tokenizer, folder = gemma
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager").eval()
    ids = _text_ids(tokenizer, WINDOW + 101, document=1)  # past the window, and not a multiple of any block
    expected = eager_entropies(reference, ids)
    captured = layer_entropies(reference.float(), ids)
    assert captured.shape == expected.shape == (LAYERS, 1, 4, WINDOW + 101)
    types = reference.config.layer_types
    for layer_type in ("sliding_attention", "full_attention"):
        layers = [index for index, name in enumerate(types) if name == layer_type]
        torch.testing.assert_close(captured[layers].double(), expected[layers], rtol=0, atol=2e-4)
    # the window shows: past it, a sliding layer's queries see 512 keys at most, a global layer's all of them
    sliding = types.index("sliding_attention")
    assert expected[sliding, 0, :, WINDOW:].max() <= math.log(WINDOW) + 1e-9


def test_the_entropy_readout_keeps_the_layer_types_apart(gemma):
    model, tokenizer, _ = gemma
    ids = _text_ids(tokenizer, 256, document=2)[0]
    rows = entropy_profile(model, [ids], position_bin_size=64)
    means = {mean["layer_type"]: mean for mean in layer_type_means(rows, "entropy", by=("length",))}
    assert {name: mean["layers"] for name, mean in means.items()} == {"sliding_attention": SLIDING,
                                                                      "full_attention": GLOBAL}
    entropy = layer_entropies(model, ids[None])[:, 0].double().mean(dim=(1, 2))  # brute force: per layer
    for layer_type, mean in means.items():
        layers = [index for index, name in enumerate(model.config.layer_types) if name == layer_type]
        assert mean["entropy"] == pytest.approx(float(entropy[layers].mean()), abs=1e-5)


def test_an_extension_changes_the_global_layers_only_and_reloads_in_plain_transformers(gemma, tmp_path, caplog):
    _, tokenizer, folder = gemma
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rotary = model.model.rotary_emb
    sliding_before = rotary.sliding_attention_inv_freq.clone()
    global_before = rotary.full_attention_inv_freq.clone()
    spec = RopeSpec("yarn", factor=2.0, original_max_position_embeddings=32768)
    with caplog.at_level(logging.WARNING, logger="ropescope"):
        extend(model, spec)
    assert "extends the 3 full_attention layers; the 15 sliding_attention layers keep their pretrained rotation " \
           "(they never see a key past their 512-token window)" in caplog.text
    extended = model.model.rotary_emb
    torch.testing.assert_close(extended.original.sliding_attention_inv_freq, sliding_before, rtol=0, atol=0)
    assert not torch.allclose(extended.original.full_attention_inv_freq, global_before)
    rope = model.config.rope_parameters
    assert rope["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4}
    assert rope["full_attention"]["rope_type"] == "yarn" and rope["full_attention"]["factor"] == 2.0
    ids = _text_ids(tokenizer, 96)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-4)
