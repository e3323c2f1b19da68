"""llama.cpp at commit 0c1e570 (the copy llama-cpp-python 0.3.36 builds): the RoPE it computes from a GGUF file,
and the GGUF RoPE metadata its converter writes for a saved Llama-family config; re-derived from its source.

From a saved folder in two steps, as a user serves it: `gguf_metadata` is what convert_hf_to_gguf.py writes
(`TextModel.set_gguf_parameters` in conversion/base.py, `LlamaModel.set_gguf_parameters` and
`LlamaModel.generate_extra_tensors` in conversion/llama.py), and `derive_gguf` is what llama.cpp computes from such
metadata (`llama_model::load_hparams` and `get_rope_factors` in src/llama-model.cpp, the Llama tensors in
src/models/llama.cpp, the yarn attention factor in `llama_context::llama_context` in src/llama-context.cpp, and
`ggml_rope_yarn_corr_dims` in ggml/src/ggml.c with `rope_yarn` and `ggml_rope_cache_init` in
ggml/src/ggml-cpu/ops.cpp). Metadata keys are written without the architecture prefix: `rope.freq_base` for
`llama.rope.freq_base`. Floats are the float32 values a GGUF file stores.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ropescope.rope.engines.views import (
    Engine, EngineView, ServedConfig, Unreadable, default_inv_freq, yarn_correction_range, yarn_ramp,
    yarn_temperature,
)

VERSION = "0.3.36 (llama-cpp-python; llama.cpp 0c1e570)"

SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# Keys the converter may write that the llama architecture never reads (grok reads the first two, deepseek2 the
# log multiplier), with what llama.cpp takes instead for every yarn model (None: its temperature 0.1 ln s + 1, times
# rope.scaling.attn_factor, whatever the key says).
UNREAD_KEYS = {"rope.scaling.yarn_ext_factor": 1.0, "rope.scaling.yarn_attn_factor": None,
               "rope.scaling.yarn_beta_fast": 32.0, "rope.scaling.yarn_beta_slow": 1.0,
               "rope.scaling.yarn_log_multiplier": 0.0}
_CONVERTED = ("default", "linear", "yarn", "longrope", "su", "dynamic", "llama3")


def _float32(value: float) -> float:
    return float(torch.tensor(float(value), dtype=torch.float32))


def _llama3_factors(config: ServedConfig, dim: int) -> torch.Tensor:
    # LlamaModel.generate_extra_tensors: one divisor per pair, 1 for short wavelengths, factor for long ones
    factor, low = config.get("factor", 8.0), config.get("low_freq_factor", 1.0)
    high, original = config.get("high_freq_factor", 4.0), config.get("original_max_position_embeddings", 8192)
    wavelength = 2 * math.pi / default_inv_freq(config.base, dim)
    smooth = (original / wavelength - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    divisors = torch.where(wavelength < original / high, torch.ones_like(wavelength),
                           torch.where(wavelength > original / low, torch.full_like(wavelength, factor), blended))
    return divisors.to(torch.float32)


def gguf_metadata(config: ServedConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The RoPE metadata and tensors convert_hf_to_gguf.py writes for a Llama-family `config`: (metadata without
    the architecture prefix, {"rope_freqs": [n_rot // 2] float32} for llama3, else {})."""
    dim = int(config.head_dim)  # LlamaModel writes head_dim as rope.dimension_count
    metadata: dict[str, Any] = {"context_length": int(config.max_position_embeddings),
                                "rope.dimension_count": dim, "rope.freq_base": _float32(config.base)}
    kind, factor, tensors = config.rope_type, config.get("factor"), {}
    if kind == "linear" and factor is not None:
        metadata.update({"rope.scaling.type": "linear", "rope.scaling.factor": _float32(factor)})
    elif kind == "yarn" and factor is not None:
        metadata.update({"rope.scaling.type": "yarn", "rope.scaling.factor": _float32(factor),
                         "rope.scaling.original_context_length": int(config.get("original_max_position_embeddings"))})
        attention = config.get("attention_factor", config.get("attn_factor"))
        for key, value in (("yarn_ext_factor", config.get("extrapolation_factor")), ("yarn_attn_factor", attention),
                           ("yarn_beta_fast", config.get("beta_fast")), ("yarn_beta_slow", config.get("beta_slow"))):
            if value is not None:
                metadata[f"rope.scaling.{key}"] = _float32(value)
    elif kind in ("longrope", "su"):  # the type only: LlamaModel writes no rope_factors_long / _short tensors
        metadata["rope.scaling.type"] = "longrope"
    elif kind == "llama3":
        tensors["rope_freqs"] = _llama3_factors(config, dim)
    return metadata, tensors


