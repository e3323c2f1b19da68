"""Figures show the rows they are drawn from: lines, points, cells, labels and reference lines, read back through
matplotlib's own objects; saving is atomic and leaves nothing beside the image."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ropescope.io import plots


def _lines(axis) -> dict[str, tuple[list, list]]:
    """The labelled data lines of an axis: label -> (xs, ys)."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axis.get_lines()
            if not line.get_label().startswith("_")}


def _vertical_lines(axis) -> list[float]:
    """x of every vertical reference line (axvline: two equal x values spanning the axis)."""
    return [line.get_xdata()[0] for line in axis.get_lines()
            if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]]


def test_perplexity_figure_draws_one_line_per_model_and_protocol_with_the_means():
    rows = [{"task": "perplexity", "model": "m", "method": "yarn", "factor": 4.0, "protocol": protocol,
             "length": length, "perplexity": value}
            for protocol, values in (("truncated", (10.0, 20.0, 40.0)), ("sliding", (9.0, 15.0, 30.0)))
            for length, value in zip((256, 512, 1024), values)]
    rows.reverse()  # drawn sorted by length whatever the row order
    figure = plots.perplexity_figure(rows, original_max_position_embeddings=256)
    axis = figure.axes[0]
    lines = _lines(axis)
    assert lines == {"m / yarn x4 (truncated)": ([256, 512, 1024], [10.0, 20.0, 40.0]),
                     "m / yarn x4 (sliding)": ([256, 512, 1024], [9.0, 15.0, 30.0])}
    assert _vertical_lines(axis) == [256]
    assert axis.get_xscale() == "log" and axis.get_yscale() == "linear"  # a 4.4x range stays linear
    assert [text.get_text() for text in axis.get_xticklabels()] == ["256", "512", "1024"]
    assert {text.get_text() for text in axis.get_legend().get_texts()} == set(lines)


def test_perplexity_axis_goes_log_past_a_20x_range():
    rows = [{"model": "m", "method": "pi", "factor": 2, "protocol": "truncated", "length": length,
             "perplexity": value} for length, value in ((256, 10.0), (512, 500.0))]
    assert plots.perplexity_figure(rows).axes[0].get_yscale() == "log"


def test_retrieval_cells_are_the_mean_score_per_length_and_depth():
    rows = [{"task": "passkey", "model": "m", "method": "yarn", "factor": 2.0, "length": length,
             "depth_percent": depth, "score": score}
            for length, depth, score in ((256, 0, 1.0), (256, 0, 0.0), (256, 50, 1.0), (512, 0, 0.0),
                                         (512, 50, 1.0), (512, 50, 1.0), (512, 50, 0.0))]
    figure = plots.retrieval_figure(rows)
    axis = figure.axes[0]
    grid = axis.get_images()[0].get_array()
    np.testing.assert_allclose(np.asarray(grid), [[0.5, 0.0], [1.0, 2 / 3]])  # rows: depth, columns: length
    assert [text.get_text() for text in axis.texts] == ["0.50", "0.00", "1.00", "0.67"]
    assert [text.get_text() for text in axis.get_xticklabels()] == ["256", "512"]
    assert [text.get_text() for text in axis.get_yticklabels()] == ["0", "50"]
    assert figure._suptitle.get_text() == "passkey: m / yarn x2"


def test_retrieval_has_one_panel_per_variant_and_leaves_empty_cells_blank():
    rows = [{"variant": variant, "length": length, "depth_percent": 0, "score": score}
            for variant, length, score in (("a", 256, 1.0), ("a", 512, 0.0), ("b", 256, 0.5))]
    figure = plots.retrieval_figure(rows, title="t")
    panels = [axis for axis in figure.axes if axis.get_images()]
    assert [axis.get_title() for axis in panels] == ["a", "b"]
    np.testing.assert_allclose(np.asarray(panels[0].get_images()[0].get_array()), [[1.0, 0.0]])
    b_cells = np.asarray(panels[1].get_images()[0].get_array())
    assert b_cells[0, 0] == 0.5 and math.isnan(b_cells[0, 1])
    assert figure._suptitle.get_text() == "t"


def test_frequencies_figure_draws_wavelengths_and_ratios_per_method():
    rows = [{"method": method, "pair": pair, "wavelength": 10.0 * (pair + 1) * scale, "ratio": scale}
            for method, scale in (("default", 1.0), ("linear x4", 4.0)) for pair in range(3)]
    left, right = plots.frequencies_figure(rows, original_max_position_embeddings=256).axes
    assert _lines(left) == {"default": ([0, 1, 2], [10.0, 20.0, 30.0]),
                            "linear x4": ([0, 1, 2], [40.0, 80.0, 120.0])}
    assert _lines(right)["linear x4"] == ([0, 1, 2], [4.0, 4.0, 4.0])
    horizontal = [line.get_ydata()[0] for line in left.get_lines() if line.get_label().startswith("_")]
    assert horizontal == [256]  # the pretrained length as a wavelength


