"""The study's stages, registered once, in the order they run: `STAGES`.

A `Stage` declares its name, the stages whose cells (of the same variant) it needs first, the config values its
result depends on (`settings`: these, and the cells it requires, make a cell's fingerprint), and
`run(context, variant) -> rows`. Each run composes library functions only. A stage is its run and settings here
and its entry in `STAGES`; what it is configured by lives in study/config.py, and the report reads its rows by
its name (study/report.py). Retrieval tasks need none of this: they come from the task registry
(eval/tasks.py) through the `retrieval` stage.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ropescope.study.config import StudyConfig
from ropescope.study.context import ORIGINAL_VARIANT, StageContext, Variant
from ropescope.train.batch import batch_size_for


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext, Variant], list[dict]]
    settings: Callable[[StudyConfig, Variant], dict]  # exactly the config values the stage's rows depend on
    requires: tuple[str, ...] = ()  # stages whose cell of the same variant must finish first (when it has one)
    fine_tuned_only: bool = False  # the stage has a cell only for fine-tuned variants
    writes_checkpoint: bool = False  # its cell is finished only while the variant's checkpoint exists
    sweep: bool = False  # the stage also has a cell for the sweep variants (finding 1's perplexity and pattern)

    def applies(self, variant: Variant) -> bool:
        if variant.sweep and not self.sweep:
            return False
        return variant.fine_tuned or not self.fine_tuned_only


def train_settings(config: StudyConfig, variant: Variant) -> dict:
    training = config.training
    settings = {"length": variant.train_length, "steps": training.steps, "tokens_per_step": training.tokens_per_step,
                "learning_rate": training.learning_rate, "warmup_steps": training.warmup_steps,
                "retrieval_mix": training.retrieval_mix}
    if training.retrieval_mix and training.retrieval_haystack != "filler":  # filler: the fingerprint before the option
        settings["retrieval_haystack"] = training.retrieval_haystack
    if training.retrieval_mix and training.retrieval_min_length is not None:  # unset: the fingerprint before it
        settings["retrieval_min_length"] = min(training.retrieval_min_length, variant.train_length)
    # the first seed's fingerprint stays what it was before seeds existed, so adding seeds retrains nothing
    return {**settings, "train_seed": variant.train_seed} if variant.train_seed else settings


def train(context: StageContext, variant: Variant) -> list[dict]:
    """Continual pretraining of the extension at `variant.train_length`; rows are the training curve."""
    from ropescope.train.continual import TrainConfig
    from ropescope.train.continual import train as run_training

    settings = context.config.training
    out = context.checkpoint_dir(variant)
    run_training(TrainConfig(
        model=context.config.model.path,
        spec=variant.spec.to_dict(),
        length=variant.train_length,
        steps=settings.steps,
        corpus=context.corpus,
        batch_size=batch_size_for(settings.tokens_per_step, variant.train_length),
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        seed=context.config.seed + variant.train_seed,
        out=str(out),
        overwrite=True,
        progress=context.progress,
        retrieval_mix=settings.retrieval_mix,
        retrieval_haystack=settings.retrieval_haystack,
        retrieval_min_length=train_settings(context.config, variant).get("retrieval_min_length"),
    ))
    with (out / "metrics.csv").open(newline="") as handle:
        return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]


def perplexity_settings(config: StudyConfig, variant: Variant) -> dict:
    lengths = config.evaluation.perplexity_lengths
    # a sweep variant serves finding 1 only, which reads the longest length: the shorter ones would cost time alone
    return {"lengths": lengths[-1:] if variant.sweep else lengths, "documents": config.evaluation.perplexity_documents}


def perplexity(context: StageContext, variant: Variant) -> list[dict]:
    from ropescope.eval.perplexity import evaluate_perplexity

    model, tokenizer = context.load(variant)
    settings = perplexity_settings(context.config, variant)
    return evaluate_perplexity(
        model, tokenizer, context.documents("validation"), settings["lengths"], protocols=("truncated",),
        max_documents=settings["documents"], progress=context.progress,
    )


def retrieval_settings(config: StudyConfig, variant: Variant) -> dict:
    return asdict(config.retrieval)


def retrieval(context: StageContext, variant: Variant) -> list[dict]:
    """Every configured retrieval task over the retrieval grid; rows carry their task."""
    from ropescope.eval.retrieval import evaluate_retrieval
    from ropescope.tasks.cases import needs_documents
    from ropescope.tasks.registry import get_task

    model, tokenizer = context.load(variant)
    settings = context.config.retrieval
    rows = []
    for name in settings.tasks:
        task = get_task(name)
        documents = context.documents("validation") if needs_documents(task, settings.independent_haystacks) else None
        rows += evaluate_retrieval(model, tokenizer, task, settings.lengths, settings.depths, trials=settings.trials,
                                   seed=context.config.seed, documents=documents,
                                   independent_haystacks=settings.independent_haystacks, progress=context.progress)
    return rows


def _with_position(rows: list[dict]) -> list[dict]:
    return [{**row, "position": (row["position_start"] + row["position_end"] - 1) / 2} for row in rows]


def entropy_settings(config: StudyConfig, variant: Variant) -> dict:
    return {"lengths": config.analysis.entropy_lengths, "samples": config.analysis.entropy_samples}


def entropy(context: StageContext, variant: Variant) -> list[dict]:
    """Attention entropy per layer, head and query-position bin at each analysis length."""
    from ropescope.attention.profiles import entropy_profile

    model, tokenizer = context.load(variant)
    settings = context.config.analysis
    rows = []
    for length in settings.entropy_lengths:
        samples = context.samples(tokenizer, length, settings.entropy_samples)
        rows += _with_position(entropy_profile(model, samples, position_bin_size=max(1, length // 32),
                                               progress=context.progress))
    return rows


def patterns_settings(config: StudyConfig, variant: Variant) -> dict:
    # the original model at its pretrained length (model.original_max_position_embeddings) is the reference
    return {"pattern_length": config.analysis.pattern_length, "samples": config.analysis.entropy_samples}


def patterns(context: StageContext, variant: Variant) -> list[dict]:
    """Attention against key distance at the pretrained and the extended length, and how well the variant keeps
    the pattern: the reference is the original model at its pretrained length (the paper's Figure 2(a))."""
    from ropescope.attention.patterns import pattern_preservation

    original = context.config.model.original_max_position_embeddings
    count = context.config.analysis.entropy_samples
    reference = context.distance_rows(ORIGINAL_VARIANT, original, count)
    at_pretrained = context.distance_rows(variant, original, count)
    extended = context.distance_rows(variant, context.config.analysis.pattern_length, count)
    preservation = [row for row in pattern_preservation(reference, extended) if row["layer"] != "mean"]
    return ([{**row, "row_type": "distribution"} for row in at_pretrained + extended]
            + [{**row, "row_type": "preservation"} for row in preservation])


def no_settings(config: StudyConfig, variant: Variant) -> dict:
    return {}


UNCERTAINTY_FIELDS = ("task", "length", "depth_percent", "trial", "correct", "entropy", "needle_mass",
                      "distractor_mass", "entropy_max")


def uncertainty(context: StageContext, variant: Variant) -> list[dict]:
    """The answering query's attention entropy, needle and distractor mass for every retrieval cell of this
    variant."""
    from ropescope.attention.uncertainty import retrieval_attention
    from ropescope.tasks.registry import rebuild_cases

    evaluated = context.required_rows("retrieval", variant)
    model, tokenizer = context.load(variant)
    cases = rebuild_cases(tokenizer, evaluated, documents=context.documents("validation"), seed=context.config.seed)
    return [{key: row[key] for key in UNCERTAINTY_FIELDS}
            for row in retrieval_attention(model, cases, evaluated, progress=context.progress)]


STAGES: tuple[Stage, ...] = (
    Stage("train", train, train_settings, fine_tuned_only=True, writes_checkpoint=True),
    Stage("perplexity", perplexity, perplexity_settings, requires=("train",), sweep=True),
    Stage("retrieval", retrieval, retrieval_settings, requires=("train",)),
    Stage("entropy", entropy, entropy_settings, requires=("train",)),
    Stage("patterns", patterns, patterns_settings, requires=("train",), sweep=True),
    # its settings are the retrieval cell's: they reach the fingerprint through `requires`
    Stage("uncertainty", uncertainty, no_settings, requires=("train", "retrieval")),
)
STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)
