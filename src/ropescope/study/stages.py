"""One function per study stage: `stage(study, variant) -> rows`. Each composes library functions only."""

from __future__ import annotations

import csv

from ropescope.study.runner import Study, Variant


def train(study: Study, variant: Variant) -> list[dict]:
    """Continual pretraining of the extension at `variant.train_length`; rows are the training curve."""
    from ropescope.train import TrainConfig
    from ropescope.train import train as run_training

    settings = study.config.training
    out = study.checkpoint_dir(variant)
    run_training(TrainConfig(
        model=study.config.model.path,
        spec=variant.spec.to_dict(),
        length=variant.train_length,
        steps=settings.steps,
        corpus=None if study.config.corpus.path == "default" else study.config.corpus.path,
        batch_size=max(1, settings.tokens_per_step // variant.train_length),
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        seed=study.config.seed,
        out=str(out),
        overwrite=True,
        progress=study.progress,
    ))
    with (out / "metrics.csv").open(newline="") as handle:
        return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]


def perplexity(study: Study, variant: Variant) -> list[dict]:
    from ropescope.eval.perplexity import evaluate_perplexity

    model, tokenizer = study.load(variant)
    settings = study.config.evaluation
    return evaluate_perplexity(
        model, tokenizer, study.documents("validation"), settings.perplexity_lengths, protocols=("truncated",),
        max_documents=settings.perplexity_documents, progress=study.progress,
    )


def passkey(study: Study, variant: Variant) -> list[dict]:
    from ropescope.eval.passkey import evaluate_passkey

    model, tokenizer = study.load(variant)
    settings = study.config.evaluation
    return evaluate_passkey(
        model, tokenizer, settings.passkey_lengths, settings.passkey_depths, trials=settings.passkey_trials,
        seed=study.config.seed, progress=study.progress,
    )


def _with_position(rows: list[dict]) -> list[dict]:
    return [{**row, "position": (row["position_start"] + row["position_end"] - 1) / 2} for row in rows]


def entropy(study: Study, variant: Variant) -> list[dict]:
    """Attention entropy per layer, head and query-position bin at each analysis length."""
    from ropescope.attention.profiles import entropy_profile

    model, tokenizer = study.load(variant)
    settings = study.config.analysis
    rows = []
    for length in settings.entropy_lengths:
        samples = study.samples(tokenizer, length, settings.entropy_samples)
        rows += _with_position(entropy_profile(model, samples, position_bin_size=max(1, length // 32),
                                               progress=study.progress))
    return rows


def patterns(study: Study, variant: Variant) -> list[dict]:
    """Attention against key distance at the pretrained and the extended length, and how well the variant keeps
    the pattern: the reference is the original model at its pretrained length (the paper's Figure 2(a))."""
    from ropescope.attention.patterns import distance_distribution, pattern_preservation

    pretrained_length = study.config.model.pretrained_length
    extended_length = study.config.analysis.pattern_length
    count = study.config.analysis.entropy_samples
    original, tokenizer = study.load(study.original_variant())
    reference = distance_distribution(original, study.samples(tokenizer, pretrained_length, count),
                                      pretrained_length=pretrained_length, progress=study.progress)
    model, tokenizer = study.load(variant)
    at_pretrained = distance_distribution(model, study.samples(tokenizer, pretrained_length, count),
                                          pretrained_length=pretrained_length, progress=study.progress)
    extended = distance_distribution(model, study.samples(tokenizer, extended_length, count),
                                     pretrained_length=pretrained_length, progress=study.progress)
    preservation = [row for row in pattern_preservation(reference, extended) if row["layer"] != "mean"]
    return ([{**row, "row_type": "distribution"} for row in at_pretrained + extended]
            + [{**row, "row_type": "preservation"} for row in preservation])


def uncertainty(study: Study, variant: Variant) -> list[dict]:
    """The answering query's attention entropy and needle mass for every passkey cell of this variant."""
    from ropescope.attention.uncertainty import rebuild_cases, retrieval_attention

    evaluated = [row for row in study.store.rows("passkey") if row["variant"] == variant.name]
    if not evaluated:
        raise RuntimeError(f"no passkey rows for {variant.name}: its passkey cell has not finished")
    model, tokenizer = study.load(variant)
    cases = rebuild_cases(tokenizer, evaluated, seed=study.config.seed)
    fields = ("length", "depth_percent", "trial", "correct", "entropy", "needle_mass", "entropy_max")
    return [{key: row[key] for key in fields}
            for row in retrieval_attention(model, cases, evaluated, progress=study.progress)]
