"""The saved config each serving engine reads, and transformers' own RoPE from it (run, not re-derived).

`saved_config(model, spec)` is the config.json a user would serve: the model's own, or the one `extend` writes for
`spec` (the model built on the meta device, so no weights are read), saved and read back by transformers.
`served_config` turns it into what an engine reads (`ServedConfig`), `reference` is what ropescope applies, and
`ALL_ENGINES` puts transformers beside the engines re-derived in `ropescope.rope.engines`, and `engine_rows`
sets every engine against ropescope at each length (the rows of `ropescope engines` and of a study's report).
"""

from __future__ import annotations

import math
import sys
import tempfile

import torch
import transformers
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ropescope.errors import RopescopeError
from ropescope.io.rows import FULL_LAYER_TYPE, EngineRow, RunLabels
from ropescope.model.patch import extend, per_layer_type, pretrained_rope, rotary_dim, spec_from_config
from ropescope.model.resolve import causal_lm_class, read_model_config
from ropescope.rope import METHODS, RopeSpec, parse_spec, rope_frequencies
from ropescope.rope.engines import ENGINES, Engine, EngineView, ServedConfig, Unreadable, compare


def saved_config(model: str, spec: RopeSpec | None = None, factor: float | None = None,
                 original_max_position_embeddings: int | None = None):
    """The transformers config of `model` (its config alone: no weights are read) as saved with `spec` applied
    (a RopeSpec or a `--method` text, with `factor` and the original length, default the model's pretrained
    one, filled in as every command does; None: as it is), read back from disk as an engine reads it."""
    config = read_model_config(model, config_only=True).get_text_config()
    if spec is None:
        if factor is not None:
            raise RopescopeError(f"factor {factor:g} is given but no method; add e.g. --method yarn")
        return config
    spec = parse_spec(spec, factor, original_max_position_embeddings or pretrained_rope(config)[1])
    with torch.device("meta"):  # extend only needs the rotary modules' shapes
        network = causal_lm_class(config)._from_config(config)
    extend(network, spec)
    with tempfile.TemporaryDirectory() as folder:
        network.config.save_pretrained(folder)
        return AutoConfig.from_pretrained(folder).get_text_config()


def _flat_rope(config) -> dict:
    rope = dict(config.rope_parameters or {})
    if per_layer_type(rope):  # the layer type an extension changes
        rope = dict(rope.get(FULL_LAYER_TYPE) or next(value for value in rope.values() if value))
    return rope


def served_config(config) -> ServedConfig:
    """What an engine reads of `config`: its rope_parameters (the full-attention layers' where there are several),
    head size, max_position_embeddings and the top-level original length and partial rotary factor."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ServedConfig(_flat_rope(config), int(head_dim), int(config.max_position_embeddings),
                        getattr(config, "original_max_position_embeddings", None),
                        getattr(config, "partial_rotary_factor", None), source=config)


def reference(config) -> tuple[RopeSpec, float, int]:
    """What ropescope applies for `config`: the spec `extend` recorded, else the one its rope_parameters name;
    with the pretrained base and the rotary dimension. RopescopeError for a rope_type ropescope has no method of."""
    base, pretrained_length = pretrained_rope(config)
    rope = _flat_rope(config)
    spec = spec_from_config(config)
    if spec is None:
        kind = rope.get("rope_type") or rope.get("type") or "default"
        names = [name for name, method in METHODS.items() if (method.transformers_type or name) == kind]
        if not names:
            raise RopescopeError(f"rope_type {kind!r} is no ropescope method; accepted: "
                                 f"{', '.join(sorted({m.transformers_type or m.name for m in METHODS.values()}))}")
        accepted = METHODS[names[0]].params
        params = {key: value for key, value in rope.items() if key in accepted and value is not None}
        if "original_max_position_embeddings" in accepted:
            params.setdefault("original_max_position_embeddings", pretrained_length)
        if "factor" in accepted and "factor" not in params and "original_max_position_embeddings" in params:
            params["factor"] = config.max_position_embeddings / params["original_max_position_embeddings"]
        spec = RopeSpec(names[0], **params)
    return spec, base, rotary_dim(config, rope)


def ropescope_frequencies(config, length: int) -> tuple[torch.Tensor, float]:
    """ropescope's inverse frequencies `[rotary_dim // 2]` and attention scale for `config` at `length` tokens,
    a constant logit scale folded into the scale (cos and sin both carry it: its square root)."""
    spec, base, dim = reference(config)
    inv_freq, attention_scale = rope_frequencies(spec, dim, base, length)
    if isinstance(spec.logit_scale, float):
        attention_scale *= math.sqrt(spec.logit_scale)
    return inv_freq, attention_scale


def unserved_scale(spec: RopeSpec) -> str | None:
    """The verdict of every engine for a logit scale that no rotary attention factor expresses (one per layer, or
    logn): only ropescope's loader applies it. None for no scale or a constant one."""
    scale = spec.logit_scale
    if scale is None or isinstance(scale, float):
        return None
    shown = "per-layer" if isinstance(scale, list) else scale
    return (f"cannot read logit_scale={shown}: it is in ropescope's record of the config only, which ropescope's "
            f"loader applies")


