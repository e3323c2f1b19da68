"""The attention analyses end to end, as the CLI runs them: load models, build inputs, compute, write rows and plots.

Each `run_*` checks its arguments and its inputs (model folder, methods, corpus long enough) before any weights
load or any file is written, then composes the library: models are loaded exactly as the evaluation loads them
(`ropescope.eval.common.load_eval_model`), so rows from both line up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ropescope.errors import RopescopeError

NO_EXTENSION = ("default", "none")


def pretrained_length_of(model: str, original_length: int | None = None) -> int:
    """The context length the model was pretrained at: `original_length` if given, else from its config (the
    length before any extension recorded in a saved, extended checkpoint)."""
    from transformers import AutoConfig

    from ropescope.models import resolve_model_path
    from ropescope.patch import pretrained_rope

    config = AutoConfig.from_pretrained(resolve_model_path(str(model)))
    return original_length or pretrained_rope(config)[1]


def load_for_method(model: str, method: str, factor: float | None, original_length: int | None):
    """The model with `method` applied ('default' / 'none': as trained), as an `EvalModel` (model, tokenizer,
    labels)."""
    from ropescope.eval.common import load_eval_model

    if method in NO_EXTENSION:
        return load_eval_model(str(model))
    return load_eval_model(str(model), method, factor, original_length)


def token_samples(tokenizer, length: int, samples: int, corpus: str | Path | None, split: str) -> list:
    """The first `samples` token blocks of `length` tokens from the corpus split (None: the shipped corpus)."""
    from ropescope.data import load_corpus, token_blocks

    blocks = []
    for block in token_blocks(tokenizer, load_corpus(corpus, split=split), block_length=length):
        blocks.append(block)
        if len(blocks) == samples:
            return blocks
    raise RopescopeError(f"the {split} corpus holds only {len(blocks)} blocks of {length} tokens; asked for {samples}")


def _check_methods(model: str, methods: Sequence[str], factor: float | None, original_length: int | None) -> None:
    from ropescope.eval.common import check_model_args

    if not methods:
        raise RopescopeError("no methods given; e.g. --method default --method yarn")
    for method in methods:
        if method in NO_EXTENSION:
            check_model_args(str(model), None, None, None)
        else:
            check_model_args(str(model), method, factor, original_length)


def _check_counts(samples: int, lengths: Sequence[int], chunk_size: int) -> None:
    from ropescope.eval.common import check_lengths, check_positive

    check_positive("samples", samples)
    check_positive("chunk_size", chunk_size)
    check_lengths(sorted(set(lengths)))


def _samples_by_length(model: str, lengths: Sequence[int], samples: int, corpus, split: str) -> dict[int, list]:
    """Token blocks for every length, tokenized once with the model's tokenizer (before any weights load)."""
    from ropescope.eval.common import load_tokenizer

    tokenizer = load_tokenizer(str(model))
    return {length: token_samples(tokenizer, length, samples, corpus, split) for length in sorted(set(lengths))}


def run_entropy(model: str, methods: Sequence[str], factor: float | None, lengths: Sequence[int] | None,
                samples: int, out_dir: str | Path, *, original_length: int | None = None, corpus=None,
                split: str = "validation", chunk_size: int = 512, position_bin_size: int | None = None,
                progress: bool | None = None) -> list[dict]:
    """Entropy profiles of every method at every length -> out_dir/entropy.csv and out_dir/entropy.png."""
    from ropescope.results import write_rows
    from ropescope.attention.profiles import entropy_profile
    from ropescope.plots import plot_entropy_profile

    _check_methods(model, methods, factor, original_length)
    pretrained_length = pretrained_length_of(model, original_length)
    lengths = list(lengths or [pretrained_length, 2 * pretrained_length, 4 * pretrained_length])
    _check_counts(samples, lengths, chunk_size)
    if position_bin_size is not None and position_bin_size < 1:
        raise RopescopeError(f"position_bin_size={position_bin_size} must be >= 1")
    blocks = _samples_by_length(model, lengths, samples, corpus, split)
    rows = []
    for method in methods:
        loaded = load_for_method(model, method, factor, original_length)
        for length in lengths:
            rows += entropy_profile(
                loaded.model, blocks[length], chunk_size=chunk_size, position_bin_size=position_bin_size,
                progress=progress,
                labels={**loaded.labels(), "pretrained_length": pretrained_length, "split": split},
            )
    out_dir = Path(out_dir)
    write_rows(rows, out_dir / "entropy.csv")
    plot_entropy_profile(rows, out_dir / "entropy.png", pretrained_length=pretrained_length)
    return rows


