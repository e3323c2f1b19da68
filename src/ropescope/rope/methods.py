"""The built-in RoPE methods: one pure function per formula, and one `RopeMethod` object per method.

Every formula has the signature `fn(params, head_dim, base, seq_len) -> (inv_freq, attention_scale)`:
`inv_freq: [head_dim // 2]` float32, the rotation speed of each pair of dimensions, and `attention_scale`, the
factor by which cos and sin are multiplied (so q.k is scaled by its square). The formulas, their float32
operation order included, follow the reference implementations that users compare against (transformers'
`modeling_rope_utils.py`; the YaRN, Code Llama / NTK and LongRoPE papers), so that the numbers are identical.
"""

from __future__ import annotations

import math

import torch

from ropescope.errors import RopescopeError
from ropescope.rope.registry import REQUIRED, RopeMethod, flag, number, positive, positive_list, register

# --- the formulas ---------------------------------------------------------------------------------------------


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    # theta_i = base^(-2i/d), Su et al. (2021) eq. 15
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _ntk_exponent(method: str, dim: int) -> float:
    """d / (d - 2), the exponent of NTK-aware scaling, which a head of 2 dimensions cannot have."""
    if dim <= 2:
        raise RopescopeError(f"{method} needs head_dim > 2 (its exponent is d / (d - 2)); got {dim}")
    return dim / (dim - 2)


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
    return base * params["factor"] ** _ntk_exponent("ntk", dim)


def _ntk(params, dim, base, seq_len):
    _ntk_exponent("ntk", dim)
    return _default_inv_freq(ntk_base(params, dim, base), dim), 1.0


def _dynamic(params, dim, base, seq_len):
    # Dynamic NTK (emozilla 2023): the base grows with the current length once it passes the original one.
    exponent = _ntk_exponent("dynamic", dim)
    original = params["original_max_position_embeddings"]
    factor = params["factor"]
    seq_len = original if seq_len is None else max(int(seq_len), original)
    base = base * ((factor * seq_len / original) - (factor - 1)) ** exponent
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


# --- each method's own rules, beside it --------------------------------------------------------------------------


def _check_ntk(params: dict) -> dict:
    if params["factor"] is None and params["b"] is None:
        raise RopescopeError("ntk needs 'factor' (base * factor^(d/(d-2))) or 'b' (the new base directly)")
    params["b"] = number("ntk", "b", params["b"])
    positive("ntk", "b", params["b"])
    return params


def _check_yarn(name: str):
    def check(params: dict) -> dict:
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            params[key] = number(name, key, params[key])
        params["truncate"] = flag(name, "truncate", params["truncate"])
        return params

    return check


def _check_llama3(params: dict) -> dict:
    for key in ("low_freq_factor", "high_freq_factor"):
        params[key] = number("llama3", key, params[key])
    if params["high_freq_factor"] <= params["low_freq_factor"]:
        raise RopescopeError(
            f"llama3 high_freq_factor={params['high_freq_factor']:g} must exceed "
            f"low_freq_factor={params['low_freq_factor']:g}"
        )
    return params


def _check_longrope(params: dict) -> dict:
    for key in ("short_factor", "long_factor"):
        params[key] = positive_list("longrope", key, params[key])
    return params


# --- how each saves, where transformers' form differs from the params ----------------------------------------------


def _ntk_saved(params: dict, rotary_dim: int, base: float) -> dict:
    # NTK-aware is the original RoPE with a larger base (Code Llama's larger theta, to a serving engine)
    return {"rope_theta": ntk_base(params, rotary_dim, base)}


def _dynamic_saved(params: dict, rotary_dim: int, base: float) -> dict:
    # transformers' dynamic scaling reads the original length from max_position_embeddings alone: left out
    return {"factor": params["factor"], "original_max_position_embeddings": None}


def _ntk_label(params: dict) -> str:
    return f"ntk b={params['b']:g}" if params["b"] is not None else f"ntk x{params['factor']:g}"


