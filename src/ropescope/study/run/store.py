"""The results database: SQLite in the study folder. A cell's rows and its 'done' mark are committed in one
transaction, so a kill at any moment leaves each cell either wholly recorded or not at all.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sqlite3
import time
import zlib
from pathlib import Path

from ropescope.errors import RopescopeError
from ropescope.io.results import atomic_path

DATABASE = "results.sqlite"  # the results database's file name inside a study folder
# A results database as committed beside the docs: the gzip of DATABASE (its JSON rows shrink about 20x: a
# real-model study's 150 MB to 7 MB). `report` and `study` unpack it where the folder holds only it.
PUBLISHED = DATABASE + ".gz"
# Rows keep 7 significant digits, a float32's precision: every measurement is computed in float32 or bfloat16, so
# the digits beyond are rounding noise, and they made half of the thorough study's published database.
SIGNIFICANT_DIGITS = 7

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    cell TEXT PRIMARY KEY,      -- e.g. 'passkey/yarn@1024'
    kind TEXT NOT NULL,         -- train, perplexity, passkey, entropy, patterns, uncertainty
    variant TEXT NOT NULL,      -- original, yarn@0, yarn@1024, ...
    config_hash TEXT NOT NULL,  -- fingerprint of the configuration that produced the rows
    status TEXT NOT NULL,       -- done or failed
    error TEXT,
    seconds REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS rows (
    cell TEXT NOT NULL REFERENCES cells(cell),
    kind TEXT NOT NULL,
    variant TEXT NOT NULL,
    data TEXT NOT NULL          -- one result row as JSON
);
CREATE INDEX IF NOT EXISTS rows_by_kind ON rows(kind);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pieces (
    cell TEXT NOT NULL,         -- a cell not finished yet
    config_hash TEXT NOT NULL,  -- the fingerprint it was computed under: another one is not resumed
    piece TEXT NOT NULL,        -- the stage's key, e.g. a retrieval grid point
    data TEXT NOT NULL,         -- the piece's rows, as a JSON list
    PRIMARY KEY (cell, piece)
);
"""


def check_database(connection: sqlite3.Connection, path: Path) -> None:
    """Refuse a file that is not a healthy SQLite database, saying how to recover (quick_check reads every page
    once: milliseconds for a study's results)."""
    try:
        problems = [message for (message,) in connection.execute("PRAGMA quick_check")]
    except sqlite3.OperationalError as error:
        if "locked" in str(error):  # another study is writing it: the folder's lock refuses this one
            return
        problems = [str(error)]
    except sqlite3.DatabaseError as error:
        problems = [str(error)]
    if problems != ["ok"]:
        raise RopescopeError(
            f"{str(path)!r} is not a readable results database ({problems[0]}); move it aside to keep it, or run "
            "`ropescope study --force` to start over")


def check_database_file(path: Path) -> None:
    """An existing results database is healthy; checked read-only, so a refusal leaves every file as it was."""
    if not path.exists():
        return
    if not path.is_file():
        raise RopescopeError(f"{str(path)!r} is not a file; move it aside")
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        check_database(connection, path)
    finally:
        connection.close()


def unpack_published(folder: Path) -> None:
    """Write `folder`'s results database from its published copy (PUBLISHED) where the folder holds only that,
    whole or not at all. A database already there is the working copy and is left alone."""
    database, published = folder / DATABASE, folder / PUBLISHED
    if database.exists() or not published.is_file():
        return
    try:
        with gzip.open(published, "rb") as source, atomic_path(database) as temporary:
            with open(temporary, "wb") as target:
                shutil.copyfileobj(source, target)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:  # not gzip, cut short, damaged; a full disk raises
        raise RopescopeError(f"{str(published)!r} is not a gzip file of a results database ({error}); "
                             f"accepted: the output of `gzip -c {DATABASE}`") from None


def rounded(value):
    """`value` with every float in it (through lists, tuples and dicts) rounded to SIGNIFICANT_DIGITS digits."""
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item) for item in value]
    return value


