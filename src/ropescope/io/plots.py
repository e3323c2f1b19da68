"""Every figure ropescope draws, from rows (lists of dicts): `NAME_figure(rows, ...)` draws one and returns the
matplotlib Figure (what a test inspects); `plot_NAME(rows, path, ...)` draws it and saves it atomically to `path`."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from statistics import median

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from ropescope.io.results import atomic_path  # noqa: E402
from ropescope.io.rows import FULL_LAYER_TYPE, as_bool  # noqa: E402


def save_figure(figure, path: str | Path) -> Path:
    """Save atomically (a unique temporary file, then rename), so an interrupted run never leaves half an image;
    the figure is closed (its artists stay readable)."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


def _series(rows: list[dict], key: str, x: str, y: str) -> dict[str, tuple[list, list]]:
    series: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for row in rows:
        xs, ys = series[row[key]]
        xs.append(row[x])
        ys.append(row[y])
    return series


def frequencies_figure(rows: list[dict], original_max_position_embeddings: int | None = None) -> Figure:
    """Per-pair rotation wavelength of each method (left) and its ratio to the original RoPE (right).

    rows: {"method", "pair", "wavelength", "ratio"}. The figure that tells PI (every pair stretched by the factor)
    from NTK (fast pairs kept, slow ones stretched) from YaRN (fast kept, slow interpolated, a ramp between).
    """
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, (pairs, wavelengths) in _series(rows, "method", "pair", "wavelength").items():
        left.plot(pairs, wavelengths, marker=".", label=method)
    for method, (pairs, ratios) in _series(rows, "method", "pair", "ratio").items():
        right.plot(pairs, ratios, marker=".", label=method)
    if original_max_position_embeddings:
        left.axhline(original_max_position_embeddings, color="grey", linestyle="--", linewidth=1)
        left.annotate(f"pretrained length {original_max_position_embeddings}", (0, original_max_position_embeddings),
                      color="grey",
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
    return figure


def plot_frequencies(rows: list[dict], path: str | Path,
                     original_max_position_embeddings: int | None = None) -> Path:
    """`frequencies_figure`, saved to `path`."""
    return save_figure(frequencies_figure(rows, original_max_position_embeddings), path)


def perplexity_axis(axis, values: list[float]) -> None:
    """A log y axis only where the range needs it (over 20x), and plain tick numbers (not 2.2 x 10^2) either way."""
    if values and max(values) > 20 * min(values):
        axis.set_yscale("log")
    axis.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axis.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))


def _mean_by(rows: list[dict], keys: tuple[str, ...], value: str) -> dict[tuple, float]:
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        if row.get(value) is not None:
            groups[tuple(row[key] for key in keys)].append(float(row[value]))
    return {key: sum(values) / len(values) for key, values in groups.items()}


def retrieval_figure(rows: list[dict], title: str | None = None, value: str = "score") -> Figure:
    """Mean `value` per (length, depth) cell (length on x, depth percent on y, 0 at the top), one panel per series
    (a study's variant, or a command's model and method), each cell written in; green is found, red is missed.

    rows: retrieval rows of one task (length, depth_percent, score and the series' labels). Cells without rows
    stay blank. title: default "<task>: <series>" for one series, "<task>" for several.
    """
    series = list(dict.fromkeys(_series_label(row) for row in rows))
    labelled = [{**row, "series": _series_label(row)} for row in rows]
    lengths = sorted({int(row["length"]) for row in rows})
    depths = sorted({float(row["depth_percent"]) for row in rows})
    cells = _mean_by(labelled, ("series", "length", "depth_percent"), value)
    columns = min(4, len(series))
    lines = -(-len(series) // columns)
    figure, axes = plt.subplots(lines, columns, squeeze=False,
                                figsize=(1.4 + (0.6 + 0.9 * len(lengths)) * columns, 1.0 + (0.5 + 0.45 * len(depths)) * lines))
    for index, axis in enumerate(axes.flat):
        if index >= len(series):
            axis.axis("off")
            continue
        grid = [[cells.get((series[index], length, depth), math.nan) for length in lengths] for depth in depths]
        image = axis.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for y, line in enumerate(grid):
            for x, cell in enumerate(line):
                if not math.isnan(cell):
                    axis.text(x, y, f"{cell:.2f}", ha="center", va="center", fontsize=7)
        axis.set_xticks(range(len(lengths)), [str(length) for length in lengths], fontsize=7)
        axis.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths], fontsize=7)
        if len(series) > 1:
            axis.set_title(series[index], fontsize=9)
        if index % columns == 0:
            axis.set_ylabel("depth (%)")
    task = rows[0].get("task", "retrieval") if rows else "retrieval"
    figure.supxlabel("context length (tokens)")
    figure.colorbar(image, ax=axes, shrink=0.8, label=value)
    figure.suptitle(title or (f"{task}: {series[0]}" if len(series) == 1 else task))
    return figure


