"""SafeDir: writing below a root by descriptors, no symlink followed (real files and links, no mocks)."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

import pytest

from ion.core.safefs import SafeDir, SymlinkRefused, WalkCache, lies_in, relative_parts


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


@pytest.mark.parametrize(("path", "top", "inside"), [
    ("/a/b", "/a/b", True), ("/a/b/c", "/a/b", True), ("/a/b/c/d", "/a/b", True), ("/a/b", "/", True),
    ("/", "/", True), ("/a/bc", "/a/b", False), ("/a", "/a/b", False), ("/x/b", "/a/b", False),
    ("/a/b/c", "/a/b/", True), ("/a/b-2/c", "/a/b", False),
])
def test_lies_in_compares_whole_components(path: str, top: str, inside: bool) -> None:
    """A path lies in a folder that is it or one of its parents, never in a sibling whose name it
    begins with; the answers are those of ``Path.parents``."""
    assert lies_in(path, top) is inside
    assert lies_in(Path(path), Path(top)) is inside
    assert inside == (Path(path) == Path(top) or Path(top) in Path(path).parents)


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


# -- exchange ----------------------------------------------------------------------------------------------
def test_exchange_swaps_folders_files_and_links_in_one_step(tmp_path: Path) -> None:
    """``renameat2(RENAME_EXCHANGE)`` on the real filesystem: a full folder and another, a folder and a
    link, a file and a folder in another folder (``into``): both names exist after, each holding the other."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a/one").write_text("1")
    (tmp_path / "b").mkdir()
    (tmp_path / "b/two").write_text("2")
    (tmp_path / "link").symlink_to("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/file").write_text("f")
    with SafeDir.open_root(tmp_path) as top, top.open_dir("sub") as sub:
        assert top.exchange("a", "b") is True
        assert (tmp_path / "a/two").read_text() == "2" and (tmp_path / "b/one").read_text() == "1"
        assert top.exchange("b", "link") is True  # the link is moved, never followed
        assert os.readlink(tmp_path / "b") == "a" and (tmp_path / "link/one").read_text() == "1"
        assert top.exchange("link", "file", into=sub) is True
        assert (tmp_path / "link").read_text() == "f" and (tmp_path / "sub/file/one").read_text() == "1"


def test_exchange_of_a_missing_name_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with SafeDir.open_root(tmp_path) as top:
        with pytest.raises(OSError) as info:
            top.exchange("a", "missing")
    assert info.value.errno == errno.ENOENT and info.value.filename == str(tmp_path / "a")
    assert (tmp_path / "a").is_dir()


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_exchange_where_the_filesystem_cannot_answers_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            code: int) -> None:
    """What a kernel without ``renameat2`` or a filesystem without ``RENAME_EXCHANGE`` (NFS...) answers
    is False, nothing changed, so that the caller falls back; the call as the C library sets ``errno``."""
    import ctypes

    from ion.core import safefs

    def refuse(*args: object) -> int:
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(safefs, "_renameat2_call", [refuse])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").write_text("b")
    with SafeDir.open_root(tmp_path) as top:
        assert top.exchange("a", "b") is False
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").read_text() == "b"


def test_exchange_through_the_raw_system_call(tmp_path: Path) -> None:
    """Where the C library lacks the ``renameat2`` wrapper, ``syscall(SYS_renameat2)`` does the same."""
    import ctypes
    import platform

    from ion.core import safefs

    call = safefs._syscall_renameat2(ctypes.CDLL(None, use_errno=True))
    if call is None:
        pytest.fail(f"no SYS_renameat2 number known for {platform.machine()}")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").write_text("b")
    with SafeDir.open_root(tmp_path) as top:
        assert call(top.fd, b"a", top.fd, b"b", safefs.RENAME_EXCHANGE) == 0
    assert (tmp_path / "b").is_dir() and (tmp_path / "a").read_text() == "b"


def test_second_name_survives_a_rename_over_the_first(tmp_path: Path) -> None:
    """A file gets a hard link, a link a copy of itself (never what it points to); a folder is refused."""
    (tmp_path / "f").write_text("old")
    (tmp_path / "l").symlink_to("/nowhere")
    (tmp_path / "d").mkdir()
    with SafeDir.open_root(tmp_path) as top:
        top.second_name("f", "f.old")
        top.second_name("l", "l.old")
        (tmp_path / "new").write_text("new")
        top.replace("new", "f")
        with pytest.raises(OSError):
            top.second_name("d", "d.old")
    assert (tmp_path / "f.old").read_text() == "old" and (tmp_path / "f").read_text() == "new"
    assert os.readlink(tmp_path / "l.old") == "/nowhere"


