"""Rows and files on disk: atomic writes with unique temporary names, rows round trips, run identities."""

from __future__ import annotations

import dataclasses

import pytest

from ropescope.errors import RopescopeError
from ropescope.io.results import atomic_path, read_rows, run_differences, run_identity, write_atomically, write_rows


def test_write_atomically_writes_text_and_bytes_and_leaves_nothing_beside(tmp_path):
    path = tmp_path / "deep" / "file.txt"
    assert write_atomically(path, "first\n") == path and path.read_text() == "first\n"
    write_atomically(path, b"\x00second")
    assert path.read_bytes() == b"\x00second"
    assert [entry.name for entry in path.parent.iterdir()] == ["file.txt"]


def test_atomic_path_gives_each_writer_its_own_temporary_name(tmp_path):
    target = tmp_path / "figure.png"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.parent.parent == second.parent.parent == tmp_path
        assert first.name == second.name == "figure.png"  # the suffix a writer such as savefig reads
        first.write_text("one")
        second.write_text("two")
        assert not target.exists()  # nothing at the target before a writer finishes
    # the writer that finishes last wins, whole (here the outer one)
    assert target.read_text() == "one" and [entry.name for entry in tmp_path.iterdir()] == ["figure.png"]


def test_atomic_path_on_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "rows.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [entry.name for entry in tmp_path.iterdir()] == ["rows.json"]


def test_atomic_path_replaces_a_folder_whole(tmp_path):
    target = tmp_path / "model"
    (target / "old-only").mkdir(parents=True)
    with atomic_path(target) as temporary:
        temporary.mkdir()  # as save_pretrained does
        (temporary / "config.json").write_text("{}")
    assert sorted(entry.name for entry in target.iterdir()) == ["config.json"]
    assert [entry.name for entry in tmp_path.iterdir()] == ["model"]


def test_rows_round_trip_through_json_and_csv(tmp_path):
    rows = [{"method": "yarn", "factor": 4.0, "length": 256, "correct": True, "note": None},
            {"method": "pi", "factor": 2.5, "length": 512, "correct": False, "extra": "x"}]
    assert read_rows(write_rows(rows, tmp_path / "rows.json")) == rows
    back = read_rows(write_rows(rows, tmp_path / "rows.csv"))
    assert back[0] == {**rows[0], "extra": None} and back[1] == {**rows[1], "note": None}
    with pytest.raises(RopescopeError, match="must end in .json or .csv"):
        write_rows(rows, tmp_path / "rows.txt")


@dataclasses.dataclass
class _Config:
    out: str
    seed: int = 0
    rate: float = 1e-3
    spec: dict | None = None


def test_run_identity_and_differences():
    identity = run_identity(_Config(out="a", spec={"method": "yarn"}), ignore=("out",), world=2)
    assert identity == {"seed": 0, "rate": 1e-3, "spec": {"method": "yarn"}, "world": 2}
    same = run_identity(_Config(out="b", spec={"method": "yarn"}), ignore=("out",), world=2)
    assert run_differences(identity, same) == []
    other = run_identity(_Config(out="a", seed=1), ignore=("out",))
    assert run_differences(identity, other) == ["seed", "spec", "world"]
    assert run_differences(identity, other, ignore=("spec", "world")) == ["seed"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    from ropescope.io.results import atomic_path, remove_stale_temporaries

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / ".keep.tmp").write_text("a file the user named so: kept")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "report" / "figure.png") as temporary:
            temporary.write_text("half")
            holder = temporary.parent
            raise KeyboardInterrupt
    assert not holder.exists()  # an orderly exit cleans up itself
    holder.mkdir()  # what a SIGKILL at that moment leaves behind
    (holder / "figure.png").write_text("half")
    assert remove_stale_temporaries(tmp_path) == [holder]
    assert sorted(path.name for path in (tmp_path / "report").iterdir()) == [".keep.tmp"]
