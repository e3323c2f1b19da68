"""The uncertainty stage: the answering query's attention entropy, needle and distractor mass for every retrieval
cell of a variant (finding 2). Its settings are the retrieval cell's: they reach the fingerprint through
`requires`. The retrieval stage reads these numbers in each prompt's own prefill; only retrieval rows recorded
before it did are read again, each prompt in a forward of its own."""

from __future__ import annotations

from ropescope.attention.uncertainty import recorded_attention, retrieval_attention
from ropescope.study.context import StageContext, Variant
from ropescope.study.stage import Stage, no_settings
from ropescope.tasks.registry import rebuild_cases

UNCERTAINTY_FIELDS = ("task", "length", "depth_percent", "trial", "correct", "entropy", "needle_mass",
                      "distractor_mass", "entropy_max")


def run(context: StageContext, variant: Variant) -> list[dict]:
    """The answering query's attention entropy, needle and distractor mass for every retrieval cell of this
    variant."""
    evaluated = context.required_rows("retrieval", variant)
    read = recorded_attention(evaluated)
    if read is None:
        model, tokenizer = context.load(variant)
        cases = rebuild_cases(tokenizer, evaluated, documents=context.documents("validation"),
                              seed=context.config.seed)
        read = retrieval_attention(model, cases, evaluated, progress=context.progress)
    return [{key: row[key] for key in UNCERTAINTY_FIELDS} for row in read]


STAGE = Stage("uncertainty", run, no_settings, requires=("train", "scale_fit", "retrieval"))
