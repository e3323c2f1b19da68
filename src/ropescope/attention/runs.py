"""The attention analyses end to end, as the CLI runs them: load models, build inputs, compute, write rows and plots.

Each `run_*` validates its arguments first, then composes the library (models, data, the attention modules,
plots); nothing here computes a statistic of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ropescope.errors import RopescopeError

NO_EXTENSION = ("default", "none")


def _foundation(name: str):
    """Import a foundation module, turning its absence into one readable line."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise RopescopeError(f"{name} is not available in this installation ({error})") from error


def pretrained_length_of(model: str) -> int:
    """max_position_embeddings of a model given as 'default' or a local path, read from its config."""
    from transformers import AutoConfig

    path = _foundation("ropescope.models").default_model_path() if model == "default" else model
    if not Path(path).is_dir():
        raise RopescopeError(f"model {model!r} is neither 'default' nor a local model folder")
    return int(AutoConfig.from_pretrained(path).max_position_embeddings)


def load_for_method(model: str, method: str, factor: float, pretrained_length: int):
    """(model, tokenizer) with the method's RoPE extension applied ('default' / 'none': the original RoPE)."""
    spec = None
    if method not in NO_EXTENSION:
        spec = _foundation("ropescope.rope").simple_spec(
            method, factor=factor, original_max_position_embeddings=pretrained_length
        )
    return _foundation("ropescope.models").load_model(model, spec=spec)


def token_samples(tokenizer, length: int, samples: int, split: str) -> list:
    """The first `samples` token blocks of `length` tokens from the shipped corpus split."""
    data = _foundation("ropescope.data")
    blocks = []
    for block in data.token_blocks(tokenizer, data.load_corpus(split=split), block_length=length):
        blocks.append(block)
        if len(blocks) == samples:
            return blocks
    raise RopescopeError(f"the {split} corpus holds only {len(blocks)} blocks of {length} tokens; asked for {samples}")


def _check_common(methods: Sequence[str], factor: float, samples: int, lengths: Sequence[int]) -> None:
    if not methods:
        raise RopescopeError("no methods given")
    known = getattr(_foundation("ropescope.rope"), "METHODS", None)
    for method in methods:
        if method not in NO_EXTENSION and known is not None and method not in known:
            raise RopescopeError(f"method={method!r} is unknown; accepted: {', '.join(sorted(known))}")
    if factor <= 0:
        raise RopescopeError(f"factor={factor} must be > 0")
    if samples < 1:
        raise RopescopeError(f"samples={samples} must be >= 1")
    for length in lengths:
        if length < 2:
            raise RopescopeError(f"length={length} must be >= 2")


def _labels(model: str, method: str, factor: float) -> dict:
    return {"model": model, "method": method, "factor": None if method in NO_EXTENSION else factor}


def run_entropy(model: str, methods: Sequence[str], factor: float, lengths: Sequence[int] | None, samples: int,
                out_dir: str | Path, *, split: str = "validation", chunk_size: int = 512,
                position_bin_size: int | None = None, progress: bool = True) -> list[dict]:
    """Entropy profiles of every method at every length -> out_dir/entropy.csv and out_dir/entropy.png."""
    from ropescope.attention.io import write_rows
    from ropescope.attention.profiles import entropy_profile
    from ropescope.plots import plot_entropy_profile

    pretrained_length = pretrained_length_of(model)
    lengths = list(lengths or [pretrained_length, 2 * pretrained_length, 4 * pretrained_length])
    _check_common(methods, factor, samples, lengths)
    rows = []
    for method in methods:
        loaded, tokenizer = load_for_method(model, method, factor, pretrained_length)
        for length in lengths:
            rows += entropy_profile(
                loaded, token_samples(tokenizer, length, samples, split), chunk_size=chunk_size,
                position_bin_size=position_bin_size, progress=progress,
                labels={**_labels(model, method, factor), "pretrained_length": pretrained_length, "split": split},
            )
    out_dir = Path(out_dir)
    write_rows(rows, out_dir / "entropy.csv")
    plot_entropy_profile(rows, out_dir / "entropy.png", pretrained_length=pretrained_length)
    return rows


