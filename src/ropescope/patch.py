"""`extend(model, spec)`: the only place that touches Hugging Face model internals.

A RoPE model (Llama, Mistral, Qwen2, or any model whose rotary module takes `(x, position_ids)` and returns
`(cos, sin)`) gets a rotary module computing its frequencies with `rope_frequencies`, and its config gets the
standard `rope_parameters` for the method, so `save_pretrained` then plain `from_pretrained` gives back the same
model. `dynamic_yarn`, which transformers lacks, is registered with transformers when ropescope is imported.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import modeling_rope_utils
from transformers.modeling_rope_utils import RotaryEmbeddingConfigMixin

from ropescope.errors import RopescopeError
from ropescope.rope import METHODS, RopeSpec, ntk_base, rope_frequencies

CONFIG_KEY = "ropescope_rope"  # config attribute: the spec, plus the pretrained base and length it started from


class ExtendedRotaryEmbedding(nn.Module):
    """Drop-in rotary module: `forward(x, position_ids) -> (cos, sin)`, each `[batch, seq, rotary_dim]`.

    Dynamic methods recompute the frequencies from the current length `max(position_ids) + 1` on every call, a
    pure function of the input (transformers' own dynamic module only grows and keeps its longest length).
    """

    def __init__(self, spec: RopeSpec, rotary_dim: int, base: float):
        super().__init__()
        self.spec, self.rotary_dim, self.base = spec, rotary_dim, base
        self.dynamic = METHODS[spec.method].dynamic
        inv_freq, self.attention_scaling = rope_frequencies(spec, rotary_dim, base)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._by_length: dict[int, tuple[torch.Tensor, float]] = {}

    def frequencies_at(self, seq_len: int) -> tuple[torch.Tensor, float]:
        if seq_len not in self._by_length:
            self._by_length[seq_len] = rope_frequencies(self.spec, self.rotary_dim, self.base, seq_len)
        return self._by_length[seq_len]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        inv_freq, attention_scaling = self.inv_freq, self.attention_scaling
        if self.dynamic:
            inv_freq, attention_scaling = self.frequencies_at(int(position_ids.max()) + 1)
        freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * attention_scaling
        sin = emb.sin() * attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"{self.spec.label()}, rotary_dim={self.rotary_dim}, base={self.base:g}"


def _rope_parameters(config) -> dict:
    parameters = getattr(config, "rope_parameters", None) or {}
    if any(isinstance(value, dict) for value in parameters.values()):
        raise RopescopeError(
            f"{type(config).__name__} has per-layer-type RoPE ({', '.join(parameters)}); extend supports one RoPE "
            "for all layers (Llama, Mistral, Qwen2 and alike)"
        )
    return parameters


def rope_base(config) -> float:
    """The model's RoPE base (rope_theta), wherever this transformers version keeps it."""
    theta = _rope_parameters(config).get("rope_theta") or getattr(config, "rope_theta", None)
    return float(theta if theta is not None else getattr(config, "default_theta", 10000.0))


def rotary_dim(config) -> int:
    """The number of rotated dimensions per head: head_dim x partial_rotary_factor."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = _rope_parameters(config).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", 1.0)
    return int(head_dim * (partial or 1.0))


def _rotary_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    found = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            parent_name, _, attribute = name.rpartition(".")
            found.append((model.get_submodule(parent_name), attribute))
    return found


def pretrained_rope(config) -> tuple[float, int]:
    """The base and max_position_embeddings the model had before any `extend`, so extensions never compound."""
    recorded = getattr(config, CONFIG_KEY, None)
    if recorded:
        return float(recorded["pretrained_rope_theta"]), int(recorded["pretrained_max_position_embeddings"])
    return rope_base(config), int(config.max_position_embeddings)


def extend(model: nn.Module, spec: RopeSpec) -> nn.Module:
    """Make every layer of `model` use the RoPE method `spec`, in place; returns the model.

    Replaces any extension applied before (relative to the pretrained base), records the spec in `model.config`
    (standard `rope_parameters` where transformers has the method), and works at any position.
    """
    if not isinstance(spec, RopeSpec):
        raise RopescopeError(f"extend needs a RopeSpec, got {type(spec).__name__}: e.g. RopeSpec('linear', factor=4)")
    config = getattr(model, "config", None)
    targets = _rotary_modules(model)
    if config is None or not targets:
        raise RopescopeError(
            f"{type(model).__name__} has no rotary embedding module to extend "
            "(expected a *RotaryEmbedding submodule, as in Llama, Mistral and Qwen2)"
        )
    base, pretrained_length = pretrained_rope(config)
    rotary = ExtendedRotaryEmbedding(spec, rotary_dim(config), base)
    for parent, attribute in targets:
        device = getattr(parent, attribute).inv_freq.device
        setattr(parent, attribute, rotary.to(device))
    _record(config, spec, base, pretrained_length)
    return model


def _record(config, spec: RopeSpec, base: float, pretrained_length: int) -> None:
    """Write the spec into the config: transformers' own `rope_parameters`, plus ropescope's record."""
    params = spec.params
    partial = _rope_parameters(config).get("partial_rotary_factor")
    rope = {"rope_type": METHODS[spec.method].transformers_type or spec.method, "rope_theta": base}
    if partial is not None:
        rope["partial_rotary_factor"] = partial
    if spec.method == "ntk":  # NTK-aware is the original RoPE with a larger base
        rope["rope_theta"] = ntk_base(params, rotary_dim(config), base)
    else:
        rope.update({key: value for key, value in params.items() if value is not None})
    config.max_position_embeddings = pretrained_length
    if spec.method in ("dynamic", "dynamic_yarn"):
        # transformers' dynamic scaling measures growth from max_position_embeddings
        config.max_position_embeddings = params["original_max_position_embeddings"]
    if spec.method == "dynamic":  # transformers reads the original length from max_position_embeddings alone
        del rope["original_max_position_embeddings"]
    config.rope_parameters = rope
    setattr(config, CONFIG_KEY, {
        **spec.to_dict(),
        "pretrained_rope_theta": base,
        "pretrained_max_position_embeddings": pretrained_length,
    })


def spec_from_config(config) -> RopeSpec | None:
    """The spec `extend` recorded in a config, or None for a model ropescope never extended."""
    recorded = getattr(config, CONFIG_KEY, None)
    if not recorded:
        return None
    return RopeSpec.from_dict(
        {key: value for key, value in recorded.items() if not key.startswith("pretrained_")}
    )


def _transformers_dynamic_yarn(config, device=None, seq_len=None, layer_type=None):
    """`dynamic_yarn` in transformers' own registry, so plain `from_pretrained` loads such checkpoints."""
    rope = _rope_parameters(config)
    accepted = METHODS["dynamic_yarn"].params
    spec = RopeSpec("dynamic_yarn", **{key: value for key, value in rope.items() if key in accepted})
    length = None if seq_len is None else int(seq_len)
    inv_freq, attention_scale = rope_frequencies(spec, rotary_dim(config), rope_base(config), length)
    return inv_freq.to(device), attention_scale


def _validate_dynamic_yarn(self, rope_parameters, ignore_keys=None):
    RopeSpec("dynamic_yarn", **{
        key: value for key, value in rope_parameters.items()
        if key not in ("rope_type", "rope_theta", "partial_rotary_factor")
    })


# transformers invites new rope types in ROPE_INIT_FUNCTIONS; "dynamic" in the name makes it recompute per length
modeling_rope_utils.ROPE_INIT_FUNCTIONS.setdefault("dynamic_yarn", _transformers_dynamic_yarn)
if not hasattr(RotaryEmbeddingConfigMixin, "_validate_dynamic_yarn_rope_parameters"):
    RotaryEmbeddingConfigMixin._validate_dynamic_yarn_rope_parameters = _validate_dynamic_yarn