def encoded(rows) -> str:
    """A row, or a list of rows, as the JSON the database holds."""
    return json.dumps(rounded(rows), default=str)


def remove_database(path: Path) -> None:
    """Delete a results database and its journal files (`ropescope study --force` starts over)."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


class ResultStore:
    """`ResultStore(path)`; `is_done(cell, config_hash)`, `record(...)`, `record_failure(...)`, `rows(kind)`,
    `cell_rows(cell)`, and the finished pieces of a running cell (`pieces`, `keep_piece`), dropped when it is
    recorded."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.connection = sqlite3.connect(self.path)
        try:
            check_database(self.connection, self.path)
            self.connection.executescript(SCHEMA)
            self.connection.commit()
        except BaseException:
            self.connection.close()
            raise

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_done(self, cell: str, config_hash: str) -> bool:
        found = self.connection.execute(
            "SELECT 1 FROM cells WHERE cell = ? AND config_hash = ? AND status = 'done'", (cell, config_hash)
        ).fetchone()
        return found is not None

    def record(self, cell: str, kind: str, variant: str, config_hash: str, rows: list[dict], seconds: float) -> None:
        """Replace the cell's rows and mark it done, in one transaction."""
        with self.connection:
            self.connection.execute("DELETE FROM rows WHERE cell = ?", (cell,))
            self.connection.execute("DELETE FROM pieces WHERE cell = ?", (cell,))
            self.connection.executemany(
                "INSERT INTO rows (cell, kind, variant, data) VALUES (?, ?, ?, ?)",
                [(cell, kind, variant, encoded(row)) for row in rows],
            )
            self.connection.execute(
                "INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, 'done', NULL, ?, ?)",
                (cell, kind, variant, config_hash, seconds, time.time()),
            )

    def pieces(self, cell: str, config_hash: str) -> dict[str, list[dict]]:
        """The finished pieces of an unfinished cell under `config_hash` (others are dropped: stale)."""
        with self.connection:
            self.connection.execute("DELETE FROM pieces WHERE cell = ? AND config_hash != ?", (cell, config_hash))
        cursor = self.connection.execute("SELECT piece, data FROM pieces WHERE cell = ? ORDER BY rowid", (cell,))
        return {piece: json.loads(data) for piece, data in cursor}

    def keep_piece(self, cell: str, config_hash: str, piece: str, rows: list[dict]) -> None:
        """Commit one finished piece of a running cell."""
        with self.connection:
            self.connection.execute("INSERT OR REPLACE INTO pieces VALUES (?, ?, ?, ?)",
                                    (cell, config_hash, piece, encoded(rows)))

    def record_failure(self, cell: str, kind: str, variant: str, config_hash: str, error: str, seconds: float):
        with self.connection:
            self.connection.execute("DELETE FROM rows WHERE cell = ?", (cell,))
            self.connection.execute(
                "INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, 'failed', ?, ?, ?)",
                (cell, kind, variant, config_hash, error, seconds, time.time()),
            )

    def cell_rows(self, cell: str) -> list[dict]:
        """The rows of one recorded cell, in the order they were recorded."""
        cursor = self.connection.execute("SELECT data FROM rows WHERE cell = ? ORDER BY rowid", (cell,))
        return [json.loads(data) for (data,) in cursor]

    def rows(self, kind: str) -> list[dict]:
        cursor = self.connection.execute("SELECT data FROM rows WHERE kind = ? ORDER BY rowid", (kind,))
        return [json.loads(data) for (data,) in cursor]

    def cells(self) -> list[dict]:
        cursor = self.connection.execute(
            "SELECT cell, kind, variant, config_hash, status, error, seconds FROM cells ORDER BY rowid")
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, values)) for values in cursor]

    def set_meta(self, key: str, value) -> None:
        with self.connection:
            self.connection.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str, default=None):
        found = self.connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if found is None else json.loads(found[0])
