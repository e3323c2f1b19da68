"""The entropy stage: attention entropy per layer, head and query-position bin at each analysis length. It owns
[analysis], which the patterns stage reads too."""

from __future__ import annotations

from dataclasses import dataclass, field

from ropescope.attention.profiles import entropy_profile
from ropescope.errors import RopescopeError
from ropescope.io import plots
from ropescope.io.rows import several_layer_types
from ropescope.study.config import ConfigTable, StudyConfig
from ropescope.study.context import StageContext, Variant
from ropescope.study.stage import ReportInputs, Stage, StageFigure


@dataclass(frozen=True)
class AnalysisSection:
    entropy_lengths: list[int] = field(default_factory=lambda: [256, 1024, 2048])
    entropy_samples: int = 2
    pattern_length: int = 1024  # the extended length whose attention pattern is compared with the pretrained one


def check_analysis(analysis: AnalysisSection, source: str) -> None:
    if analysis.pattern_length not in analysis.entropy_lengths:
        raise RopescopeError(
            f"{source}: 'analysis.pattern_length' = {analysis.pattern_length} must be one of "
            f"analysis.entropy_lengths {analysis.entropy_lengths}"
        )


def settings(config: StudyConfig, variant: Variant) -> dict:
    return {"lengths": config.analysis.entropy_lengths, "samples": config.analysis.entropy_samples}


def _with_position(rows: list[dict]) -> list[dict]:
    return [{**row, "position": (row["position_start"] + row["position_end"] - 1) / 2} for row in rows]


def run(context: StageContext, variant: Variant) -> list[dict]:
    """Attention entropy per layer, head and query-position bin at each analysis length."""
    model, tokenizer = context.load(variant, entropy_capture=True)
    analysis = context.config.analysis
    rows = []
    for length in analysis.entropy_lengths:
        samples = context.samples(tokenizer, length, analysis.entropy_samples)
        rows += _with_position(entropy_profile(model, samples, position_bin_size=max(1, length // 32),
                                               progress=context.progress))
    return rows


def check_inputs(config: StudyConfig, context: StageContext, tokenizer) -> None:
    """The validation split fills the samples at the longest analysis length."""
    analysis = config.analysis
    context.samples(tokenizer, max(analysis.entropy_lengths), analysis.entropy_samples)


def figures(report: ReportInputs) -> list[StageFigure]:
    rows = report.rows["entropy"]
    if not rows:
        return []
    longest = max(row["length"] for row in rows)
    return [StageFigure(
        "entropy_position", "Attention entropy against position",
        "Mean over layers, heads and samples, at the longest analysed length: entropy grows past the length a model "
        "was trained on unless the extension (or training) holds it down.",
        lambda path: plots.plot_entropy_position(rows, path, report.original_max_position_embeddings,
                                                 length=longest))] + [StageFigure(
        f"entropy_position_{layer_type}", f"Attention entropy against position, {layer_type} layers",
        f"As above, over the {layer_type} layers only.",
        lambda path, layer_type=layer_type: plots.plot_entropy_position(
            rows, path, report.original_max_position_embeddings, length=longest, layer_type=layer_type))
        for layer_type in several_layer_types(rows)]


STAGE = Stage("entropy", run, settings, requires=("train", "scale_fit"),
              table=ConfigTable("analysis", AnalysisSection, check=check_analysis), check_inputs=check_inputs,
              figures=figures)
