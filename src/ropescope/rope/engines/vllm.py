"""vLLM 0.34.0: the RoPE its `get_rope` builds from a saved config, re-derived from its source.

Read from vllm/model_executor/layers/rotary_embedding/ (`get_rope` in __init__.py; the classes in base.py,
linear_scaling_rope.py, dynamic_ntk_scaling_rope.py, yarn_scaling_rope.py, llama3_rope.py,
phi3_long_rope_scaled_rope.py; the YaRN helpers in common.py) and `_get_and_verify_max_len` in vllm/config/model.py
(the longest length served without --max-model-len). A Llama-family model passes `max_position_embeddings` as
`max_position` (vllm/model_executor/models/llama.py).
"""

from __future__ import annotations

import math

import torch

from ropescope.rope.engines.views import (
    Engine, EngineView, ServedConfig, Unreadable, default_inv_freq, llama3_inv_freq, yarn_correction_range,
    yarn_ramp, yarn_temperature,
)

VERSION = "0.34.0"

# Types whose max_position_embeddings is the extended length already; every other type's is multiplied by factor.
_SCALED_ALREADY = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")
# Types get_rope reads that no ropescope method writes (model-specific); not re-derived here.
_NOT_DERIVED = ("ntk", "mllama4", "xdrope", "deepseek_yarn", "deepseek_llama_scaling", "openpangu", "proportional",
                "bailing_mrope")


def rotary_dim(config: ServedConfig) -> int:
    """get_rope: `rope_dim` where given, else head_size x partial_rotary_factor (from rope_parameters)."""
    return int(config.get("rope_dim") or config.head_dim * config.get("partial_rotary_factor", 1.0))


def max_model_len(config: ServedConfig) -> int:
    """The default --max-model-len (`_get_and_verify_max_len`): max_position_embeddings, x factor for the types
    whose length is not scaled already; for LongRoPE the top-level original length, so short factors serve."""
    derived = float(config.max_position_embeddings)
    if config.rope_type not in _SCALED_ALREADY:
        derived *= config.get("factor", 1.0)
    if config.rope_type == "longrope":
        return int(config.original_max_position_embeddings or derived)
    return int(derived)


def _yarn_attention(config: ServedConfig, factor: float) -> float:
    # YaRNScalingRotaryEmbedding.__init__: attention_factor first, then both mscales (truthy), else 0.1 ln s + 1
    if config.get("attention_factor") is not None:
        return float(config.get("attention_factor"))
    mscale, mscale_all_dim = config.get("mscale"), config.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_temperature(factor, mscale) / yarn_temperature(factor, mscale_all_dim)
    return yarn_temperature(factor)


def _yarn(config: ServedConfig, dim: int) -> tuple[torch.Tensor, float, int]:
    factor, original = float(config.get("factor")), int(config.get("original_max_position_embeddings"))
    low, high = yarn_correction_range(config.get("beta_fast", 32), config.get("beta_slow", 1), dim, config.base,
                                      original, config.get("truncate", True))
    extrapolation = 1 - yarn_ramp(low, high, dim // 2)
    inv_freq = default_inv_freq(config.base, dim)
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, _yarn_attention(config, factor), math.ceil(original * factor)  # its cache: original x factor


def _llama3(config: ServedConfig, dim: int) -> torch.Tensor:
    # Llama3RotaryEmbedding._compute_inv_freq: keep short wavelengths, divide long ones, blend between
    return llama3_inv_freq(config.base, dim, float(config.get("factor")), config.get("low_freq_factor"),
                           config.get("high_freq_factor"), config.get("original_max_position_embeddings"))


def _longrope(config: ServedConfig, dim: int) -> tuple[torch.Tensor, float, str]:
    # Phi3LongRoPEScaledRotaryEmbedding: long factors for every position once max_model_len > original, its
    # temperature from max_position_embeddings / original (the config's factor and attention_factor unread)
    original = int(config.get("original_max_position_embeddings"))
    use_long = max_model_len(config) > original
    scale = config.max_position_embeddings / original
    temperature = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original))
    attention = config.get("long_mscale" if use_long else "short_mscale", temperature)
    factors = torch.tensor(config.get("long_factor" if use_long else "short_factor"), dtype=torch.float64)
    note = (f"{'long' if use_long else 'short'} factors at every length: the switch follows --max-model-len "
            f"(default {max_model_len(config)}), not the sequence")
    return default_inv_freq(config.base, dim) / factors, float(attention), note


def derive(config: ServedConfig, length: int) -> EngineView | Unreadable:
    """vLLM's inverse frequencies, attention scale and longest length for `config` (the same at every length)."""
    kind, dim, base = config.rope_type, rotary_dim(config), config.base
    longest, static, note = max_model_len(config), False, ""
    if kind in _NOT_DERIVED:
        return Unreadable(f"vLLM reads rope_type {kind!r} for its own model families; not re-derived here")
    if kind == "default":
        inv_freq, attention, rows = default_inv_freq(base, dim), 1.0, config.max_position_embeddings
    elif kind == "linear":  # LinearScalingRotaryEmbedding: positions t / factor, the same as inv_freq / factor
        factor = float(config.get("factor"))
        inv_freq, attention = default_inv_freq(base, dim) / factor, 1.0
        rows = math.ceil(config.max_position_embeddings * factor)
    elif kind == "dynamic" and config.get("alpha") is None:
        # DynamicNTKScalingRotaryEmbedding: one base, computed once at max_position_embeddings
        factor = float(config.get("factor"))
        trained = config.get("max_trained_positions", config.max_position_embeddings)
        grown = base * (factor * config.max_position_embeddings / trained - (factor - 1)) ** (dim / (dim - 2))
        inv_freq, attention, rows, static = default_inv_freq(grown, dim), 1.0, config.max_position_embeddings, True
        note = f"one base for every length ({grown:.6g}); its cos/sin cache holds max_position_embeddings rows"
    elif kind == "yarn":
        inv_freq, attention, rows = _yarn(config, dim)
    elif kind == "llama3":
        inv_freq, attention, rows = _llama3(config, dim), 1.0, config.max_position_embeddings
    elif kind == "longrope":
        inv_freq, attention, note = _longrope(config, dim)
        rows, static = config.max_position_embeddings, True
    else:
        return Unreadable(f"get_rope raises ValueError('Unknown RoPE scaling type {kind}')")
    return EngineView(inv_freq, float(attention), min(longest, rows), static, note)


ENGINE = Engine(
    "vllm", VERSION,
    "vllm/model_executor/layers/rotary_embedding/__init__.py get_rope (and the classes it builds); "
    "vllm/config/model.py _get_and_verify_max_len",
    derive,
)
