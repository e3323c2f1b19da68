"""Rows on disk: CSV and JSON written atomically, so an interrupted run never leaves half a file."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path


def write_atomically(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Columns are the union of the rows' keys, in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return write_atomically(path, buffer.getvalue())


def write_json(rows: list[dict], path: str | Path) -> Path:
    return write_atomically(path, json.dumps(rows, indent=1, default=str) + "\n")


def read_rows(path: str | Path) -> list[dict]:
    """Rows back from a .json or .csv file written above (CSV values come back as strings)."""
    path = Path(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))
