"""How a model computes attention: its attention modules, the function each calls, and the logit scale.

Every RoPE family of transformers hands its rotated q, k to the function named by `config._attn_implementation`
(through `AttentionInterface`), with the scores' `scaling`. A `logit_scale` (`RopeSpec.logit_scale`) multiplies
those logits on top of the method's own scaling: `apply_logit_scale` records each layer's scale on its attention
module and points the model at a thin function that scales, then calls the model's own implementation (sdpa,
eager, flash...). `scaled_attention_inputs` is the one place the scale is applied, so the attention capture,
which sees each layer's q and k, sees the scaled logits that attention used.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ropescope.errors import RopescopeError
from ropescope.io.rows import FULL_LAYER_TYPE
from ropescope.rope import RopeSpec

SUPPORTED_MODELS = (
    "causal LMs with a rotary embedding module whose attention goes through transformers' AttentionInterface "
    "(Llama, Mistral, Mixtral, Qwen2, Qwen3 and their MoE, Gemma 1-3, Phi-3, StableLM, OLMo 2, Granite, Cohere, "
    "SmolLM3, gpt-oss and models of the same shape)"
)

SCALED_PREFIX = "ropescope_scaled_"  # the implementation name of a model with a logit scale: prefix + its own
INTERNAL_PREFIX = "ropescope_"  # implementations ropescope registers (never offered to users)
_SCALE = "ropescope_logit_scale"  # attention module attribute: a float, or "logn"
_LENGTH = "ropescope_pretrained_length"  # attention module attribute: L of the logn rule


def attention_modules(model) -> list[torch.nn.Module]:
    """The causal self-attention modules (those with a `layer_idx`) of a model, in layer order (whether their
    attention goes through `AttentionInterface` shows only when they run: `capture_attention` checks it)."""
    modules = [
        module
        for module in model.modules()
        if isinstance(getattr(module, "layer_idx", None), int) and getattr(module, "is_causal", None) is True
    ]
    if not modules:
        raise RopescopeError(
            f"{type(model).__name__} has no causal attention modules; ropescope supports {SUPPORTED_MODELS}"
        )
    return sorted(modules, key=lambda module: module.layer_idx)


def layer_types(model) -> list[str]:
    """Each layer's attention type as the config names it (Gemma 3: "sliding_attention" or "full_attention");
    "full_attention" for every layer of a model whose config names none."""
    config = model.config.get_text_config()
    types = getattr(config, "layer_types", None)
    return list(types) if types else [FULL_LAYER_TYPE] * len(attention_modules(model))


def attention_configs(model, modules: list[torch.nn.Module]) -> list:
    """The configs the attention modules read their implementation from (the text config of a composite model)."""
    return list({id(config): config for config in [model.config, *(
        module.config for module in modules if getattr(module, "config", None) is not None
    )]}.values())


def base_implementation(implementation: str) -> str:
    """The model's own implementation behind a logit-scaled one (`sdpa` for `ropescope_scaled_sdpa`)."""
    return implementation.removeprefix(SCALED_PREFIX)


def attention_function(module, implementation: str) -> Callable:
    """The function `module` calls for `implementation`: one registered with `AttentionInterface`, or the family's
    own `eager_attention_forward` for eager."""
    if implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if implementation == "eager" and eager is not None:  # eager lives in each model's own modeling file
        return eager
    raise RopescopeError(
        f"attention implementation {implementation!r} of {type(module).__name__} is not supported; accepted: eager "
        f"(the family's eager_attention_forward) and those registered with transformers' AttentionInterface "
        f"({', '.join(name for name in ALL_ATTENTION_FUNCTIONS if not name.startswith(INTERNAL_PREFIX))})"
    )


