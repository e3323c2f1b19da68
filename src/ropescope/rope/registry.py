"""The method registry: one `RopeMethod` object per method, `METHODS` by name, and the validation they share.

A method is its formula, its parameters with defaults, its own rules, how a saved config writes it and an example;
adding one is building that object and passing it to `register`. The checks every method shares (unknown and
missing keys, the common knobs `factor`, `original_max_position_embeddings`, `attention_factor` and the
`logit_scale` every method takes) live in `validated_params`, as transformers checks required and optional keys
as sets with one function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ropescope.errors import RopescopeError

REQUIRED = object()  # marks a parameter without a default

# Every method takes `logit_scale`: each attention logit multiplied by a number, by one number per layer, or by
# a rule. "logn" multiplies the query at position i by max(1, ln(i + 1) / ln L), L the pretrained length (Qwen's
# logn attention, Scalable-Softmax); "fit" is resolved to numbers by `ropescope fit-scale` or a study.
LOGIT_SCALE = "logit_scale"
LOGIT_SCALE_RULES = ("logn", "fit")
_LOGIT_SCALE_ACCEPTED = "a positive number, a list of positive numbers (one per layer), 'logn' or 'fit'"

# Which length a saved config writes as max_position_embeddings (see `RopeMethod.saved_length`).
SavedLength = Literal["pretrained", "original", "extended"]


@dataclass(frozen=True)
class RopeMethod:
    """A RoPE method: everything ropescope knows about it, in one object.

    compute: `(params, head_dim, base, seq_len) -> (inv_freq [head_dim // 2] float32, attention_scale)`.
    params: name -> default (or REQUIRED), in the order `to_text` and `ropescope methods` list them.
    check: the method's own rules on the filled params (after the shared checks); returns them, converted.
    transformers_type: the `rope_type` a saved config names (None: saved under the method's own name, which
    ropescope registers with transformers so that plain `from_pretrained` loads it).
    saved_length: the `max_position_embeddings` its published configs write: "extended" (original length x factor,
    as Llama 3.1 does), "original" (as YaRN-extended Qwen2.5 does) or "pretrained" (the model's own).
    saved_parameters: `(params, rotary_dim, base) -> entries` of its transformers `rope_parameters` (default: the
    params that are set; an entry None leaves that key out, the model's own included). top_level: the params a
    saved config also writes at its top level (Phi-3 keeps original_max_position_embeddings there).
    label_of: `params -> short name for plots` (default `NAME xFACTOR`). example: how to build it, for errors.
    """

    name: str
    compute: Callable[[dict, int, float, int | None], tuple[torch.Tensor, float]]
    params: dict[str, Any]
    summary: str
    example: str = ""
    check: Callable[[dict], dict] | None = None
    dynamic: bool = False  # frequencies depend on the current sequence length
    transformers_type: str | None = None
    saved_length: SavedLength = "pretrained"
    saved_parameters: Callable[[dict, int, float], dict] | None = None
    top_level: tuple[str, ...] = ()
    label_of: Callable[[dict], str] | None = None

    def label(self, params: dict) -> str:
        if self.label_of is not None:
            return self.label_of(params)
        factor = params.get("factor")
        return self.name if factor is None else f"{self.name} x{factor:g}"

    def rope_parameters(self, params: dict, rotary_dim: int, base: float) -> dict:
        """The entries of transformers' `rope_parameters` this method writes, `rope_type` and `rope_theta` included."""
        rope = {"rope_type": self.transformers_type or self.name, "rope_theta": base}
        if self.saved_parameters is None:
            rope.update({key: value for key, value in params.items() if value is not None})
        else:
            rope.update(self.saved_parameters(params, rotary_dim, base))
        return rope

    def saved_max_position_embeddings(self, params: dict, pretrained_length: int) -> int:
        original = params.get("original_max_position_embeddings") or pretrained_length
        if self.saved_length == "original":
            return int(original)
        if self.saved_length == "extended" and params.get("factor") is not None:
            return int(round(original * params["factor"]))
        return pretrained_length

    def top_level_attributes(self, params: dict) -> dict:
        return {key: params[key] for key in self.top_level}


METHODS: dict[str, RopeMethod] = {}


def register(method: RopeMethod) -> RopeMethod:
    """Add `method` to `METHODS` under its name (a name taken already is refused); returns it."""
    if not isinstance(method, RopeMethod):
        raise RopescopeError(f"register needs a RopeMethod, got {type(method).__name__}")
    if method.name in METHODS:
        raise RopescopeError(f"a RoPE method named {method.name!r} is registered already; accepted: a new name")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> RopeMethod:
    """Remove a method registered with `register` (a test's, say); returns it."""
    if name not in METHODS:
        raise RopescopeError(f"no RoPE method {name!r} is registered; registered: {', '.join(METHODS)}")
    return METHODS.pop(name)


# --- validation, shared -------------------------------------------------------------------------------------------


def validated_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """`params` of the method `name`, checked and complete: unknown or missing keys and bad values of the common
    knobs refused here, then the method's own `check`. RopescopeError in one line naming the bad value."""
    if name not in METHODS:
        raise RopescopeError(f"unknown RoPE method {name!r}; accepted: {', '.join(METHODS)}")
    method = METHODS[name]
    accepted = method.params
    params = dict(params)
    logit_scale = checked_logit_scale(name, params.pop(LOGIT_SCALE, None))  # every method takes it
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise RopescopeError(f"{name} takes no parameter {unknown[0]!r}; accepted: {', '.join(accepted) or 'none'}")
    filled = {key: params.get(key, default) for key, default in accepted.items()}
    missing = [key for key, value in filled.items() if value is REQUIRED or value is None and accepted[key] is REQUIRED]
    if missing:
        example = method.example or f'RopeSpec("{name}")'
        raise RopescopeError(f"{name} needs {missing[0]!r} (e.g. {example})")
    for key in ("factor", "attention_factor"):
        if key in filled:
            filled[key] = number(name, key, filled[key])
    if filled.get("factor") is not None and filled["factor"] < 1:
        raise RopescopeError(f"{name} factor={filled['factor']:g} must be >= 1 (it is the length ratio)")
    positive(name, "attention_factor", filled.get("attention_factor"))
    if "original_max_position_embeddings" in filled:
        filled["original_max_position_embeddings"] = tokens(
            name, "original_max_position_embeddings", filled["original_max_position_embeddings"])
    filled = filled if method.check is None else method.check(filled)
    if logit_scale is not None:  # kept out when unset, so specs, their text and fingerprints stay as they were
        filled[LOGIT_SCALE] = logit_scale
    return filled


def checked_logit_scale(method: str, value: Any) -> float | list[float] | str | None:
    """`logit_scale` as a spec keeps it: None for unset or 1 (no change), a positive float, a list of positive
    floats (one per layer; its length is checked against the model in `extend`), or one of `LOGIT_SCALE_RULES`."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in LOGIT_SCALE_RULES:
            raise RopescopeError(f"{method} logit_scale={value!r} is unknown; accepted: {_LOGIT_SCALE_ACCEPTED}")
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise RopescopeError(f"{method} logit_scale=[] is empty; accepted: {_LOGIT_SCALE_ACCEPTED}")
        return [_positive_scale(method, item) for item in value]
    scale = _positive_scale(method, value)
    return None if scale == 1.0 else scale


def _positive_scale(method: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise RopescopeError(f"{method} logit_scale={value!r} must be a positive finite number; "
                             f"accepted: {_LOGIT_SCALE_ACCEPTED}")
    return float(value)


def number(method: str, name: str, value: Any) -> float | None:
    """`value` as a float (None stays None); a bool, a string or a non-finite number is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RopescopeError(f"{method} {name}={value!r} is not a number")
    return float(value)


def positive(method: str, name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise RopescopeError(f"{method} {name}={value:g} must be > 0")


def tokens(method: str, name: str, value: Any) -> int | None:
    """`value` as a positive whole number of tokens (None stays None)."""
    if value is None:
        return None
    whole = isinstance(value, int) or isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not whole or value < 1:
        raise RopescopeError(f"{method} {name}={value!r} must be a positive whole number of tokens")
    return int(value)


def flag(method: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RopescopeError(f"{method} {name}={value!r} must be true or false")
    return value


def positive_list(method: str, name: str, value: Any) -> list[float]:
    """A non-empty list of positive numbers, one per dimension pair, as floats."""
    if not isinstance(value, (list, tuple)) or not value or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value
    ):
        raise RopescopeError(f"{method} {name} must be a list of positive numbers, one per dimension pair")
    return [float(v) for v in value]
