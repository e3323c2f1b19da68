"""What a study stage works on: the `Variant` it evaluates and the `StageContext` it runs in (the config, the
output folder, model loading, evaluation samples and the rows of the cells it requires). Stages and the runner
both import this module; it imports neither.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from ropescope.attention.patterns import distance_distribution
from ropescope.errors import RopescopeError
from ropescope.io.data import load_corpus, token_blocks
from ropescope.io.rows import RunLabels
from ropescope.model.load import ModelOptions, load, model_dtype
from ropescope.model.resolve import resolve_model
from ropescope.rope import RopeSpec, rope_frequencies
from ropescope.study.config import StudyConfig


@dataclass(frozen=True)
class Variant:
    """One model the study evaluates: a method, fine-tuned at `train_length` tokens or (None) applied as is."""
    name: str  # "original", "yarn@0", "yarn@1024", "yarn@1024-s1" (the second training seed)
    method_name: str  # the [methods.NAME] key
    spec: RopeSpec
    train_length: int | None = None
    train_seed: int = 0  # the fine-tune's index among `training.seeds`; its training seed is config.seed + this
    sweep: bool = False  # an untrained variant for finding 1 only: perplexity and pattern

    @property
    def is_original(self) -> bool:
        return self.spec.method == "default"

    @property
    def fine_tuned(self) -> bool:
        return self.train_length is not None

    def labels(self, model: str, original_max_position_embeddings: int | None, revision: str | None = None,
               device: str | None = None, dtype: str | None = None) -> RunLabels:
        """The labels of this variant's rows: the base model as the config names it, the extension, the variant."""
        params = self.spec.params
        return RunLabels(
            model=model, revision=revision, device=device, dtype=dtype, method=self.spec.method, factor=params.get("factor"),
            original_max_position_embeddings=params.get("original_max_position_embeddings")
            or original_max_position_embeddings, rope=self.spec.to_text(), variant=self.name,
            method_name=self.method_name, train_length=self.train_length,
            train_seed=self.train_seed if self.fine_tuned else None,
        )


ORIGINAL_VARIANT = Variant("original", "original", RopeSpec("default"))  # the pretrained model as it is


def plan_variants(config: StudyConfig) -> list[Variant]:
    """Every variant of a config in study order: per method, as is ("NAME@0") and then per training length and
    seed ("NAME@LENGTH" for the first seed, so adding seeds adds variants and renames none; "NAME@LENGTH-sK" for
    the others); a sweep method only as is."""
    variants = []
    for name, spec in config.methods.items():
        if spec.method == "default":
            variants.append(Variant(name, name, spec))
            continue
        if name in config.sweep:
            variants.append(Variant(f"{name}@0", name, spec, sweep=True))
            continue
        if config.training.include_untrained:
            variants.append(Variant(f"{name}@0", name, spec))
        variants += [Variant(f"{name}@{length}" + (f"-s{seed}" if seed else ""), name, spec, length, seed)
                     for length in config.training.lengths for seed in range(config.training.seeds)]
    return variants


def repeated_extensions(config: StudyConfig, rotary_dim: int, base: float) -> list[tuple[str, str]]:
    """Pairs of [methods.NAME] that are the same extension on a model of this rotary dimension and base: equal
    inverse frequencies and attention scale at every length the study uses (dynamic methods change with it). Such
    a pair evaluates one model twice and would count it twice in finding 1 (e.g. YaRN's beta_fast above what the
    pretrained length allows: its ramp starts at the first pair either way)."""
    lengths = sorted({*config.evaluation.perplexity_lengths, *config.analysis.entropy_lengths,
                      *config.training.lengths})
    seen: dict[tuple, str] = {}
    pairs = []
    for name, spec in config.methods.items():
        if spec.method == "default":
            continue
        key = tuple((tuple(inv_freq.tolist()), scale) for inv_freq, scale in
                    (rope_frequencies(spec, rotary_dim, base, length) for length in (None, *lengths)))
        if key in seen:
            pairs.append((seen[key], name))
        else:
            seen[key] = name
    return pairs


def cell_name(stage: str, variant: Variant) -> str:
    return f"{stage}/{variant.name}"


def fits_own_scale(variant: Variant) -> bool:
    """A variant whose own `logit_scale` is "fit": the scale-fit cell finds it, every other cell loads it."""
    return variant.spec.logit_scale == "fit"


def fit_length(config: StudyConfig, variant: Variant) -> int:
    """The length a variant's own `logit_scale = "fit"` is fitted at: the length its extension is meant for, its
    factor times the pretrained length (the pretrained length for a method without a factor)."""
    return int(round(config.model.original_max_position_embeddings * (variant.spec.params.get("factor") or 1)))


def fitted_scales(rows: list[dict]) -> dict[int, list[float]]:
    """Length -> each layer's fitted scale, in layer order, from the scale-fit cell's rows (one per layer)."""
    by_length: dict[int, dict[int, float]] = {}
    for row in rows:
        by_length.setdefault(row["length"], {})[row["layer"]] = row["logit_scale"]
    return {length: [scales[layer] for layer in sorted(scales)] for length, scales in by_length.items()}


def checkpoint_dir(out: str | Path, variant: Variant) -> Path:
    """Where a fine-tuned variant's checkpoint lives inside the study folder."""
    return Path(out) / "checkpoints" / variant.name


