"""Every RoPE decoder family of transformers, as a user's checkpoint: capture against eager attention, extend against
the family's own rope configuration.

Each family is a tiny random model (2 layers) with the features that set it apart switched on: sliding windows,
softcapping, a query scale that is not head_dim ** -0.5, partial rotary dimensions, per-layer-type RoPE, NoPE
layers, q/k norms, head_dim = None. It is saved to a folder and loaded with `AutoModelForCausalLM`, as a user's
checkpoint would be, with transformers' default attention for the family (sdpa where the family has it).
"""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from ropescope import RopescopeError, RopeSpec, extend
from ropescope.attention.capture import layer_entropies
from ropescope.model.patch import ExtendedRotaryEmbedding, is_rotary_module, kept_layers, spec_from_config

VOCAB = 96
PRETRAINED = 32  # max_position_embeddings of the tiny models
SHORT, LONG = 24, 3 * PRETRAINED + 7  # one length inside the pretrained window, one well past it
SIZES = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=PRETRAINED,
    initializer_range=0.2,  # peaked, position-dependent attention, so a wrong rotation or scale shows
)
WINDOW = 8  # shorter than the inputs, so sliding windows change the attention
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
FAMILIES = {
    # family: (config class, what sets it apart)
    "llama": ("LlamaConfig", dict(head_dim=16)),
    "mistral": ("MistralConfig", dict(head_dim=16, sliding_window=WINDOW)),
    "mixtral": ("MixtralConfig", dict(head_dim=None, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        **MOE, shared_expert_intermediate_size=32, use_sliding_window=True, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    )),
    "qwen3": ("Qwen3Config", dict(head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(**MOE, head_dim=16)),
    "gemma": ("GemmaConfig", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", dict(
        head_dim=16, query_pre_attn_scalar=40, attn_logit_softcapping=3.0, final_logit_softcapping=30.0,
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
    )),
    "gemma3_text": ("Gemma3TextConfig", dict(
        head_dim=16, query_pre_attn_scalar=40, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        # local and global rotations with different bases, as in Gemma 3 (bases chosen to rotate within 100 tokens)
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    )),
    "phi3": ("Phi3Config", dict(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        original_max_position_embeddings=PRETRAINED, pad_token_id=0,
    )),
    "stablelm": ("StableLmConfig", dict(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        qk_layernorm=True,
    )),
    "olmo2": ("Olmo2Config", dict(pad_token_id=0)),
    "granite": ("GraniteConfig", dict(attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.5,
                                      logits_scaling=2.0)),
    "cohere": ("CohereConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, use_qk_norm=True,
                                    pad_token_id=0)),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[0, 1], pad_token_id=0)),  # layer 0 is a NoPE layer
    # Beyond the families named above, two of the same shape that ropescope has no line of code for.
    "starcoder2": ("Starcoder2Config", dict(sliding_window=WINDOW)),
    "ministral3": ("Ministral3Config", dict(  # its queries scale with log(position / original length)
        head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "llama_4_scaling_beta": 0.1,
                                      "original_max_position_embeddings": PRETRAINED},
    )),
    "gpt_oss": ("GptOssConfig", dict(  # attention sinks, sliding and full layers
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    )),
}


def family_config(family: str, rope_parameters: dict | None = None):
    config_class, extra = FAMILIES[family]
    extra = dict(extra)
    if rope_parameters is not None:
        extra["rope_parameters"] = rope_parameters
    extra.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0})
    return getattr(transformers, config_class)(**{**SIZES, **extra})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> folder of a saved tiny random model, built once per test module."""
    folders = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(family_config(family))
        folders[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(folders[family])
    return folders


def load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def token_ids(length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))


def logits(model, length: int) -> torch.Tensor:
    with torch.no_grad():
        return model(token_ids(length)).logits


def eager_attention_entropy(model, input_ids) -> torch.Tensor:
    """Entropy of transformers' own eager attention weights: [layers, batch, heads, seq], float64. Where weights
    sum to less than 1, the rest went to a sink (gpt-oss), one more outcome of the softmax."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            weights = torch.stack(model(input_ids, output_attentions=True).attentions).double()
    finally:
        model.set_attn_implementation(previous)
    sink = (1 - weights.sum(-1)).clamp_min(1e-300)
    return -(weights * weights.clamp_min(1e-300).log()).sum(-1) - sink * sink.log()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_capture_equals_eager_attention(family, checkpoints):
    model = load(checkpoints[family])
    input_ids = token_ids(29)
    captured = layer_entropies(model, input_ids, chunk_size=8)
    assert captured.shape == (2, 2, 4, 29)
    torch.testing.assert_close(captured.double(), eager_attention_entropy(model, input_ids), atol=1e-4, rtol=0)


