"""The cells of a study: one per (stage, variant) the stage applies to, in registry order, each with the names of
the cells it requires and a fingerprint of exactly what its rows depend on.

A cell's fingerprint covers its stage's settings, the variant's name and RopeSpec, the model, corpus and seed,
and the fingerprints of the cells it requires (so an evaluation of a fine-tuned variant depends on that
variant's training cell, and through it on its own training length and settings, not on the other lengths of
the config; a required cell that a stage does not read, such as the intervention's scale fit for the variant's
other cells, is left out). Adding a method or a training length adds cells and changes no existing one. The unit
of work is a (stage, variant) pair, so adding an evaluation length changes the settings of that stage and reruns
its cells (and the cells that require them), never the training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ropescope.study.config import StudyConfig, fingerprint
from ropescope.study.context import Variant, cell_name, plan_variants
from ropescope.study.stage import Stage
from ropescope.study.stages import STAGES


@dataclass(frozen=True)
class Cell:
    stage: Stage
    variant: Variant
    fingerprint: str
    requires: tuple[str, ...]  # names of the cells that must be recorded before this one runs

    @property
    def name(self) -> str:
        return cell_name(self.stage.name, self.variant)


def check_registry(stages: Sequence[Stage]) -> None:
    """Stage names are unique and every stage requires only stages registered before it (a bug otherwise)."""
    seen: set[str] = set()
    for stage in stages:
        assert stage.name not in seen, f"stage {stage.name!r} registered twice"
        missing = [name for name in stage.requires if name not in seen]
        assert not missing, f"stage {stage.name!r} requires {missing}, which are not registered before it"
        seen.add(stage.name)


def plan_cells(config: StudyConfig, stages: Sequence[Stage] = STAGES) -> list[Cell]:
    """Every cell of the config, stage by stage in registry order, variants in study order within a stage."""
    check_registry(stages)
    by_stage = {stage.name: stage for stage in stages}
    shared = {"model": asdict(config.model), "corpus": config.corpus.path, "seed": config.seed}
    cells: dict[str, Cell] = {}
    for stage in stages:
        for variant in plan_variants(config):
            if not stage.has_cell(config, variant):
                continue
            requires = tuple(cell_name(name, variant) for name in stage.requires
                             if by_stage[name].is_read_by(stage.name, config, variant))
            cell_fingerprint = fingerprint(
                stage.name, variant.name, variant.spec.to_dict(), shared, stage.settings(config, variant),
                [cells[name].fingerprint for name in requires],
            )
            cell = Cell(stage, variant, cell_fingerprint, requires)
            cells[cell.name] = cell
    return list(cells.values())
