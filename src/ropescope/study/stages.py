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
