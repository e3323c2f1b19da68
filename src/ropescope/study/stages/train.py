"""The train stage: continual pretraining of each extension at each training length ([training]). Its cells exist
for fine-tuned variants only and write the variant's checkpoint; its rows are the training curve."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from itertools import islice

from ropescope.errors import RopescopeError
from ropescope.io.data import token_blocks
from ropescope.study.config import ConfigTable, StudyConfig, check_fraction, one_of
from ropescope.study.context import StageContext, Variant, fits_own_scale
from ropescope.study.stage import Stage
from ropescope.tasks.passkey import RETRIEVAL_HAYSTACKS
from ropescope.train.batch import batch_size_for
from ropescope.train.continual import TrainConfig
from ropescope.train.continual import train as run_training


@dataclass(frozen=True)
class TrainingSection:
    # continual-pretraining lengths; [] = no fine-tuning (then include_untrained must be true)
    lengths: list[int] = field(default_factory=lambda: [512, 1024], metadata={"empty": True})
    steps: int = 40
    tokens_per_step: int = 8192  # the batch is tokens_per_step // length blocks, so lengths see equal tokens
    learning_rate: float = 1e-3
    warmup_steps: int = 3
    # the fraction of training blocks that are synthetic passkey examples instead of corpus text
    retrieval_mix: float = field(default=0.0, metadata={"check": check_fraction})
    # the text around the key in those examples: "filler" (the repeated sentences) or "corpus" (the block's own
    # text, what [retrieval] independent_haystacks evaluates)
    retrieval_haystack: str = field(default="filler", metadata={"check": one_of(RETRIEVAL_HAYSTACKS)})
    # tokens of the shortest single passkey example (drawn from here to the training length); None = the training
    # length. Above a fine-tune's length it is that length.
    retrieval_min_length: int | None = None
    include_untrained: bool = True  # also evaluate each extension applied without training ("NAME@0")
    # independent fine-tunes per (method, length), seeds config.seed + 0 .. seeds - 1 (data order, passkey draws):
    # finding 3 compares training runs, so it needs at least 2
    seeds: int = 1


def check_training(training: TrainingSection, source: str) -> None:
    if not training.lengths and not training.include_untrained:
        raise RopescopeError(f"{source}: 'training.lengths' = [] and 'training.include_untrained' = false leave no "
                             "extension to evaluate; give a length or set include_untrained = true")


def settings(config: StudyConfig, variant: Variant) -> dict:
    training = config.training
    values = {"length": variant.train_length, "steps": training.steps, "tokens_per_step": training.tokens_per_step,
              "learning_rate": training.learning_rate, "warmup_steps": training.warmup_steps,
              "retrieval_mix": training.retrieval_mix}
    if training.retrieval_mix and training.retrieval_haystack != "filler":  # filler: the fingerprint before the option
        values["retrieval_haystack"] = training.retrieval_haystack
    if training.retrieval_mix and training.retrieval_min_length is not None:  # unset: the fingerprint before it
        values["retrieval_min_length"] = min(training.retrieval_min_length, variant.train_length)
    # the first seed's fingerprint stays what it was before seeds existed, so adding seeds retrains nothing
    return {**values, "train_seed": variant.train_seed} if variant.train_seed else values


def run(context: StageContext, variant: Variant) -> list[dict]:
    """Continual pretraining of the extension at `variant.train_length`; rows are the training curve."""
    training = context.config.training
    out = context.checkpoint_dir(variant)
    run_training(TrainConfig(
        model=context.config.model.path,
        # a "fit" scale is fitted to the fine-tune afterwards (scale_fit): it trains without one
        spec=(variant.spec.without_logit_scale() if fits_own_scale(variant) else variant.spec).to_dict(),
        length=variant.train_length,
        steps=training.steps,
        corpus=context.corpus,
        batch_size=batch_size_for(training.tokens_per_step, variant.train_length),
        learning_rate=training.learning_rate,
        warmup_steps=training.warmup_steps,
        seed=context.config.seed + variant.train_seed,
        out=str(out),
        overwrite=True,
        progress=context.progress,
        retrieval_mix=training.retrieval_mix,
        retrieval_haystack=training.retrieval_haystack,
        retrieval_min_length=settings(context.config, variant).get("retrieval_min_length"),
    ))
    with (out / "metrics.csv").open(newline="") as handle:
        return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]


def check_inputs(config: StudyConfig, context: StageContext, tokenizer) -> None:
    """The train split fills one training step at every training length."""
    if not config.training.lengths:
        return
    documents = context.documents("train")
    # a token spans at least one byte in the tokenizers we meet: a corpus far too small is refused without
    # tokenizing it all
    corpus_bytes = sum(len(document.encode("utf-8")) + 1 for document in documents)
    for length in config.training.lengths:
        batch = batch_size_for(config.training.tokens_per_step, length)
        if 2 * corpus_bytes < batch * length or \
                len(list(islice(token_blocks(tokenizer, documents, length), batch))) < batch:
            raise RopescopeError(
                f"corpus {config.corpus.path!r} (train split) does not fill {batch} blocks of {length} tokens, "
                f"one training step at training.lengths {length}; give shorter lengths or a larger corpus")


STAGE = Stage("train", run, settings, fine_tuned_only=True, writes_checkpoint=True,
              table=ConfigTable("training", TrainingSection, check=check_training), check_inputs=check_inputs)
