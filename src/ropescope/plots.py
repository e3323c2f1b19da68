"""Every figure, drawn from rows (lists of dicts) with matplotlib's Agg backend and saved to a path."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _method_label(row: dict) -> str:
    """'yarn x4' for an extension, the bare method where there is no factor."""
    method = row.get("method") or "default"
    factor = row.get("factor")
    if factor in (None, "", 1, 1.0) or method in ("default", "none"):
        return str(method)
    return f"{method} x{float(factor):g}"


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + ".tmp" + path.suffix)  # keeps the suffix that picks the format
    figure.savefig(temporary, dpi=120, bbox_inches="tight")
    plt.close(figure)
    temporary.replace(path)
    return path


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def plot_entropy_profile(rows: list[dict], path, *, pretrained_length: int | None = None, layer: int | None = None):
    """Attention entropy against query position, one line per method (mean over layers and heads, or one layer);
    the pretrained length as a vertical line. Rows from `ropescope.attention.profiles.entropy_profile`."""
    lines: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    lengths = {row["length"] for row in rows}
    uniform: dict[float, float] = {}
    for row in rows:
        if layer is not None and row["layer"] != layer:
            continue
        label = _method_label(row) + (f" @{row['length']}" if len(lengths) > 1 else "")
        middle = (row["position_start"] + row["position_end"] - 1) / 2
        lines[label][middle].append(row["entropy"])
        uniform[middle] = row["entropy_max"]
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, points in sorted(lines.items()):
        positions = sorted(points)
        axes.plot(positions, [_mean(points[p]) for p in positions], label=label)
    positions = sorted(uniform)
    axes.plot(positions, [uniform[p] for p in positions], color="grey", linestyle=":", label="uniform attention")
    if pretrained_length:
        axes.axvline(pretrained_length, color="black", linestyle="--", linewidth=1, label="pretrained length")
    axes.set_xlabel("query position")
    axes.set_ylabel("attention entropy (nats)" + ("" if layer is None else f", layer {layer}"))
    axes.set_title("Attention entropy by position" + (" (mean over layers and heads)" if layer is None else ""))
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_attention_distance(rows: list[dict], path, *, layer: int | None = None):
    """The paper's Figure 2 view: attention mass against (rescaled) key distance, one panel per length, one line
    per method (mean over layers and heads, or one layer). Rows from `patterns.distance_distribution`."""
    panels: dict[int, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    edges: dict[int, tuple[int, int]] = {}
    for row in rows:
        if layer is not None and row["layer"] != layer:
            continue
        label = row.get("role") or _method_label(row)
        panels[row["length"]][label][row["bin"]].append(row["mass"])
        edges[row["bin"]] = (row["distance_start"], row["distance_end"])
    lengths = sorted(panels)
    figure, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), sharey=True, squeeze=False)
    bins = sorted(edges)
    for axis, length in zip(axes[0], lengths):
        for label, masses in sorted(panels[length].items()):
            axis.plot(bins, [_mean(masses[b]) for b in bins], marker="o", markersize=3, label=label)
        axis.set_xticks(bins, [f"{edges[b][0]}" for b in bins], rotation=60, fontsize=7)
        axis.set_xlabel("key distance x pretrained/length (bin start)")
        axis.set_title(f"length {length}")
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("attention mass" + ("" if layer is None else f", layer {layer}"))
    return _save(figure, path)


def plot_pattern_preservation(rows: list[dict], path):
    """Jensen-Shannon divergence from the pretrained pattern (mean over layers), per method and length.
    Rows from `patterns.pattern_preservation` (the layer == "mean" rows)."""
    values: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if row["layer"] == "mean":
            values[_method_label(row)][row["length"]] = row["js_divergence"]
    labels = sorted(values)
    lengths = sorted({length for per in values.values() for length in per})
    figure, axes = plt.subplots(figsize=(max(5, 1.2 * len(labels) * max(1, len(lengths))), 4))
    width = 0.8 / max(1, len(lengths))
    for index, length in enumerate(lengths):
        axes.bar([i + index * width for i in range(len(labels))],
                 [values[label].get(length, math.nan) for label in labels], width=width, label=f"length {length}")
    axes.set_xticks([i + width * (len(lengths) - 1) / 2 for i in range(len(labels))], labels)
    axes.set_ylabel("JS divergence from pretrained pattern (nats)")
    axes.set_title("Pattern preservation (lower = pattern kept)")
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_entropy_heatmap(rows: list[dict], path):
    """Accuracy and answering-query entropy laid out as the needle grid (depth x length), side by side, one pair
    of panels per method. Rows from `uncertainty.retrieval_attention` (evaluation rows with entropy)."""
    from ropescope.attention.uncertainty import as_bool

    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[_method_label(row)].append(row)
    figure, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    for (label, group), (accuracy_axis, entropy_axis) in zip(sorted(groups.items()), axes):
        lengths = sorted({row["length"] for row in group})
        depths = sorted({float(row["depth_percent"]) for row in group})
        cells: dict[tuple, list[dict]] = defaultdict(list)
        for row in group:
            cells[(float(row["depth_percent"]), row["length"])].append(row)

        def grid(value):
            return [[_mean(value(r) for r in cells[(depth, length)]) for length in lengths] for depth in depths]

        for axis, values, title, colormap in (
            (accuracy_axis, grid(lambda r: float(as_bool(r["correct"]))), "accuracy", "RdYlGn"),
            (entropy_axis, grid(lambda r: float(r["entropy"])), "answer-query entropy (nats)", "viridis"),
        ):
            image = axis.imshow(values, aspect="auto", cmap=colormap, origin="upper",
                                vmin=0.0 if title == "accuracy" else None, vmax=1.0 if title == "accuracy" else None)
            axis.set_xticks(range(len(lengths)), [str(length) for length in lengths], rotation=45, fontsize=8)
            axis.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths], fontsize=8)
            axis.set_xlabel("context length")
            axis.set_ylabel("needle depth (%)")
            axis.set_title(f"{label}: {title}")
            figure.colorbar(image, ax=axis)
    figure.tight_layout()
    return _save(figure, path)
