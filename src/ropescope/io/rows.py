"""Typed result rows: one dataclass per kind of row that evaluation and attention analysis produce.

A row on disk (CSV, JSON, the study database) is the dict `row.to_dict(labels)`: the labels first (which model,
extended how; see `RunLabels`), then the row's own fields in the order declared here. Readers turn a dict back
into a row with `Kind.from_dict(data)`, which names the first missing field. The pretrained context length is
`original_max_position_embeddings` everywhere, as in transformers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from ropescope.errors import RopescopeError


@dataclass(frozen=True, kw_only=True)
class Row:
    """The shared behaviour of every row kind."""

    def to_dict(self, labels: Mapping | RunLabels | None = None) -> dict[str, Any]:
        """`{**labels, **fields}`: the dict written to disk, labels first."""
        if isinstance(labels, RunLabels):
            labels = labels.to_dict()
        return {**(labels or {}), **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "rows") -> "Row":
        """The row from a dict holding (at least) its fields; extra keys (labels) are ignored."""
        values = {}
        for field in fields(cls):
            if field.name in data:
                values[field.name] = data[field.name]
            elif field.default is MISSING:
                raise RopescopeError(f"{source} lack the field {field.name!r} of a {cls.kind()} row")
        return cls(**values)

    @classmethod
    def kind(cls) -> str:
        return cls.__name__.removesuffix("Row").lower()

    @classmethod
    def keys(cls) -> list[str]:
        return [field.name for field in fields(cls)]


@dataclass(frozen=True, kw_only=True)
class RunLabels(Row):
    """What every row carries first, from a command or a study: the model and the extension applied to it.

    model: as the user named it ('default', a folder, a .gguf file, a short name or a Hub id); revision: the Hub
    commit or the GGUF file's hash, where known; device and dtype: where and in what precision it ran (None in rows
    written before they were recorded); method / factor / original_max_position_embeddings: the RoPE extension ('default':
    the model as trained), and `rope`, all its parameters as `--method` takes them. A study's rows also name the
    variant: its name, its [methods.NAME] key, the fine-tune's length and seed index (None: not fine-tuned, or
    not in a study).
    """

    model: str
    revision: str | None = None
    device: str | None = None
    dtype: str | None = None
    method: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    rope: str = "default"
    variant: str | None = None
    method_name: str | None = None
    train_length: int | None = None
    train_seed: int | None = None


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True, kw_only=True)
class PerplexityRow(Row):
    """Perplexity at one length by one protocol (truncated or sliding), over `documents` long documents."""

    task: str = "perplexity"
    protocol: str
    length: int
    stride: int | None  # the sliding protocol's step; None for truncated
    documents: int
    tokens_scored: int
    nll: float  # mean negative log-likelihood per scored token, nats
    perplexity: float
    document_nll: list[float] = field(default_factory=list)  # each document's mean NLL, for intervals over documents


@dataclass(frozen=True, kw_only=True)
class RetrievalRow(Row):
    """One retrieval prompt of a registered task (`ropescope tasks`) and how the model answered it.

    `answer` is the expected answers joined by ', '; `needle_start` / `needle_end` the first needle's span;
    `facts` every inserted fact as [start, end, role] (role: needle or distractor); `score` and `correct` as the
    task scores them.
    """

    task: str
    length: int
    answer: str
    needle_start: int  # token span of the (first) hidden needle, end exclusive
    needle_end: int
    question_position: int  # index of the last prompt token
    depth_percent: float
    trial: int
    seed: int
    score: float
    correct: bool
    prediction: str
    facts: list = field(default_factory=list)
    independent_haystacks: bool = False  # each trial had its own corpus haystack and values
    independent_keys: bool = False  # in the repeated filler, each trial had its own key and filler start
    # the answering query's attention read in the prompt's own prefill, per layer (means over heads): {"entropy",
    # "needle_mass", "distractor_mass" (None without distractors)}; None where it was not read
    answer_attention: dict | None = None


# A layer's attention type as transformers' configs name it (`layer_types`); rows written before the column came from
# models whose layers were all of this type.
FULL_LAYER_TYPE = "full_attention"
SLIDING_LAYER_TYPE = "sliding_attention"


# ---------------------------------------------------------------------------------------------------------------
# Attention


@dataclass(frozen=True, kw_only=True)
class EntropyProfileRow(Row):
    """Mean attention entropy (nats) of one head over a query-position bin [position_start, position_end)."""

    length: int
    layer: int
    layer_type: str  # as the config names it: "full_attention", or "sliding_attention" (Gemma 3's local layers)
    head: int
    position_start: int
    position_end: int
    entropy: float
    entropy_max: float  # entropy of uniform attention over the visible keys, for scale
    samples: int
    # Each sample's mean over all the head's queries at this length, for intervals over samples; the same list on
    # every bin of the head (gzip stores it once), since a list per bin would be most of a study's database.
    head_sample_entropy: list[float] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class ScaleFitRow(Row):
    """One layer of a fitted logit scale (`ropescope fit-scale`): the scale, and the layer's mean attention entropy
    (nats) at `length` before and after it, against the target measured on the original model at
    `target_length`. fitted_method: the `--method` string that applies every layer's fitted scale."""

    length: int
    target_length: int
    layer: int
    logit_scale: float
    target_entropy: float
    entropy_before: float
    entropy_after: float
    per_layer: bool
    forwards: int
    converged: bool
    fitted_method: str

    @classmethod
    def of_fit(cls, fit, length: int, target_length: int, fitted_method: str) -> list[ScaleFitRow]:
        """One row per layer of a `ropescope.attention.scale_fit.ScaleFit` found at `length`."""
        return [cls(length=length, target_length=target_length, layer=layer, logit_scale=scale,
                    target_entropy=want, entropy_before=before, entropy_after=after, per_layer=fit.per_layer,
                    forwards=fit.forwards, converged=fit.converged, fitted_method=fitted_method)
                for layer, (scale, want, before, after) in enumerate(zip(fit.scales, fit.target, fit.before,
                                                                         fit.after))]


