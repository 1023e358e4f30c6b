"""SafeDir: writing below a root by descriptors, no symlink followed (real files and links, no mocks)."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

import pytest

from ion.core.safefs import SafeDir, SymlinkRefused, relative_parts


def test_walk_makes_missing_folders_and_refuses_a_link_naming_it(tmp_path: Path) -> None:
    """mkdir -p below the root; a component that is a symlink is refused by name, never followed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    with SafeDir.open_below(tmp_path, tmp_path / "root" / "a" / "b", create=True) as d:
        assert d.realpath() == tmp_path / "root" / "a" / "b"
    (tmp_path / "root" / "link").symlink_to(outside)
    with pytest.raises(SymlinkRefused) as info:
        SafeDir.open_below(tmp_path, tmp_path / "root" / "link" / "c", create=True)
    assert info.value.path == tmp_path / "root" / "link"
    assert "symbolic link and was refused" in str(info.value)
    assert list(outside.iterdir()) == []


def test_walk_of_a_missing_folder_without_create_is_file_not_found(tmp_path: Path) -> None:
    """Without create nothing is made: a missing component is FileNotFoundError."""
    with pytest.raises(FileNotFoundError):
        SafeDir.open_below(tmp_path, tmp_path / "nope" / "x")
    assert not (tmp_path / "nope").exists()


def test_a_missing_root_is_made_from_slash_without_following_links(tmp_path: Path) -> None:
    """With create, a root that does not exist (yet) is made too, walking from /."""
    with SafeDir.open_below(tmp_path / "r", tmp_path / "r" / "d", create=True):
        pass
    assert (tmp_path / "r" / "d").is_dir()


def test_relative_parts_refuses_a_path_outside_the_root() -> None:
    """Paths are compared lexically after folding '..'."""
    assert relative_parts("/a/b/c", "/a") == ("b", "c")
    assert relative_parts("/a", "/a") == ()
    with pytest.raises(ValueError):
        relative_parts("/a/../b", "/a")


def test_write_atomic_replaces_a_link_never_writes_through_it(tmp_path: Path) -> None:
    """A small file written whole; a link at its name is replaced, its target untouched."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "f").symlink_to(victim)
    with SafeDir.open_root(tmp_path) as d:
        d.write_atomic("f", b"new")
    assert victim.read_text() == "keep" and not (tmp_path / "f").is_symlink()
    assert (tmp_path / "f").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "victim"]


def test_copy_tree_keeps_links_modes_and_times(tmp_path: Path) -> None:
    """A tree copied by descriptors: links copied as links, file and folder modes and mtimes kept."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("data")
    os.chmod(src / "sub" / "f", 0o640)
    (src / "ln").symlink_to("sub/f")
    os.utime(src / "sub" / "f", (1_000_000, 1_000_000))
    os.chmod(src / "sub", 0o555)
    (tmp_path / "dst").mkdir()
    try:
        with SafeDir.open_root(tmp_path / "dst") as d:
            d.copy_tree(src, "copy")
        copy = tmp_path / "dst" / "copy"
        assert (copy / "sub" / "f").read_text() == "data"
        assert stat.S_IMODE((copy / "sub" / "f").stat().st_mode) == 0o640
        assert (copy / "sub" / "f").stat().st_mtime == 1_000_000
        assert stat.S_IMODE((copy / "sub").stat().st_mode) == 0o555
        assert os.readlink(copy / "ln") == "sub/f"
        # And removed again, read-only folder included.
        with SafeDir.open_root(tmp_path / "dst") as d:
            d.remove("copy")
        assert list((tmp_path / "dst").iterdir()) == []
    finally:
        os.chmod(src / "sub", 0o755)


def test_remove_of_a_link_to_a_folder_removes_only_the_link(tmp_path: Path) -> None:
    """remove() never descends through a link."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("k")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ln").symlink_to(target)
    with SafeDir.open_root(tmp_path / "d") as d:
        d.remove("ln")
        d.remove("missing")  # nothing there: nothing to do
    assert (target / "keep").read_text() == "k" and list((tmp_path / "d").iterdir()) == []


def test_locked_excludes_another_holder_and_refuses_a_link(tmp_path: Path) -> None:
    """The flock is held inside the block only; a lock file that is a symlink is refused."""
    with SafeDir.open_root(tmp_path) as d:
        with d.locked(".lock"):
            other = os.open(tmp_path / ".lock", os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(other)
        other = os.open(tmp_path / ".lock", os.O_RDWR)
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
        (tmp_path / "evil").symlink_to(tmp_path / "victim")
        with pytest.raises(SymlinkRefused):
            with d.locked("evil"):
                pass
    assert not (tmp_path / "victim").exists()


def test_read_bytes_refuses_a_link(tmp_path: Path) -> None:
    """read_bytes reads a regular file; None when missing; a link is refused."""
    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "ln").symlink_to(tmp_path / "f")
    with SafeDir.open_root(tmp_path) as d:
        assert d.read_bytes("f") == b"abc" and d.read_bytes("none") is None
        with pytest.raises(SymlinkRefused) as info:
            d.read_bytes("ln")
        assert info.value.errno == errno.ELOOP


def test_locked_refuses_a_fifo_without_hanging(tmp_path: Path) -> None:
    """A FIFO planted at the lock's name is refused at once (the open does not wait for a writer)."""
    os.mkfifo(tmp_path / ".lock")
    with SafeDir.open_root(tmp_path) as d:
        with pytest.raises(OSError, match="not a regular file"):
            with d.locked(".lock"):
                pass


def test_a_lock_held_elsewhere_is_given_up_after_the_timeout(tmp_path: Path) -> None:
    """locked() does not wait for ever: a holder that keeps the flock makes it fail (EWOULDBLOCK)."""
    (tmp_path / "lock").touch()
    holder = os.open(tmp_path / "lock", os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with SafeDir.open_root(tmp_path) as folder, pytest.raises(OSError) as info:
            with folder.locked("lock", timeout=0):
                raise AssertionError("the lock was held elsewhere")
        assert info.value.errno == errno.EWOULDBLOCK and "still locked" in str(info.value)
    finally:
        os.close(holder)
    with SafeDir.open_root(tmp_path) as folder, folder.locked("lock", timeout=0):
        pass
