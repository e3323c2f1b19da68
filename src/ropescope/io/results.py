"""Rows on disk: CSV and JSON written atomically, so an interrupted run never leaves half a file."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from ropescope.errors import RopescopeError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary path beside `path` to write to; renamed onto `path` when the block ends without error.

    The temporary name is unique (tempfile), so two runs writing the same file never share it; on error it is
    removed and `path` is left as it was. Works for a file or a folder (a writer such as save_pretrained that
    creates the folder itself): an existing folder at `path` is replaced whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkdtemp reserves the name; the writer gets a path inside no one else uses, then we rename it out.
    holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    temporary = holder / path.name
    try:
        yield temporary
        if temporary.is_dir() and path.is_dir():
            # os.replace cannot put a folder over a non-empty folder: move the old one aside first.
            retired = holder / (path.name + ".old")
            os.replace(path, retired)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def check_output_folder(out: str | Path) -> None:
    """`out` is a folder, or can be made one, that this process can write: checked before any work."""
    out = Path(out)
    existing = out.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == out.absolute() else f"lies below {str(existing)!r}, a file"
        raise RopescopeError(f"out={str(out)!r} {what}; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RopescopeError(f"out={str(out)!r}: {str(existing)!r} is not writable; give a folder you can write")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove what `atomic_path` left under `folder` when its process was killed (a kill skips its cleanup);
    only for a folder whose one writer is the caller (a study holding its folder's lock). Returns what went."""
    stale = [path for path in Path(folder).rglob(".*.tmp") if path.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def write_atomically(path: str | Path, content: str | bytes) -> Path:
    """Write text or bytes to `path` through a unique temporary file in the same folder, then rename."""
    with atomic_path(path) as temporary:
        if isinstance(content, bytes):
            temporary.write_bytes(content)
        else:
            temporary.write_text(content, encoding="utf-8")
    return Path(path)


def run_identity(config, ignore: Iterable[str] = (), **extra) -> dict:
    """What makes two runs the same run: a config dataclass's fields but `ignore`d ones (those that do not change
    what the run computes), plus `extra`, as JSON values (so a saved identity compares equal to a fresh one)."""
    fields = {key: value for key, value in dataclasses.asdict(config).items() if key not in set(ignore)}
    return json.loads(json.dumps({**fields, **extra}, default=str))


def run_differences(saved: Mapping, current: Mapping, ignore: Iterable[str] = ()) -> list[str]:
    """The keys, sorted, whose values differ between two run identities (a missing key counts as None), `ignore`d
    keys aside; empty when both name the same run."""
    ignore = set(ignore)
    return sorted(key for key in set(saved) | set(current) if key not in ignore and saved.get(key) != current.get(key))


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
