"""Atomic file and directory writes (lmforge.fileio)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lmforge.fileio import atomic_directory, atomic_path, atomic_write_bytes, atomic_write_text, recover_directory


class Boom(Exception):
    pass


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ files
def test_atomic_write_text_and_bytes(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n😀")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\xff\x01")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n😀"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff\x01"
    assert names(tmp_path) == ["a.txt", "b.bin"]  # no temp files left behind


def test_atomic_write_replaces_existing_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old content that is longer", encoding="utf-8")
    atomic_write_text(target, "new")
    assert target.read_text(encoding="utf-8") == "new"
    assert names(tmp_path) == ["f.txt"]


def test_atomic_write_creates_missing_parents(tmp_path):
    target = tmp_path / "x" / "y" / "z.txt"
    atomic_write_text(target, "deep")
    assert target.read_text(encoding="utf-8") == "deep"
    assert names(target.parent) == ["z.txt"]


def test_atomic_path_writes_under_temporary_name_until_done(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp != target
        assert tmp.parent == tmp_path  # same directory: the final rename stays on one file system
        tmp.write_bytes(b"data")
        assert not target.exists()  # nothing at the final path before the block ends
    assert target.read_bytes() == b"data"
    assert not tmp.exists()
    assert names(tmp_path) == ["out.bin"]


def test_exception_inside_atomic_path_keeps_previous_content(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("previous", encoding="utf-8")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written", encoding="utf-8")
            raise Boom
    assert target.read_text(encoding="utf-8") == "previous"
    assert names(tmp_path) == ["keep.txt"]


def test_exception_inside_atomic_path_creates_nothing_new(tmp_path):
    with pytest.raises(Boom):
        with atomic_path(tmp_path / "new.txt") as tmp:
            tmp.write_text("partial", encoding="utf-8")
            raise Boom
    assert names(tmp_path) == []


def test_file_permissions_follow_umask_not_0600(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.txt", "x")
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"y")
    for name in ("a.txt", "b.bin"):
        assert mode(tmp_path / name) == 0o644, oct(mode(tmp_path / name))


def test_file_permissions_with_another_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.txt") == 0o640


# ------------------------------------------------------------------ directories
def fill_with(files: dict[str, str]):
    def fill(folder: Path) -> None:
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text, encoding="utf-8")
    return fill


def read_tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_directory_creates_complete_directory(tmp_path):
    target = tmp_path / "ckpt"
    files = {"model.bin": "weights", "config.json": "{}", "sub/extra.txt": "more"}
    atomic_directory(target, fill_with(files))
    assert read_tree(target) == files
    assert names(tmp_path) == ["ckpt"]


def test_atomic_directory_target_absent_while_filling(tmp_path):
    target = tmp_path / "ckpt"
    seen = {}

    def fill(folder: Path) -> None:
        seen["target_exists"] = target.exists()
        seen["folder"] = folder
        (folder / "a").write_text("1", encoding="utf-8")

    atomic_directory(target, fill)
    assert seen["target_exists"] is False
    assert seen["folder"] != target and seen["folder"].parent == tmp_path
    assert not seen["folder"].exists()


def test_atomic_directory_replaces_existing_directory_completely(tmp_path):
    target = tmp_path / "ckpt"
    atomic_directory(target, fill_with({"old.txt": "old", "shared.txt": "v1"}))
    atomic_directory(target, fill_with({"new.txt": "new", "shared.txt": "v2"}))
    assert read_tree(target) == {"new.txt": "new", "shared.txt": "v2"}  # nothing of the old one left
    assert names(tmp_path) == ["ckpt"]  # no .old copy, no temp directory


def test_exception_in_fill_keeps_previous_directory(tmp_path):
    target = tmp_path / "ckpt"
    atomic_directory(target, fill_with({"a.txt": "old"}))

    def failing(folder: Path) -> None:
        (folder / "a.txt").write_text("new", encoding="utf-8")
        (folder / "b.txt").write_text("new", encoding="utf-8")
        raise Boom

    with pytest.raises(Boom):
        atomic_directory(target, failing)
    assert read_tree(target) == {"a.txt": "old"}
    assert names(tmp_path) == ["ckpt"]


def test_exception_in_fill_without_previous_directory_leaves_nothing(tmp_path):
    def failing(folder: Path) -> None:
        (folder / "a.txt").write_text("x", encoding="utf-8")
        raise Boom

    with pytest.raises(Boom):
        atomic_directory(tmp_path / "ckpt", failing)
    assert names(tmp_path) == []


def test_directory_and_file_permissions(tmp_path, umask_022):
    target = tmp_path / "ckpt"
    atomic_directory(target, fill_with({"a.txt": "x"}))
    assert mode(target) == 0o755, oct(mode(target))
    assert mode(target / "a.txt") == 0o644


def test_recover_directory_puts_back_old_copy(tmp_path):
    target = tmp_path / "ckpt"
    old = tmp_path / ".ckpt.old"
    old.mkdir()
    (old / "a.txt").write_text("saved", encoding="utf-8")
    recover_directory(target)
    assert read_tree(target) == {"a.txt": "saved"}
    assert not old.exists()


def test_recover_directory_leaves_existing_directory_alone(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "a.txt").write_text("current", encoding="utf-8")
    old = tmp_path / ".ckpt.old"
    old.mkdir()
    (old / "a.txt").write_text("stale", encoding="utf-8")
    recover_directory(target)
    assert read_tree(target) == {"a.txt": "current"}
    recover_directory(tmp_path / "absent")  # nothing to do, no error
    assert not (tmp_path / "absent").exists()
