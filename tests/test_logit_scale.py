"""`logit_scale` on every method: the spec reads and checks it, `extend` applies it to every layer's logits, the
capture sees the scaled attention, and a saved model keeps it.

The reference is brute force: the same extension without the scale, its attention computed here in float64 from
the layer's q, k, v and eager mask, with the logits scaled by hand (the scaling times the number, or each query
times its logn factor computed from its position), on Llama, Gemma 2 (softcapping, sliding windows) and StableLM
(partial rotary).
"""

import math

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from ropescope import RopescopeError, RopeSpec, extend
from ropescope.attention.capture import layer_entropies
from ropescope.model.patch import spec_from_config
from ropescope.rope import METHODS, parse_spec
from tests.test_families import PRETRAINED, family_config, token_ids

FAMILIES = ["llama", "gemma2", "stablelm"]
LENGTH = 3 * PRETRAINED + 5  # odd, past the pretrained length so that logn scales
SCALES = [1.7, [1.3, 0.6], "logn"]


@pytest.fixture(scope="module")
def models():
    built = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        built[family] = AutoModelForCausalLM.from_config(family_config(family)).double().eval()
    return built


def _hand_scale(scale, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float):
    if scale == "logn":  # positions from the keys: the inputs are unpadded, with or without a KV cache
        first = key.shape[-2] - query.shape[-2]
        factors = [max(1.0, math.log(first + i + 1) / math.log(PRETRAINED)) for i in range(query.shape[-2])]
        return query * torch.tensor(factors, dtype=query.dtype)[None, None, :, None], scaling
    return query, scaling * (scale[layer] if isinstance(scale, list) else scale)


def _weights(query, key, attention_mask, scaling, softcap):
    """Softmax of the scaled, softcapped, masked scores in float64 (eager's softmax runs in float32)."""
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return (scores + attention_mask[..., :key.shape[-2]]).softmax(-1)


def reference(model, spec: RopeSpec, input_ids, **forward):
    """Logits and the eager attention entropy [layers, batch, heads, seq] of `spec` applied by hand."""
    scale, entropies = spec.logit_scale, []
    plain = extend(model, spec.without_logit_scale())

    def by_hand(module, query, key, value, attention_mask, scaling=None, **kwargs):
        query, scaling = _hand_scale(scale, module.layer_idx, query, key, scaling)
        weights = _weights(query, key, attention_mask, scaling, kwargs.get("softcap"))
        entropies.append(-(weights * weights.clamp_min(1e-300).log()).sum(-1))
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        return (weights @ value).transpose(1, 2).contiguous(), weights

    AttentionInterface.register("test_scaled_by_hand", by_hand)
    AttentionMaskInterface.register("test_scaled_by_hand", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    previous = plain.config._attn_implementation
    plain.config._attn_implementation = "test_scaled_by_hand"
    try:
        with torch.no_grad():
            logits = plain(input_ids, **forward).logits
    finally:
        plain.config._attn_implementation = previous
    return logits, torch.stack(entropies)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scale", SCALES, ids=["number", "per-layer", "logn"])
def test_scaled_logits_and_entropy_equal_brute_force(family, scale, models):
    model = models[family]
    spec = RopeSpec("yarn", factor=4.0, original_max_position_embeddings=PRETRAINED, logit_scale=scale)
    input_ids = token_ids(LENGTH)
    expected_logits, expected_entropy = reference(model, spec, input_ids)
    extend(model, spec)
    assert model.config._attn_implementation.startswith("ropescope_scaled_")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, expected_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer_entropies(model, input_ids, chunk_size=16).double(), expected_entropy,
                               atol=1e-6, rtol=0)
    unscaled = layer_entropies(extend(model, spec.without_logit_scale()), input_ids)
    assert not torch.allclose(unscaled.double(), expected_entropy, atol=1e-3)  # the scale changed the attention