_YARN_PARAMS = {
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": None,
    "mscale_all_dim": None,
    "attention_factor": None,
    "truncate": True,
}

# The saved lengths follow the published configs of each method: Llama 3.1 writes 131072 with original 8192,
# Phi-3 131072 with a top-level original 4096, and fixed-base NTK is the original RoPE to a serving engine, so these
# write the extended length. Dynamic NTK and YaRN write the original length (a YaRN-extended Qwen2.5 keeps 32768):
# transformers' dynamic scaling grows from it, its YaRN check wants the two equal or their ratio the factor, and vLLM
# multiplies it by the factor itself. Linear keeps the pretrained length, which vLLM multiplies by the factor too.
BUILT_IN = [
    RopeMethod("default", _default, {}, "original RoPE (Su et al. 2021)", transformers_type="default"),
    RopeMethod(
        "linear", _linear, {"factor": REQUIRED},
        "position interpolation, PI (Chen et al. 2023): positions divided by factor",
        example='RopeSpec("linear", factor=4.0)', transformers_type="linear",
    ),
    RopeMethod(
        "ntk", _ntk, {"factor": None, "b": None},
        "NTK-aware scaling, fixed: base b, or base * factor^(d/(d-2)) (bloc97 2023)",
        check=_check_ntk, transformers_type="default", saved_length="extended", saved_parameters=_ntk_saved,
        label_of=_ntk_label,
    ),
    RopeMethod(
        "dynamic", _dynamic, {"factor": REQUIRED, "original_max_position_embeddings": REQUIRED},
        "dynamic NTK: the NTK base grows with the sequence past the original length (emozilla 2023)",
        example='RopeSpec("dynamic", factor=2.0, original_max_position_embeddings=256)',
        dynamic=True, transformers_type="dynamic", saved_length="original", saved_parameters=_dynamic_saved,
    ),
    RopeMethod(
        "yarn", _yarn, {"factor": REQUIRED, "original_max_position_embeddings": REQUIRED, **_YARN_PARAMS},
        "YaRN: NTK-by-parts interpolation plus attention temperature (Peng et al. 2023)",
        example='RopeSpec("yarn", factor=4.0, original_max_position_embeddings=256)',
        check=_check_yarn("yarn"), transformers_type="yarn", saved_length="original",
    ),
    RopeMethod(
        "dynamic_yarn", _dynamic_yarn, {"original_max_position_embeddings": REQUIRED, **_YARN_PARAMS},
        "YaRN with factor = seq_len / original length once the sequence outgrows it (Peng et al. 2023)",
        example='RopeSpec("dynamic_yarn", original_max_position_embeddings=256)',
        check=_check_yarn("dynamic_yarn"), dynamic=True, saved_length="original",
    ),
    RopeMethod(
        "llama3", _llama3,
        {
            "factor": REQUIRED, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": REQUIRED,
        },
        "Llama 3.1: interpolate long wavelengths, keep short ones, blend between",
        example='RopeSpec("llama3", factor=8.0, original_max_position_embeddings=8192)',
        check=_check_llama3, transformers_type="llama3", saved_length="extended",
    ),
    RopeMethod(
        "longrope", _longrope,
        {
            "short_factor": REQUIRED, "long_factor": REQUIRED, "original_max_position_embeddings": REQUIRED,
            "factor": REQUIRED, "attention_factor": None,
        },
        "LongRoPE: searched per-dimension factors, long ones past the original length (Ding et al. 2024)",
        example='RopeSpec("longrope", short_factor=[...], long_factor=[...], '
        'original_max_position_embeddings=4096, factor=32.0)',
        check=_check_longrope, dynamic=True, transformers_type="longrope", saved_length="extended",
        top_level=("original_max_position_embeddings",),  # Phi-3 keeps it beside max_position_embeddings
    ),
]

for _method in BUILT_IN:
    register(_method)
