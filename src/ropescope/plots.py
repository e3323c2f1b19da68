"""Every figure ropescope draws: one function per figure, each drawn from rows (lists of dicts) and saved to a path."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(figure, path: str | Path) -> Path:
    """Save atomically (temp file, then rename), so an interrupted run never leaves half an image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{path.suffix}")
    figure.savefig(temporary, dpi=120, bbox_inches="tight")
    plt.close(figure)
    os.replace(temporary, path)
    return path


def _series(rows: list[dict], key: str, x: str, y: str) -> dict[str, tuple[list, list]]:
    series: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for row in rows:
        xs, ys = series[row[key]]
        xs.append(row[x])
        ys.append(row[y])
    return series


def plot_frequencies(rows: list[dict], path: str | Path, pretrained_length: int | None = None) -> Path:
    """Per-pair rotation wavelength of each method (left) and its ratio to the original RoPE (right).

    rows: {"method", "pair", "wavelength", "ratio"}. The figure that tells PI (every pair stretched by the factor)
    from NTK (fast pairs kept, slow ones stretched) from YaRN (fast kept, slow interpolated, a ramp between).
    """
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, (pairs, wavelengths) in _series(rows, "method", "pair", "wavelength").items():
        left.plot(pairs, wavelengths, marker=".", label=method)
    for method, (pairs, ratios) in _series(rows, "method", "pair", "ratio").items():
        right.plot(pairs, ratios, marker=".", label=method)
    if pretrained_length:
        left.axhline(pretrained_length, color="grey", linestyle="--", linewidth=1)
        left.annotate(f"pretrained length {pretrained_length}", (0, pretrained_length), color="grey",
                      xytext=(2, 3), textcoords="offset points", fontsize=8)
    left.set(yscale="log", xlabel="dimension pair i", ylabel="wavelength 2π/θᵢ (tokens)",
             title="Rotation wavelength per dimension pair")
    right.set(yscale="log", xlabel="dimension pair i", ylabel="wavelength / original wavelength",
              title="Stretch relative to the original RoPE")
    right.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    right.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    return save_figure(figure, path)
