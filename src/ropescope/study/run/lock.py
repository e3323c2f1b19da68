"""One writer per study folder: a file lock held for the whole run.

The lock is an OS lock (flock, through the filelock package), so it is released when the holding process exits,
however it exits: a killed study never blocks the rerun. Who holds it is written beside it, for the refusal message.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from ropescope.errors import RopescopeError
from ropescope.io.results import write_atomically

LOCK_FILE = ".ropescope.lock"
HOLDER_FILE = ".ropescope.lock.json"


def _read_holder(folder: Path) -> dict | None:
    try:
        holder = json.loads((folder / HOLDER_FILE).read_text())
        return holder if {"pid", "host", "started"} <= set(holder) else None
    except (OSError, ValueError, TypeError):
        return None


def _alive(holder: dict) -> bool:
    if holder["host"] != socket.gethostname():
        return True  # another machine's process cannot be checked from here
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def _holder(folder: Path, wait_s: float = 2.0) -> str:
    # The holder writes its record just after it takes the lock, so a refusal in that instant may find no record,
    # or a dead run's record: wait briefly for a live one.
    deadline = time.monotonic() + wait_s
    while True:
        holder = _read_holder(folder)
        if holder is not None and _alive(holder):
            return f"process {holder['pid']} on {holder['host']}, since {holder['started']}"
        if time.monotonic() >= deadline:
            return "another process"
        time.sleep(0.05)


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold the lock of `folder` (which must exist) for the duration; refuse at once if another process holds it."""
    folder = Path(folder)
    lock = FileLock(folder / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RopescopeError(
            f"{folder} is in use by another ropescope study ({_holder(folder)}); wait for it to finish, "
            "or give another --out") from None
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_atomically(folder / HOLDER_FILE, json.dumps(holder))
        yield
    finally:
        lock.release()
