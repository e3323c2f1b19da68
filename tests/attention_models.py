"""Tiny random Llama / Mistral / Qwen2 models for the attention tests (no downloads)."""

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 100
SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=256,
    initializer_range=0.2,  # large enough for peaked, position-dependent attention (0.02 gives near-uniform)
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    # A window shorter than the test inputs, so the sliding-window path is exercised.
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 8}),
    # Layer 0 full attention, layer 1 sliding.
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
}


def tiny_model(family: str = "llama", attn_implementation: str = "sdpa", seed: int = 0):
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(**SIZES, **extra)
    return model_class._from_config(config, attn_implementation=attn_implementation).eval()


def eager_entropies(model, input_ids) -> torch.Tensor:
    """Entropy from transformers' own eager attention weights: [layers, batch, heads, seq], float64."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    weights = torch.stack(attentions).double()
    return -torch.where(weights > 0, weights * weights.log(), 0.0).sum(-1)
