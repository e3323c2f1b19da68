"""Capture the rotated queries and keys of every attention layer during an ordinary forward pass.

The RoPE decoders of transformers (Llama, Mistral, Qwen, Gemma, Phi-3 and alike) compute q and k, rotate them
(and normalise them, in Qwen3 and OLMo 2), and hand them to the attention function named by
`config._attn_implementation` through transformers' `AttentionInterface`, with the scaling, logit softcapping and
sliding window (and gpt-oss's sinks) that layer uses. `capture_attention`
registers a thin function under a name of its own that first shows (layer, q, k) to a callback and then calls
the model's own function (sdpa or eager), and points the model at it for the duration of a `with` block.
The callback reduces each layer's q, k to statistics right away, so only one layer's q and k are ever alive,
as in a plain forward. Whatever rotary module produced the rotation (the model's own or one installed by
`ropescope.extend`), the callback sees the rotated q, k, and the scores' scaling, softcap and window, that
attention really used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from ropescope.attention.entropy import DEFAULT_CHUNK_SIZE, AttentionStatistics, attention_statistics
from ropescope.errors import RopescopeError
from ropescope.model.attention import (
    SUPPORTED_MODELS,
    attention_configs,
    attention_function,
    attention_modules,
    base_implementation,
    register_implementation,
    scaled_attention_inputs,
)
from ropescope.model.patch import require_supported

_CAPTURE_PREFIX = "ropescope_capture_"


@dataclass(frozen=True)
class LayerAttention:
    """What attention saw in one layer. query: [batch, heads, q_len, head_dim]; key: [batch, kv_heads, k_len,
    head_dim] (both post-RoPE); scores are scaling * q . k, then softcap * tanh(scores / softcap) where softcap is
    set (Gemma 2); sliding_window as in Mistral / Qwen2 (None = off); sinks: [heads] logits of one more outcome
    per head (gpt-oss), or None."""

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    sliding_window: int | None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def statistics(self, last_queries: int | None = None, **options) -> AttentionStatistics:
        """`attention_statistics` of this layer's scores, for all queries or the last `last_queries` of them.

        options: the keyword arguments of `attention_statistics` other than the scores' own (scale, softcap,
        sinks and sliding window come from the layer).
        """
        query = self.query if last_queries is None else self.query[:, :, -last_queries:]
        return attention_statistics(
            query, self.key, scale=self.scaling, softcap=self.softcap, sinks=self.sinks,
            sliding_window=self.sliding_window, **options,
        )


LayerCallback = Callable[[LayerAttention], None]


@dataclass
class _Hook:
    callback: LayerCallback
    inner: Callable  # the attention function the model would have called (its own, under any logit scale)
    calls: int = 0


_ACTIVE: dict[int, _Hook] = {}  # id(attention module) -> hook, only inside `capture_attention`


def _capturing_attention(module, query, key, value, attention_mask, *args, **kwargs):
    hook = _ACTIVE.get(id(module))
    if hook is None:  # a module of a model outside any capture block that shares our implementation name
        raise RuntimeError(f"{type(module).__name__} called ropescope's capture outside `capture_attention`")
    hook.calls += 1
    with torch.no_grad():
        hook.callback(_layer_attention(module, *scaled_attention_inputs(module, query, key, kwargs), key))
    # the logits attention uses, scale and all; a callback may set the layer's scale (fit_logit_scale does)
    query, kwargs = scaled_attention_inputs(module, query, key, kwargs)
    return hook.inner(module, query, key, value, attention_mask, *args, **kwargs)


def _layer_attention(module, query, kwargs, key) -> LayerAttention:
    scaling = kwargs.get("scaling")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling  # the default of every attention function
    softcap = kwargs.get("softcap")
    window = kwargs.get("sliding_window")
    if window is None:  # Qwen2-MoE keeps its window on the module and in the mask, not in the call
        window = getattr(module, "sliding_window", None)
    sinks = kwargs.get("s_aux")  # gpt-oss: one learned logit per head joins each softmax
    return LayerAttention(
        module.layer_idx, query, key, float(scaling), int(window) if window else None,  # 0 means off
        float(softcap) if softcap else None, None if sinks is None else sinks.detach(),
    )


@contextmanager
def capture_attention(model, callback: LayerCallback) -> Iterator[None]:
    """Within the block, every attention call of `model` first passes a `LayerAttention` to `callback`.

    The model keeps computing attention with its own implementation (sdpa, eager, flash attention...), so outputs
    are unchanged. Inputs must be unpadded (every position of every sequence is a real token): the statistics
    assume the causal (and sliding-window) mask only. Not reentrant for the same model. Raises RopescopeError for
    a model that is not supported, or whose layers ran attention outside `AttentionInterface` (found on exit).
    """
    require_supported(model)
    modules = attention_modules(model)
    # The attention modules read the implementation from their own config (the text config of a composite model).
    configs = attention_configs(model, modules)
    implementation = model.config._attn_implementation
    if implementation.startswith(_CAPTURE_PREFIX):
        raise RopescopeError("capture_attention is already active on this model; nested captures are not supported")
    name = _CAPTURE_PREFIX + implementation
    base = base_implementation(implementation)
    register_implementation(name, _capturing_attention, base)
    hooks = {id(module): _Hook(callback, attention_function(module, base)) for module in modules}
    _ACTIVE.update(hooks)
    previous = [config._attn_implementation for config in configs]
    for config in configs:
        config._attn_implementation = name
    try:
        yield
    finally:
        for config, value in zip(configs, previous):
            config._attn_implementation = value
        for module in modules:
            _ACTIVE.pop(id(module), None)
    missed = [module.layer_idx for module in modules if not hooks[id(module)].calls]
    if missed and len(missed) < len(modules):  # some layers ran attention their own way: their statistics are missing
        raise RopescopeError(
            f"layers {missed} of {type(model).__name__} compute attention outside transformers' AttentionInterface; "
            f"ropescope supports {SUPPORTED_MODELS}"
        )


def forward_for_statistics(model, input_ids: torch.Tensor) -> None:
    """One forward pass run only for what the capture sees: no cache, logits for the last position only.

    input_ids: LongTensor[batch, seq] or [seq], unpadded.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=input_ids.to(device), use_cache=False, logits_to_keep=1)


def layer_entropies(
    model, input_ids: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto"
) -> torch.Tensor:
    """Attention entropy of every layer, head and query position during one forward pass of `input_ids`.

    input_ids: LongTensor[batch, seq] (or [seq]), unpadded. Returns float32 (float64 for a float64 model) [layers, batch, heads, seq],
    natural log. Memory stays near that of a plain forward: each layer's q, k are reduced as they appear.
    backend: as in `attention_statistics` ("auto", or one of `KERNELS` such as "blocks").
    """
    per_layer: dict[int, torch.Tensor] = {}

    def record(attention: LayerAttention) -> None:
        per_layer[attention.layer] = attention.statistics(chunk_size=chunk_size, backend=backend).entropy.cpu()

    with capture_attention(model, record):
        forward_for_statistics(model, input_ids)
    if not per_layer:
        raise RopescopeError(
            f"no layer of {type(model).__name__} computed attention through transformers' AttentionInterface; "
            f"ropescope supports {SUPPORTED_MODELS}"
        )
    return torch.stack([per_layer[layer] for layer in sorted(per_layer)])