def plot_retrieval(rows: list[dict], path: str | Path, title: str | None = None, value: str = "score") -> Path:
    """`retrieval_figure`, saved to `path`."""
    return save_figure(retrieval_figure(rows, title=title, value=value), path)


def method_label(row: dict) -> str:
    """'yarn x4' for an extension, the bare method where there is no factor (RopeSpec.label's form, from a row)."""
    method = row.get("method") or "default"
    factor = row.get("factor")
    if factor in (None, "", 1, 1.0) or method in ("default", "none"):
        return str(method)
    return f"{method} x{float(factor):g}"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _of_layer_type(row: dict, layer_type: str | None) -> bool:
    return layer_type is None or row.get("layer_type", FULL_LAYER_TYPE) == layer_type


def _layers_named(layer_type: str | None) -> str:
    return "mean over layers and heads)" if layer_type is None else f"mean over {layer_type} layers and heads)"


def entropy_position_figure(rows: list[dict], original_max_position_embeddings: int | None = None, *,
                            length: int | None = None, layer: int | None = None,
                            layer_type: str | None = None) -> Figure:
    """Attention entropy against query position, one line per series (a study's variant, or a command's method)
    and length, the mean over the rows at each position (layers and heads, or one `layer`); the entropy of uniform
    attention where the rows give it, and the pretrained length as a vertical line.

    rows: entropy profile rows (length, layer, position_start / position_end or position, entropy, entropy_max).
    length: draw only that length (default: every length in the rows). layer_type: only the layers of that type.
    """
    rows = [row for row in rows if (length is None or int(row["length"]) == length)
            and (layer is None or row["layer"] == layer) and _of_layer_type(row, layer_type)]
    lengths = sorted({int(row["length"]) for row in rows})
    lines: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    uniform: dict[float, float] = {}
    for row in rows:
        position = row["position"] if "position" in row else (row["position_start"] + row["position_end"] - 1) / 2
        label = _series_label(row) + (f" @{row['length']}" if len(lengths) > 1 else "")
        lines[label][position].append(float(row["entropy"]))
        if row.get("entropy_max") is not None:
            uniform[position] = float(row["entropy_max"])
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, points in lines.items():
        positions = sorted(points)
        axis.plot(positions, [_mean(points[p]) for p in positions], marker=".", label=label)
    if uniform:
        positions = sorted(uniform)
        axis.plot(positions, [uniform[p] for p in positions], color="grey", linestyle=":", label="uniform attention")
    if original_max_position_embeddings:
        axis.axvline(original_max_position_embeddings, color="black", linestyle="--", linewidth=1,
                     label="pretrained length")
    axis.set(xlabel="query position (tokens)",
             ylabel="attention entropy (nats, " + (_layers_named(layer_type) if layer is None else f"layer {layer})"),
             title="Attention entropy against position" + (f", {lengths[0]}-token inputs" if len(lengths) == 1 else ""))
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def plot_entropy_position(rows: list[dict], path, original_max_position_embeddings: int | None = None, *,
                          length: int | None = None, layer: int | None = None, layer_type: str | None = None) -> Path:
    """`entropy_position_figure`, saved to `path`."""
    return save_figure(entropy_position_figure(rows, original_max_position_embeddings, length=length, layer=layer,
                                               layer_type=layer_type), path)


