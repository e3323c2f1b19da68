"""`extend(model, spec)`: the only place that touches Hugging Face model internals.

Any causal LM of transformers with a rotary embedding module (one that turns `(x, position_ids)` into
`(cos, sin)` from an `inv_freq` buffer: Llama, Mistral, Mixtral, Qwen2/3 and their MoE, Gemma 1-3, Phi-3, StableLM,
OLMo 2, Granite, Cohere, SmolLM3, gpt-oss and any new family of the same shape) gets that module wrapped so that its
frequencies come from `rope_frequencies`, and its config gets the standard `rope_parameters` for the method, so
`save_pretrained` then the family's own `from_pretrained` gives back the same model. The wrapped module keeps the
family's own layout of cos and sin; the rotary dimension is read from its frequency buffer (partial rotary
models); models with one RoPE per layer type (Gemma 3) are extended on their full-attention layers.
A method that transformers lacks (`transformers_type` None, such as `dynamic_yarn`) is registered with transformers
under its own name when this module is imported and when `extend` first applies it, so plain `from_pretrained`
loads what `extend` saved. Nothing here names a method: what a method saves is its `RopeMethod`'s to say.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math

import torch
from torch import nn
from transformers import modeling_rope_utils
from transformers.modeling_rope_utils import RotaryEmbeddingConfigMixin

from ropescope.errors import RopescopeError
from ropescope.io.rows import SLIDING_LAYER_TYPE
from ropescope.model.attention import SUPPORTED_MODELS, apply_logit_scale, attention_modules, layer_scales
from ropescope.rope import METHODS, RopeMethod, RopeSpec, parse_spec, rope_frequencies

_LOG = logging.getLogger(__name__)
_SAID: set[str] = set()
CONFIG_KEY = "ropescope_rope"  # config attribute: the spec, plus the RoPE and length the model was pretrained with
# Sliding-window layers (SLIDING_LAYER_TYPE) never see a key farther than their window, so `extend` keeps their
# pretrained rotation (as Gemma 3 ships its own long-context scaling on its full-attention layers only).


class ExtendedRotaryEmbedding(nn.Module):
    """A model's own rotary module, fed frequencies from `rope_frequencies`.

    `forward(x, position_ids[, layer_type]) -> (cos, sin)`, each `[batch, seq, rotary_dim]`, as the wrapped module
    returns them: it still lays out cos and sin (halves in Llama, interleaved pairs in Cohere) and casts them; only
    its inverse frequencies and attention scaling come from `spec`. `layers` maps each layer type the spec applies
    to (None: the module's only one) to its pretrained `(base, rotary_dim)`; other layer types pass through.
    Dynamic methods recompute the frequencies from the current length `max(position_ids) + 1` on every call, a
    pure function of the input (transformers' own dynamic module only grows and keeps its longest length).
    """

    def __init__(self, original: nn.Module, spec: RopeSpec, layers: dict[str | None, tuple[float, int]]):
        super().__init__()
        self.original, self.spec, self.layers = original, spec, layers
        self.dynamic = METHODS[spec.method].dynamic
        self._by_length: dict[tuple[str | None, int], tuple[torch.Tensor, float]] = {}
        for layer_type, (base, dim) in layers.items():
            _plain_rope_type(original, layer_type)
            self._install(layer_type, *rope_frequencies(spec, dim, base))

    def __getattr__(self, name: str):
        """Attributes the family's code reads from its rotary module (Granite SWA reads `.config`) come from the
        wrapped module."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original":
                raise
            return getattr(self.original, name)

    def _install(self, layer_type: str | None, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        prefix = "" if layer_type is None else f"{layer_type}_"
        device = getattr(self.original, prefix + "inv_freq").device
        setattr(self.original, prefix + "inv_freq", inv_freq.to(device))  # a buffer: follows model.to(...)
        setattr(self.original, prefix + "attention_scaling", attention_scaling)

    def frequencies_at(self, layer_type: str | None, seq_len: int) -> tuple[torch.Tensor, float]:
        if (layer_type, seq_len) not in self._by_length:
            base, dim = self.layers[layer_type]
            self._by_length[layer_type, seq_len] = rope_frequencies(self.spec, dim, base, seq_len)
        return self._by_length[layer_type, seq_len]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        if self.dynamic and layer_type in self.layers:
            self._install(layer_type, *self.frequencies_at(layer_type, int(position_ids.max()) + 1))
        if layer_type is None:
            return self.original(x, position_ids)
        return self.original(x, position_ids, layer_type)

    def extra_repr(self) -> str:
        layers = ", ".join(f"{layer_type or 'all'}: base={base:g} rotary_dim={dim}"
                           for layer_type, (base, dim) in self.layers.items())
        return f"{self.spec.label()}; {layers}"


def _plain_rope_type(module: nn.Module, layer_type: str | None) -> None:
    """Mark a layer type of a transformers rotary module as plain RoPE, so that its own dynamic or LongRoPE update
    (`dynamic_rope_update`) never overwrites the frequencies installed here."""
    rope_type = getattr(module, "rope_type", None)
    if isinstance(rope_type, dict) and layer_type is not None:
        rope_type[layer_type] = "default"
    elif isinstance(rope_type, str):
        module.rope_type = "default"


def frequency_layer_types(module: nn.Module) -> list[str | None]:
    """The layer types a rotary module keeps frequencies for: [None] for one `inv_freq` buffer; per-layer-type
    modules (Gemma 3) keep `{layer_type}_inv_freq` for each of their `layer_types`; [] for none."""
    buffers = dict(module.named_buffers(recurse=False))
    if "inv_freq" in buffers:
        return [None]
    layer_types = getattr(module, "layer_types", None) or []
    return [layer_type for layer_type in layer_types if f"{layer_type}_inv_freq" in buffers]


def is_rotary_module(module: nn.Module) -> bool:
    """Whether `module` turns `(x, position_ids)` into `(cos, sin)` from inverse-frequency buffers: a
    `*RotaryEmbedding` class, or any module with such buffers and that forward signature."""
    if isinstance(module, ExtendedRotaryEmbedding) or not frequency_layer_types(module):
        return False
    if type(module).__name__.endswith("RotaryEmbedding"):
        return True
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return names[:2] == ["x", "position_ids"]


def rotary_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """`(parent, attribute, module)` of every rotary module of `model`, the ones an earlier `extend` installed
    given as the model's own module they wrap."""
    found = []
    inside_extended = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside_extended):
            continue
        if isinstance(module, ExtendedRotaryEmbedding):
            inside_extended.append(name + ".")
            module = module.original
        elif not is_rotary_module(module):
            continue
        parent_name, _, attribute = name.rpartition(".")
        found.append((model.get_submodule(parent_name), attribute, module))
    return found


def is_causal_lm(model: nn.Module) -> bool:
    """A decoder-only language model: it generates, and it is not an encoder-decoder."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    return (
        config is not None and not getattr(config, "is_encoder_decoder", False)
        and callable(can_generate) and bool(can_generate())
    )


def require_supported(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """The rotary modules of a supported model (see `rotary_modules`); RopescopeError for any other model."""
    if not is_causal_lm(model):
        raise RopescopeError(f"{type(model).__name__} is not a causal LM; ropescope supports {SUPPORTED_MODELS}")
    targets = rotary_modules(model)
    if not targets:
        raise RopescopeError(
            f"{type(model).__name__} has no rotary embedding module; ropescope supports {SUPPORTED_MODELS}"
        )
    return targets


def per_layer_type(parameters: dict) -> bool:
    """Whether `rope_parameters` hold one RoPE per layer type (Gemma 3) rather than one for every layer."""
    return any(isinstance(value, dict) for value in parameters.values())


def pretrained_rope_parameters(config) -> dict:
    """The model's `rope_parameters` before any `extend` (flat, or one dict per layer type as in Gemma 3)."""
    recorded = getattr(config, CONFIG_KEY, None) or {}
    if "pretrained_rope_parameters" in recorded:
        return copy.deepcopy(recorded["pretrained_rope_parameters"])
    current = copy.deepcopy(getattr(config, "rope_parameters", None) or {})
    if "pretrained_rope_theta" in recorded:  # recorded before per-layer-type support: one plain RoPE
        partial = current.get("partial_rotary_factor")
        current = {"rope_type": "default", "rope_theta": float(recorded["pretrained_rope_theta"])}
        if partial is not None:
            current["partial_rotary_factor"] = partial
    if not per_layer_type(current) and current.get("rope_theta") is None:
        theta = getattr(config, "rope_theta", None) or getattr(config, "default_theta", 10000.0)
        current = {"rope_type": "default", **current, "rope_theta": float(theta)}
    return current


def _layer_parameters(parameters: dict, layer_type: str | None) -> dict:
    return parameters if layer_type is None else parameters[layer_type]


def pretrained_rope(config) -> tuple[float, int]:
    """The base and length (max_position_embeddings) the model was pretrained with, before any `extend`, so
    extensions never compound: `(base, pretrained_length)`.

    A model with one RoPE per layer type (Gemma 3) gives the base of its first layer type that `extend` changes.
    """
    recorded = getattr(config, CONFIG_KEY, None) or {}
    parameters = pretrained_rope_parameters(config)
    # NoPE layer types (None parameters, as in Beam's full-attention layers) have no base
    layer_types = [name for name, value in parameters.items() if value] if per_layer_type(parameters) else [None]
    layer_type = _extended_layer_types(layer_types)[0]
    pretrained_length = recorded.get("pretrained_max_position_embeddings", config.max_position_embeddings)
    return float(_layer_parameters(parameters, layer_type)["rope_theta"]), int(pretrained_length)


def _extended_layer_types(layer_types: list[str | None]) -> list[str | None]:
    return [layer_type for layer_type in layer_types if layer_type != SLIDING_LAYER_TYPE] or layer_types


def extend(model: nn.Module, spec: RopeSpec) -> nn.Module:
    """Make every layer of `model` use the RoPE method `spec`, in place; returns the model.

    Replaces any extension applied before (relative to the pretrained base), records the spec in `model.config`
    (standard `rope_parameters` where transformers has the method), and works at any position. Partial rotary
    dimensions (StableLM, Phi) follow from the rotary module's own frequency buffer; a model with one RoPE per
    layer type (Gemma 3) gets `spec` on its full-attention layers, relative to their own base, while its
    sliding-window layers keep their pretrained rotation; NoPE layers (SmolLM3) stay without rotation.
    """
    if not isinstance(spec, RopeSpec):
        raise RopescopeError(f"extend needs a RopeSpec, got {type(spec).__name__}: e.g. RopeSpec('linear', factor=4)")
    targets = require_supported(model)
    teach_transformers(METHODS[spec.method])
    config = model.config
    parameters = pretrained_rope_parameters(config)
    _, pretrained_length = pretrained_rope(config)
    per_module = [_module_layers(original, config, parameters) for _, _, original in targets]
    # The config records the layers that read the model's own RoPE (the first module that does).
    shared = [layers for (_, _, original), layers in zip(targets, per_module) if _own_config(original, config) is None]
    rope = _rope_parameters_for(spec, parameters, (shared or per_module)[0])
    _check_family_accepts(config, rope, spec, pretrained_length)
    layer_scales(spec, len(attention_modules(model)))  # a bad logit scale is refused before anything changes
    for (parent, attribute, original), layers in zip(targets, per_module):
        setattr(parent, attribute, ExtendedRotaryEmbedding(original, spec, layers))
    apply_logit_scale(model, spec, pretrained_length)
    _record(config, spec, rope, parameters, pretrained_length)
    kept = kept_layers(model, spec)
    if kept and kept not in _SAID:  # once per process: a study loads the same model many times
        _SAID.add(kept)
        _LOG.warning(kept)
    return model


def kept_layers(model: nn.Module, spec: RopeSpec) -> str | None:
    """What `extend(model, spec)` leaves as pretrained, in one line, for a model with one RoPE per layer type
    (Gemma 3's sliding-window layers); None where the extension reaches every rotated layer."""
    text = model.config.get_text_config()
    types = list(getattr(text, "layer_types", None) or [])
    modules = [module for module in model.modules() if isinstance(module, ExtendedRotaryEmbedding)]
    kept = {layer_type for module in modules for layer_type in frequency_layer_types(module.original)
            if layer_type not in module.layers}
    if spec.method == "default" or not kept:
        return None
    window = getattr(text, "sliding_window", None)
    extended = sorted({layer_type for module in modules for layer_type in module.layers if layer_type})
    return (f"{spec.label()} extends the {sum(t in extended for t in types)} {'/'.join(extended)} layers; the "
            f"{sum(t in kept for t in types)} {'/'.join(sorted(kept))} layers keep their pretrained rotation"
            + (f" (they never see a key past their {window}-token window)" if window else ""))


def _own_config(module: nn.Module, config):
    """A rotary module's private config, as Granite SWA builds one per RoPE base (a copy of the model's config
    with another rope_theta, never recorded by `extend`), or None where it reads the model's config."""
    own = getattr(module, "config", None)
    if own is None or own is config or getattr(own, CONFIG_KEY, None) or not hasattr(own, "rope_parameters"):
        return None
    return own


def _module_layers(module: nn.Module, config, parameters: dict) -> dict[str | None, tuple[float, int]]:
    """Layer type -> (pretrained base, rotary dim) for each layer type of `module` that `extend` changes."""
    own = _own_config(module, config)
    layers = {}
    for layer_type in _extended_layer_types(frequency_layer_types(module)):
        prefix = "" if layer_type is None else f"{layer_type}_"
        source = parameters if own is None else own.rope_parameters
        base = float(_layer_parameters(source, layer_type)["rope_theta"])
        layers[layer_type] = (base, 2 * getattr(module, prefix + "inv_freq").numel())
    return layers


def _check_family_accepts(config, rope: dict, spec: RopeSpec, pretrained_length: int) -> None:
    """Refuse, before anything changes, an extension whose config the family's own class would not load (Phi-3's
    config accepts LongRoPE and the original RoPE only)."""
    trial = copy.deepcopy(config)
    trial.rope_parameters = copy.deepcopy(rope)
    trial.max_position_embeddings = saved_max_position_embeddings(spec, pretrained_length)
    try:
        trial.validate_rope()
    except Exception as error:  # the config classes raise ValueError, or a validation error wrapping it
        reason = str(getattr(error, "__cause__", None) or error).strip().splitlines()[-1].strip()
        raise RopescopeError(
            f"{type(config).__name__} does not load {spec.method} (transformers says: {reason})"
        ) from error


# The knobs of transformers' RoPE types: they belong to the method `extend` replaces, so they are not carried over.
_SCALING_KEYS = {
    "rope_type", "type", "rope_theta", "factor", "short_factor", "long_factor", "low_freq_factor", "high_freq_factor",
    "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate",
}


def _method_parameters(spec: RopeSpec, pretrained: dict, rotary_dim: int) -> dict:
    """One layer type's `rope_parameters` for `spec`, in transformers' form (`RopeMethod.rope_parameters`). The
    family's own keys (partial_rotary_factor, Ministral 3's llama_4_scaling_beta, the pretrained original length)
    stay unless the method writes them."""
    own = {key: value for key, value in pretrained.items() if key not in _SCALING_KEYS}
    written = METHODS[spec.method].rope_parameters(spec.method_params, rotary_dim, float(pretrained["rope_theta"]))
    rope = {key: written.pop(key) for key in ("rope_type", "rope_theta")}
    rope.update(own)
    for key, value in written.items():
        if value is None:  # the method leaves the key out, the family's own too
            rope.pop(key, None)
        else:
            rope[key] = value
    attention_factor = _constant_attention_factor(spec, pretrained, rotary_dim)
    if attention_factor is not None:
        # cos and sin both carry the attention factor, so the logits carry its square: sqrt(s) more is exactly s
        rope["attention_factor"] = attention_factor * math.sqrt(spec.logit_scale)
    return rope


def _constant_attention_factor(spec: RopeSpec, pretrained: dict, rotary_dim: int) -> float | None:
    """The method's attention factor where plain transformers can carry `spec`'s logit scale in it: a constant
    scale, a method with an attention factor that does not follow the length (LongRoPE's does not; dynamic YaRN's
    does), and every dimension rotated (on partial rotary models the factor scales the rotated ones only). None
    otherwise: those scales live in ropescope's record alone (`spec_from_config`), which ropescope's loader applies."""
    if not isinstance(spec.logit_scale, float) or "attention_factor" not in METHODS[spec.method].params:
        return None
    if (pretrained.get("partial_rotary_factor") or 1.0) != 1.0:
        return None
    original = spec.params.get("original_max_position_embeddings") or 1
    factors = {rope_frequencies(spec, rotary_dim, float(pretrained["rope_theta"]), length)[1]
               for length in (None, original, 4 * original, 64 * original)}
    return factors.pop() if len(factors) == 1 else None


def _rope_parameters_for(spec: RopeSpec, pretrained: dict, layers: dict) -> dict:
    """The model's `rope_parameters` with `spec` on the layer types in `layers`."""
    if None in layers:
        return _method_parameters(spec, pretrained, layers[None][1])
    rope = copy.deepcopy(pretrained)
    for layer_type, (_, dim) in layers.items():
        rope[layer_type] = _method_parameters(spec, pretrained[layer_type], dim)
    return rope


def saved_max_position_embeddings(spec: RopeSpec, pretrained_length: int) -> int:
    """The `max_position_embeddings` a config extended with `spec` says (`RopeMethod.saved_length`)."""
    return METHODS[spec.method].saved_max_position_embeddings(spec.method_params, pretrained_length)


def _record(config, spec: RopeSpec, rope: dict, pretrained: dict, pretrained_length: int) -> None:
    """Write the spec into the config: transformers' own `rope_parameters`, the length the extension may run to
    (`saved_max_position_embeddings`), the method's top-level attributes, plus ropescope's record."""
    config.max_position_embeddings = saved_max_position_embeddings(spec, pretrained_length)
    for key in _top_level_keys():  # a replaced method's, never the family's own field
        if key in config.__dict__ and not hasattr(type(config), key):
            delattr(config, key)
    for key, value in METHODS[spec.method].top_level_attributes(spec.method_params).items():
        setattr(config, key, value)
    if hasattr(config, "head_dim") and config.head_dim is None:
        # Mixtral leaves head_dim None; transformers' yarn and LongRoPE read it with a default that None defeats.
        config.head_dim = config.hidden_size // config.num_attention_heads
    config.rope_parameters = rope
    setattr(config, CONFIG_KEY, {
        **spec.to_dict(),
        "pretrained_rope_parameters": pretrained,
        "pretrained_max_position_embeddings": pretrained_length,
    })


def _top_level_keys() -> set[str]:
    """The config attributes any registered method writes at the top level."""
    return {key for method in METHODS.values() for key in method.top_level}


def spec_from_config(config) -> RopeSpec | None:
    """The spec `extend` recorded in a config, or None for a model ropescope never extended."""
    recorded = getattr(config, CONFIG_KEY, None)
    if not recorded:
        return None
    return parse_spec({key: value for key, value in recorded.items() if not key.startswith("pretrained_")})


def rotary_dim(config, rope: dict) -> int:
    """The dimensions of a head that RoPE rotates: head_dim (else hidden_size / heads) x partial_rotary_factor."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * (rope.get("partial_rotary_factor") or 1.0))


def _transformers_init(name: str):
    """A transformers RoPE init function computing the registered method `name` through `rope_frequencies`."""

    def init(config, device=None, seq_len=None, layer_type=None):
        rope = _layer_parameters(config.rope_parameters, layer_type)
        accepted = METHODS[name].params
        spec = RopeSpec(name, **{key: value for key, value in rope.items() if key in accepted})
        length = None if seq_len is None else int(seq_len)
        inv_freq, attention_scale = rope_frequencies(spec, rotary_dim(config, rope), float(rope["rope_theta"]), length)
        return inv_freq.to(device), attention_scale

    return init


def _transformers_validator(name: str):
    """A transformers config validator for the registered method `name`: `RopeSpec` checks the parameters."""

    def validate(self, rope_parameters, ignore_keys=None):
        RopeSpec(name, **{key: value for key, value in rope_parameters.items()
                          if key not in ("rope_type", "rope_theta", "partial_rotary_factor")})

    return validate


def teach_transformers(method: RopeMethod) -> None:
    """Register a method transformers lacks in transformers' own registries (`ROPE_INIT_FUNCTIONS`, which invites
    new rope types, and the config's validator), so that plain `from_pretrained` loads a model saved with it.
    transformers recomputes per length the types with "dynamic" in their name."""
    if method.transformers_type is not None:
        return
    modeling_rope_utils.ROPE_INIT_FUNCTIONS.setdefault(method.name, _transformers_init(method.name))
    validator = f"_validate_{method.name}_rope_parameters"
    if not hasattr(RotaryEmbeddingConfigMixin, validator):
        setattr(RotaryEmbeddingConfigMixin, validator, _transformers_validator(method.name))


for _method in METHODS.values():
    teach_transformers(_method)
