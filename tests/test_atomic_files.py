"""aa_lightning.atomic_files: whole files or nothing, beside the target, with open()'s permissions."""

import os
import stat

import pytest

from aa_lightning.atomic_files import atomic_open, write_bytes_atomic, write_text_atomic


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    write_bytes_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"intact")
    with pytest.raises(RuntimeError, match="killed"), atomic_open(target, "wb") as handle:
        handle.write(b"half a checkpoint")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"intact" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_new_files_get_the_permissions_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644  # not mkstemp's 0o600


def test_the_temporary_file_is_beside_the_target_whatever_tmpdir_is(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    with atomic_open(tmp_path / "f.bin", "wb") as handle:
        handle.write(b"1")
        during = sorted(p.name for p in tmp_path.iterdir())
    assert len(during) == 1 and during[0].startswith(".f.bin.") and during[0].endswith(".tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_only_whole_file_writes():
    with pytest.raises(ValueError, match="mode must be"), atomic_open("x", "a"):
        pass


def test_publish_folder_replaces_the_target_by_renames_and_leaves_nothing_aside(tmp_path):
    from aa_lightning.atomic_files import publish_folder

    target, staged = tmp_path / "set", tmp_path / ".set.partial"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staged.mkdir()
    (staged / "new.txt").write_text("new")
    publish_folder(staged, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    again = tmp_path / ".again"
    again.mkdir()
    (again / "x").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    publish_folder(again, empty)  # an empty target is simply replaced
    assert sorted(p.name for p in empty.iterdir()) == ["x"] and not again.exists()
