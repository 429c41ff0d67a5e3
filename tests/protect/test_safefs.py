"""protect.safefs: atomic writes that never follow a link inside the tree, temporaries, the lock."""

from __future__ import annotations

import os

import pytest

from protect import RecordError
from protect.safefs import TMP_MARK, RunLock, Tree, UnsafePath


def test_write_replaces_atomically_and_leaves_no_temporary(tmp_path):
    with Tree(tmp_path / "out") as tree:
        tree.write("sub/x.png", b"one")
        tree.write("sub/x.png", lambda fh: fh.write(b"two"))
        assert tree.read("sub/x.png") == b"two"
    assert [p.name for p in (tmp_path / "out" / "sub").iterdir()] == ["x.png"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    with Tree(tmp_path) as tree:
        tree.write("x.png", b"old")

        def broken(fh):
            fh.write(b"half")
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            tree.write("x.png", broken)
        assert tree.read("x.png") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_links_inside_the_tree_are_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.png").write_bytes(b"precious")
    root = tmp_path / "tree"
    root.mkdir()
    (root / "dir").symlink_to(outside, target_is_directory=True)
    (root / "file.png").symlink_to(outside / "f.png")
    with Tree(root) as tree:
        with pytest.raises(UnsafePath, match="symbolic link"):
            tree.write("dir/f.png", b"evil")
        assert tree.read("file.png") is None and tree.sha256("file.png") is None  # not read through
        tree.write("file.png", b"new")  # replaces the link itself
        assert tree.unlink("file.png") and not tree.unlink("file.png")
    assert (outside / "f.png").read_bytes() == b"precious"
    with pytest.raises(UnsafePath):
        Tree(root).write("../escape.png", b"x")


def test_stale_temporaries_are_removed_without_following_links(tmp_path):
    (tmp_path / "a").mkdir()
    stale = tmp_path / "a" / f".x.png{TMP_MARK}123-456"
    stale.write_bytes(b"partial")
    (tmp_path / "a" / "x.png").write_bytes(b"ok")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    (elsewhere / f".y.png{TMP_MARK}1-2").write_bytes(b"not ours to delete")
    (tmp_path / "link").symlink_to(elsewhere, target_is_directory=True)
    with Tree(tmp_path) as tree:
        assert tree.remove_temporaries() == 1
    assert not stale.exists() and (tmp_path / "a" / "x.png").exists()
    assert (elsewhere / f".y.png{TMP_MARK}1-2").exists()


def test_the_lock_names_its_holder(tmp_path):
    record, out = tmp_path / "rec", tmp_path / "out"
    record.mkdir()
    out.mkdir()
    first = RunLock(record, out)
    try:
        pid = os.fork()
        if pid == 0:  # another process: must be refused while the first holds the lock
            try:
                RunLock(record, out)
                os._exit(1)
            except RecordError as exc:
                os._exit(0 if f"pid {os.getppid()}" in str(exc) else 2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        first.release()
    RunLock(record, out).release()  # free again