def attention_distance_figure(rows: list[dict], *, layer: int | None = None, layer_type: str | None = None) -> Figure:
    """The paper's Figure 2 view: attention mass against key distance (divided by input length / pretrained
    length), one panel per series (a study's variant, or a command's model and method), one line per input length,
    the mean over layers and heads (or one `layer`): overlapping lines mean the extension kept the pattern.

    rows: distance rows (length, layer, distance_start, mass and the series' labels). layer_type: only its layers.
    """
    rows = [row for row in rows if (layer is None or row["layer"] == layer) and _of_layer_type(row, layer_type)]
    labelled = [{**row, "series": _series_label(row)} for row in rows]
    series = list(dict.fromkeys(row["series"] for row in labelled))
    columns = min(4, len(series))
    lines = -(-len(series) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.4 * columns, 2.8 * lines), squeeze=False, sharey=True)
    masses = _mean_by(labelled, ("series", "length", "distance_start"), "mass")
    for index, axis in enumerate(axes.flat):
        if index >= len(series):
            axis.axis("off")
            continue
        for length in sorted({key[1] for key in masses if key[0] == series[index]}):
            points = sorted((start, mass) for (name, size, start), mass in masses.items()
                            if name == series[index] and size == length)
            # distance 0 (the query itself) drawn at 0.5 on the log axis
            axis.plot([max(start, 0.5) for start, _ in points], [mass for _, mass in points], marker=".",
                      label=f"{length} tokens")
        axis.set(xscale="log", yscale="log", title=series[index])
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
        if index // columns == lines - 1:
            axis.set_xlabel("key distance x pretrained / input length")
        if index % columns == 0:
            axis.set_ylabel("attention mass" + ("" if layer is None else f", layer {layer}"))
    figure.suptitle("Attention against distance: pretrained vs extended length"
                    + ("" if layer_type is None else f", {layer_type} layers"))
    figure.tight_layout()
    return figure


def plot_attention_distance(rows: list[dict], path, *, layer: int | None = None, layer_type: str | None = None) -> Path:
    """`attention_distance_figure`, saved to `path`."""
    return save_figure(attention_distance_figure(rows, layer=layer, layer_type=layer_type), path)


def pattern_preservation_figure(rows: list[dict]) -> Figure:
    """Jensen-Shannon divergence from the pretrained pattern (mean over layers), per method and length.
    Rows from `patterns.pattern_preservation` (the layer == "mean" rows)."""
    values: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if row["layer"] == "mean":
            values[method_label(row)][row["length"]] = row["js_divergence"]
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
    return figure


def plot_pattern_preservation(rows: list[dict], path) -> Path:
    """`pattern_preservation_figure`, saved to `path`."""
    return save_figure(pattern_preservation_figure(rows), path)


def entropy_heatmap_figure(rows: list[dict]) -> Figure:
    """Accuracy and answering-query entropy laid out as the needle grid (depth x length), side by side, one pair
    of panels per method. Rows from `uncertainty.retrieval_attention` (evaluation rows with entropy)."""

    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[method_label(row)].append(row)
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
    return figure


def plot_entropy_heatmap(rows: list[dict], path) -> Path:
    """`entropy_heatmap_figure`, saved to `path`."""
    return save_figure(entropy_heatmap_figure(rows), path)


def _series_label(row: dict) -> str:
    # Study rows name their variant (yarn@0 and yarn@512 share model and method); command rows their model and method.
    if row.get("variant"):  # None (or "" read back from a CSV) outside a study
        return row["variant"]
    return f"{row['model']} / {method_label(row)}" if row.get("model") else method_label(row)


