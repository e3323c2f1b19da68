"""Rows on disk: CSV and JSON written atomically, so an interrupted run never leaves half a file."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ropescope.errors import RopescopeError


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


ROW_SUFFIXES = (".json", ".csv")


def check_rows_path(path: str | Path) -> Path:
    """A rows file path ending in .json or .csv; checked before any work, so nothing is half written."""
    path = Path(path)
    if path.suffix.lower() not in ROW_SUFFIXES:
        raise RopescopeError(f"rows file {str(path)!r} must end in .json or .csv")
    if path.is_dir():
        raise RopescopeError(f"rows file {str(path)!r} is a directory")
    return path


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Rows as a JSON list of objects or as CSV (columns: every key seen), by the file's suffix."""
    path = check_rows_path(path)
    return write_json(list(rows), path) if path.suffix.lower() == ".json" else write_csv(list(rows), path)


def _typed(value: str):
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return {"True": True, "False": False, "": None}.get(value, value)


def read_rows(path: str | Path) -> list[dict]:
    """Rows back from a file written by `write_rows`; CSV numbers and True/False come back typed."""
    path = check_rows_path(path)
    if not path.is_file():
        raise RopescopeError(f"rows file {str(path)!r} does not exist")
    if path.suffix.lower() == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise RopescopeError(f"rows file {str(path)!r} must hold a JSON list of objects")
        return rows
    with path.open(newline="") as handle:
        return [{key: _typed(value) for key, value in row.items()} for row in csv.DictReader(handle)]
