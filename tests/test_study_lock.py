import os
import signal
import subprocess
import sys
import time

import pytest

from ropescope.errors import RopescopeError
from ropescope.study.lock import folder_lock

HOLD = """
import sys, time
from ropescope.study.lock import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def _start_holder(folder):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_holder_is_refused_with_the_holding_process_named(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(RopescopeError, match=rf"in use by another ropescope study \(process {holder.pid} on "):
            with folder_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_does_not_block_the_next_run(tmp_path):
    holder = _start_holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with folder_lock(tmp_path):
        assert (tmp_path / ".ropescope.lock.json").read_text().find(str(os.getpid())) >= 0


def test_the_lock_is_released_on_exit_and_on_error(tmp_path):
    with pytest.raises(ValueError):
        with folder_lock(tmp_path):
            raise ValueError("boom")
    started = time.perf_counter()
    with folder_lock(tmp_path):
        pass
    assert time.perf_counter() - started < 1
