"""The scale-fit stage: the per-layer logit scale that keeps the original model's attention entropy at its
pretrained length, fitted on the variant itself (`fit_logit_scale` of the attention package), for every variant
whose own `logit_scale` is "fit" (at the length its extension is meant for) and for [intervention]'s "fit" (at
each intervention length). Its own cell, so the cells that load the variant read the fitted scales and a rerun
keeps them; their fingerprints follow this cell's."""

from __future__ import annotations

import torch

from ropescope.attention.scale_fit import fit_logit_scale, target_entropies
from ropescope.io import plots
from ropescope.io.rows import ScaleFitRow
from ropescope.model.load import ModelOptions, load
from ropescope.study.config import StudyConfig
from ropescope.study.context import StageContext, Variant, fit_length, fits_own_scale
from ropescope.study.stage import ReportInputs, Stage, StageFigure
from ropescope.study.stages.intervention import intervention_variant

FIT_SAMPLES = 2  # corpus blocks per length: one forward holds them
TOLERANCE = 0.02  # nats, per layer
MAX_FORWARDS = 10


def fit_lengths(config: StudyConfig, variant: Variant) -> list[int]:
    """The lengths the variant's scale is fitted at (empty: the stage has no cell for it)."""
    lengths = [fit_length(config, variant)] if fits_own_scale(variant) else []
    if "fit" in config.intervention.logit_scales and variant.name == intervention_variant(config):
        lengths += [length for length in config.intervention.lengths if length not in lengths]
    return lengths


def selects(config: StudyConfig, variant: Variant) -> bool:
    return bool(fit_lengths(config, variant))


def feeds(config: StudyConfig, variant: Variant, stage: str) -> bool:
    """The intervention reads the fit; the variant's other cells only where its own scale is "fit"."""
    return stage == "intervention" or fits_own_scale(variant)


def settings(config: StudyConfig, variant: Variant) -> dict:
    return {"lengths": fit_lengths(config, variant), "samples": FIT_SAMPLES, "tolerance": TOLERANCE,
            "max_forwards": MAX_FORWARDS}


def run(context: StageContext, variant: Variant) -> list[dict]:
    """The per-layer logit scale at each fit length, against the original model at its pretrained length (the
    original weights, also for a fine-tuned variant: the entropy the extension should keep)."""
    pretrained_length = context.config.model.original_max_position_embeddings
    original = load(context.config.model.path, None, ModelOptions(device=context.device, entropy_capture=True))
    blocks = context.samples(original.tokenizer, pretrained_length, FIT_SAMPLES)
    target = target_entropies(original.model, torch.stack([torch.as_tensor(block) for block in blocks]))
    del original
    model, tokenizer = context.load(variant, variant.spec.without_logit_scale(), entropy_capture=True)
    rows = []
    for length in fit_lengths(context.config, variant):
        inputs = torch.stack([torch.as_tensor(block) for block in context.samples(tokenizer, length, FIT_SAMPLES)])
        fit = fit_logit_scale(model, inputs, target, tolerance=TOLERANCE, max_forwards=MAX_FORWARDS,
                              progress=context.progress)
        text = variant.spec.with_logit_scale(fit.scales).to_text()
        rows += [row.to_dict() for row in ScaleFitRow.of_fit(fit, length, pretrained_length, text)]
    return rows


def figures(report: ReportInputs) -> list[StageFigure]:
    """One figure per fitted (variant, length): each layer's entropy before, after and its target, and the scale."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in report.rows.get("scale_fit", []):
        groups.setdefault((row["variant"], row["length"]), []).append(row)
    return [StageFigure(
        f"scale_fit_{variant.replace('@', '_')}_{length}", f"Fitted logit scale: {variant} at {length} tokens",
        f"Each layer's mean attention entropy of {variant} at {length} tokens before and with its fitted logit scale, "
        f"against the original model's at its pretrained length (left), and the scale per layer (right).",
        lambda path, rows=rows: plots.plot_scale_fit(rows, path)) for (variant, length), rows in groups.items()]


STAGE = Stage("scale_fit", run, settings, requires=("train",), sweep=True, selects=selects, feeds=feeds,
              figures=figures)