def _attention_factor(metadata: dict, scaling_type: str, factor: float) -> tuple[float, float]:
    """(ext_factor, the attention factor llama_context passes to ggml_rope_ext) for the llama architecture."""
    ext_factor = 1.0 if scaling_type == "yarn" else 0.0
    attention = 1.0  # hparams.yarn_attn_factor: the llama architecture does not read rope.scaling.yarn_attn_factor
    if ext_factor != 0:
        # get_mscale(factor, 1), then divided by the 1 + 0.1 ln(factor) that rope_yarn multiplies in again
        attention = yarn_temperature(factor) / (1.0 + 0.1 * math.log(factor))
    return ext_factor, attention * metadata.get("rope.scaling.attn_factor", 1.0)


def derive_gguf(metadata: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None,
                n_ctx: int | None = None) -> EngineView | Unreadable:
    """llama.cpp's RoPE for a GGUF file's metadata and RoPE tensors (rope_freqs, rope_factors_long,
    rope_factors_short: `[n_rot // 2]`), in a context of `n_ctx` tokens (None: llama.cpp's 0, the training
    context). The same at every position: llama.cpp fixes its frequencies when the context is created."""
    tensors = tensors or {}
    scaling_type = metadata.get("rope.scaling.type", "linear")  # load_hparams' default name
    if scaling_type not in SCALING_TYPES:
        return Unreadable(f"llama.cpp asserts on rope.scaling.type {scaling_type!r}; it reads {SCALING_TYPES}")
    n_rot, base = int(metadata["rope.dimension_count"]), float(metadata.get("rope.freq_base", 10000.0))
    n_ctx_train = int(metadata["context_length"])
    n_ctx_orig = int(metadata.get("rope.scaling.original_context_length") or n_ctx_train)
    factor = float(metadata.get("rope.scaling.factor") or 0.0)
    freq_scale = 1.0 if scaling_type == "none" or factor == 0 else 1.0 / factor
    ext_factor, attention = _attention_factor(metadata, scaling_type, 1.0 / freq_scale)
    n_ctx = int(n_ctx or n_ctx_train)
    divisors = tensors.get("rope_freqs")  # get_rope_factors: rope_freqs first, then long or short by the context
    if divisors is None and scaling_type == "longrope":
        divisors = tensors.get("rope_factors_long" if n_ctx > n_ctx_orig else "rope_factors_short")
    theta = default_inv_freq(base, n_rot)
    if divisors is not None:
        theta = theta / divisors.to(torch.float64)
    inv_freq = freq_scale * theta
    if ext_factor != 0:  # rope_yarn: blend by the ramp between the correction dims, then the temperature
        low, high = yarn_correction_range(UNREAD_KEYS["rope.scaling.yarn_beta_fast"],
                                          UNREAD_KEYS["rope.scaling.yarn_beta_slow"], n_rot, base, n_ctx_orig)
        mix = (1 - yarn_ramp(low, high, n_rot // 2)) * ext_factor
        inv_freq = inv_freq * (1 - mix) + theta * mix
        attention *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    unread = [f"{key}={metadata[key]:g} (takes {'0.1 ln s + 1' if used is None else f'{used:g}'})"
              for key, used in UNREAD_KEYS.items() if key in metadata and metadata[key] != used]
    note = f"its llama architecture does not read {', '.join(unread)}" if unread else ""
    return EngineView(inv_freq, float(attention), n_ctx, scaling_type == "longrope", note)


def derive(config: ServedConfig, length: int) -> EngineView | Unreadable:
    """llama.cpp on the GGUF file convert_hf_to_gguf.py makes of `config`, run with its default context."""
    if config.rope_type not in _CONVERTED:
        return Unreadable(f"convert_hf_to_gguf.py warns 'Unknown RoPE type: {config.rope_type}' and writes no "
                          "scaling: llama.cpp would run the original RoPE")
    metadata, tensors = gguf_metadata(config)
    view = derive_gguf(metadata, tensors)
    if isinstance(view, Unreadable):
        return view
    notes = [view.note] if view.note else []
    if config.rope_type == "dynamic":
        notes.append("convert_hf_to_gguf.py writes no scaling for dynamic (only HunYuan's class does): the original "
                     "RoPE at every length")
    if config.rope_type in ("longrope", "su"):
        notes.append("LlamaModel writes no rope_factors_long / rope_factors_short tensors")
    if config.rope_type == "yarn" and (config.get("mscale") or config.get("mscale_all_dim")):
        notes.append("mscale and mscale_all_dim are not converted (the log multiplier line is commented out)")
    static = config.rope_type in ("dynamic", "longrope", "su")  # fixed with the context, where ropescope's vary
    return EngineView(view.inv_freq, view.attention_scale, view.longest_length, static, "; ".join(notes))


ENGINE = Engine(
    "llama.cpp", VERSION,
    "convert_hf_to_gguf.py (conversion/base.py TextModel.set_gguf_parameters, conversion/llama.py LlamaModel); "
    "src/llama-context.cpp llama_context::llama_context; ggml/src/ggml-cpu/ops.cpp rope_yarn",
    derive,
)