def run_patterns(model: str, methods: Sequence[str], factor: float, length: int | None, samples: int,
                 out_dir: str | Path, *, split: str = "validation", query_fraction: float = 0.125,
                 bins_per_octave: int = 1, chunk_size: int = 512, progress: bool = True) -> list[dict]:
    """Attention-vs-distance at the pretrained and the extended length for every method, and each method's
    pattern preservation (JS divergence from the original model at the pretrained length).
    Writes out_dir/patterns_distance.csv, patterns_preservation.csv, attention_distance.png, pattern_preservation.png."""
    from ropescope.attention.io import write_rows
    from ropescope.attention.patterns import distance_distribution, pattern_preservation
    from ropescope.plots import plot_attention_distance, plot_pattern_preservation

    pretrained_length = pretrained_length_of(model)
    length = length or int(factor * pretrained_length)
    _check_common(methods, factor, samples, [length])
    # The reference is the original model at its pretrained length: include it even when not asked for.
    methods = ["default", *[m for m in methods if m not in NO_EXTENSION]]
    distributions: dict[tuple[str, int], list[dict]] = {}
    for method in methods:
        loaded, tokenizer = load_for_method(model, method, factor, pretrained_length)
        for current in sorted({pretrained_length, length}):
            distributions[(method, current)] = distance_distribution(
                loaded, token_samples(tokenizer, current, samples, split), pretrained_length=pretrained_length,
                query_fraction=query_fraction, bins_per_octave=bins_per_octave, chunk_size=chunk_size,
                progress=progress, labels={**_labels(model, method, factor), "split": split},
            )
    reference = distributions[("default", pretrained_length)]
    preservation = []
    for (method, current), rows in distributions.items():
        preservation += pattern_preservation(reference, rows, labels=_labels(model, method, factor))
    distance_rows = [row for rows in distributions.values() for row in rows]
    out_dir = Path(out_dir)
    write_rows(distance_rows, out_dir / "patterns_distance.csv")
    write_rows(preservation, out_dir / "patterns_preservation.csv")
    plot_attention_distance(distance_rows, out_dir / "attention_distance.png")
    plot_pattern_preservation(preservation, out_dir / "pattern_preservation.png")
    return preservation


def run_uncertainty(rows_path: str | Path, model: str, out_dir: str | Path, *, methods: Sequence[str] | None = None,
                    factor: float | None = None, haystack_split: str = "test", chunk_size: int = 512,
                    progress: bool = True) -> list[dict]:
    """Answering-query entropy and needle mass for every evaluation row, grouped by (method, factor) so that
    each group runs on its own extended model. Writes out_dir/uncertainty.csv, uncertainty_summary.json and
    entropy_heatmap.png."""
    from ropescope.attention.io import read_rows, write_rows
    from ropescope.attention.uncertainty import failure_summary, rebuild_cases, retrieval_attention
    from ropescope.plots import plot_entropy_heatmap

    rows = read_rows(rows_path)
    if methods:
        rows = [row for row in rows if (row.get("method") or "default") in methods]
    if factor is not None:
        rows = [row for row in rows if row.get("method") in NO_EXTENSION or row.get("factor") in (None, "")
                or float(row["factor"]) == factor]
    if not rows:
        raise RopescopeError(f"no evaluation rows in {str(rows_path)!r} match method={methods} factor={factor}")
    for field in ("task", "length", "depth_percent", "trial", "correct"):
        if any(field not in row for row in rows):
            raise RopescopeError(f"evaluation rows in {str(rows_path)!r} lack the field {field!r}")
    pretrained_length = pretrained_length_of(model)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        method = row.get("method") or "default"
        groups.setdefault((method, None if method in NO_EXTENSION else float(row["factor"])), []).append(row)
    results = []
    haystack = None
    for (method, group_factor), group in groups.items():
        loaded, tokenizer = load_for_method(model, method, group_factor or 1.0, pretrained_length)
        if haystack is None and any(row["task"] == "needle" for row in group):
            haystack = _foundation("ropescope.data").load_corpus(split=haystack_split)
        cases = rebuild_cases(tokenizer, group, haystack_documents=haystack)
        results += retrieval_attention(loaded, cases, group, chunk_size=chunk_size, progress=progress)
    out_dir = Path(out_dir)
    write_rows(results, out_dir / "uncertainty.csv")
    summary = failure_summary(results)
    write_rows(summary, out_dir / "uncertainty_summary.json")
    plot_entropy_heatmap(results, out_dir / "entropy_heatmap.png")
    return summary
