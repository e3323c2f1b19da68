"""What a study stage declares: `Stage`. A stage is one module in study/stages/ and one entry in
`ropescope.study.stages.STAGES`; the config, the cells, the runner and the report read everything else from the
declaration.

A `Stage` declares its name, the stages whose cells (of the same variant) it needs first, its config table (the
TOML table it owns, or None when it reads another stage's), the config values its result depends on (`settings`:
these, and the cells it requires, make a cell's fingerprint), the checks of its inputs before anything is written,
`run(context, variant) -> rows`, and its report figures, drawn from the recorded rows alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ropescope.study.config import ConfigTable, StudyConfig
from ropescope.study.context import StageContext, Variant


@dataclass(frozen=True)
class StageFigure:
    """One figure of the report: `draw(path)` writes it to `path` (a .png) and returns the path."""

    key: str  # the file name without .png, unique in the report
    title: str
    caption: str
    draw: Callable[[Path], Path]


@dataclass(frozen=True)
class ReportInputs:
    """What a stage's figures are drawn from: every stage's recorded rows by stage name (variants in study order),
    the recorded config (`StudyConfig.to_dict()`) and the pretrained length."""

    rows: dict[str, list[dict]]
    config: dict[str, Any]
    original_max_position_embeddings: int


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext, Variant], list[dict]]
    settings: Callable[[StudyConfig, Variant], dict]  # exactly the config values the stage's rows depend on
    requires: tuple[str, ...] = ()  # stages whose cell of the same variant must finish first (when it has one)
    fine_tuned_only: bool = False  # the stage has a cell only for fine-tuned variants
    writes_checkpoint: bool = False  # its cell is finished only while the variant's checkpoint exists
    sweep: bool = False  # the stage also has a cell for the sweep variants (finding 1's perplexity and pattern)
    table: ConfigTable | None = None  # the config table the stage owns
    # (config, context, tokenizer): raise a RopescopeError for an input the stage cannot use, before any cell runs
    check_inputs: Callable[[StudyConfig, StageContext, Any], None] | None = None
    figures: Callable[[ReportInputs], list[StageFigure]] | None = None  # the report's figures of its rows
    # (config, variant) -> whether the stage has a cell for this variant, for a stage whose config names the
    # variants it runs on (None: every variant `applies` allows); raise a RopescopeError for a name it cannot use
    selects: Callable[[StudyConfig, Variant], bool] | None = None
    # (config, variant, stage name) -> whether that stage's cell of the variant reads this stage's cell, for a
    # stage whose cell only some of the stages that require it read (None: all of them); the others' fingerprints
    # leave it out, so adding such a cell reruns only what reads it
    feeds: Callable[[StudyConfig, Variant, str], bool] | None = None

    def applies(self, variant: Variant) -> bool:
        if variant.sweep and not self.sweep:
            return False
        return variant.fine_tuned or not self.fine_tuned_only

    def has_cell(self, config: StudyConfig, variant: Variant) -> bool:
        """Whether the study has a cell of this stage for `variant`."""
        return self.applies(variant) and (self.selects is None or self.selects(config, variant))

    def is_read_by(self, stage: str, config: StudyConfig, variant: Variant) -> bool:
        """Whether the cell of `stage` for `variant`, which requires this stage, reads this stage's cell."""
        return self.has_cell(config, variant) and (self.feeds is None or self.feeds(config, variant, stage))


def no_settings(config: StudyConfig, variant: Variant) -> dict:
    """The settings of a stage whose rows depend only on the cells it requires (they reach the fingerprint
    through `requires`)."""
    return {}
