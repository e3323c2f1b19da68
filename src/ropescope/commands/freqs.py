"""Rows describing each method's per-pair rotation wavelengths, for tables and the frequency figure."""

from __future__ import annotations

import math
from pathlib import Path

from ropescope.io.plots import plot_frequencies
from ropescope.io.results import write_rows
from ropescope.io.rows import FrequencyRow
from ropescope.rope import RopeSpec, parse_spec, rope_frequencies


def frequency_rows(
    specs: list[RopeSpec], head_dim: int, base: float = 10000.0, seq_len: int | None = None
) -> list[dict]:
    """One row per method and dimension pair: wavelength 2π/θᵢ and its ratio to the original RoPE's."""
    original, _ = rope_frequencies(RopeSpec("default"), head_dim, base)
    rows = []
    for spec in specs:
        inv_freq, attention_scale = rope_frequencies(spec, head_dim, base, seq_len)
        for pair, (theta, theta_original) in enumerate(zip(inv_freq.tolist(), original.tolist())):
            rows.append(FrequencyRow(
                method=spec.label(), pair=pair, inv_freq=theta, wavelength=2 * math.pi / theta,
                ratio=theta_original / theta, attention_scale=attention_scale,
                head_dim=head_dim, base=base, seq_len=seq_len,
            ).to_dict())
    return rows


def wavelength_table(rows: list[dict]) -> str:
    """The wavelengths of `frequency_rows` as a text table: one line per pair, one column per method."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    pairs = sorted({row["pair"] for row in rows})
    wavelengths = {(row["method"], row["pair"]): row["wavelength"] for row in rows}
    lines = [f"{'pair':>4} " + " ".join(f"{method:>14}" for method in methods) + "   (wavelength in tokens)"]
    lines += [f"{pair:>4} " + " ".join(f"{wavelengths[(method, pair)]:>14.1f}" for method in methods) for pair in pairs]
    return "\n".join(lines)


def run_frequencies(methods=("default", "linear", "ntk", "yarn", "llama3"), *, factor: float | None = 4.0,
                    original_max_position_embeddings: int = 256, head_dim: int = 64, base: float = 10000.0,
                    seq_len: int | None = None, out: str | Path = "results/freqs") -> list[dict]:
    """`ropescope freqs`: the rows of `methods` (named as in `rope.parse_spec`) -> out/frequencies.csv and
    out/frequencies.png; returns the rows."""
    specs = [parse_spec(method, factor, original_max_position_embeddings) for method in methods]
    rows = frequency_rows(specs, head_dim, base, seq_len)
    out = Path(out)
    write_rows(rows, out / "frequencies.csv")
    plot_frequencies(rows, out / "frequencies.png", original_max_position_embeddings)
    return rows