def perplexity_figure(rows: list[dict], original_max_position_embeddings: int | None = None) -> Figure:
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
    perplexity_axis(axes, [float(row["perplexity"]) for row in rows])
    lengths = sorted({int(row["length"]) for row in rows})
    if lengths:
        axes.set_xticks(lengths, [str(length) for length in lengths])
    if original_max_position_embeddings:
        axes.axvline(original_max_position_embeddings, color="grey", linestyle="--", linewidth=1)
        axes.annotate(f"pretrained {original_max_position_embeddings}", (original_max_position_embeddings, 1),
                      xycoords=("data", "axes fraction"),
                      xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
    axes.set_xlabel("evaluation length (tokens)")
    axes.set_ylabel("perplexity")
    axes.set_title("Perplexity against length")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def plot_perplexity(rows: list[dict], path, original_max_position_embeddings: int | None = None) -> Path:
    """`perplexity_figure`, saved to `path`."""
    return save_figure(perplexity_figure(rows, original_max_position_embeddings=original_max_position_embeddings), path)


# The findings' figures draw the test's own comparison: they read the numbers a finding keeps for its figure
# (`Finding.numbers` of study/report/findings.py) and a title the report words.

LABELLED_POINTS = 15  # above this many variants, names overlap: colour and marker say method and training length


def plot_finding_pattern(numbers: dict, title: str, path: str | Path) -> Path:
    """Finding 1: pattern divergence against perplexity at the longest length, one point per variant (colour: the
    RoPE method; marker: untrained or the training length). numbers: {"js", "perplexity", "method": {variant:
    value}, "length"}."""
    methods = numbers.get("method", {})
    colours = {m: f"C{i % 10}" for i, m in enumerate(sorted(set(methods.values())))}
    lengths = sorted({variant.split("@")[-1] for variant in numbers["js"]}, key=lambda t: int(t) if t.isdigit() else 0)
    markers = {length: "os^Dvp*h"[i % 8] for i, length in enumerate(lengths)}
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    for variant, js in numbers["js"].items():
        axis.scatter(js, numbers["perplexity"][variant], s=40, color=colours.get(methods.get(variant), "tab:blue"),
                     marker=markers[variant.split("@")[-1]])
        if len(numbers["js"]) <= LABELLED_POINTS:
            axis.annotate(variant, (js, numbers["perplexity"][variant]), fontsize=8, xytext=(4, 3),
                          textcoords="offset points")
    handles = [Line2D([], [], color=colour, marker="o", linestyle="", label=method)
               for method, colour in colours.items()]
    handles += [Line2D([], [], color="gray", marker=marker, linestyle="",
                       label="untrained" if length == "0" else f"trained at {length}")
                for length, marker in markers.items()]
    if len(handles) > 1:
        axis.legend(handles=handles, fontsize=8, loc="best")
    perplexity_axis(axis, list(numbers["perplexity"].values()))
    axis.set(xlabel="Jensen-Shannon divergence from the pretrained pattern (lower = preserved)",
             ylabel=f"perplexity at {numbers['length']} tokens", title=title)
    axis.grid(True, which="both", alpha=0.3)
    return save_figure(figure, path)


def plot_finding_entropy_errors(numbers: dict, rows: list[dict], p_label: str, path: str | Path) -> Path:
    """Finding 2: the answering query's entropy on correct and failed retrievals per length: as measured (left,
    what the pooled AUROC compares) and minus its stratum's median in the strata that hold both outcomes (right,
    what the stratified test compares). numbers: {"stratified_by", "by_length", "pooled_auroc", "stratified_auroc"};
    rows: the uncertainty rows; p_label: the stratified test's p-value as the title shows it ("p = 0.012")."""
    keys = {"variant x length x depth": ("variant", "length", "depth_percent"),
            "variant x length": ("variant", "length")}[numbers["stratified_by"]]
    rows = [row for row in rows if row.get("entropy") is not None]
    by_stratum = defaultdict(list)
    for row in rows:
        by_stratum[tuple(row.get(key) for key in keys)].append(row)
    centre = {key: median(row["entropy"] for row in group) for key, group in by_stratum.items()}
    both = {key for key, group in by_stratum.items() if len({bool(row["correct"]) for row in group}) == 2}
    lengths = sorted({row["length"] for row in rows})
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for axis, centred in zip(axes, (False, True)):
        shown = [row for row in rows if not centred or tuple(row.get(key) for key in keys) in both]
        for offset, outcome, colour in ((-0.17, True, "tab:green"), (0.17, False, "tab:red")):
            groups = []
            for length in lengths:
                groups.append([row["entropy"] - (centre[tuple(row.get(key) for key in keys)] if centred else 0.0)
                               for row in shown if row["length"] == length and bool(row["correct"]) is outcome])
            positions = [index + offset for index, values in enumerate(groups) if values]
            filled = [values for values in groups if values]
            if filled:
                axis.boxplot(filled, positions=positions, widths=0.28, showfliers=False,
                             medianprops={"color": colour}, boxprops={"color": colour},
                             whiskerprops={"color": colour}, capprops={"color": colour})
            for position, values in zip(positions, filled):
                spread = [position + 0.1 * ((i * 0.618) % 1 - 0.5) for i in range(len(values))]
                axis.scatter(spread, values, s=8, alpha=0.45, color=colour,
                             label=("correct" if outcome else "failed") if position == positions[0] else None)
        axis.set_xticks(range(len(lengths)), [str(length) for length in lengths])
        axis.set_xlabel("context length (tokens)")
        axis.grid(True, alpha=0.3)
    by_length = numbers["by_length"]
    axes[0].set(ylabel="entropy of the answering query (nats)",
                title=f"As measured: pooled AUROC {numbers['pooled_auroc']:.2f} (confounded)")
    axes[1].set(ylabel="entropy minus its stratum's median (nats)",
                title=f"Within {numbers['stratified_by']}: AUROC {numbers['stratified_auroc']:.2f}, "
                      f"{p_label}")
    for index, length in enumerate(lengths):
        value = by_length.get(length, math.nan)
        axes[1].annotate("no pair" if not math.isfinite(value) else f"AUROC {value:.2f}", (index, 1.0),
                         xycoords=("data", "axes fraction"), xytext=(0, -12), textcoords="offset points",
                         ha="center", fontsize=8)
    axes[1].margins(y=0.15)  # room for the per-length AUROCs along the top
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_finding_training_length(numbers: dict, title: str, path: str | Path) -> Path:
    """Finding 3: the pooled effect (with two or more runs per arm) and per extension the entropy and log-perplexity
    differences (longer minus shorter training) with their intervals (over training runs, or with one run per arm
    over evaluation units), against the bounds of no effect; below 0 is the paper's direction. numbers: {"methods",
    "pooled", "bounds", "entropy_length", "perplexity_length"}, whose tests carry statistic, interval and verdict."""
    methods = numbers["methods"]
    pooled, bounds = numbers.get("pooled", {}), numbers.get("bounds", {})
    names = (["all (pooled)"] if pooled else []) + [f"{m} {d['train_lengths'][0]}->{d['train_lengths'][1]}"
                                                    for m, d in methods.items()]
    figure, axes = plt.subplots(1, 2, figsize=(max(11, 1.6 * len(names)), 4.6))
    for axis, key, label in ((axes[0], "entropy", f"entropy difference at {numbers['entropy_length']} "
                                                   f"tokens (nats)"),
                             (axes[1], "perplexity", f"log-perplexity difference at "
                                                     f"{numbers['perplexity_length']} tokens")):
        if key in bounds:
            axis.axhspan(-bounds[key], bounds[key], color="tab:blue", alpha=0.12,
                         label=f"bounds of no effect (±{bounds[key]:g})")
        tests = ([pooled[key]] if pooled else []) + [details[f"{key}_test"] for details in methods.values()]
        for index, test in enumerate(tests):
            colour = {"reproduced": "tab:green", "contradicted": "tab:red"}.get(test.verdict, "tab:gray")
            marker = "D" if pooled and index == 0 else "o"
            if test.interval is None:
                axis.scatter(index, test.statistic, marker="x", color=colour, s=50)
                axis.annotate("no interval", (index, test.statistic), xytext=(6, 0), textcoords="offset points",
                              fontsize=8, va="center")
            else:
                low, high = test.interval
                axis.errorbar(index, test.statistic, yerr=[[test.statistic - low], [high - test.statistic]],
                              fmt=marker, color=colour, capsize=5)
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axis.set(ylabel=label, xlim=(-0.6, len(names) - 0.4))
        axis.grid(True, axis="y", alpha=0.3)
        if key in bounds:
            axis.legend(fontsize=8, loc="best")
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_finding_intervention(numbers: dict, title: str, path: str | Path) -> Path:
    """Finding 2 by intervention: per context length, retrieval accuracy (left, Wilson intervals) and the answering
    query's mean entropy (right) against the logit scale, the same prompts at every scale. numbers: {"by_length":
    {length: [levels]}}, each level with .level (the scale as text), .accuracy, .interval and .entropy; scales in
    the order they were asked."""
    by_length = numbers["by_length"]
    scales = list(dict.fromkeys(level.level for levels in by_length.values() for level in levels))
    figure, axes = plt.subplots(1, 2, figsize=(max(10, 1.4 * len(scales) * 2), 4.4))
    for index, (length, levels) in enumerate(by_length.items()):
        colour = plt.get_cmap("viridis")(0.85 * index / max(1, len(by_length) - 1))  # its last yellow is faint
        positions = [scales.index(level.level) + 0.06 * (index - (len(by_length) - 1) / 2) for level in levels]
        accuracy = [level.accuracy for level in levels]
        errors = [[a - level.interval[0] for a, level in zip(accuracy, levels)],
                  [level.interval[1] - a for a, level in zip(accuracy, levels)]]
        axes[0].errorbar(positions, accuracy, yerr=errors, marker="o", capsize=4, color=colour,
                         label=f"{length} tokens")
        axes[1].plot(positions, [level.entropy for level in levels], marker="o", color=colour,
                     label=f"{length} tokens")
    axes[0].set(ylabel="retrieval accuracy (95% Wilson interval)", ylim=(-0.03, 1.03))
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[1].set(ylabel="entropy of the answering query (nats)")
    for axis in axes:
        axis.set_xticks(range(len(scales)), scales)
        axis.set_xlabel("logit scale")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def scale_fit_figure(rows: list[dict]) -> Figure:
    """A fitted logit scale (`ropescope fit-scale`): each layer's mean entropy before the scale, after it and its
    target (left), and the fitted scale per layer (right).

    rows: scale-fit rows (layer, target_entropy, entropy_before, entropy_after, logit_scale, length, target_length).
    """
    rows = sorted(rows, key=lambda row: row["layer"])
    layers = [row["layer"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.2))
    left.plot(layers, [row["entropy_before"] for row in rows], marker="o", label=f"before, {rows[0]['length']} tokens")
    left.plot(layers, [row["entropy_after"] for row in rows], marker="o", label="with the fitted scale")
    left.plot(layers, [row["target_entropy"] for row in rows], marker="x", linestyle="--", color="black",
              label=f"original at {rows[0]['target_length']} (target)")
    left.set(xlabel="layer", ylabel="mean attention entropy (nats)")
    left.legend(fontsize=8)
    right.bar(layers, [row["logit_scale"] for row in rows], color="tab:green")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set(xlabel="layer", ylabel="fitted logit scale")
    for axis in (left, right):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    figure.tight_layout()
    return figure


def plot_scale_fit(rows: list[dict], path) -> Path:
    """`scale_fit_figure`, saved to `path`."""
    return save_figure(scale_fit_figure(rows), path)
