"""Rows describing each method's per-pair rotation wavelengths, for tables and the frequency figure."""

from __future__ import annotations

import math

from ropescope.rope import RopeSpec, rope_frequencies


def frequency_rows(
    specs: list[RopeSpec], head_dim: int, base: float = 10000.0, seq_len: int | None = None
) -> list[dict]:
    """One row per method and dimension pair: wavelength 2π/θᵢ and its ratio to the original RoPE's."""
    original, _ = rope_frequencies(RopeSpec("default"), head_dim, base)
    rows = []
    for spec in specs:
        inv_freq, attention_scale = rope_frequencies(spec, head_dim, base, seq_len)
        for pair, (theta, theta_original) in enumerate(zip(inv_freq.tolist(), original.tolist())):
            rows.append({
                "method": spec.label(), "pair": pair, "inv_freq": theta, "wavelength": 2 * math.pi / theta,
                "ratio": theta_original / theta, "attention_scale": attention_scale,
                "head_dim": head_dim, "base": base, "seq_len": seq_len,
            })
    return rows
