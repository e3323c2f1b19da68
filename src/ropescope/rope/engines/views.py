"""What an engine reads (`ServedConfig`), what it computes from it (`EngineView`, or `Unreadable`), and the
comparison with ropescope's own frequencies (`compare`). Pure maths over torch and math, like the rest of `rope`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# Two float32 computations of the same formula in another operation order differ by a few 1e-7 (relative); a real
# difference between engines is larger by orders of magnitude (a YaRN temperature is 1.14 at x4).
TOLERANCE = 1e-5


@dataclass(frozen=True)
class ServedConfig:
    """The RoPE part of a saved config.json, as a serving engine reads it.

    rope_parameters: transformers 5's `rope_parameters` of one RoPE (rope_type, rope_theta, factor, ...);
    head_dim: the attention head size (head_dim, else hidden_size / num_attention_heads); max_position_embeddings
    and the top-level `original_max_position_embeddings` and `partial_rotary_factor` (Phi-3 and some families keep
    them beside it; None where absent); source: the transformers config it was read from, for the engine that runs
    transformers itself (None elsewhere).
    """

    rope_parameters: dict[str, Any]
    head_dim: int
    max_position_embeddings: int
    original_max_position_embeddings: int | None = None
    partial_rotary_factor: float | None = None
    source: Any = field(default=None, compare=False, repr=False)

    @property
    def rope_type(self) -> str:
        return self.rope_parameters.get("rope_type") or self.rope_parameters.get("type") or "default"

    @property
    def base(self) -> float:
        return float(self.rope_parameters.get("rope_theta") or 10000.0)

    def get(self, key: str, default: Any = None) -> Any:
        """A rope parameter, `default` where it is absent or null (a null an engine would pass on is a bug of the
        config, not of the engine)."""
        value = self.rope_parameters.get(key)
        return default if value is None else value


@dataclass(frozen=True)
class EngineView:
    """One engine's RoPE for a sequence of some length.

    inv_freq: `[rotary_dim // 2]` float64, the rotation speed of each pair as the engine applies it (a position
    scale such as linear interpolation's folded in); attention_scale: the factor on cos and sin (q.k scales by its
    square); longest_length: the most tokens the engine serves by default (None: no limit); static: one set of
    frequencies at every length, where the method's own change with the length; note: what the engine did with the
    config that the numbers alone do not say.
    """

    inv_freq: torch.Tensor
    attention_scale: float
    longest_length: int | None
    static: bool = False
    note: str = ""


@dataclass(frozen=True)
class Unreadable:
    """The engine cannot serve this config; reason: what it says or does (its error, or a silent fallback)."""

    reason: str


@dataclass(frozen=True)
class Engine:
    """A serving engine: its name, the version its derivation was read from, the file and function it cites, and
    `derive(config: ServedConfig, length: int) -> EngineView | Unreadable`."""

    name: str
    version: str
    source: str
    derive: Callable[[ServedConfig, int], EngineView | Unreadable]


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    """`base^(-2i/dim)` for i < dim / 2, float64: the original RoPE (Su et al. 2021, eq. 15). `[dim // 2]`"""
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def llama3_inv_freq(base: float, dim: int, factor: float, low: float, high: float, original: int) -> torch.Tensor:
    """Llama 3.1's per-pair rule as vLLM and SGLang both write it: keep short wavelengths, divide long ones by
    `factor`, blend between `original / high` and `original / low`."""
    inv_freq = default_inv_freq(base, dim)
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low) if low != high else torch.zeros_like(inv_freq)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelength < original / high, inv_freq,
                       torch.where(wavelength > original / low, inv_freq / factor, blended))


def yarn_ramp(low: float, high: float, pairs: int) -> torch.Tensor:
    """YaRN's ramp over pair indices, 0 below `low`, 1 above `high` (a zero width made 0.001). `[pairs]` float64"""
    if low == high:
        high += 0.001
    return torch.clamp((torch.arange(pairs, dtype=torch.float64) - low) / (high - low), 0, 1)


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float, original: int,
                          truncate: bool = True) -> tuple[float, float]:
    """The pair indices between which YaRN blends (Peng et al. 2023, sec. 3.2), as every engine here writes it."""

    def pair_of(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_of(beta_fast), pair_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_temperature(factor: float, mscale: float = 1.0) -> float:
    """0.1 mscale ln(s) + 1 for s > 1, else 1 (Peng et al. 2023, eq. 22; DeepSeek-V2's mscale)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def relative_difference(values: torch.Tensor, reference: torch.Tensor) -> float:
    """max |values - reference| / |reference| over the pairs (inf where the shapes differ)."""
    values, reference = values.to(torch.float64), reference.to(torch.float64)
    if values.shape != reference.shape:
        return math.inf
    return float(((values - reference).abs() / reference.abs()).max())


def compare(view: EngineView | Unreadable, rope_type: str, inv_freq: torch.Tensor, attention_scale: float,
            length: int) -> dict[str, Any]:
    """An engine's view against ropescope's `inv_freq [pairs]` and `attention_scale` at `length` tokens: the largest
    relative difference of each (None where unreadable) and the verdict: "same", "differs: ... by ...", "serves it
    statically: ..." (one set of frequencies where ropescope's change with the length) or "cannot read TYPE: ..."."""
    if isinstance(view, Unreadable):
        return {"inv_freq_difference": None, "attention_scale_difference": None, "longest_length": None,
                "engine_attention_scale": None, "verdict": f"cannot read {rope_type}: {view.reason}"}
    frequency = relative_difference(view.inv_freq, inv_freq)
    scale = abs(view.attention_scale - attention_scale) / abs(attention_scale)
    parts = []
    if frequency > TOLERANCE:
        parts.append(f"inv_freq by {frequency:.3g}" if math.isfinite(frequency) else
                     f"rotates {view.inv_freq.numel()} pairs, not {inv_freq.numel()}")
    if scale > TOLERANCE:
        parts.append(f"attention scale by {scale:.3g} ({view.attention_scale:.6g}, not {attention_scale:.6g})")
    if view.longest_length is not None and view.longest_length < length:
        parts.append(f"serves at most {view.longest_length} tokens")
    if not parts:
        verdict = "same"
    elif view.static and frequency > TOLERANCE:
        verdict = "serves it statically: " + ", ".join(parts)
    else:
        verdict = "differs: " + ", ".join(parts)
    return {"inv_freq_difference": frequency if math.isfinite(frequency) else None, "attention_scale_difference": scale,
            "longest_length": view.longest_length, "engine_attention_scale": view.attention_scale, "verdict": verdict}