def test_try_lock_shared_and_exclusive(tmp_path: Path) -> None:
    """Shared locks coexist, an exclusive one is refused while any is held (without waiting), and a
    missing file without ``create`` is no lock."""
    with SafeDir.open_root(tmp_path) as top:
        assert top.try_lock("p", create=False) is None
        one, two = top.try_lock("p", shared=True), top.try_lock("p", shared=True)
        assert one is not None and two is not None
        assert top.try_lock("p") is None
        os.close(one)
        assert top.try_lock("p") is None
        os.close(two)
        mine = top.try_lock("p")
        assert mine is not None and top.try_lock("p", shared=True) is None
        os.close(mine)


# -- the walks of one deployment ---------------------------------------------------------------------------
def test_walk_reports_whether_it_made_the_folder(tmp_path: Path) -> None:
    """``created``: the walk made the folder itself (it was missing), not one that was there."""
    with SafeDir.open_below(tmp_path, tmp_path / "a" / "b", create=True) as made:
        assert made.created
    with SafeDir.open_below(tmp_path, tmp_path / "a" / "b", create=True) as found:
        assert not found.created
    with SafeDir.open_root(tmp_path) as top, top.walk(()) as same:
        assert not same.created and same.realpath() == tmp_path


def test_locked_new_says_whether_it_made_the_lock_file(tmp_path: Path) -> None:
    """``locked(new=True)`` yields True when it made the file, False when it was there (or without ``new``)."""
    with SafeDir.open_root(tmp_path) as d:
        with d.locked(".lock", new=True) as made:
            assert made and (tmp_path / ".lock").is_file()
        with d.locked(".lock", new=True) as made:
            assert not made
        with d.locked(".lock") as made:
            assert not made
        (tmp_path / ".other").symlink_to(tmp_path / "elsewhere")
        with pytest.raises(SymlinkRefused), d.locked(".other", new=True):
            pass
    assert not (tmp_path / "elsewhere").exists()


def test_walk_cache_walks_to_a_parent_once_and_never_follows_a_link_swapped_in(tmp_path: Path) -> None:
    """A second destination in the same folder is walked to from that folder's kept descriptor: a folder
    above swapped for a link after the first walk is not followed (the kept one is the folder walked
    to, wherever it went); a destination itself swapped for a link is refused, as by SafeDir."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    (outside / "a").mkdir(parents=True)
    with WalkCache() as walks:
        with walks.open_below(root, root / "a" / "one", create=True) as one:
            assert one.created and one.realpath() == root / "a" / "one"
        (root / "a").rename(tmp_path / "moved")
        (root / "a").symlink_to(outside / "a")
        with walks.open_below(root, root / "a" / "two", create=True) as two:
            assert two.realpath() == tmp_path / "moved" / "two"  # the folder walked to, never the link
        assert list((outside / "a").iterdir()) == []
        (tmp_path / "moved" / "three").symlink_to(outside / "a")
        with pytest.raises(SymlinkRefused):
            walks.open_below(root, root / "a" / "three")
    # Closed: a walk goes from the root again, and refuses the link there.
    with pytest.raises(SymlinkRefused):
        walks.open_below(root, root / "a" / "four", create=True)
    assert list((outside / "a").iterdir()) == []


def test_walk_cache_keeps_at_most_limit_folders_and_closes_them(tmp_path: Path) -> None:
    """Over ``limit`` folders, walks go from the root (nothing kept, nothing leaked); ``close`` closes them."""
    before = len(os.listdir("/proc/self/fd"))
    walks = WalkCache(limit=2)
    for n in range(5):
        with walks.open_below(tmp_path, tmp_path / f"p{n}" / "d", create=True) as d:
            assert d.realpath() == tmp_path / f"p{n}" / "d"
    assert len(os.listdir("/proc/self/fd")) == before + 2
    walks.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_walk_cache_realpath_resolves_as_os_path_realpath(tmp_path: Path) -> None:
    """``realpath`` agrees with ``os.path.realpath`` for folders, links among them and missing names."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    walks = WalkCache()
    for path in (tmp_path / "real" / "sub", tmp_path / "link" / "sub", tmp_path / "link" / "missing" / "x",
                 tmp_path / "real" / ".." / "link", tmp_path / "link" / ".." / "link", Path("/")):
        assert walks.realpath(path) == os.path.realpath(path), path
        assert walks.realpath(path) == os.path.realpath(path), path  # (remembered)
