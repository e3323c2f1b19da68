"""The intervention stage: one variant asked the same retrieval prompts at several logit scales ([intervention]),
each row recording the answering query's entropy and attention on the facts, so that finding 2 (high entropy goes
with retrieval errors) is tested by changing the entropy of one model on fixed prompts rather than by comparing
prompts, lengths and variants that differ in many ways at once. The prompts (keys, haystacks, depths) are built
once from the study's seed and reused for every scale; the retrieval tasks, depths and trials are [retrieval]'s."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ropescope.attention.uncertainty import recorded_attention
from ropescope.errors import RopescopeError
from ropescope.eval.retrieval import build_cases, evaluate_retrieval
from ropescope.model.load import load_tokenizer
from ropescope.study.config import ConfigTable, Fail, StudyConfig
from ropescope.study.context import StageContext, Variant, fitted_scales, plan_variants
from ropescope.study.stage import Stage
from ropescope.tasks.cases import needs_documents
from ropescope.tasks.registry import get_task

NAMED_SCALES = ("logn", "fit")  # logn: Qwen's / Scalable-Softmax's log-position scale; fit: fitted to keep entropy


def scale_text(value: float | str) -> str:
    """How a row names a logit scale: "0.8", "1.0", "logn", "fit"."""
    return value if isinstance(value, str) else repr(float(value))


def check_logit_scales(value: Any, fail: Fail) -> list:
    """A non-empty list of distinct logit scales, each a positive number, "logn" or "fit"."""
    accepted = 'a non-empty list of distinct logit scales, each a positive number, "logn" or "fit"'
    if not isinstance(value, list) or not value:
        fail(accepted)
    for item in value:
        number = not isinstance(item, bool) and isinstance(item, (int, float))
        if not (item in NAMED_SCALES if isinstance(item, str) else number and math.isfinite(item) and item > 0):
            fail(f"{accepted}; {item!r} is not")
    if len({scale_text(item) for item in value}) != len(value):
        fail(f"{accepted} (a scale is repeated)")
    return [item if isinstance(item, str) else float(item) for item in value]


@dataclass(frozen=True)
class InterventionSection:
    # the variant whose logit scale changes: a variant name ("yarn@0", "yarn@1024") or a [methods] name, which
    # means its untrained variant; None: the study runs no intervention
    method: str | None = None
    # every scale asks the same prompts; 1.0 is the variant as it is, the reference the others are compared with
    logit_scales: list = field(default_factory=lambda: [0.8, 1.0, 1.25, "logn"],
                               metadata={"check": check_logit_scales})
    lengths: list[int] = field(default_factory=lambda: [512, 1024])


def intervention_variant(config: StudyConfig) -> str | None:
    """The name of the variant [intervention] names (None: no intervention); a RopescopeError for a name that is
    no variant of the study."""
    name = config.intervention.method
    if name is None:
        return None
    variants = {variant.name: variant for variant in plan_variants(config)}
    if name not in variants and name in config.methods:
        name = name if config.methods[name].method == "default" else f"{name}@0"
    if name not in variants or variants[name].sweep:
        usable = [variant.name for variant in variants.values() if not variant.sweep]
        raise RopescopeError(f"'intervention.method' = {config.intervention.method!r} names no variant of the study "
                             f"that is evaluated in full; accepted: {', '.join(usable)}")
    return name


def selects(config: StudyConfig, variant: Variant) -> bool:
    return variant.name == intervention_variant(config)


def settings(config: StudyConfig, variant: Variant) -> dict:
    retrieval = config.retrieval
    return {"logit_scales": [scale_text(value) for value in config.intervention.logit_scales],
            "lengths": config.intervention.lengths, "tasks": retrieval.tasks, "depths": retrieval.depths,
            "trials": retrieval.trials, "independent_haystacks": retrieval.independent_haystacks,
            **({"independent_keys": True} if retrieval.independent_keys else {})}


def scaled_spec(variant: Variant, value: float | list[float] | str):
    """The variant's extension with its logit scale set to `value`."""
    return variant.spec.with_logit_scale(value)


def _ask(context: StageContext, variant: Variant, text: str, value, cases: dict, tokenizer,
         lengths: list[int]) -> list[dict]:
    """Every task's prompts at one logit scale and `lengths`: the retrieval rows and the answering query's
    attention. Each (scale, task, length) is one piece of the cell, kept as it finishes; the model at this scale
    loads only when a piece is still to do."""
    retrieval, rows, model = context.config.retrieval, [], None
    for name, task_cases in cases.items():
        task = get_task(name)
        for length in lengths:
            key = f"{text} {name} {length}"
            piece = context.pieces.get(key)
            if piece is None:
                if model is None:
                    model, _ = context.load(variant, scaled_spec(variant, value))
                evaluated = evaluate_retrieval(
                    model, tokenizer, task, [length], retrieval.depths, trials=retrieval.trials,
                    seed=context.config.seed, independent_haystacks=retrieval.independent_haystacks,
                    progress=context.progress, cases=task_cases, independent_keys=retrieval.independent_keys,
                    read_attention=True)  # the answering query read in the prefill: one forward per prompt
                piece = [{**row, "logit_scale": text} for row in recorded_attention(evaluated)]
                context.pieces.put(key, piece)
            rows += piece
    return rows


def run(context: StageContext, variant: Variant) -> list[dict]:
    """The same prompts at every logit scale of [intervention]."""
    tokenizer = load_tokenizer(context.config.model.path)  # a fine-tune keeps its base model's tokenizer
    retrieval, config = context.config.retrieval, context.config
    cases = {}
    for name in retrieval.tasks:
        task = get_task(name)
        documents = (context.documents("validation") if needs_documents(task, retrieval.independent_haystacks)
                     else None)
        cases[name] = build_cases(task, tokenizer, config.intervention.lengths, retrieval.depths, retrieval.trials,
                                  config.seed, documents, retrieval.independent_haystacks,
                                  retrieval.independent_keys)
    rows, lengths = [], config.intervention.lengths
    for value in config.intervention.logit_scales:
        if value == "fit":  # fitted per length by the scale_fit cell: one model per length
            fitted = fitted_scales(context.required_rows("scale_fit", variant))
            for length in lengths:
                rows += _ask(context, variant, "fit", fitted[length], cases, tokenizer, [length])
            continue
        reused = as_it_is(context, variant, lengths) if value == 1.0 else []
        asked = [length for length in lengths if length not in {row["length"] for row in reused}]
        rows += reused + (_ask(context, variant, scale_text(value), value, cases, tokenizer, asked) if asked else [])
    return rows


def as_it_is(context: StageContext, variant: Variant, lengths: list[int]) -> list[dict]:
    """Scale 1.0's rows where the variant's own retrieval cell already asked them: the same prompts (built from
    the same [retrieval] grid and seed, in the same batches) of the same model, read in the same prefill, so the
    very rows a forward at scale 1.0 would give (logit_scale 1 changes nothing, bit for bit). Lengths the
    retrieval did not ask, rows without a readout, or a variant with a logit scale of its own: nothing."""
    if variant.spec.logit_scale not in (None, 1, 1.0):
        return []
    recorded = [row for row in context.required_rows("retrieval", variant) if row["length"] in lengths]
    read = recorded_attention(recorded)
    return [] if read is None else [{**{key: value for key, value in row.items() if key != "cell"},
                                     "logit_scale": scale_text(1.0)} for row in read]


STAGE = Stage("intervention", run, settings, requires=("train", "scale_fit", "retrieval"),
              table=ConfigTable("intervention", InterventionSection), selects=selects)