def native_rope(family: str) -> tuple[RopeSpec, dict, dict]:
    """The spec extend applies to `family`, and the same extension in the family's own config: (spec,
    rope_parameters, other config changes)."""
    if family == "phi3":  # Phi-3 ships LongRoPE; its config accepts no other scaling
        pairs = int(16 * 0.75) // 2
        factors = dict(short_factor=[1.0 + i / 8 for i in range(pairs)], long_factor=[1.0 + i for i in range(pairs)])
        spec = RopeSpec("longrope", factor=4.0, original_max_position_embeddings=PRETRAINED, **factors)
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75, "factor": 4.0,
                "original_max_position_embeddings": PRETRAINED, **factors}
        return spec, rope, {}
    spec = RopeSpec("yarn", factor=4.0, original_max_position_embeddings=PRETRAINED)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": PRETRAINED}
    pretrained = family_config(family).rope_parameters
    if family == "gemma3_text":  # Gemma 3 scales its global layers only, each layer type keeping its own base
        return spec, {**pretrained, "full_attention": {**pretrained["full_attention"], **yarn}}, {}
    other = {"head_dim": 16} if family == "mixtral" else {}
    return spec, {**pretrained, **yarn}, other


@pytest.mark.parametrize("family", list(FAMILIES))
def test_extend_equals_the_family_native_config(family, checkpoints, tmp_path):
    spec, rope_parameters, other = native_rope(family)
    extended = extend(load(checkpoints[family]), spec)
    native_config = family_config(family, rope_parameters)
    for key, value in other.items():
        setattr(native_config, key, value)
    native = AutoModelForCausalLM.from_config(native_config).eval()
    native.load_state_dict(extended.state_dict())
    for length in (SHORT, LONG):  # increasing: transformers' LongRoPE switches to its long factors once
        torch.testing.assert_close(logits(extended, length), logits(native, length), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(extended, LONG), logits(load(checkpoints[family]), LONG), atol=1e-3)

    extended.save_pretrained(tmp_path)
    reloaded = load(tmp_path)
    assert type(reloaded) is type(extended)
    assert not any(isinstance(module, ExtendedRotaryEmbedding) for module in reloaded.modules())  # plain transformers
    assert spec_from_config(reloaded.config) == spec
    torch.testing.assert_close(logits(reloaded, LONG), logits(extended, LONG), atol=1e-5, rtol=0)


def test_gemma3_keeps_its_local_rotation_and_smollm3_its_nope_layer(checkpoints):
    gemma = extend(load(checkpoints["gemma3_text"]), RopeSpec("linear", factor=4.0))
    rope = gemma.config.rope_parameters
    assert rope["sliding_attention"] == {"rope_type": "default", "rope_theta": 500.0}
    assert rope["full_attention"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    assert kept_layers(gemma, RopeSpec("linear", factor=4.0)) == (
        "linear x4 extends the 1 full_attention layers; the 1 sliding_attention layers keep their pretrained "
        f"rotation (they never see a key past their {WINDOW}-token window)")
    linear = RopeSpec("linear", factor=4.0)
    assert kept_layers(extend(load(checkpoints["llama"]), linear), linear) is None
    smollm = load(checkpoints["smollm3"])
    input_ids = token_ids(LONG, batch=1)
    before = layer_entropies(smollm, input_ids)
    after = layer_entropies(extend(smollm, RopeSpec("linear", factor=4.0)), input_ids)
    torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)  # the NoPE layer is untouched
    assert not torch.allclose(after[1], before[1], atol=1e-3)


