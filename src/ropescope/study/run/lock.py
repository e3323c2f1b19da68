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


def _holder(folder: Path) -> str:
    try:
        holder = json.loads((folder / HOLDER_FILE).read_text())
        return f"process {holder['pid']} on {holder['host']}, since {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


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
