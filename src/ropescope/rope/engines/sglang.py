"""SGLang 0.5.23: the RoPE its `get_rope` builds from a saved config, re-derived from its source.

Read from sglang/srt/layers/rotary_embedding/ (`get_rope` in factory.py; `RotaryEmbedding` and
`LinearScalingRotaryEmbedding` in base.py; `YaRNScalingRotaryEmbedding` and its helpers in yarn.py;
`Llama3RotaryEmbedding`, `DynamicNTKScalingRotaryEmbedding` and `Phi3LongRoPEScaledRotaryEmbedding` in
rope_variant.py), `get_context_length` in sglang/srt/utils/hf_transformers/common.py (the longest length served
without --context-length) and the Llama layer in sglang/srt/models/llama.py (rope_parameters as rope_scaling, the
top-level original_max_position_embeddings copied into it, rotary_dim from the top-level partial_rotary_factor).
"""

from __future__ import annotations

import math

import torch

from ropescope.rope.engines.views import (
    Engine, EngineView, ServedConfig, Unreadable, default_inv_freq, llama3_inv_freq, yarn_correction_range,
    yarn_ramp, yarn_temperature,
)

VERSION = "0.5.23"

_NOT_DERIVED = ("deepseek_yarn", "proportional")


def context_length(config: ServedConfig) -> int:
    """`get_context_length`: max_position_embeddings x factor, unless rope_scaling names an original length or is
    llama3 (then max_position_embeddings as it is)."""
    factor = config.rope_parameters.get("factor", 1) or 1
    if "original_max_position_embeddings" in config.rope_parameters or config.rope_type == "llama3":
        factor = 1
    return int(factor * config.max_position_embeddings)


def _original(config: ServedConfig) -> int:
    # LlamaDecoderLayer copies a top-level original_max_position_embeddings into rope_scaling
    return int(config.original_max_position_embeddings or config.get("original_max_position_embeddings",
                                                                       config.max_position_embeddings))


def _yarn(config: ServedConfig, dim: int) -> tuple[torch.Tensor, float]:
    # YaRNScalingRotaryEmbedding: reads attn_factor and extrapolation_factor, not transformers' attention_factor;
    # the two mscales when both are given (not None), else 0.1 ln s + 1
    factor = float(config.get("factor", 1.0))
    mscale, mscale_all_dim = config.get("mscale"), config.get("mscale_all_dim")
    if mscale is not None and mscale_all_dim is not None:
        attention = yarn_temperature(factor, mscale) / yarn_temperature(factor, mscale_all_dim)
    else:
        attention = yarn_temperature(factor)
    attention *= config.get("attn_factor", 1.0)
    low, high = yarn_correction_range(config.get("beta_fast", 32), config.get("beta_slow", 1), dim, config.base,
                                      _original(config), config.get("truncate", True))
    extrapolation = (1 - yarn_ramp(low, high, dim // 2)) * config.get("extrapolation_factor", 1.0)
    inv_freq = default_inv_freq(config.base, dim)
    return inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation, float(attention)


def _llama3(config: ServedConfig, dim: int) -> torch.Tensor:
    # its defaults where the config leaves a key out: factor 1, low 1, high 4
    return llama3_inv_freq(config.base, dim, float(config.get("factor", 1.0)), config.get("low_freq_factor", 1.0),
                           config.get("high_freq_factor", 4.0), _original(config))


def _longrope(config: ServedConfig, dim: int, length: int) -> tuple[torch.Tensor, float]:
    # Phi3LongRoPEScaledRotaryEmbedding.forward: long factors once any position of the batch is > original, i.e.
    # from length original + 2 on (positions count from 0); the temperature from max_position_embeddings / original
    original = _original(config)
    use_long = length - 1 > original
    scale = config.max_position_embeddings / original
    temperature = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original))
    attention = config.get("long_mscale" if use_long else "short_mscale", temperature)
    factors = torch.tensor(config.get("long_factor" if use_long else "short_factor"), dtype=torch.float64)
    return default_inv_freq(config.base, dim) / factors, float(attention)


def derive(config: ServedConfig, length: int) -> EngineView | Unreadable:
    """SGLang's inverse frequencies, attention scale and longest length for a prompt of `length` tokens."""
    kind, base = config.rope_type, config.base
    dim = int((config.partial_rotary_factor or 1) * config.head_dim)
    note, static = "", False
    if kind in _NOT_DERIVED:
        return Unreadable(f"SGLang reads rope_type {kind!r} for its own model families; not re-derived here")
    if kind == "default":
        inv_freq, attention = default_inv_freq(base, dim), 1.0
    elif kind == "linear":
        inv_freq, attention = default_inv_freq(base, dim) / float(config.get("factor", 1.0)), 1.0
    elif kind == "dynamic" and config.get("alpha") is None:
        # DynamicNTKScalingRotaryEmbedding: one base, the dynamic NTK base at max_position_embeddings x factor
        factor = float(config.get("factor", 1.0))
        grown = base * (factor * factor - (factor - 1)) ** (dim / (dim - 2))
        inv_freq, attention, static = default_inv_freq(grown, dim), 1.0, True
        note = f"one base for every length ({grown:.6g}), the dynamic base at max_position_embeddings x factor"
    elif kind == "yarn":
        inv_freq, attention = _yarn(config, dim)
    elif kind == "llama3":
        inv_freq, attention = _llama3(config, dim), 1.0
    elif kind == "longrope":
        inv_freq, attention = _longrope(config, dim, length)
        note = ("the switch to long factors is per batch, at a position > original; a decoded sequence keeps the "
                "keys its prompt cached with the factors of its prefill")
    else:
        return Unreadable(f"get_rope raises ValueError('Unknown RoPE scaling type {kind}')")
    return EngineView(inv_freq, float(attention), context_length(config), static, note)


ENGINE = Engine(
    "sglang", VERSION,
    "sglang/srt/layers/rotary_embedding/factory.py get_rope (and the classes it builds); "
    "sglang/srt/utils/hf_transformers/common.py get_context_length",
    derive,
)