@dataclass
class CellPieces:
    """The pieces of the running cell finished so far (a retrieval cell's grid points), each kept as it finishes,
    so that an interrupted cell resumes from its last piece instead of from its start. The runner fills it from the
    results database, for the cell's fingerprint; where nothing keeps them (a Ray worker) pieces live only in
    memory. Keys are strings the stage chooses; a piece's rows are exactly what it computed."""

    saved: dict[str, list[dict]] = field(default_factory=dict)
    keep: Callable[[str, list[dict]], None] | None = None

    def get(self, key: str) -> list[dict] | None:
        return self.saved.get(key)

    def put(self, key: str, rows: list[dict]) -> None:
        self.saved[key] = rows
        if self.keep is not None:
            self.keep(key, rows)


@dataclass
class StageContext:
    """Everything a stage may use besides its variant. `required_rows(stage, variant)` returns the recorded rows
    of a cell the running stage declared in `requires` (the runner fills it; a stage never reads the database)."""
    config: StudyConfig
    out: Path
    required_rows: Callable[[str, Variant], list[dict]]
    progress: bool | None = None
    device: str = "cpu"
    pieces: CellPieces = field(default_factory=CellPieces)  # the running cell's, set by the runner
    _documents: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _distributions: dict[tuple, list[dict]] = field(default_factory=dict, repr=False)
    _loaded_dtype: str | None = field(default=None, repr=False)

    def checkpoint_dir(self, variant: Variant) -> Path:
        return checkpoint_dir(self.out, variant)

    @property
    def corpus(self) -> str | None:
        """The corpus path for ropescope.io.data: None is the shipped corpus."""
        return None if self.config.corpus.path == "default" else self.config.corpus.path

    def documents(self, split: str) -> list[str]:

        if split not in self._documents:
            self._documents[split] = load_corpus(self.corpus, split=split)
        return self._documents[split]

    def samples(self, tokenizer, length: int, count: int) -> list:
        """The first `count` validation blocks of `length` tokens (the same blocks for every variant)."""
        blocks = list(islice(token_blocks(tokenizer, self.documents("validation"), length), count))
        if len(blocks) < count:
            raise RopescopeError(
                f"the validation corpus fills {len(blocks)} blocks of {length} tokens; the study needs {count}")
        return blocks

    @functools.cached_property
    def revision(self) -> str | None:
        """The model's revision (a Hub commit, a GGUF file's hash), read once per process."""
        return resolve_model(self.config.model.path).revision

    @functools.cached_property
    def evaluation_dtype(self) -> str:
        """The dtype a variant loads in for evaluation (`ModelOptions`' auto: bfloat16 for a large model on a CPU
        that multiplies it natively), read once per process from the model's config."""
        return model_dtype(self.config.model.path, ModelOptions(device=self.device))

    @property
    def dtype(self) -> str:
        """The dtype of the rows of the cell running now: that of the model it last loaded, else (a cell that
        reads recorded rows) the evaluation dtype that produced them."""
        return self._loaded_dtype or self.evaluation_dtype

    def labels(self, variant: Variant) -> RunLabels:
        """The labels every row of the variant starts with."""
        return variant.labels(self.config.model.path, self.config.model.original_max_position_embeddings,
                              self.revision, self.device, self.dtype)

    def distance_rows(self, variant: Variant, length: int, count: int) -> list[dict]:
        """`distance_distribution` of a variant on the first `count` blocks of `length` tokens, kept for the rest
        of this process: the original model at its pretrained length is every variant's pattern reference, and a
        16K-token capture of a real model takes minutes."""
        key = ("original" if variant.is_original and not variant.fine_tuned else variant.name, length, count)
        if key not in self._distributions:
            model, tokenizer = self.load(variant, entropy_capture=True)
            self._distributions[key] = distance_distribution(
                model, self.samples(tokenizer, length, count),
                original_max_position_embeddings=self.config.model.original_max_position_embeddings,
                progress=self.progress)
        self._loaded_dtype = model_dtype(self.config.model.path, ModelOptions(device=self.device,
                                                                              entropy_capture=True))
        return self._distributions[key]

    def load(self, variant: Variant, spec: RopeSpec | None = None, entropy_capture: bool = False):
        """(model, tokenizer) of a variant: its fine-tuned checkpoint, or the base model extended as is. spec: the
        extension to apply in place of the variant's own (the same method with another logit scale), to the
        checkpoint or the base model. entropy_capture: for whole-sequence attention readouts (see `ModelOptions`).
        A variant whose logit scale is "fit" loads with the scales its scale-fit cell found (a stage that loads it
        requires "scale_fit")."""
        options = ModelOptions(device=self.device, entropy_capture=entropy_capture)
        if spec is None and fits_own_scale(variant):
            scales = fitted_scales(self.required_rows("scale_fit", variant))[fit_length(self.config, variant)]
            spec = variant.spec.with_logit_scale(scales)
        if variant.fine_tuned:
            loaded = load(self.checkpoint_dir(variant), spec, options=options)
        else:
            loaded = load(self.config.model.path, spec or (None if variant.is_original else variant.spec), options)
        self._loaded_dtype = loaded.labels.dtype
        return loaded.model, loaded.tokenizer
