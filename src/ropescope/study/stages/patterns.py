"""The patterns stage: attention against key distance at the pretrained and the extended length, and how well
each variant keeps the pretrained pattern (arXiv 2406.13282, Figure 2(a)). It reads [analysis], which the entropy
stage owns, and also has a cell for the sweep variants (finding 1)."""

from __future__ import annotations

from ropescope.attention.patterns import pattern_preservation
from ropescope.io import plots
from ropescope.io.rows import several_layer_types
from ropescope.study.config import StudyConfig
from ropescope.study.context import ORIGINAL_VARIANT, StageContext, Variant
from ropescope.study.stage import ReportInputs, Stage, StageFigure


def settings(config: StudyConfig, variant: Variant) -> dict:
    # the original model at its pretrained length (model.original_max_position_embeddings) is the reference
    return {"pattern_length": config.analysis.pattern_length, "samples": config.analysis.entropy_samples}


def run(context: StageContext, variant: Variant) -> list[dict]:
    """Attention against key distance at the pretrained and the extended length, and how well the variant keeps
    the pattern: the reference is the original model at its pretrained length (the paper's Figure 2(a))."""
    original = context.config.model.original_max_position_embeddings
    count = context.config.analysis.entropy_samples
    reference = context.distance_rows(ORIGINAL_VARIANT, original, count)
    at_pretrained = context.distance_rows(variant, original, count)
    extended = context.distance_rows(variant, context.config.analysis.pattern_length, count)
    preservation = [row for row in pattern_preservation(reference, extended) if row["layer"] != "mean"]
    return ([{**row, "row_type": "distribution"} for row in at_pretrained + extended]
            + [{**row, "row_type": "preservation"} for row in preservation])


def check_inputs(config: StudyConfig, context: StageContext, tokenizer) -> None:
    """The validation split fills the samples at the pretrained and the pattern length."""
    longest = max(config.analysis.pattern_length, config.model.original_max_position_embeddings)
    context.samples(tokenizer, longest, config.analysis.entropy_samples)


def figures(report: ReportInputs) -> list[StageFigure]:
    distribution = [row for row in report.rows["patterns"] if row.get("row_type") == "distribution"]
    if not distribution:
        return []
    return [StageFigure(
        "attention_distance", "Attention against distance",
        "Attention mass per key-distance bin at the pretrained length and at the extended length, distance divided "
        "by the length ratio: overlapping curves mean the extension kept the pretrained pattern.",
        lambda path: plots.plot_attention_distance(distribution, path))] + [StageFigure(
        f"attention_distance_{layer_type}", f"Attention against distance, {layer_type} layers",
        f"As above, over the {layer_type} layers only.",
        lambda path, layer_type=layer_type: plots.plot_attention_distance(distribution, path, layer_type=layer_type))
        for layer_type in several_layer_types(distribution)]


STAGE = Stage("patterns", run, settings, requires=("train", "scale_fit"), sweep=True, check_inputs=check_inputs,
              figures=figures)
