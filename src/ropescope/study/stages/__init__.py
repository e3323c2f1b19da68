"""The study's stages, registered once, in the order they run: `STAGES`. Each is one module here declaring its
`Stage` (ropescope.study.stage): its config table, settings, input checks, run and report figures. Adding a stage
is its module and one line below."""

from __future__ import annotations

from ropescope.study.stage import Stage
from ropescope.study.stages import (entropy, intervention, patterns, perplexity, retrieval, scale_fit, train,
                                    uncertainty)

STAGES: tuple[Stage, ...] = (train.STAGE, scale_fit.STAGE, perplexity.STAGE, retrieval.STAGE, entropy.STAGE,
                             patterns.STAGE, uncertainty.STAGE, intervention.STAGE)
STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)