@dataclass(frozen=True, kw_only=True)
class DistanceRow(Row):
    """Attention mass of one head in one rescaled key-distance bin [distance_start, distance_end)."""

    length: int
    original_max_position_embeddings: int
    distance_scale: float  # length / original_max_position_embeddings
    layer: int
    layer_type: str
    head: int
    bin: int
    distance_start: int
    distance_end: int
    mass: float
    queries: int
    samples: int


@dataclass(frozen=True, kw_only=True)
class PreservationRow(Row):
    """Jensen-Shannon divergence (nats) of one layer's distance distribution from the reference's."""

    length: int
    reference_length: int
    layer: int | str  # "mean": the average over layers
    layer_type: str  # "all" on the mean row
    js_divergence: float  # mean over heads
    js_divergence_max_head: float


@dataclass(frozen=True, kw_only=True)
class UncertaintySummaryRow(Row):
    """Answering-query entropy, needle and distractor mass on correct vs failed prompts of one (model, method, factor,
    task)."""

    model: str | None = None
    method: str | None = None
    factor: float | None = None
    task: str
    layer: int | str  # "mean": the mean over layers
    cells: int  # prompts read (the column keeps the name it has on disk)
    failures: int
    entropy_correct: float
    entropy_failed: float
    needle_mass_correct: float
    needle_mass_failed: float
    distractor_mass_correct: float = math.nan  # attention on inserted facts the question does not ask for
    distractor_mass_failed: float = math.nan
    auroc_entropy_predicts_failure: float


@dataclass(frozen=True, kw_only=True)
class FrequencyRow(Row):
    """One dimension pair of one method: its rotation speed and wavelength against the original RoPE's."""

    method: str  # the spec's label, e.g. "yarn x4"
    pair: int
    inv_freq: float
    wavelength: float  # 2 pi / inv_freq, tokens
    ratio: float  # original inv_freq / this inv_freq
    attention_scale: float
    head_dim: int
    base: float
    seq_len: int | None


@dataclass(frozen=True, kw_only=True)
class EngineRow(Row):
    """One serving engine at one length: what it computes from the saved config against what ropescope applies.

    The differences are the largest relative ones over the dimension pairs (None: the engine cannot read the
    config); longest_length is the most tokens the engine serves by default (None: no limit); verdict is "same",
    "differs: ...", "serves it statically: ..." or "cannot read TYPE: ..." (`ropescope.rope.engines.compare`).
    """

    engine: str
    engine_version: str
    rope_type: str  # as the saved config names it
    length: int
    inv_freq_difference: float | None
    attention_scale: float | None  # the engine's
    ropescope_attention_scale: float
    attention_scale_difference: float | None
    longest_length: int | None
    verdict: str
    note: str = ""


def as_bool(value) -> bool:
    """A `correct` field from JSON (bool, number) or CSV (text)."""
    if isinstance(value, str):
        if value.strip().lower() in ("true", "1", "yes"):
            return True
        if value.strip().lower() in ("false", "0", "no", ""):
            return False
        raise RopescopeError(f"correct={value!r} is not a truth value; accepted: true/false/1/0")
    return bool(value)


def point_means(rows: list[Mapping], value: str = "score") -> list[dict]:
    """The mean of `value` at each (length, depth_percent) point of a retrieval grid, points in sorted order:
    [{length, depth_percent, <value>, trials}]."""
    points: dict[tuple, list[float]] = {}
    for row in rows:
        points.setdefault((row["length"], row["depth_percent"]), []).append(float(row[value]))
    return [{"length": length, "depth_percent": depth, value: sum(scores) / len(scores), "trials": len(scores)}
            for (length, depth), scores in sorted(points.items())]


def several_layer_types(rows: list[Mapping]) -> list[str]:
    """The layer types of rows from a model with more than one (Gemma 3's sliding and global layers), in first-seen
    order, each to be drawn apart; [] for a model of one type."""
    types = list(dict.fromkeys(row.get("layer_type", FULL_LAYER_TYPE) for row in rows))
    return types if len(types) > 1 else []


def layer_type_means(rows: list[Mapping], value: str,
                     by: tuple[str, ...] = ("method", "factor", "length")) -> list[dict]:
    """The mean of `value` over the per-layer rows (layer an int) of each layer type, per `by` group, in first-seen
    order: [{**by, layer_type, <value>, layers}]. Models of one layer type get one entry per group."""
    groups: dict[tuple, dict[str, list]] = {}
    for row in rows:
        if isinstance(row["layer"], int):
            key = (tuple(row.get(name) for name in by), row.get("layer_type", FULL_LAYER_TYPE))
            groups.setdefault(key, {"values": [], "layers": set()})
            groups[key]["values"].append(float(row[value]))
            groups[key]["layers"].add(row["layer"])
    return [{**dict(zip(by, labels)), "layer_type": layer_type, value: sum(group["values"]) / len(group["values"]),
             "layers": len(group["layers"])} for (labels, layer_type), group in groups.items()]
