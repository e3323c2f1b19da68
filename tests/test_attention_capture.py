"""Capturing q, k during an sdpa forward gives what eager `output_attentions=True` gives, and changes nothing."""

import pytest
import torch

from tests.helpers import VOCAB, eager_entropies, tiny_model
from ropescope.attention.capture import LayerAttention, capture_attention, layer_entropies
from ropescope.errors import RopescopeError
from ropescope.model.patch import extend
from ropescope.rope import parse_spec


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_capture_equals_eager_output_attentions(family):
    model = tiny_model(family)
    input_ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    captured = layer_entropies(model, input_ids, chunk_size=8)
    expected = eager_entropies(model, input_ids)
    assert captured.shape == (2, 2, 4, 37)  # layers, batch, heads, positions
    torch.testing.assert_close(captured.double(), expected, atol=1e-4, rtol=0)
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("method", ["yarn", "dynamic"])
def test_capture_sees_the_rotation_of_an_extended_model(method):
    """After `extend` replaced the rotary module, the capture still equals eager attention beyond the pretrained
    length (and differs from the unextended model)."""
    model = tiny_model("llama")
    input_ids = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(5))
    original = layer_entropies(model, input_ids)
    extend(model, parse_spec(method, factor=4.0, original_max_position_embeddings=32))
    captured = layer_entropies(model, input_ids)
    torch.testing.assert_close(captured.double(), eager_entropies(model, input_ids), atol=1e-4, rtol=0)
    assert not torch.allclose(captured, original, atol=1e-3)


def test_sliding_window_reaches_the_statistics():
    model = tiny_model("mistral")
    input_ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    windowed = layer_entropies(model, input_ids)
    # Beyond the window of 8 a query sees 8 keys: entropy can never exceed log 8.
    assert windowed[..., 8:].max() <= torch.log(torch.tensor(8.0)) + 1e-5


def test_capture_leaves_outputs_unchanged_and_sees_rotated_keys():
    model = tiny_model("llama")
    input_ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(input_ids).logits
    seen: list[LayerAttention] = []
    with capture_attention(model, seen.append), torch.no_grad():
        captured = model(input_ids).logits
    torch.testing.assert_close(captured, plain)
    assert [attention.layer for attention in seen] == [0, 1]
    assert seen[0].query.shape == (1, 4, 20, 16) and seen[0].key.shape == (1, 2, 20, 16)
    assert seen[0].scaling == pytest.approx(16**-0.5)
    # Post-RoPE: the key at position 0 is unrotated, later ones differ from the plain projection.
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(input_ids))
        raw_keys = attention.k_proj(hidden).view(1, 20, 2, 16).transpose(1, 2)
    torch.testing.assert_close(seen[0].key[:, :, 0], raw_keys[:, :, 0])
    assert not torch.allclose(seen[0].key[:, :, 5], raw_keys[:, :, 5])


def test_capture_works_over_eager_too():
    model = tiny_model("qwen2", attn_implementation="eager")
    input_ids = torch.randint(0, VOCAB, (1, 25), generator=torch.Generator().manual_seed(4))
    captured = layer_entropies(model, input_ids).double()
    torch.testing.assert_close(captured, eager_entropies(model, input_ids), atol=1e-4, rtol=0)
    assert model.config._attn_implementation == "eager"


def test_nested_capture_and_unknown_models_are_refused():
    model = tiny_model("llama")
    with capture_attention(model, lambda attention: None):
        with pytest.raises(RopescopeError, match="already active"):
            with capture_attention(model, lambda attention: None):
                pass
    with pytest.raises(RopescopeError, match="Linear is not a causal LM; ropescope supports"):
        layer_entropies(torch.nn.Linear(2, 2), torch.zeros(1, 3, dtype=torch.long))
