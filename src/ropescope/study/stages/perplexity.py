"""The perplexity stage: each variant's perplexity on validation documents cut to each length ([evaluation]). It
also has a cell for the sweep variants (finding 1 reads their perplexity at the longest length)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ropescope.errors import RopescopeError
from ropescope.eval.perplexity import evaluate_perplexity, long_documents
from ropescope.io import plots
from ropescope.study.config import ConfigTable, StudyConfig
from ropescope.study.context import StageContext, Variant
from ropescope.study.stage import ReportInputs, Stage, StageFigure


@dataclass(frozen=True)
class EvaluationSection:
    perplexity_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])
    perplexity_documents: int = 4


def refuse_moved_keys(table: dict, source: str) -> None:
    """The passkey grid moved to [retrieval]: an old config's key says where it went."""
    moved = [key for key in table if key.startswith("passkey_")]
    if moved:
        raise RopescopeError(f"{source}: 'evaluation.{moved[0]}' moved to [retrieval] as "
                             f"'{moved[0].removeprefix('passkey_')}' (with tasks = [\"passkey\"])")


def settings(config: StudyConfig, variant: Variant) -> dict:
    lengths = config.evaluation.perplexity_lengths
    # a sweep variant serves finding 1 only, which reads the longest length: the shorter ones would cost time alone
    return {"lengths": lengths[-1:] if variant.sweep else lengths, "documents": config.evaluation.perplexity_documents}


def run(context: StageContext, variant: Variant) -> list[dict]:
    model, tokenizer = context.load(variant)
    values = settings(context.config, variant)
    return evaluate_perplexity(
        model, tokenizer, context.documents("validation"), values["lengths"], protocols=("truncated",),
        max_documents=values["documents"], progress=context.progress,
    )


def check_inputs(config: StudyConfig, context: StageContext, tokenizer) -> None:
    """The validation split holds a document as long as the longest perplexity length."""
    long_documents(tokenizer, context.documents("validation"), max(config.evaluation.perplexity_lengths), 1)


def truncated(rows: list[dict]) -> list[dict]:
    """The rows of the truncated protocol (the one the study runs; older databases may hold others)."""
    return [row for row in rows if row.get("protocol", "truncated") == "truncated"]


def figures(report: ReportInputs) -> list[StageFigure]:
    rows, pretrained = truncated(report.rows["perplexity"]), report.original_max_position_embeddings
    if not rows:
        return []
    return [StageFigure(
        "perplexity", "Perplexity against length",
        f"Each variant's perplexity on validation documents cut to each length; dashed: the pretrained length "
        f"({pretrained}).",
        lambda path: plots.plot_perplexity(rows, path, pretrained))]


STAGE = Stage("perplexity", run, settings, requires=("train", "scale_fit"), sweep=True,
              table=ConfigTable("evaluation", EvaluationSection, check_raw=refuse_moved_keys),
              check_inputs=check_inputs, figures=figures)
