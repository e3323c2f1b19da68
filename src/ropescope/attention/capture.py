"""Capture the rotated queries and keys of every attention layer during an ordinary forward pass.

Llama, Mistral and Qwen2 in transformers compute q and k, rotate them, and hand them to the attention function
named by `config._attn_implementation` through transformers' `AttentionInterface`. `capture_attention`
registers a thin function under a name of its own that first shows (layer, q, k) to a callback and then calls
the model's own function (sdpa or eager), and points the model at it for the duration of a `with` block.
The callback reduces each layer's q, k to statistics right away, so only one layer's q and k are ever alive,
as in a plain forward. Whatever rotary module produced the rotation (the model's own or one installed by
`ropescope.extend`), the callback sees the rotated q, k that attention really used.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ropescope.attention.entropy import DEFAULT_CHUNK_SIZE, attention_entropy
from ropescope.errors import RopescopeError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_CAPTURE_PREFIX = "ropescope_capture_"


@dataclass(frozen=True)
class LayerAttention:
    """What attention saw in one layer. query: [batch, heads, q_len, head_dim]; key: [batch, kv_heads, k_len,
    head_dim] (both post-RoPE); scaling multiplies q . k; sliding_window as in Mistral / Qwen2 (None = off)."""

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    sliding_window: int | None


LayerCallback = Callable[[LayerAttention], None]


@dataclass
class _Hook:
    callback: LayerCallback
    inner: Callable  # the attention function the model would have called


_ACTIVE: dict[int, _Hook] = {}  # id(attention module) -> hook, only inside `capture_attention`


def _capturing_attention(module, query, key, value, attention_mask, *args, **kwargs):
    hook = _ACTIVE.get(id(module))
    if hook is None:  # a module of a model outside any capture block that shares our implementation name
        raise RuntimeError(f"{type(module).__name__} called ropescope's capture outside `capture_attention`")
    scaling = kwargs.get("scaling")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    with torch.no_grad():
        hook.callback(LayerAttention(module.layer_idx, query, key, float(scaling), kwargs.get("sliding_window")))
    return hook.inner(module, query, key, value, attention_mask, *args, **kwargs)


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules of a supported model, in layer order."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        accepted = ", ".join(SUPPORTED_MODEL_TYPES)
        raise RopescopeError(f"model type {model_type!r} is not supported; accepted: {accepted}")
    modules = [
        module
        for module in model.modules()
        if type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx") and hasattr(module, "k_proj")
    ]
    return sorted(modules, key=lambda module: module.layer_idx)


def _inner_function(module, implementation: str) -> Callable:
    if implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    if implementation == "eager":  # eager lives in each model's own modeling file
        return sys.modules[type(module).__module__].eager_attention_forward
    raise RopescopeError(f"attention implementation {implementation!r} is not supported; accepted: sdpa, eager")


@contextmanager
def capture_attention(model, callback: LayerCallback) -> Iterator[None]:
    """Within the block, every attention call of `model` first passes a `LayerAttention` to `callback`.

    The model keeps computing attention with its own implementation (sdpa or eager), so outputs are unchanged.
    Inputs must be unpadded (every position of every sequence is a real token): the statistics assume the
    causal (and sliding-window) mask only. Not reentrant for the same model.
    """
    modules = attention_modules(model)
    config = model.config
    implementation = config._attn_implementation
    if implementation.startswith(_CAPTURE_PREFIX):
        raise RopescopeError("capture_attention is already active on this model; nested captures are not supported")
    name = _CAPTURE_PREFIX + implementation
    AttentionInterface.register(name, _capturing_attention)
    # Masks are built exactly as for the wrapped implementation (sdpa may skip the mask and use is_causal).
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    for module in modules:
        _ACTIVE[id(module)] = _Hook(callback, _inner_function(module, implementation))
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = implementation
        for module in modules:
            _ACTIVE.pop(id(module), None)


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

    input_ids: LongTensor[batch, seq] (or [seq]), unpadded. Returns float32 [layers, batch, heads, seq],
    natural log. Memory stays near that of a plain forward: each layer's q, k are reduced as they appear.
    backend: as in `attention_entropy` ("auto" or "blocks").
    """
    per_layer: dict[int, torch.Tensor] = {}

    def record(attention: LayerAttention) -> None:
        per_layer[attention.layer] = attention_entropy(
            attention.query, attention.key, scale=attention.scaling,
            sliding_window=attention.sliding_window, chunk_size=chunk_size, backend=backend,
        ).cpu()

    with capture_attention(model, record):
        forward_for_statistics(model, input_ids)
    return torch.stack([per_layer[layer] for layer in sorted(per_layer)])
