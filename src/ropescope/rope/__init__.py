"""RoPE extension methods: a `RopeSpec` and one pure function per method.

Every method has the signature `fn(params, head_dim, base, seq_len) -> (inv_freq, attention_scale)`:
`inv_freq: [head_dim // 2]` float32, the rotation speed of each pair of dimensions, and `attention_scale`, the
factor by which cos and sin are multiplied (so q.k is scaled by its square). The formulas, their float32
operation order included, follow the reference implementations that users compare against (transformers'
`modeling_rope_utils.py`; the YaRN, Code Llama / NTK and LongRoPE papers), so that the numbers are identical.
This module imports only torch and math: no models, no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ropescope.errors import RopescopeError

REQUIRED = object()  # marks a parameter without a default


@dataclass(frozen=True)
class RopeMethod:
    """A registered method: its function, its parameters (name -> default or REQUIRED) and what it is."""

    name: str
    compute: Callable[[dict, int, float, int | None], tuple[torch.Tensor, float]]
    params: dict[str, Any]
    summary: str
    dynamic: bool = False  # frequencies depend on the current sequence length
    transformers_type: str | None = None  # the `rope_type` transformers knows it by, if any


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
        object.__setattr__(self, "params", _validated_params(method, params))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RopeSpec":
        data = dict(data)
        if "method" not in data:
            raise RopescopeError(f"a rope spec needs a 'method' key; got keys {sorted(data)}")
        return cls(data.pop("method"), **data)

    def to_text(self) -> str:
        """The spec as users name it, `NAME[:key=value,...]` (`parse_method` reads it back), listing the
        parameters that differ from their defaults, e.g. `yarn:factor=4.0,original_max_position_embeddings=256`."""
        defaults = METHODS[self.method].params
        changed = [f"{name}={json.dumps(value, separators=(',', ':'))}" for name, value in self.params.items()
                   if value != defaults[name]]
        return self.method + (":" + ",".join(changed) if changed else "")

    def label(self) -> str:
        """A short name for plots and tables, e.g. `yarn x4`."""
        factor = self.params.get("factor")
        if self.method == "ntk" and self.params.get("b") is not None:
            return f"ntk b={self.params['b']:g}"
        return self.method if factor is None else f"{self.method} x{factor:g}"

    def __hash__(self) -> int:
        return hash((self.method, tuple(sorted((k, repr(v)) for k, v in self.params.items()))))


# --- the formulas ---------------------------------------------------------------------------------------------


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    # theta_i = base^(-2i/d), Su et al. (2021) eq. 15
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _default(params, dim, base, seq_len):
    return _default_inv_freq(base, dim), 1.0


def _linear(params, dim, base, seq_len):
    # Position interpolation (Chen et al. 2023): positions m -> m / factor, the same as inv_freq / factor.
    inv_freq = _default_inv_freq(base, dim)
    inv_freq /= params["factor"]
    return inv_freq, 1.0


def ntk_base(params: dict, dim: int, base: float) -> float:
    """The enlarged base of fixed NTK-aware scaling: `b` if given, else base * factor^(d / (d - 2))."""
    if params.get("b") is not None:
        return float(params["b"])
    return base * params["factor"] ** (dim / (dim - 2))


def _ntk(params, dim, base, seq_len):
    return _default_inv_freq(ntk_base(params, dim, base), dim), 1.0


def _dynamic(params, dim, base, seq_len):
    # Dynamic NTK (emozilla 2023): the base grows with the current length once it passes the original one.
    original = params["original_max_position_embeddings"]
    factor = params["factor"]
    seq_len = original if seq_len is None else max(int(seq_len), original)
    base = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(base, dim), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023, eq. 22), 1 for s <= 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(
    beta_fast: float, beta_slow: float, dim: int, base: float, original_max_position_embeddings: int,
    truncate: bool = True,
) -> tuple[float, float]:
    """Dimension-pair indices (low, high) between which YaRN ramps from extrapolation to interpolation.

    A pair whose wavelength fits more than beta_fast rotations into the original length is left as is, one with
    fewer than beta_slow rotations is interpolated (Peng et al. 2023, sec. 3.2, "NTK-by-parts").
    """

    def dimension_of(rotations: float) -> float:
        wavelengths = original_max_position_embeddings / (rotations * 2 * math.pi)
        return (dim * math.log(wavelengths)) / (2 * math.log(base))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn_with_factor(params: dict, dim: int, base: float, factor: float) -> tuple[torch.Tensor, float]:
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:  # DeepSeek-V2 form: the ratio of two temperatures
            attention_factor = float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    low, high = yarn_correction_range(
        params["beta_fast"], params["beta_slow"], dim, base,
        params["original_max_position_embeddings"], params["truncate"],
    )
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight
    )
    return inv_freq, attention_factor


def _yarn(params, dim, base, seq_len):
    return _yarn_with_factor(params, dim, base, params["factor"])


def _dynamic_yarn(params, dim, base, seq_len):
    # YaRN whose factor follows the sequence: s = L / L_original once L outgrows L_original (Peng et al. 2023,
    # sec. 3.3, "Dynamic Scaling"); at or below the original length it is the original RoPE.
    original = params["original_max_position_embeddings"]
    if seq_len is None or int(seq_len) <= original:
        return _default(params, dim, base, seq_len)
    return _yarn_with_factor(params, dim, base, int(seq_len) / original)


def _llama3(params, dim, base, seq_len):
    # Llama 3.1: long wavelengths interpolated by `factor`, short ones kept, a smooth blend in between.
    inv_freq = _default_inv_freq(base, dim)
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama), 1.0


def _longrope(params, dim, base, seq_len):
    # LongRoPE (Ding et al. 2024): searched per-dimension rescale factors, `long_factor` past the original length.
    original = params["original_max_position_embeddings"]
    factor = params["factor"]
    for key in ("short_factor", "long_factor"):
        if len(params[key]) != dim // 2:
            raise RopescopeError(
                f"longrope {key} has {len(params[key])} values; head_dim={dim} needs {dim // 2} (one per pair)"
            )
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    use_long = seq_len is not None and int(seq_len) > original
    ext_factors = torch.tensor(params["long_factor" if use_long else "short_factor"], dtype=torch.float32)
    inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext_factors * base**inv_freq_shape), attention_factor


_YARN_PARAMS = {
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": None,
    "mscale_all_dim": None,
    "attention_factor": None,
    "truncate": True,
}

METHODS: dict[str, RopeMethod] = {
    method.name: method
    for method in [
        RopeMethod("default", _default, {}, "original RoPE (Su et al. 2021)", transformers_type="default"),
        RopeMethod(
            "linear", _linear, {"factor": REQUIRED},
            "position interpolation, PI (Chen et al. 2023): positions divided by factor",
            transformers_type="linear",
        ),
        RopeMethod(
            "ntk", _ntk, {"factor": None, "b": None},
            "NTK-aware scaling, fixed: base b, or base * factor^(d/(d-2)) (bloc97 2023)",
            transformers_type="default",
        ),
        RopeMethod(
            "dynamic", _dynamic, {"factor": REQUIRED, "original_max_position_embeddings": REQUIRED},
            "dynamic NTK: the NTK base grows with the sequence past the original length (emozilla 2023)",
            dynamic=True, transformers_type="dynamic",
        ),
        RopeMethod(
            "yarn", _yarn,
            {"factor": REQUIRED, "original_max_position_embeddings": REQUIRED, **_YARN_PARAMS},
            "YaRN: NTK-by-parts interpolation plus attention temperature (Peng et al. 2023)",
            transformers_type="yarn",
        ),
        RopeMethod(
            "dynamic_yarn", _dynamic_yarn, {"original_max_position_embeddings": REQUIRED, **_YARN_PARAMS},
            "YaRN with factor = seq_len / original length once the sequence outgrows it (Peng et al. 2023)",
            dynamic=True,
        ),
        RopeMethod(
            "llama3", _llama3,
            {
                "factor": REQUIRED, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": REQUIRED,
            },
            "Llama 3.1: interpolate long wavelengths, keep short ones, blend between",
            transformers_type="llama3",
        ),
        RopeMethod(
            "longrope", _longrope,
            {
                "short_factor": REQUIRED, "long_factor": REQUIRED, "original_max_position_embeddings": REQUIRED,
                "factor": REQUIRED, "attention_factor": None,
            },
            "LongRoPE: searched per-dimension factors, long ones past the original length (Ding et al. 2024)",
            dynamic=True, transformers_type="longrope",
        ),
    ]
}


# --- validation, in one place ---------------------------------------------------------------------------------


def _validated_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    if method not in METHODS:
        raise RopescopeError(f"unknown RoPE method {method!r}; accepted: {', '.join(METHODS)}")
    accepted = METHODS[method].params
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        names = ", ".join(accepted) or "none"
        raise RopescopeError(f"{method} takes no parameter {unknown[0]!r}; accepted: {names}")
    filled = {name: params.get(name, default) for name, default in accepted.items()}
    missing = [name for name, value in filled.items() if value is REQUIRED or value is None and accepted[name] is REQUIRED]
    if missing:
        raise RopescopeError(f"{method} needs {missing[0]!r} (e.g. {_example(method)})")
    if method == "ntk" and filled["factor"] is None and filled["b"] is None:
        raise RopescopeError("ntk needs 'factor' (base * factor^(d/(d-2))) or 'b' (the new base directly)")
    for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "b",
                 "attention_factor", "mscale", "mscale_all_dim"):
        value = filled.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RopescopeError(f"{method} {name}={value!r} is not a number")
        filled[name] = float(value)
    if filled.get("factor") is not None and filled["factor"] < 1:
        raise RopescopeError(f"{method} factor={filled['factor']:g} must be >= 1 (it is the length ratio)")
    for name in ("b", "attention_factor"):
        if filled.get(name) is not None and filled[name] <= 0:
            raise RopescopeError(f"{method} {name}={filled[name]:g} must be > 0")
    if method == "llama3" and filled["high_freq_factor"] <= filled["low_freq_factor"]:
        raise RopescopeError(
            f"llama3 high_freq_factor={filled['high_freq_factor']:g} must exceed "
            f"low_freq_factor={filled['low_freq_factor']:g}"
        )
    original = filled.get("original_max_position_embeddings")
    if original is not None:
        if isinstance(original, bool) or not isinstance(original, int) and not (
            isinstance(original, float) and original.is_integer()
        ) or original < 1:
            raise RopescopeError(
                f"{method} original_max_position_embeddings={original!r} must be a positive whole number of tokens"
            )
        filled["original_max_position_embeddings"] = int(original)
    if "truncate" in filled and not isinstance(filled["truncate"], bool):
        raise RopescopeError(f"{method} truncate={filled['truncate']!r} must be true or false")
    for name in ("short_factor", "long_factor"):
        if name in filled:
            values = filled[name]
            if not isinstance(values, (list, tuple)) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values
            ):
                raise RopescopeError(f"longrope {name} must be a list of positive numbers, one per dimension pair")
            filled[name] = [float(v) for v in values]
    return filled


def _example(method: str) -> str:
    examples = {
        "linear": 'RopeSpec("linear", factor=4.0)',
        "dynamic": 'RopeSpec("dynamic", factor=2.0, original_max_position_embeddings=256)',
        "yarn": 'RopeSpec("yarn", factor=4.0, original_max_position_embeddings=256)',
        "dynamic_yarn": 'RopeSpec("dynamic_yarn", original_max_position_embeddings=256)',
        "llama3": 'RopeSpec("llama3", factor=8.0, original_max_position_embeddings=8192)',
        "longrope": 'RopeSpec("longrope", short_factor=[...], long_factor=[...], '
        'original_max_position_embeddings=4096, factor=32.0)',
    }
    return examples.get(method, f'RopeSpec("{method}")')


def simple_spec(
    method: str, factor: float | None = None, original_max_position_embeddings: int | None = None, **extra: Any
) -> RopeSpec:
    """Build a spec from the two knobs most methods share, passing each only to the methods that take it.

    `simple_spec("ntk", factor=4)` and `simple_spec("yarn", factor=4, original_max_position_embeddings=256)`
    both work, so a command line can offer one `--factor` / `--original-max-position-embeddings` for every
    method. Parameters in `extra` win over the shared knobs.
    """
    return RopeSpec(method, **_with_shared(method, dict(extra), factor, original_max_position_embeddings))


def _with_shared(method: str, params: dict, factor: float | None, original: int | None) -> dict:
    """`params` plus `factor` and the original length where the method takes them and `params` lacks them."""
    accepted = METHODS[method].params if method in METHODS else {}  # an unknown name is refused by RopeSpec
    for name, value in {"factor": factor, "original_max_position_embeddings": original}.items():
        if value is not None and name in accepted:
            params.setdefault(name, value)
    return params


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """`"yarn:factor=4,beta_fast=32"` -> `("yarn", {"factor": 4, "beta_fast": 32})`: how users name a method.

    Values are JSON (numbers, true / false, null, lists such as `short_factor=[1.0,1.1]`); anything else is a
    string. Only the syntax is checked here; `RopeSpec` checks names and values.
    """
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


def method_spec(
    text: str, factor: float | None = None, original_max_position_embeddings: int | None = None
) -> RopeSpec:
    """The spec a user names as `NAME[:key=value,...]`, with `factor` and the original length filled in for
    methods that take them and do not set them (see `parse_method` and `simple_spec`)."""
    name, params = parse_method(text)
    return RopeSpec(name, **_with_shared(name, params, factor, original_max_position_embeddings))


# --- the public entry point -----------------------------------------------------------------------------------


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
    if spec.method in ("ntk", "dynamic") and head_dim <= 2:
        raise RopescopeError(f"{spec.method} needs head_dim > 2 (its exponent is d / (d - 2)); got {head_dim}")
    inv_freq, attention_scale = METHODS[spec.method].compute(spec.params, head_dim, float(base), seq_len)
    return inv_freq, float(attention_scale)