@pytest.mark.parametrize("model, reason", [
    (lambda: AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)),
     "GPT2LMHeadModel has no rotary embedding module"),
    # rotary, but an encoder
    (lambda: transformers.AutoModelForMaskedLM.from_config(transformers.ModernBertConfig(
        vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)),
     "ModernBertForMaskedLM is not a causal LM"),
    (lambda: torch.nn.Linear(2, 2), "Linear is not a causal LM"),
])
def test_unsupported_models_are_refused_in_one_line(model, reason):
    model = model()
    for call in (lambda: extend(model, RopeSpec("linear", factor=2.0)),
                 lambda: layer_entropies(model, torch.zeros(1, 3, dtype=torch.long))):
        with pytest.raises(RopescopeError, match=reason + "; ropescope supports causal LMs with a rotary embedding "
                                                 "module whose attention goes through transformers' "
                                                 "AttentionInterface") as error:
            call()
        assert "\n" not in str(error.value)


def test_an_extension_the_family_cannot_load_is_refused_before_anything_changes(checkpoints):
    model = load(checkpoints["phi3"])
    before = logits(model, LONG)
    with pytest.raises(RopescopeError, match="Phi3Config does not load yarn .*longrope"):
        extend(model, RopeSpec("yarn", factor=4.0, original_max_position_embeddings=PRETRAINED))
    assert model.config.rope_parameters["rope_type"] == "default"
    torch.testing.assert_close(logits(model, LONG), before, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3_text", "phi3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capture_on_cuda_equals_eager_attention(family, dtype, checkpoints):
    """On a GPU the statistics go through the CUDA kernels (the blocked loop for softcapping): the same numbers
    as the eager weights of the same model, to 1e-4 in float32 and within the stated 0.05 nats in bfloat16 (there
    both forwards are eager: sdpa and eager round differently, so later layers would see other q, k)."""
    implementation = {"attn_implementation": "eager"} if dtype == torch.bfloat16 else {}
    model = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=dtype, **implementation).cuda().eval()
    input_ids = token_ids(29).cuda()
    captured = layer_entropies(model, input_ids, chunk_size=8)
    expected = eager_attention_entropy(model, input_ids).cpu()
    torch.testing.assert_close(captured.double(), expected, atol=1e-4 if dtype == torch.float32 else 0.05, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss"])
def test_bfloat16_on_cpu(family, checkpoints):
    """A bfloat16 checkpoint on CPU end to end: the statistics (computed in float32) against the eager bfloat16
    weights of the same forward, within 0.03 nats (those weights are rounded to 8 bits of mantissa: up to 0.02 off).
    Eager on both sides: sdpa and eager round differently in bfloat16, so later layers would see other q, k."""
    model = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.bfloat16,
                                                 attn_implementation="eager").eval()
    input_ids = token_ids(29)
    captured = layer_entropies(model, input_ids, chunk_size=8)
    assert captured.dtype == torch.float32
    expected = eager_attention_entropy(model, input_ids)
    torch.testing.assert_close(captured.double(), expected, atol=0.03, rtol=0)


def test_rotary_modules_are_found_by_what_they_are():
    class Rotation(torch.nn.Module):  # no family's name, a rotary module's buffer and signature
        def __init__(self):
            super().__init__()
            self.register_buffer("inv_freq", torch.ones(4), persistent=False)

        def forward(self, x, position_ids):
            return x, x

    class NotRotaryEmbedding(torch.nn.Module):  # the name alone is not enough
        def forward(self, x, position_ids):
            return x, x

    assert is_rotary_module(Rotation())
    assert not is_rotary_module(NotRotaryEmbedding())
    assert not is_rotary_module(torch.nn.Linear(2, 2))
