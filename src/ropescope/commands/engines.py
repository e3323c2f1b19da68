"""`ropescope engines`: what each serving engine computes from a model's saved config, against what ropescope
applies, at each length asked; rows and a table."""

from __future__ import annotations

from pathlib import Path

from ropescope.errors import RopescopeError
from ropescope.io.results import write_rows
from ropescope.io.rows import EngineRow, RunLabels
from ropescope.model.engines import ALL_ENGINES, reference, ropescope_frequencies, saved_config, served_config
from ropescope.model.patch import pretrained_rope
from ropescope.rope.engines import compare


def _engines(names: list[str] | None) -> list:
    unknown = [name for name in names or [] if name not in ALL_ENGINES]
    if unknown:
        raise RopescopeError(f"unknown engine {unknown[0]!r}; accepted: {', '.join(ALL_ENGINES)}")
    return [ALL_ENGINES[name] for name in names or ALL_ENGINES]


def _lengths(config, spec, lengths: list[int] | None) -> list[int]:
    """The lengths asked, else the pretrained length and the extended one (x factor, or x 2 without one)."""
    if lengths:
        if any(isinstance(length, bool) or int(length) < 1 for length in lengths):
            raise RopescopeError(f"lengths {lengths} must be positive numbers of tokens")
        return [int(length) for length in lengths]
    original = spec.params.get("original_max_position_embeddings") or pretrained_rope(config)[1]
    return sorted({int(original), int(round(original * (spec.params.get("factor") or 2.0)))})


def engine_rows(model: str = "default", method: str | None = None, *, factor: float | None = None,
                original_max_position_embeddings: int | None = None, lengths: list[int] | None = None,
                engines: list[str] | None = None) -> list[dict]:
    """One `EngineRow` dict per (engine, length): `model`'s saved config (with `method` applied where given, as
    `extend` would save it) read by each engine, against ropescope's own frequencies at that length."""
    chosen = _engines(engines)
    config = saved_config(model, method, factor, original_max_position_embeddings)
    applied, _, _ = reference(config)
    served = served_config(config)
    labels = RunLabels(model=str(model), method=applied.method, factor=applied.params.get("factor"),
                       original_max_position_embeddings=applied.params.get("original_max_position_embeddings"),
                       rope=applied.to_text())
    rows = []
    for length in _lengths(config, applied, lengths):
        inv_freq, attention_scale = ropescope_frequencies(config, length)
        for engine in chosen:
            view = engine.derive(served, length)
            result = compare(view, served.rope_type, inv_freq, attention_scale, length)
            rows.append(EngineRow(
                engine=engine.name, engine_version=engine.version, rope_type=served.rope_type, length=length,
                inv_freq_difference=result["inv_freq_difference"], attention_scale=result["engine_attention_scale"],
                ropescope_attention_scale=attention_scale,
                attention_scale_difference=result["attention_scale_difference"],
                longest_length=result["longest_length"], verdict=result["verdict"], note=getattr(view, "note", ""),
            ).to_dict(labels))
    return rows


def engine_table(rows: list[dict]) -> str:
    """The rows as a text table, one line per (engine, length), then each engine's notes once."""
    def number(value) -> str:
        return "-" if value is None else f"{value:.2e}"

    lines = [f"{rows[0]['model']}: {rows[0]['rope']} (saved as rope_type {rows[0]['rope_type']})",
             f"{'engine':<13}{'length':>8} {'inv_freq':>9} {'scale':>9} {'longest':>8}  verdict"]
    for row in rows:
        longest = "-" if row["longest_length"] is None else str(row["longest_length"])
        lines.append(f"{row['engine']:<13}{row['length']:>8} {number(row['inv_freq_difference']):>9} "
                     f"{number(row['attention_scale_difference']):>9} {longest:>8}  {row['verdict']}")
    notes = {(row["engine"], row["note"]): None for row in rows if row["note"]}
    lines += [f"  {engine}: {note}" for engine, note in notes]
    return "\n".join(lines)


def run_engines(model: str = "default", method: str | None = None, *, factor: float | None = None,
                original_max_position_embeddings: int | None = None, lengths: list[int] | None = None,
                engines: list[str] | None = None, out: str | Path = "results/engines") -> list[dict]:
    """`ropescope engines`: `engine_rows` -> out/engines.csv and out/engines.json; returns the rows."""
    rows = engine_rows(model, method, factor=factor, original_max_position_embeddings=original_max_position_embeddings,
                       lengths=lengths, engines=engines)
    write_rows(rows, Path(out) / "engines.csv")
    write_rows(rows, Path(out) / "engines.json")
    return rows
