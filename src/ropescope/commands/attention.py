"""The attention analyses end to end, as the CLI runs them: load models, build inputs, compute, write rows and plots.

Each `run_*` resolves the model and the methods' specs and tokenizes its inputs (corpus long enough) before any
weights load or any file is written, then composes the library. Models load through `ropescope.model.load.load`, as
the evaluation commands load them, so rows from both line up. Each writes fixed file names into its `out` folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ropescope.attention.patterns import distance_distribution, pattern_preservation
from ropescope.attention.profiles import entropy_profile
from ropescope.attention.uncertainty import failure_summary, retrieval_attention
from ropescope.errors import RopescopeError
from ropescope.io.data import load_corpus, token_blocks
from ropescope.io.plots import (plot_attention_distance, plot_entropy_heatmap, plot_entropy_position,
                                plot_pattern_preservation)
from ropescope.io.results import read_rows, write_rows
from ropescope.io.rows import RetrievalRow, as_bool, several_layer_types
from ropescope.model.load import ModelOptions, extension_specs, load, load_tokenizer
from ropescope.model.resolve import ModelSource, pretrained_length_of, resolve_model
from ropescope.rope import RopeSpec
from ropescope.tasks.cases import needs_documents
from ropescope.tasks.registry import TASKS, get_task, rebuild_cases


def token_samples(tokenizer, length: int, samples: int, corpus: str | Path | None, split: str) -> list:
    """The first `samples` token blocks of `length` tokens from the corpus split (None: the shipped corpus)."""
    blocks = []
    for block in token_blocks(tokenizer, load_corpus(corpus, split=split), block_length=length):
        blocks.append(block)
        if len(blocks) == samples:
            return blocks
    raise RopescopeError(f"the {split} corpus holds only {len(blocks)} blocks of {length} tokens; asked for {samples}")


def _samples_by_length(source: ModelSource, lengths: Sequence[int], samples: int, corpus,
                       split: str) -> dict[int, list]:
    """Token blocks for every length, tokenized once with the model's tokenizer (before any weights load)."""
    tokenizer = load_tokenizer(source)
    return {length: token_samples(tokenizer, length, samples, corpus, split) for length in sorted(set(lengths))}


def _load(source: ModelSource, spec: RopeSpec, options: ModelOptions | None, original: int, split: str):
    """The model with `spec` applied, for whole-sequence attention readouts (`ModelOptions.entropy_capture`), and
    the labels its rows start with (the analysis' pretrained length)."""
    loaded = load(source, spec, replace(options or ModelOptions(), entropy_capture=True))
    labels = replace(loaded.labels, original_max_position_embeddings=original)
    return loaded, {**labels.to_dict(), "split": split}


def _setup(model, methods: Sequence[str | RopeSpec], factor: float | None, original: int | None):
    """(source, specs, original length): every name checked before anything loads."""
    source = resolve_model(model)
    original = original or pretrained_length_of(source)
    return source, extension_specs(source, methods, factor, original), original


def run_entropy(model: str = "default", methods: Sequence[str | RopeSpec] = ("default",), *,
                factor: float | None = None, lengths: Sequence[int] | None = None, samples: int = 4,
                original_max_position_embeddings: int | None = None, corpus=None, split: str = "validation",
                chunk_size: int = 512, position_bin_size: int | None = None, options: ModelOptions | None = None,
                out: str | Path = "results/entropy", progress: bool | None = None) -> list[dict]:
    """Entropy profiles of every method at every length (default: 1x, 2x and 4x the pretrained length) ->
    out/entropy.csv and out/entropy.png (and out/entropy_<layer type>.png for a model of several layer types)."""
    source, specs, original = _setup(model, methods, factor, original_max_position_embeddings)
    lengths = list(lengths or [original, 2 * original, 4 * original])
    blocks = _samples_by_length(source, lengths, samples, corpus, split)
    rows = []
    for spec in specs:
        loaded, labels = _load(source, spec, options, original, split)
        for length in lengths:
            rows += entropy_profile(loaded.model, blocks[length], chunk_size=chunk_size,
                                    position_bin_size=position_bin_size, progress=progress, labels=labels)
    out = Path(out)
    write_rows(rows, out / "entropy.csv")
    plot_entropy_position(rows, out / "entropy.png", original)
    for layer_type in several_layer_types(rows):
        plot_entropy_position(rows, out / f"entropy_{layer_type}.png", original, layer_type=layer_type)
    return rows


