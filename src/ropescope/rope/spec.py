"""`RopeSpec` (a method and its parameters), `parse_spec` (the one way to read one) and `rope_frequencies`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ropescope.errors import RopescopeError
from ropescope.rope.registry import LOGIT_SCALE, METHODS, validated_params

# The knobs most methods share, which a command line offers once (`--factor`, `--original-max-position-embeddings`).
SHARED_KNOBS = ("factor", "original_max_position_embeddings")


@dataclass(frozen=True, init=False)
class RopeSpec:
    """A RoPE method and its parameters, e.g. `RopeSpec("yarn", factor=4.0, original_max_position_embeddings=256)`.

    Validated on construction: an unknown method or parameter, a missing required parameter or a value out of
    range raises `RopescopeError` naming it. Defaults are filled in, so `spec.params` is complete.
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def __init__(self, method: str, **params: Any):
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "params", validated_params(method, params))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}

    def to_text(self) -> str:
        """The spec as users name it, `NAME[:key=value,...]` (`parse_spec` reads it back), listing the
        parameters that differ from their defaults, e.g. `yarn:factor=4.0,original_max_position_embeddings=256`."""
        defaults = METHODS[self.method].params
        changed = [f"{name}={json.dumps(value, separators=(',', ':'))}" for name, value in self.params.items()
                   if name not in defaults or value != defaults[name]]
        return self.method + (":" + ",".join(changed) if changed else "")

    @property
    def method_params(self) -> dict[str, Any]:
        """The parameters of the method's own formula: `params` less the `logit_scale` every method takes."""
        return {key: value for key, value in self.params.items() if key != LOGIT_SCALE}

    @property
    def logit_scale(self) -> float | list[float] | str | None:
        """The attention logits' extra scale (None: none; see `ropescope.rope.registry.LOGIT_SCALE`)."""
        return self.params.get(LOGIT_SCALE)

    def without_logit_scale(self) -> RopeSpec:
        return RopeSpec(self.method, **self.method_params)

    def with_logit_scale(self, value: float | list[float] | str) -> RopeSpec:
        """The same extension with its logit scale set to `value`."""
        return RopeSpec(self.method, **self.method_params, logit_scale=value)

    def label(self) -> str:
        """A short name for plots and tables, e.g. `yarn x4`, and `yarn x4 s=1.25` with a logit scale (the method
        says how: `RopeMethod.label`)."""
        label = METHODS[self.method].label(self.method_params)
        scale = self.logit_scale
        if scale is None:
            return label
        if isinstance(scale, list):
            return f"{label} s=per-layer"
        return f"{label} s={scale}" if isinstance(scale, str) else f"{label} s={scale:g}"

    def __hash__(self) -> int:
        return hash((self.method, tuple(sorted((k, repr(v)) for k, v in self.params.items()))))


def parse_spec(
    method: str | Mapping[str, Any] | RopeSpec, factor: float | None = None,
    original_max_position_embeddings: int | None = None,
) -> RopeSpec:
    """The spec of `method`: a `--method` string `NAME[:key=value,...]`, a config table (a mapping with a
    "method" key and the parameters beside it) or a RopeSpec (returned as it is).

    `factor` and the original length go to the methods that take them and do not set them, so a command line can
    offer one `--factor` for every method: `parse_spec("ntk", 4)` and `parse_spec("yarn:beta_fast=16", 4, 256)`.
    Values in the text are JSON (numbers, true / false, null, lists such as `short_factor=[1.0,1.1]`); anything
    else is a string. RopescopeError in one line for bad syntax, an unknown method or a bad value.
    """
    if isinstance(method, RopeSpec):
        return method
    if isinstance(method, str):
        name, params = _parse_text(method)
    elif isinstance(method, Mapping):
        if "method" not in method:
            raise RopescopeError(f"a rope spec needs a 'method' key; got keys {sorted(method)}")
        params = {key: value for key, value in method.items() if key != "method"}
        name = method["method"]
    else:
        raise RopescopeError(f"a rope spec is NAME[:key=value,...], a table with 'method' or a RopeSpec; "
                             f"got {type(method).__name__}")
    accepted = METHODS[name].params if name in METHODS else {}  # an unknown name is refused by RopeSpec
    for key, value in zip(SHARED_KNOBS, (factor, original_max_position_embeddings)):
        if value is not None and key in accepted:
            params.setdefault(key, value)
    return RopeSpec(name, **params)


def _parse_text(text: str) -> tuple[str, dict[str, Any]]:
    """`"yarn:factor=4,beta_fast=32"` -> `("yarn", {"factor": 4, "beta_fast": 32})`; only the syntax is checked."""
    name, _, rest = text.strip().partition(":")
    params: dict[str, Any] = {}
    for item in _split_top_level(rest):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise RopescopeError(f"method {text!r}: {item!r} is not key=value; e.g. yarn:factor=4,beta_fast=32")
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value.strip()
    return name.strip(), params


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets, so list values keep their commas."""
    items, depth, current = [], 0, ""
    for character in text:
        depth += {"[": 1, "]": -1}.get(character, 0)
        if character == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += character
    return [item for item in [*items, current] if item.strip()]


def rope_frequencies(
    spec: RopeSpec, head_dim: int, base: float = 10000.0, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[head_dim // 2]` (float32) and the attention scale of `spec` for one head.

    `head_dim` is the rotary dimension (head_dim x partial_rotary_factor for partial-rotary models); `seq_len` is
    the current sequence length, used by dynamic methods (None: at or below the original length).
    """
    if not isinstance(spec, RopeSpec):
        raise RopescopeError(f"expected a RopeSpec, got {type(spec).__name__}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise RopescopeError(f"head_dim={head_dim!r} must be a positive even integer (RoPE rotates pairs)")
    if not isinstance(base, (int, float)) or isinstance(base, bool) or not base > 1:
        raise RopescopeError(f"base={base!r} must be a number greater than 1")
    if seq_len is not None and (isinstance(seq_len, bool) or int(seq_len) < 1):
        raise RopescopeError(f"seq_len={seq_len!r} must be a positive number of tokens or None")
    inv_freq, attention_scale = METHODS[spec.method].compute(spec.method_params, head_dim, float(base), seq_len)
    return inv_freq, float(attention_scale)