def test_entropy_position_draws_the_mean_per_variant_at_the_chosen_length():
    rows = [{"variant": "v", "length": 1024, "position": 100, "entropy": 1.0},
            {"variant": "v", "length": 1024, "position": 100, "entropy": 3.0},
            {"variant": "v", "length": 1024, "position": 600, "entropy": 4.0},
            {"variant": "w", "length": 1024, "position": 100, "entropy": 5.0},
            {"variant": "v", "length": 256, "position": 100, "entropy": 9.0}]
    axis = plots.entropy_position_figure(rows, original_max_position_embeddings=256, length=1024).axes[0]
    assert _lines(axis) == {"v": ([100, 600], [2.0, 4.0]), "w": ([100], [5.0]), "pretrained length": ([256, 256],
                                                                                                      [0, 1])}
    assert "1024-token" in axis.get_title()
    assert _lines(plots.entropy_position_figure(rows, length=256).axes[0]) == {"v": ([100], [9.0])}
    both = _lines(plots.entropy_position_figure(rows).axes[0])  # every length: one line per variant and length
    assert both["v @1024"] == ([100, 600], [2.0, 4.0]) and both["v @256"] == ([100], [9.0])


def test_entropy_position_labels_methods_and_draws_uniform_attention():
    rows = [{"method": method, "factor": factor, "length": 64, "layer": layer, "position_start": start,
             "position_end": start + 8, "entropy": entropy, "entropy_max": math.log(start + 8)}
            for method, factor, layer, start, entropy in (("yarn", 4.0, 0, 0, 1.0), ("yarn", 4.0, 1, 0, 2.0),
                                                          ("yarn", 4.0, 0, 8, 3.0), ("default", None, 0, 0, 0.5))]
    axis = plots.entropy_position_figure(rows, original_max_position_embeddings=32).axes[0]
    lines = _lines(axis)
    assert lines["yarn x4"] == ([3.5, 11.5], [1.5, 3.0])  # mean over layers at each bin centre
    assert lines["default"] == ([3.5], [0.5])
    assert lines["uniform attention"] == ([3.5, 11.5], [math.log(8), math.log(16)])
    assert lines["pretrained length"][0] == [32, 32]
    one_layer = _lines(plots.entropy_position_figure(rows, layer=1).axes[0])
    assert one_layer["yarn x4"] == ([3.5], [2.0])
    with_model = [{**row, "model": "m"} for row in rows]
    assert "m / yarn x4" in _lines(plots.entropy_position_figure(with_model).axes[0])


def test_attention_distance_one_panel_per_series_one_line_per_length():
    rows = [{"variant": variant, "length": length, "layer": layer, "distance_start": start, "mass": mass + layer / 10}
            for variant in ("a", "b") for length in (256, 1024) for layer in (0, 1)
            for start, mass in ((0, 0.6), (4, 0.4))]
    figure = plots.attention_distance_figure(rows)
    assert [axis.get_title() for axis in figure.axes] == ["a", "b"]
    means = {"256 tokens": ([0.5, 4], [0.65, 0.45]), "1024 tokens": ([0.5, 4], [0.65, 0.45])}
    for label, (xs, ys) in _lines(figure.axes[0]).items():
        assert xs == means[label][0] and ys == pytest.approx(means[label][1])
    assert _lines(plots.attention_distance_figure(rows, layer=1).axes[1])["256 tokens"][1] == pytest.approx([0.7, 0.5])
    command = [{**row, "model": "m", "method": "yarn", "factor": 2.0} for row in rows if row["variant"] == "a"]
    for row in command:
        del row["variant"]
    assert [axis.get_title() for axis in plots.attention_distance_figure(command).axes] == ["m / yarn x2"]


def test_pattern_preservation_bars_are_the_mean_layer_divergences():
    rows = [{"method": "yarn", "factor": 4.0, "layer": "mean", "length": 512, "js_divergence": 0.1},
            {"method": "linear", "factor": 4.0, "layer": "mean", "length": 512, "js_divergence": 0.3},
            {"method": "linear", "factor": 4.0, "layer": 0, "length": 512, "js_divergence": 9.0}]
    axis = plots.pattern_preservation_figure(rows).axes[0]
    assert [patch.get_height() for patch in axis.patches] == [0.3, 0.1]  # labels sorted: linear, yarn
    assert [text.get_text() for text in axis.get_xticklabels()] == ["linear x4", "yarn x4"]


def test_entropy_heatmap_pairs_accuracy_and_entropy_per_method():
    rows = [{"method": "yarn", "factor": 2.0, "length": length, "depth_percent": 50, "correct": correct,
             "entropy": entropy} for length, correct, entropy in ((64, True, 1.0), (64, False, 3.0), (128, True, 2.0))]
    figure = plots.entropy_heatmap_figure(rows)
    accuracy, entropy = [axis for axis in figure.axes if axis.get_images()]
    assert accuracy.get_title() == "yarn x2: accuracy"
    np.testing.assert_allclose(np.asarray(accuracy.get_images()[0].get_array()), [[0.5, 1.0]])
    np.testing.assert_allclose(np.asarray(entropy.get_images()[0].get_array()), [[2.0, 2.0]])


@pytest.mark.parametrize("row, label", [
    ({"method": "yarn", "factor": 4.0}, "yarn x4"),
    ({"method": "linear", "factor": 2.5}, "linear x2.5"),
    ({"method": "default", "factor": 4.0}, "default"),
    ({"method": "ntk", "factor": None}, "ntk"),
    ({}, "default"),
])
def test_method_label(row, label):
    assert plots.method_label(row) == label


def test_saving_writes_the_image_atomically_and_leaves_nothing_else(tmp_path):
    rows = [{"model": "m", "method": "yarn", "factor": 2.0, "protocol": "truncated", "length": 256,
             "perplexity": 10.0}]
    path = plots.plot_perplexity(rows, tmp_path / "figures" / "ppl.png")
    assert path == tmp_path / "figures" / "ppl.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert [entry.name for entry in path.parent.iterdir()] == ["ppl.png"]
