"""extend(model, spec) on small random Llama, Mistral and Qwen2 against transformers' native rope configuration."""

import copy

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ropescope import RopescopeError, RopeSpec, extend, load
from ropescope.model.patch import ExtendedRotaryEmbedding, spec_from_config

PRETRAINED = 64  # max_position_embeddings of the tiny models
SHORT, LONG = 40, 3 * PRETRAINED + 5  # one length inside the pretrained window, one well past it
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
SHARED_METHODS = {
    "linear": (RopeSpec("linear", factor=4.0), {"rope_type": "linear", "factor": 4.0}),
    "ntk": (RopeSpec("ntk", factor=4.0), None),  # native form: default with the enlarged base
    "dynamic": (RopeSpec("dynamic", factor=2.0, original_max_position_embeddings=PRETRAINED),
                {"rope_type": "dynamic", "factor": 2.0}),
    "yarn": (RopeSpec("yarn", factor=4.0, original_max_position_embeddings=PRETRAINED),
             {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": PRETRAINED}),
    "llama3": (RopeSpec("llama3", factor=8.0, original_max_position_embeddings=PRETRAINED),
               {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": PRETRAINED}),
    "longrope": (RopeSpec("longrope", short_factor=[1.0 + i / 16 for i in range(8)],
                          long_factor=[1.0 + i / 2 for i in range(8)], factor=4.0,
                          original_max_position_embeddings=PRETRAINED),
                 {"rope_type": "longrope", "short_factor": [1.0 + i / 16 for i in range(8)],
                  "long_factor": [1.0 + i / 2 for i in range(8)], "factor": 4.0,
                  "original_max_position_embeddings": PRETRAINED}),
}
BASE = 10000.0


def tiny_config(architecture: str, rope_parameters: dict | None = None):
    config_class, _ = ARCHITECTURES[architecture]
    return config_class(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=PRETRAINED,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": BASE},
        attn_implementation="sdpa",
        initializer_range=0.15,  # large weights make attention sharp, so a wrong rotation shows in the logits
    )


def tiny_model(architecture: str, rope_parameters: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = ARCHITECTURES[architecture][1](tiny_config(architecture, rope_parameters))
    return model.eval()


def logits(model, length: int) -> torch.Tensor:
    ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        return model(ids).logits


def native_rope(spec: RopeSpec, rope_parameters: dict | None) -> dict:
    if rope_parameters is None:  # ntk: the original RoPE with base * factor^(d/(d-2)), d = 16
        return {"rope_type": "default", "rope_theta": BASE * spec.params["factor"] ** (16 / 14)}
    return {**rope_parameters, "rope_theta": BASE}


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("method", list(SHARED_METHODS))
def test_extend_equals_native_transformers_config(architecture, method, tmp_path):
    spec, rope_parameters = SHARED_METHODS[method]
    extended = extend(tiny_model(architecture), spec)
    native = tiny_model(architecture, native_rope(spec, rope_parameters), seed=1)
    native.load_state_dict(extended.state_dict())
    for length in (SHORT, LONG):  # increasing: transformers' dynamic module only ever grows
        torch.testing.assert_close(logits(extended, length), logits(native, length), atol=1e-5, rtol=0)

    extended.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert not isinstance(reloaded.model.rotary_emb, ExtendedRotaryEmbedding)  # plain transformers did it
    for length in (SHORT, LONG):
        torch.testing.assert_close(logits(reloaded, length), logits(extended, length), atol=1e-5, rtol=0)
    assert spec_from_config(reloaded.config) == spec


def test_extension_changes_logits_only_where_it_should():
    model = tiny_model("llama")
    original = {length: logits(model, length) for length in (SHORT, LONG)}
    extend(model, RopeSpec("dynamic", factor=2.0, original_max_position_embeddings=PRETRAINED))
    torch.testing.assert_close(logits(model, SHORT), original[SHORT], atol=1e-6, rtol=0)  # inside: untouched
    assert not torch.allclose(logits(model, LONG), original[LONG], atol=1e-3)
    # the module is a pure function of the current length: going back down gives the short logits again
    torch.testing.assert_close(logits(model, SHORT), original[SHORT], atol=1e-6, rtol=0)


def test_dynamic_yarn_round_trips_through_plain_from_pretrained(tmp_path):
    spec = RopeSpec("dynamic_yarn", original_max_position_embeddings=PRETRAINED)
    extended = extend(tiny_model("qwen2"), spec)
    assert extended.config.rope_parameters["rope_type"] == "dynamic_yarn"
    expected = logits(extended, LONG)
    yarn_at_length = extend(tiny_model("qwen2"), RopeSpec(
        "yarn", factor=LONG / PRETRAINED, original_max_position_embeddings=PRETRAINED))
    torch.testing.assert_close(expected, logits(yarn_at_length, LONG), atol=1e-5, rtol=0)
    extended.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    torch.testing.assert_close(logits(reloaded, LONG), expected, atol=1e-5, rtol=0)


def test_extensions_replace_rather_than_compound():
    once = extend(tiny_model("llama"), RopeSpec("ntk", factor=4.0))
    twice = extend(extend(tiny_model("llama"), RopeSpec("ntk", factor=16.0)), RopeSpec("ntk", factor=4.0))
    torch.testing.assert_close(logits(once, LONG), logits(twice, LONG), atol=0, rtol=0)
    back = extend(twice, RopeSpec("default"))
    torch.testing.assert_close(logits(back, LONG), logits(tiny_model("llama"), LONG), atol=1e-6, rtol=0)
    assert back.config.rope_parameters == {"rope_type": "default", "rope_theta": BASE}
    assert back.config.max_position_embeddings == PRETRAINED


def test_load_applies_the_recorded_extension(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = RopeSpec("dynamic", factor=2.0, original_max_position_embeddings=PRETRAINED)
    extended = extend(tiny_model("llama"), spec)
    extended.save_pretrained(tmp_path)
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)} | {"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    loaded = load(tmp_path)
    model, tokenizer = loaded.model, loaded.tokenizer
    assert isinstance(model.model.rotary_emb, ExtendedRotaryEmbedding) and model.model.rotary_emb.spec == spec
    torch.testing.assert_close(logits(model, LONG), logits(extended, LONG), atol=1e-5, rtol=0)
    assert tokenizer("w3 w5")["input_ids"] == [3, 5]


def test_a_model_without_rotary_embeddings_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(RopescopeError, match="GPT2LMHeadModel has no rotary embedding module; ropescope supports"):
        extend(gpt2, RopeSpec("linear", factor=2.0))
    with pytest.raises(RopescopeError, match="Linear is not a causal LM"):
        extend(nn.Linear(2, 2), RopeSpec("linear", factor=2.0))
    with pytest.raises(RopescopeError, match="extend needs a RopeSpec, got dict"):
        extend(tiny_model("llama"), {"method": "linear"})


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(RopescopeError, match="is not a folder"):
        load(tmp_path / "missing")
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(RopescopeError, match="has no tokenizer"):
        load(tmp_path)


def test_extend_keeps_the_model_device_and_is_in_place():
    model = tiny_model("mistral")
    same = extend(model, RopeSpec("yarn", factor=2.0, original_max_position_embeddings=PRETRAINED))
    assert same is model and model.model.rotary_emb.original.inv_freq.device.type == "cpu"
    assert copy.deepcopy(model).model.rotary_emb.spec.method == "yarn"
