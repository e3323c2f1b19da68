"""Every figure ropescope draws: one function per figure, each drawn from rows (lists of dicts) and saved to a path."""

from __future__ import annotations

import math
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


def _series_label(row: dict) -> str:
    label = f"{row.get('model', 'model')} / {row.get('method', 'default')}"
    if row.get("factor") not in (None, ""):
        label += f" x{row['factor']:g}" if isinstance(row["factor"], (int, float)) else f" x{row['factor']}"
    return label


def plot_perplexity(rows: list[dict], path, pretrained_length: int | None = None) -> Path:
    """Perplexity against evaluation length, one colour per model/method, one line style per protocol.

    rows: perplexity rows (length, perplexity, model, method, factor, protocol). Log-2 x axis; the pretrained
    length, when given, drawn as a dashed vertical line.
    """
    rows = [row for row in rows if row.get("task", "perplexity") == "perplexity"]
    protocols = sorted({row.get("protocol") for row in rows}, key=str)
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows:
        series.setdefault((_series_label(row), row.get("protocol")), []).append((int(row["length"]),
                                                                                 float(row["perplexity"])))
    colors = {label: f"C{index}" for index, label in enumerate(dict.fromkeys(label for label, _ in series))}
    styles = {protocol: ("-", "--", ":", "-.")[index % 4] for index, protocol in enumerate(protocols)}
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for (label, protocol), points in series.items():
        points.sort()
        name = label + (f" ({protocol})" if len(protocols) > 1 else "")
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colors[label],
                  linestyle=styles[protocol], label=name)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    lengths = sorted({int(row["length"]) for row in rows})
    if lengths:
        axes.set_xticks(lengths, [str(length) for length in lengths])
    if pretrained_length:
        axes.axvline(pretrained_length, color="grey", linestyle="--", linewidth=1)
        axes.annotate(f"pretrained {pretrained_length}", (pretrained_length, 1), xycoords=("data", "axes fraction"),
                      xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
    axes.set_xlabel("evaluation length (tokens)")
    axes.set_ylabel("perplexity")
    axes.set_title("Perplexity against length")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    return save_figure(figure, path)


def plot_retrieval_heatmap(rows: list[dict], path, title: str | None = None, value: str = "score") -> Path:
    """The needle-in-a-haystack heatmap: mean `value` per cell, length on x, depth percent on y (0 at the top).

    rows: passkey or needle rows (length, depth_percent, score). Green is found, red is missed.
    """
    lengths = sorted({int(row["length"]) for row in rows})
    depths = sorted({float(row["depth_percent"]) for row in rows})
    cells: dict[tuple[int, float], list[float]] = {}
    for row in rows:
        cells.setdefault((int(row["length"]), float(row["depth_percent"])), []).append(float(row[value]))
    grid = [[(sum(cells[(length, depth)]) / len(cells[(length, depth)])) if (length, depth) in cells else math.nan
             for length in lengths] for depth in depths]
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.45 * len(depths)))
    image = axes.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for y, line in enumerate(grid):
        for x, cell in enumerate(line):
            if not math.isnan(cell):
                axes.text(x, y, f"{cell:.2f}", ha="center", va="center", fontsize=7)
    axes.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    axes.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths])
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("needle depth (%)")
    task = rows[0].get("task", "retrieval") if rows else "retrieval"
    axes.set_title(title or f"{task}: {_series_label(rows[0]) if rows else ''}")
    figure.colorbar(image, ax=axes, label="accuracy" if value == "score" and task == "passkey" else value)
    return save_figure(figure, path)