def register_implementation(name: str, function: Callable, base: str) -> None:
    """Register `function` as attention implementation `name`, its masks built exactly as for `base` (sdpa may skip
    the mask and use is_causal)."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


# ---------------------------------------------------------------------------------------------------------------
# The logit scale


def logn_factors(positions: torch.Tensor, pretrained_length: int) -> torch.Tensor:
    """max(1, ln(i + 1) / ln L) for each position i (from 0), float64: the query scale of Qwen's logn attention and
    Scalable-Softmax, 1 within the pretrained length L."""
    return torch.clamp(torch.log(positions.to(torch.float64) + 1) / math.log(pretrained_length), min=1.0)


def query_positions(query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The sequence positions of the queries, [batch or 1, q_len]: the call's `position_ids` where the family passes
    them (Llama and most do), else the last q_len of the keys' positions (an unpadded input, with or without a KV
    cache)."""
    positions = kwargs.get("position_ids")
    if positions is not None:
        return positions
    q_len, k_len = query.shape[-2], key.shape[-2]
    return torch.arange(k_len - q_len, k_len, device=query.device)[None]


def scaled_attention_inputs(module, query: torch.Tensor, key: torch.Tensor, kwargs: dict
                            ) -> tuple[torch.Tensor, dict]:
    """`(query, kwargs)` with `module`'s logit scale applied: a number multiplies the call's `scaling` (the scores
    then pass through the layer's softcap, as the method's own scaling does); "logn" multiplies each query by its
    `logn_factors`. Unchanged for a module without a scale.

    query: [batch, heads, q_len, head_dim]; key: [batch, kv_heads, k_len, head_dim].
    """
    scale = getattr(module, _SCALE, None)
    if scale is None:
        return query, kwargs
    if scale == "logn":
        factors = logn_factors(query_positions(query, key, kwargs), getattr(module, _LENGTH))
        exact = torch.promote_types(query.dtype, torch.float32)  # half-precision queries are scaled in float32
        factors = factors[:, None, :, None].to(device=query.device, dtype=exact)
        return (query.to(exact) * factors).to(query.dtype), kwargs
    scaling = kwargs.get("scaling")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling  # the default of every attention function
    return query, {**kwargs, "scaling": scaling * scale}


def _scaled_attention(module, query, key, value, attention_mask, *args, **kwargs):
    query, kwargs = scaled_attention_inputs(module, query, key, kwargs)
    implementation = base_implementation(module.config._attn_implementation)
    return attention_function(module, implementation)(module, query, key, value, attention_mask, *args, **kwargs)


def layer_scales(spec: RopeSpec, layers: int) -> list[float | str | None]:
    """The logit scale of each of `layers` attention layers under `spec` (None: unscaled)."""
    scale = spec.logit_scale
    if scale == "fit":
        raise RopescopeError("logit_scale='fit' is found by `ropescope fit-scale` or inside a study; to apply a "
                             "scale give a number, a list of numbers (one per layer) or 'logn'")
    if isinstance(scale, list):
        if len(scale) != layers:
            raise RopescopeError(f"logit_scale has {len(scale)} numbers but the model has {layers} attention layers; "
                                 f"accepted: one number per layer, a single number or 'logn'")
        return [None if value == 1.0 else value for value in scale]
    return [scale] * layers


def set_layer_scale(module, scale: float | str | None, pretrained_length: int) -> None:
    """Record one attention module's logit scale (None: none), which `scaled_attention_inputs` applies. Only the
    module changes: `apply_logit_scale` also points the model at the function that applies it, while the attention
    capture applies it on its own (so a capture callback may set a layer's scale mid-forward)."""
    if scale is None:
        module.__dict__.pop(_SCALE, None)
        module.__dict__.pop(_LENGTH, None)
    else:
        setattr(module, _SCALE, scale)
        setattr(module, _LENGTH, pretrained_length)


def layer_scale(module) -> float | str | None:
    return getattr(module, _SCALE, None)


def apply_logit_scale(model, spec: RopeSpec, pretrained_length: int) -> None:
    """Give every attention layer of `model` the logit scale of `spec`, replacing any earlier one; a spec without
    one restores the model's own attention function, so its logits are bit for bit those of no scale."""
    modules = attention_modules(model)
    scales = layer_scales(spec, len(modules))
    for module, scale in zip(modules, scales):
        set_layer_scale(module, scale, pretrained_length)
    scaled = any(scale is not None for scale in scales)
    for config in attention_configs(model, modules):
        base = base_implementation(config._attn_implementation)
        if scaled:
            register_implementation(SCALED_PREFIX + base, _scaled_attention, base)
        config._attn_implementation = SCALED_PREFIX + base if scaled else base
