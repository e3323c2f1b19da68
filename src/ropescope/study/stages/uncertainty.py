"""The uncertainty stage: the answering query's attention entropy, needle and distractor mass for every retrieval
cell of a variant (finding 2). Its settings are the retrieval cell's: they reach the fingerprint through
`requires`."""

from __future__ import annotations

from ropescope.attention.uncertainty import retrieval_attention
from ropescope.study.context import StageContext, Variant
from ropescope.study.stage import Stage, no_settings
from ropescope.tasks.registry import rebuild_cases

UNCERTAINTY_FIELDS = ("task", "length", "depth_percent", "trial", "correct", "entropy", "needle_mass",
                      "distractor_mass", "entropy_max")


def run(context: StageContext, variant: Variant) -> list[dict]:
    """The answering query's attention entropy, needle and distractor mass for every retrieval cell of this
    variant."""
    evaluated = context.required_rows("retrieval", variant)
    model, tokenizer = context.load(variant)
    cases = rebuild_cases(tokenizer, evaluated, documents=context.documents("validation"), seed=context.config.seed)
    return [{key: row[key] for key in UNCERTAINTY_FIELDS}
            for row in retrieval_attention(model, cases, evaluated, progress=context.progress)]


STAGE = Stage("uncertainty", run, no_settings, requires=("train", "retrieval"))