def _default_init(config):
    """The family's own `compute_default_rope_parameters` (transformers keeps the original RoPE in each model)."""
    module = sys.modules[causal_lm_class(config).__module__]
    for name, value in vars(module).items():
        if name.endswith("RotaryEmbedding") and hasattr(value, "compute_default_rope_parameters"):
            return value.compute_default_rope_parameters
    return None


def transformers_derive(config: ServedConfig, length: int) -> EngineView | Unreadable:
    """transformers' inverse frequencies and attention scale, from its own init function for the rope_type (what
    its rotary module installs for a sequence of `length` tokens)."""
    kind = config.rope_type
    init = _default_init(config.source) if kind == "default" else ROPE_INIT_FUNCTIONS.get(kind)
    if init is None:
        return Unreadable(f"transformers {transformers.__version__} has no rope_type {kind!r} in ROPE_INIT_FUNCTIONS")
    # a config with one RoPE per layer type (Gemma 3): the full-attention layers', which an extension changes
    options = {"layer_type": FULL_LAYER_TYPE} if per_layer_type(config.source.rope_parameters or {}) else {}
    inv_freq, attention = init(config.source, device=None, seq_len=length, **options)
    note = ""
    if kind in METHODS and METHODS[kind].transformers_type is None:
        note = "read through ropescope's registration: transformers without ropescope imported refuses it"
    return EngineView(inv_freq.to(torch.float64), float(attention), None, False, note)


TRANSFORMERS = Engine("transformers", transformers.__version__,
                      "transformers/modeling_rope_utils.py ROPE_INIT_FUNCTIONS[rope_type] (run)", transformers_derive)
ALL_ENGINES: dict[str, Engine] = {"transformers": TRANSFORMERS, **ENGINES}


def _engines(names: list[str] | None) -> list:
    unknown = [name for name in names or [] if name not in ALL_ENGINES]
    if unknown:
        raise RopescopeError(f"unknown engine {unknown[0]!r}; accepted: {', '.join(ALL_ENGINES)}")
    return [ALL_ENGINES[name] for name in names or ALL_ENGINES]


def _lengths(config, spec, lengths: list[int] | None) -> list[int]:
    """The lengths asked, else the pretrained length and the extended one (x factor, or x 2 without one)."""
    if lengths:
        if any(isinstance(length, bool) or int(length) < 1 for length in lengths):
            raise RopescopeError(f"lengths {lengths} must be positive numbers of tokens")
        return [int(length) for length in lengths]
    original = spec.params.get("original_max_position_embeddings") or pretrained_rope(config)[1]
    return sorted({int(original), int(round(original * (spec.params.get("factor") or 2.0)))})


def engine_rows(model: str = "default", method: str | None = None, *, factor: float | None = None,
                original_max_position_embeddings: int | None = None, lengths: list[int] | None = None,
                engines: list[str] | None = None) -> list[dict]:
    """`ropescope engines`' rows, one `EngineRow` dict per (engine, length): `model`'s saved config (with `method` applied where given, as
    `extend` would save it) read by each engine, against ropescope's own frequencies at that length."""
    chosen = _engines(engines)
    config = saved_config(model, method, factor, original_max_position_embeddings)
    applied, _, _ = reference(config)
    served = served_config(config)
    labels = RunLabels(model=str(model), method=applied.method, factor=applied.params.get("factor"),
                       original_max_position_embeddings=applied.params.get("original_max_position_embeddings"),
                       rope=applied.to_text())
    rows = []
    for length in _lengths(config, applied, lengths):
        inv_freq, attention_scale = ropescope_frequencies(config, length)
        for engine in chosen:
            view = engine.derive(served, length)
            result = compare(view, served.rope_type, inv_freq, attention_scale, length)
            result["verdict"] = unserved_scale(applied) or result["verdict"]
            rows.append(EngineRow(
                engine=engine.name, engine_version=engine.version, rope_type=served.rope_type, length=length,
                inv_freq_difference=result["inv_freq_difference"], attention_scale=result["engine_attention_scale"],
                ropescope_attention_scale=attention_scale,
                attention_scale_difference=result["attention_scale_difference"],
                longest_length=result["longest_length"], verdict=result["verdict"], note=getattr(view, "note", ""),
            ).to_dict(labels))
    return rows
