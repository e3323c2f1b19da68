import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib

import pytest

from ropescope.errors import RopescopeError
from ropescope.study.config import parse_config
from ropescope.study.run.lock import folder_lock
from ropescope.study.cells import plan_cells
from ropescope.study.run.store import DATABASE
from ropescope.study.stages import STAGES
from tests.helpers import TINY_STUDY, study_command

HOLD = """
import sys, time
from ropescope.study.run.lock import folder_lock
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


SLOW_HOLD = """
import sys, time
import ropescope.study.run.lock as lock
write = lock.write_atomically
def late_write(*args):  # the instant between taking the lock and writing who holds it, stretched
    print("locked", flush=True)
    time.sleep(0.5)
    write(*args)
lock.write_atomically = late_write
with lock.folder_lock(sys.argv[1]):
    time.sleep(60)
"""


def test_a_refusal_in_the_instant_before_the_holder_is_written_still_names_it(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".ropescope.lock.json").write_text(
        f'{{"pid": {int(dead.stdout)}, "host": "{os.uname().nodename}", "started": "earlier"}}')  # a finished run's
    holder = subprocess.Popen([sys.executable, "-c", SLOW_HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
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


# Whole studies in subprocesses: the lock as `ropescope study` takes it.

def _tiny_config(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_STUDY)
    return config


def _recorded_cells(folder) -> set[str]:
    with sqlite3.connect(folder / DATABASE) as connection:
        return {cell for (cell,) in connection.execute("SELECT cell FROM cells WHERE status = 'done'")}


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # progress lines arrive as printed


def _study(command):
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def test_two_studies_on_one_folder_one_runs_the_other_refuses(tmp_path):
    config, out = _tiny_config(tmp_path), tmp_path / "out"
    studies = [_study(study_command(config, out)) for _ in range(2)]
    results = [(study.pid, *study.communicate(timeout=300), study.returncode) for study in studies]
    codes = sorted(code for *_, code in results)
    assert codes == [0, 2], results
    (runner,) = [result for result in results if result[3] == 0]
    (refused,) = [result for result in results if result[3] == 2]
    lines = refused[2].strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused[2]
    assert f"is in use by another ropescope study (process {runner[0]} on " in lines[0]
    planned = len(plan_cells(parse_config(tomllib.loads(TINY_STUDY), STAGES)))
    assert len(_recorded_cells(out)) == planned
    assert f"cells: {planned} run, 0 already recorded" in runner[1]


def test_a_killed_study_does_not_block_the_rerun(tmp_path):
    config, out = _tiny_config(tmp_path), tmp_path / "out"
    study = _study(study_command(config, out))
    planned = len(plan_cells(parse_config(tomllib.loads(TINY_STUDY), STAGES)))
    assert study.stdout.readline().startswith(f"{planned} cells, {planned} to run (")  # it holds the lock
    assert f"(running 1, pending {planned - 1}, done 0/{planned})" in study.stdout.readline()  # its first cell
    study.kill()
    assert study.wait() == -signal.SIGKILL
    assert not (out / "report").exists()  # killed before its end
    rerun = subprocess.run(study_command(config, out), capture_output=True, text=True, timeout=300, env=ENV)
    assert rerun.returncode == 0, rerun.stderr
    assert len(_recorded_cells(out)) == planned