def run_patterns(model: str = "default", methods: Sequence[str | RopeSpec] = (), *, factor: float | None = None,
                 length: int | None = None, samples: int = 4, original_max_position_embeddings: int | None = None,
                 corpus=None, split: str = "validation", query_fraction: float = 0.125, bins_per_octave: int = 1,
                 chunk_size: int = 512, options: ModelOptions | None = None, out: str | Path = "results/patterns",
                 progress: bool | None = None) -> list[dict]:
    """Attention against distance at the pretrained and the extended length (default: factor x pretrained, 4x
    without a factor) for the original model and every method, and each one's pattern preservation (JS divergence
    from the original model at the pretrained length). Writes out/patterns_distance.csv,
    out/patterns_preservation.csv, out/attention_distance.png (and out/attention_distance_<layer type>.png for a
    model of several layer types) and out/pattern_preservation.png; returns the preservation rows."""
    # The reference is the original model at its pretrained length: include it even when not asked for.
    source, specs, original = _setup(model, ["default", *methods], factor, original_max_position_embeddings)
    specs = [specs[0], *[spec for spec in specs[1:] if spec.method != "default"]]
    length = length or int(round((factor or 4.0) * original))
    blocks = _samples_by_length(source, [original, length], samples, corpus, split)
    distributions: list[tuple[dict, list[dict]]] = []
    for spec in specs:
        loaded, labels = _load(source, spec, options, original, split)
        for current in sorted(blocks):
            distributions.append((labels, distance_distribution(
                loaded.model, blocks[current], original_max_position_embeddings=original,
                query_fraction=query_fraction, bins_per_octave=bins_per_octave, chunk_size=chunk_size,
                progress=progress, labels=labels,
            )))
    reference = distributions[sorted(blocks).index(original)][1]  # the original model at the pretrained length
    preservation = [row for labels, rows in distributions for row in pattern_preservation(reference, rows, labels)]
    distance_rows = [row for _, rows in distributions for row in rows]
    out = Path(out)
    write_rows(distance_rows, out / "patterns_distance.csv")
    write_rows(preservation, out / "patterns_preservation.csv")
    plot_attention_distance(distance_rows, out / "attention_distance.png")
    for layer_type in several_layer_types(distance_rows):
        plot_attention_distance(distance_rows, out / f"attention_distance_{layer_type}.png", layer_type=layer_type)
    plot_pattern_preservation(preservation, out / "pattern_preservation.png")
    return preservation


def evaluation_groups(rows: Sequence[dict]) -> dict[tuple, list[dict]]:
    """Evaluation rows grouped by the extension they ran with: their `rope` (the whole spec), or for rows without
    one, (method, factor, original_max_position_embeddings)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        method = row.get("rope") or row.get("method") or "default"
        key = (method, None, None) if method == "default" or row.get("rope") else (
            method, row.get("factor"), row.get("original_max_position_embeddings"))
        groups.setdefault(key, []).append(row)
    return groups


def read_evaluation_rows(path: str | Path, only_methods: Sequence[str] | None = None,
                         only_factors: Sequence[float] | None = None) -> list[dict]:
    """Retrieval rows of registered tasks from a rows file, each checked as a `RetrievalRow`, kept where the
    filters match (a row without a factor matches every factor)."""
    rows = read_rows(path)
    if only_methods:
        rows = [row for row in rows if (row.get("method") or "default") in only_methods]
    if only_factors:
        rows = [row for row in rows if row.get("factor") in (None, "", *only_factors)]
    if not rows:
        raise RopescopeError(f"no evaluation rows in {str(path)!r} match method={only_methods} factor={only_factors}")
    for row in rows:
        if row.get("task") not in TASKS:
            raise RopescopeError(f"a row in {str(path)!r} has task={row.get('task')!r}; accepted: {', '.join(TASKS)}")
        RetrievalRow.from_dict(row, source=f"evaluation rows in {str(path)!r}")
    return rows


def evaluated_model(rows: Sequence[dict], path: str | Path) -> str:
    """The one model that evaluation rows name (rows without a `model` field: the shipped one)."""
    named = sorted({str(row.get("model") or "default") for row in rows})
    if len(named) > 1:
        raise RopescopeError(f"the rows in {str(path)!r} come from {len(named)} models ({', '.join(named)}); "
                             "give --model, or rows of one model")
    return named[0]


def run_uncertainty(rows: str | Path, model: str | None = None, *, only_methods: Sequence[str] | None = None,
                    only_factors: Sequence[float] | None = None, corpus=None, split: str = "validation",
                    chunk_size: int = 512, options: ModelOptions | None = None,
                    out: str | Path = "results/uncertainty", progress: bool | None = None) -> list[dict]:
    """Answering-query entropy, needle and distractor mass for every retrieval row (from `ropescope retrieval`,
    `passkey` or `needle`), each group of rows on the model it was evaluated with (`model`; None: the one the rows
    name). Writes out/uncertainty.csv, out/uncertainty_summary.json and out/entropy_heatmap.png; returns the
    summary rows."""
    evaluated = read_evaluation_rows(rows, only_methods, only_factors)
    groups = evaluation_groups(evaluated)
    source = resolve_model(model or evaluated_model(evaluated, rows))
    specs = {key: extension_specs(source, [key[0]], key[1], key[2])[0] for key in groups}
    haystack = None
    if any(needs_documents(get_task(row["task"]), as_bool(row.get("independent_haystacks") or False))
           for row in evaluated):
        haystack = load_corpus(corpus, split=split)
    tokenizer = load_tokenizer(source)
    cases = {key: rebuild_cases(tokenizer, group, documents=haystack) for key, group in groups.items()}
    results = []
    for key, group in groups.items():
        loaded = load(source, specs[key], options)
        results += retrieval_attention(loaded.model, cases[key], group, chunk_size=chunk_size, progress=progress)
    out = Path(out)
    write_rows(results, out / "uncertainty.csv")
    summary = failure_summary(results)
    write_rows(summary, out / "uncertainty_summary.json")
    plot_entropy_heatmap(results, out / "entropy_heatmap.png")
    return summary