@pytest.mark.parametrize("family", FAMILIES)
def test_logn_follows_the_position_under_a_kv_cache(family, models):
    model = models[family]
    spec = RopeSpec("linear", factor=4.0, logit_scale="logn")
    input_ids = token_ids(LENGTH, batch=1)
    expected, _ = reference(model, spec, input_ids)
    extend(model, spec)
    prefix = LENGTH - 9
    with torch.no_grad():
        first = model(input_ids[:, :prefix], use_cache=True)
        cache = first.past_key_values
        logits = [first.logits]
        for position in range(prefix, LENGTH):  # one token at a time, as decoding does
            step = model(input_ids[:, position:position + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            logits.append(step.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unset_or_one_changes_nothing_bit_for_bit(method, models):
    model = models["llama"]
    spec = parse_spec(method, 4.0, PRETRAINED) if method != "longrope" else RopeSpec(
        "longrope", factor=4.0, original_max_position_embeddings=PRETRAINED, short_factor=[1.0] * 8,
        long_factor=[float(i + 1) for i in range(8)])
    one = RopeSpec(spec.method, **spec.params, logit_scale=1)
    assert one == spec and one.to_text() == spec.to_text() and "logit_scale" not in one.params
    input_ids = token_ids(LENGTH)
    with torch.no_grad():
        plain = extend(model, spec)(input_ids).logits
        assert model.config._attn_implementation == "sdpa"
        scaled = extend(model, RopeSpec(spec.method, **spec.params, logit_scale=2.0))(input_ids).logits
        again = extend(model, one)(input_ids).logits
    assert torch.equal(plain, again) and not torch.allclose(plain, scaled)
    assert model.config._attn_implementation == "sdpa"


def test_the_spec_reads_writes_and_labels_the_scale():
    spec = parse_spec("yarn:factor=4,logit_scale=1.25", None, 256)
    assert spec.logit_scale == 1.25 and spec.method_params == parse_spec("yarn:factor=4", None, 256).params
    assert parse_spec(spec.to_text()) == spec and spec.label() == "yarn x4 s=1.25"
    assert parse_spec('ntk:factor=2,logit_scale="logn"').label() == "ntk x2 s=logn"
    assert parse_spec("default:logit_scale=[1,2]").logit_scale == [1.0, 2.0]
    assert parse_spec({"method": "linear", "factor": 2, "logit_scale": "fit"}).logit_scale == "fit"


@pytest.mark.parametrize("value, message", [
    (0, "logit_scale=0 must be a positive finite number"),
    (-1.5, "logit_scale=-1.5 must be a positive finite number"),
    (float("nan"), "logit_scale=nan must be a positive finite number"),
    (True, "logit_scale=True must be a positive finite number"),
    ([1.0, 0.0], "logit_scale=0.0 must be a positive finite number"),
    ([], "logit_scale=[] is empty"),
    ("log", "logit_scale='log' is unknown; accepted: a positive number, a list"),
])
def test_bad_scales_are_refused_in_one_line(value, message):
    with pytest.raises(RopescopeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RopeSpec("yarn", factor=2.0, original_max_position_embeddings=256, logit_scale=value)


def test_a_list_of_the_wrong_length_and_fit_are_refused_before_anything_changes(models):
    model = models["llama"]
    extend(model, RopeSpec("linear", factor=2.0))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(RopescopeError, match="logit_scale has 3 numbers but the model has 2 attention layers"):
        extend(model, RopeSpec("yarn", factor=4.0, original_max_position_embeddings=PRETRAINED,
                               logit_scale=[1.0, 2.0, 3.0]))
    with pytest.raises(RopescopeError, match="logit_scale='fit' is found by `ropescope fit-scale`"):
        extend(model, RopeSpec("yarn", factor=4.0, original_max_position_embeddings=PRETRAINED, logit_scale="fit"))
    assert spec_from_config(model.config) == RopeSpec("linear", factor=2.0)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize("method", ["yarn", "longrope"])
def test_a_constant_scale_reloads_in_plain_transformers(method, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config("llama")).eval()
    params = dict(short_factor=[1.0] * 8, long_factor=[float(i + 1) for i in range(8)]) if method == "longrope" else {}
    spec = RopeSpec(method, factor=4.0, original_max_position_embeddings=PRETRAINED, logit_scale=1.6, **params)
    extend(model, spec).save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert plain.config._attn_implementation == "sdpa"  # the scale is in the rotation's attention factor
    assert spec_from_config(plain.config) == spec
    input_ids = token_ids(LENGTH)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids).logits, model(input_ids).logits, atol=1e-4, rtol=0)
        unscaled = extend(model, spec.without_logit_scale())(input_ids).logits
        assert not torch.allclose(plain(input_ids).logits, unscaled, atol=1e-2)
