"""Rows to and from CSV / JSON files: writes through `ropescope.results` (atomic), reads with CSV values typed."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from ropescope.errors import RopescopeError

ROW_FORMATS = (".csv", ".json")


def check_rows_path(path: str | Path) -> Path:
    """The path, if its suffix names a row format (checked before any work, so nothing is half written)."""
    path = Path(path)
    if path.suffix not in ROW_FORMATS:
        raise RopescopeError(f"rows file {str(path)!r} must end in {' or '.join(ROW_FORMATS)}")
    return path


def write_rows(rows: Sequence[dict], path: str | Path) -> Path:
    """Write rows as CSV (columns: the union of the rows' fields, in first-seen order) or as a JSON list."""
    from ropescope.results import write_csv, write_json

    path = check_rows_path(path)
    return write_json(list(rows), path) if path.suffix == ".json" else write_csv(list(rows), path)


def _parse(value: str):
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return {"True": True, "False": False, "": None}.get(value, value)


def read_rows(path: str | Path) -> list[dict]:
    """Rows from a CSV (numbers and True/False parsed) or JSON file."""
    path = check_rows_path(path)
    if not path.is_file():
        raise RopescopeError(f"rows file {str(path)!r} does not exist")
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise RopescopeError(f"rows file {str(path)!r} must hold a JSON list of objects")
        return rows
    with open(path, newline="") as file:
        return [{key: _parse(value) for key, value in row.items()} for row in csv.DictReader(file)]
