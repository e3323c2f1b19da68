"""RoPE as llama.cpp reads it from a GGUF file: `LlamaCppRope` (the keys), `llamacpp_rope(spec, ...)` (the keys
computing a spec, or a one-line refusal for what llama.cpp cannot express) and `LlamaCppRope.frequencies` (what
llama.cpp computes from them, re-derived from llama.cpp 0.3.x as vendored by llama-cpp-python 0.3.36:
src/llama-model.cpp `load_hparams`, src/llama-context.cpp's YaRN attention factor, ggml-cpu/ops.cpp `rope_yarn`).
Pure: no model, no file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ropescope.errors import RopescopeError
from ropescope.rope import METHODS, RopeSpec, rope_frequencies

# llama.cpp reads YaRN's ramp from its context parameters (llama-context.cpp), never from the file: these.
LLAMACPP_YARN_BETAS = (32.0, 1.0)
# Where an export keeps the spec ropescope recorded (the config's CONFIG_KEY record, as JSON), so that ropescope
# reads its own export back: transformers' GGUF loader ignores llama.cpp's RoPE scaling keys for Llama.
RECORD_KEY = "ropescope.rope"


@dataclass(frozen=True)
class LlamaCppRope:
    """A model's RoPE as llama.cpp's llama architecture reads it from a GGUF file (keys `llama.rope.*`).

    llama.cpp rotates pair i of a head by `position * freq_scale * freq_base^(-2i/dimension_count) / rope_freqs[i]`
    (YaRN: ramped between that and `freq_scale` = 1 per pair) and multiplies cos and sin by `attn_factor`, and for
    YaRN also by its own 0.1 ln(factor) + 1 (llama-context.cpp, ggml-cpu/ops.cpp `rope_yarn`).
    """

    freq_base: float
    dimension_count: int
    scaling_type: str  # rope.scaling.type: none, linear or yarn
    factor: float | None = None  # rope.scaling.factor (llama.cpp's freq_scale is its inverse)
    original_context_length: int | None = None  # rope.scaling.original_context_length, YaRN's ramp is relative to it
    attn_factor: float = 1.0  # rope.scaling.attn_factor
    rope_freqs: tuple[float, ...] | None = None  # [dimension_count // 2] per-pair divisors of the frequency

    def frequencies(self) -> tuple[torch.Tensor, float]:
        """What llama.cpp computes from these keys, in float64: `(inv_freq [dimension_count // 2], scale of cos
        and sin)`, for checking an export against ropescope's own frequencies (ggml_rope_yarn_corr_dims)."""
        dim, base = self.dimension_count, self.freq_base
        extrapolated = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        if self.rope_freqs is not None:
            extrapolated = extrapolated / torch.tensor(self.rope_freqs, dtype=torch.float64)
        if self.scaling_type == "none":
            return extrapolated, self.attn_factor
        interpolated = extrapolated / self.factor
        if self.scaling_type == "linear":
            return interpolated, self.attn_factor
        low, high = _yarn_corr_dims(dim, self.original_context_length, base)
        ramp = 1 - torch.clamp((torch.arange(dim // 2, dtype=torch.float64) - low) / max(0.001, high - low), 0, 1)
        inv_freq = interpolated * (1 - ramp) + extrapolated * ramp
        return inv_freq, self.attn_factor * llamacpp_mscale(self.factor)


def llamacpp_mscale(factor: float) -> float:
    """The part of YaRN's attention factor llama.cpp computes itself (llama-context.cpp `get_mscale`, then
    ggml's rope_yarn): 0.1 ln(factor) + 1, 1 for factor <= 1."""
    return 1.0 if factor <= 1 else 1 + 0.1 * math.log(factor)


def _yarn_corr_dims(dim: int, original: int, base: float) -> tuple[float, float]:
    def corr_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    beta_fast, beta_slow = LLAMACPP_YARN_BETAS
    return max(0.0, math.floor(corr_dim(beta_fast))), min(dim - 1.0, math.ceil(corr_dim(beta_slow)))


def llamacpp_rope(spec: RopeSpec, dim: int, base: float) -> LlamaCppRope:
    """The llama.cpp keys computing `spec` for a rotary dimension `dim` and pretrained base; RopescopeError in one
    line for what llama.cpp cannot express (it computes the frequencies once per file, never per length)."""
    params, method = spec.params, spec.method
    if spec.logit_scale is not None:
        # the llama architecture scales the logits by 1/sqrt(head_dim) and its YaRN factor alone (docs/export.md)
        raise RopescopeError(
            f"llama.cpp cannot express logit_scale={spec.logit_scale}: its llama architecture takes no "
            f"extra attention scale from the file; accepted: a model extended without a logit_scale")
    inv_freq, attention_scale = rope_frequencies(spec, dim, base)
    if method == "default":
        return LlamaCppRope(base, dim, "none")
    if method == "linear":
        return LlamaCppRope(base, dim, "linear", float(params["factor"]))
    if method == "ntk":  # the original RoPE with a larger base, as Code Llama ships it
        return LlamaCppRope(float(rope_frequencies_base(spec, dim, base)), dim, "none")
    if method == "yarn":
        return _llamacpp_yarn(spec, dim, base, attention_scale)
    if method == "longrope" and params["short_factor"] != params["long_factor"]:
        raise RopescopeError(
            "llama.cpp cannot express longrope with two factor sets in a llama-architecture file: it takes one "
            "rope_freqs tensor and never switches from short_factor to long_factor past "
            f"original_max_position_embeddings={params['original_max_position_embeddings']}; accepted: longrope "
            "with short_factor equal to long_factor, default, linear, ntk, yarn, llama3"
        )
    if METHODS[method].dynamic and method != "longrope":
        raise RopescopeError(
            f"llama.cpp cannot express {method}: it computes the frequencies once from the file, while {method} "
            "recomputes them at every length; accepted: default, linear, ntk, yarn, llama3, longrope with one "
            "factor set, and static methods"
        )
    # per pair: llama.cpp divides the original RoPE's frequency by rope_freqs[i] (convert_hf_to_gguf's llama3)
    original, _ = rope_frequencies(RopeSpec("default"), dim, base)
    divisors = original.double() / inv_freq.double()
    return LlamaCppRope(base, dim, "none", attn_factor=attention_scale, rope_freqs=tuple(divisors.tolist()))


def rope_frequencies_base(spec: RopeSpec, dim: int, base: float) -> float:
    """The base of a method that is the original RoPE with another base (ntk), from `RopeMethod.rope_parameters`."""
    return float(METHODS[spec.method].rope_parameters(spec.params, dim, base)["rope_theta"])


def _llamacpp_yarn(spec: RopeSpec, dim: int, base: float, attention_scale: float) -> LlamaCppRope:
    params = spec.params
    if not params["truncate"]:
        raise RopescopeError("llama.cpp cannot express yarn with truncate=false: it rounds the ramp's ends to whole "
                             "pairs (ggml_rope_yarn_corr_dims); accepted: truncate=true")
    if (params["beta_fast"], params["beta_slow"]) != LLAMACPP_YARN_BETAS:
        raise RopescopeError(
            f"llama.cpp cannot express yarn with beta_fast={params['beta_fast']:g}, beta_slow={params['beta_slow']:g}"
            " from the file: it reads them from its context parameters (yarn_beta_fast, yarn_beta_slow), 32 and 1 "
            "unless the server is told otherwise; accepted: beta_fast=32, beta_slow=1"
        )
    factor = float(params["factor"])
    # llama.cpp multiplies by its own 0.1 ln(s) + 1; the rest of YaRN's attention factor goes in attn_factor
    return LlamaCppRope(base, dim, "yarn", factor, int(params["original_max_position_embeddings"]),
                        attn_factor=attention_scale / llamacpp_mscale(factor))
