"""`ropescope engines`: what each serving engine computes from a model's saved config, against what ropescope
applies, at each length asked; rows and a table."""

from __future__ import annotations

from pathlib import Path

from ropescope.io.results import write_rows
from ropescope.model.engines import engine_rows


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