def run_patterns(model: str, methods: Sequence[str], factor: float | None, length: int | None, samples: int,
                 out_dir: str | Path, *, original_length: int | None = None, corpus=None, split: str = "validation",
                 query_fraction: float = 0.125, bins_per_octave: int = 1, chunk_size: int = 512,
                 progress: bool | None = None) -> list[dict]:
    """Attention against distance at the pretrained and the extended length for every method, and each method's
    pattern preservation (JS divergence from the original model at the pretrained length).
    Writes out_dir/patterns_distance.csv, patterns_preservation.csv, attention_distance.png and
    pattern_preservation.png."""
    from ropescope.results import write_rows
    from ropescope.attention.patterns import distance_distribution, pattern_preservation
    from ropescope.plots import plot_attention_distance, plot_pattern_preservation

    # The reference is the original model at its pretrained length: include it even when not asked for.
    methods = ["default", *[method for method in methods if method not in NO_EXTENSION]]
    _check_methods(model, methods, factor, original_length)
    pretrained_length = pretrained_length_of(model, original_length)
    length = length or int(round((factor or 4.0) * pretrained_length))
    _check_counts(samples, [pretrained_length, length], chunk_size)
    if not 0 < query_fraction <= 1:
        raise RopescopeError(f"query_fraction={query_fraction} is outside (0, 1]")
    if bins_per_octave < 1:
        raise RopescopeError(f"bins_per_octave={bins_per_octave} must be >= 1")
    blocks = _samples_by_length(model, [pretrained_length, length], samples, corpus, split)
    distributions: dict[tuple[str, int], tuple[dict, list[dict]]] = {}
    for method in methods:
        loaded = load_for_method(model, method, factor, original_length)
        for current in sorted(blocks):
            distributions[(method, current)] = loaded.labels(), distance_distribution(
                loaded.model, blocks[current], pretrained_length=pretrained_length, query_fraction=query_fraction,
                bins_per_octave=bins_per_octave, chunk_size=chunk_size, progress=progress,
                labels={**loaded.labels(), "split": split},
            )
    reference = distributions[("default", pretrained_length)][1]
    preservation = []
    for labels, rows in distributions.values():
        preservation += pattern_preservation(reference, rows, labels=labels)
    distance_rows = [row for _, rows in distributions.values() for row in rows]
    out_dir = Path(out_dir)
    write_rows(distance_rows, out_dir / "patterns_distance.csv")
    write_rows(preservation, out_dir / "patterns_preservation.csv")
    plot_attention_distance(distance_rows, out_dir / "attention_distance.png")
    plot_pattern_preservation(preservation, out_dir / "pattern_preservation.png")
    return preservation


def _optional_float(value) -> float | None:
    return None if value in (None, "") else float(value)


def _optional_int(value) -> int | None:
    return None if value in (None, "") else int(value)


def run_uncertainty(rows_path: str | Path, model: str, out_dir: str | Path, *, methods: Sequence[str] | None = None,
                    factor: float | None = None, corpus=None, split: str = "validation", chunk_size: int = 512,
                    progress: bool | None = None) -> list[dict]:
    """Answering-query entropy and needle mass for every evaluation row (from `ropescope passkey` / `needle`),
    grouped by (method, factor, original_length) so that each group runs on the model it was evaluated with.
    Writes out_dir/uncertainty.csv, uncertainty_summary.json and entropy_heatmap.png; returns the summary."""
    from ropescope.results import read_rows, write_rows
    from ropescope.attention.uncertainty import failure_summary, rebuild_cases, retrieval_attention
    from ropescope.eval.common import check_positive, load_tokenizer
    from ropescope.plots import plot_entropy_heatmap

    check_positive("chunk_size", chunk_size)
    rows = read_rows(rows_path)
    if methods:
        rows = [row for row in rows if (row.get("method") or "default") in methods]
    if factor is not None:
        rows = [row for row in rows if _optional_float(row.get("factor")) in (None, factor)]
    if not rows:
        raise RopescopeError(f"no evaluation rows in {str(rows_path)!r} match method={methods} factor={factor}")
    for field in ("task", "length", "depth_percent", "trial", "correct"):
        if any(field not in row for row in rows):
            raise RopescopeError(f"evaluation rows in {str(rows_path)!r} lack the field {field!r}")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        method = row.get("method") or "default"
        key = (method, None, None) if method in NO_EXTENSION else (
            method, _optional_float(row.get("factor")), _optional_int(row.get("original_length")))
        groups.setdefault(key, []).append(row)
    _check_methods(model, [method for method, _, _ in groups], None, None)
    haystack = None
    if any(row["task"] == "needle" for row in rows):
        from ropescope.data import load_corpus

        haystack = load_corpus(corpus, split=split)
    tokenizer = load_tokenizer(str(model))
    cases = {key: rebuild_cases(tokenizer, group, haystack_documents=haystack) for key, group in groups.items()}
    results = []
    for (method, group_factor, group_original_length), group in groups.items():
        loaded = load_for_method(model, method, group_factor, group_original_length)
        results += retrieval_attention(loaded.model, cases[(method, group_factor, group_original_length)], group,
                                       chunk_size=chunk_size, progress=progress)
    out_dir = Path(out_dir)
    write_rows(results, out_dir / "uncertainty.csv")
    summary = failure_summary(results)
    write_rows(summary, out_dir / "uncertainty_summary.json")
    plot_entropy_heatmap(results, out_dir / "entropy_heatmap.png")
    return summary
