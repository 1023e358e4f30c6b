"""The unpack core: detection, round trips, limits, errors, and the ways out that need a prepared target.

Hostile archives (names and links out of the tree, devices, bombs, lying headers, broken
and truncated archives, files that are no archive) are cases of ``tests/hostile/archives.py``.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import zipfile
from pathlib import Path

import pytest

from ion.core.exceptions import ConfigurationError, IonError
from ion.services.unpack import (
    ArchiveAccessError,
    ArchiveFormat,
    ArchiveLimitError,
    CorruptArchiveError,
    Limits,
    NotAnArchiveError,
    UnpackError,
    UnsafeArchiveError,
    detect,
    extract,
    extract_stream,
    unpack,
)
from ion.testing import test_config
from tests.services.unpack.archives import TAR_MODES, M, Sandbox, tar_bytes, write_tar, write_zip, zip_bytes

GOOD = [
    M("pkg", "dir"),
    M("pkg/README", data=b"read me\n"),
    M("pkg/bin", "dir"),
    M("pkg/bin/tool", data=b"#!/bin/sh\necho hi\n", mode=0o6775),
    M("pkg/lib/libx.so.1", data=b"\x7fELF" + bytes(range(256)) * 10),
    M("pkg/lib/libx.so", "symlink", link="libx.so.1"),
    M("pkg/bin/readme", "symlink", link="../README"),
    M("pkg/empty", "dir"),
]


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path)


def refused(sandbox: Sandbox, archive: Path, error: type[UnpackError], limits: Limits | None = None,
            **kwargs) -> UnpackError:
    """Extract, expect ``error``, and check nothing outside the target changed."""
    sandbox.arm()
    with pytest.raises(error) as info:
        extract(archive, sandbox.target, limits, **kwargs)
    sandbox.assert_untouched()
    return info.value


def check_good_tree(target: Path, *, links: bool = True) -> None:
    pkg = target / "pkg"
    assert (pkg / "README").read_bytes() == b"read me\n"
    assert (pkg / "lib/libx.so.1").read_bytes() == b"\x7fELF" + bytes(range(256)) * 10
    mode = stat.S_IMODE((pkg / "bin/tool").stat().st_mode)
    assert mode == 0o755, oct(mode)  # exec kept, setuid/setgid and group write dropped
    assert stat.S_IMODE((pkg / "README").stat().st_mode) == 0o644
    assert (pkg / "empty").is_dir()
    if links:
        assert os.readlink(pkg / "lib/libx.so") == "libx.so.1"
        assert (pkg / "bin/readme").read_bytes() == b"read me\n"


# -- round trips ----------------------------------------------------------------------
@pytest.mark.parametrize("suffix", sorted(TAR_MODES))
def test_tar_formats_round_trip(sandbox, suffix):
    """Every tar flavour extracts its files, folders, modes and inside symlinks as they were."""
    archive = write_tar(sandbox.archives / f"dep.{suffix}", GOOD, TAR_MODES[suffix])
    sandbox.arm()
    result = extract(archive, sandbox.target, Limits())
    check_good_tree(sandbox.target)
    expected = {"tar": ArchiveFormat.TAR, "tar.gz": ArchiveFormat.TAR_GZ, "tgz": ArchiveFormat.TAR_GZ,
                "tar.bz2": ArchiveFormat.TAR_BZ2, "tbz2": ArchiveFormat.TAR_BZ2,
                "tar.xz": ArchiveFormat.TAR_XZ, "txz": ArchiveFormat.TAR_XZ}
    assert result.format is expected[suffix]
    assert result.members == ["pkg", "pkg/README", "pkg/bin", "pkg/bin/tool", "pkg/lib/libx.so.1",
                              "pkg/lib/libx.so", "pkg/bin/readme", "pkg/empty"]
    assert result.total_bytes == 8 + 18 + 4 + 2560
    sandbox.assert_untouched()


def test_zip_round_trips(sandbox):
    """A zip extracts files, folders, exec bits and Unix symlinks pointing inside."""
    archive = write_zip(sandbox.archives / "dep.zip", GOOD)
    result = extract(archive, sandbox.target)
    check_good_tree(sandbox.target)
    assert result.format is ArchiveFormat.ZIP and result.total_bytes == 8 + 18 + 4 + 2560


def test_stored_zip_without_unix_modes_round_trips(sandbox):
    """A stored zip made elsewhere (no Unix attributes, backslash names) gets 0644 files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        info = zipfile.ZipInfo("dir\\file.txt")
        info.create_system = 0
        zf.writestr(info, b"dos")
    (sandbox.archives / "dos.zip").write_bytes(buf.getvalue())
    extract(sandbox.archives / "dos.zip", sandbox.target)
    assert (sandbox.target / "dir/file.txt").read_bytes() == b"dos"
    assert stat.S_IMODE((sandbox.target / "dir/file.txt").stat().st_mode) == 0o644


def test_tar_hard_link_inside_is_kept(sandbox):
    """A hard link to a file extracted before it becomes the same file, its size counted again."""
    archive = write_tar(sandbox.archives / "h.tar", [M("a", data=b"12345"), M("b", "hardlink", link="a")])
    result = extract(archive, sandbox.target)
    assert os.path.samefile(sandbox.target / "a", sandbox.target / "b")
    assert result.total_bytes == 10


def test_tar_hard_link_to_itself_keeps_the_file(sandbox):
    """``tar -cf x.tar f f`` stores the second ``f`` as a hard link to itself: the file is kept as it
    is (as GNU tar extracts it), not removed to make room for a link to the name just removed."""
    archive = write_tar(sandbox.archives / "self.tar", [M("d/f", data=b"hi\n"), M("d/f", "hardlink", link="d/f")])
    result = extract(archive, sandbox.target)
    assert (sandbox.target / "d/f").read_bytes() == b"hi\n"
    assert result.total_bytes == 3


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_files_are_hashed_as_they_are_written(sandbox, kind):
    """result.files gives each regular file's size and sha256 as it ended on disk: a file listed
    twice has the later content's, a hard link its source's; folders and symlinks are not files."""
    import hashlib

    members = [*GOOD, M("pkg/twice", data=b"old"), M("pkg/twice", data=b"newer")]
    if kind == "tgz":
        members.append(M("pkg/hard", "hardlink", link="pkg/README"))
        archive = write_tar(sandbox.archives / "dep.tgz", members, "w:gz")
    else:
        archive = write_zip(sandbox.archives / "dep.zip", members)
    result = extract(archive, sandbox.target)
    on_disk = {}
    for path in sandbox.target.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            on_disk[path.relative_to(sandbox.target).as_posix()] = (len(data), hashlib.sha256(data).hexdigest())
    assert result.files == on_disk
    assert "pkg/twice" in on_disk and on_disk["pkg/twice"][0] == 5
    assert ("pkg/hard" in on_disk) is (kind == "tgz")


def test_leading_dot_slash_names_extract(sandbox):
    """Names as `tar -C dir .` writes them (./, ./x) land in the target itself."""
    archive = write_tar(sandbox.archives / "dot.tgz", [M("./", "dir"), M("./x", data=b"x")], "w:gz")
    result = extract(archive, sandbox.target)
    assert (sandbox.target / "x").read_bytes() == b"x"
    assert result.members == [".", "x"]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_deep_nesting_extracts_without_holding_a_descriptor_per_level(sandbox):
    """A member 600 folders deep extracts, with a bounded number of descriptors, none leaked."""
    deep = "/".join(["d"] * 600)
    archive = write_tar(sandbox.archives / "deep.tar", [M(f"{deep}/f", data=b"bottom"), M("d/top", data=b"top"),
                                                        M(f"{deep}/g", data=b"again")])
    before = _open_fds()
    seen = []
    real_open = os.open

    def counting_open(*args, **kwargs):
        seen.append(_open_fds())
        return real_open(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", counting_open)
        extract(archive, sandbox.target)
    assert (sandbox.target / deep / "g").read_bytes() == b"again"
    assert max(seen) < before + 40
    assert _open_fds() == before


def test_empty_tar_extracts_nothing(sandbox):
    """A tar with no members, named as one, extracts to an empty target."""
    archive = write_tar(sandbox.archives / "empty.tar.gz", [], "w:gz")
    result = extract(archive, sandbox.target)
    assert result.members == [] and sandbox.inside() == []


def test_extract_stream_reads_a_non_seekable_stream(sandbox):
    """extract_stream takes a tgz from a stream that cannot seek (a download in progress)."""
    data = tar_bytes(GOOD, "w:gz")

    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.src = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            chunk = self.src.read(min(len(b), 777))
            b[:len(chunk)] = chunk
            return len(chunk)

    stream = io.BufferedReader(Pipe())
    assert not stream.seekable()
    result = extract_stream(stream, ArchiveFormat.TAR_GZ, sandbox.target, name="dep.tgz")
    check_good_tree(sandbox.target)
    assert len(result.members) == len(GOOD)


def test_extract_stream_refuses_zip(sandbox):
    """A zip needs its central directory at the end: extract_stream says so."""
    with pytest.raises(ValueError, match="seekable"):
        extract_stream(io.BytesIO(b""), ArchiveFormat.ZIP, sandbox.target)


# -- detection ------------------------------------------------------------------------
@pytest.mark.parametrize("name, mode, expected", [
    ("dep.zip", "w:gz", ArchiveFormat.TAR_GZ),
    ("dep.tar.gz", "w", ArchiveFormat.TAR),
    ("dep.tgz", "w:xz", ArchiveFormat.TAR_XZ),
    ("dep.tar", "w:bz2", ArchiveFormat.TAR_BZ2),
    ("dep-1.2.3", "w:gz", ArchiveFormat.TAR_GZ),
    ("dep.gz", "w:gz", ArchiveFormat.TAR_GZ),
])
def test_detection_by_content_beats_a_wrong_suffix(sandbox, name, mode, expected):
    """The content picks the format, whatever the suffix says, and extraction follows it."""
    write_tar(sandbox.archives / name, GOOD, mode)
    found = detect(sandbox.archives / name)
    assert found.format is expected
    assert extract(sandbox.archives / name, sandbox.target).format is expected
    check_good_tree(sandbox.target)


def test_tar_content_with_a_zip_suffix_and_zip_content_with_a_tar_suffix(sandbox):
    """A .tar.gz that is really a zip is extracted as a zip."""
    (sandbox.archives / "dep.tar.gz").write_bytes(zip_bytes(GOOD))
    found = detect(sandbox.archives / "dep.tar.gz")
    assert found.format is ArchiveFormat.ZIP and found.claimed is ArchiveFormat.TAR_GZ
    assert "content is zip" in found.reason


def test_a_fifo_is_refused_without_blocking(sandbox):
    """An archive path that is a FIFO is refused at once (never opened for a blocking read)."""
    fifo = sandbox.archives / "dep.tgz"
    os.mkfifo(fifo)
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(ArchiveAccessError, detect, fifo)))
    t.start()
    t.join(5)
    assert done, "detect blocked on a FIFO"
    with pytest.raises(ArchiveAccessError, match="not a regular file"):
        unpack(fifo, sandbox.target)


def test_a_missing_archive_is_an_access_error(sandbox):
    """A missing archive is an ArchiveAccessError (code 400) naming the file."""
    with pytest.raises(ArchiveAccessError) as info:
        unpack(sandbox.archives / "gone.tgz", sandbox.target)
    assert "gone.tgz" in str(info.value) and info.value.code == 400


# -- paths and links -------------------------------------------------------------------
@pytest.mark.parametrize("link", ["..", "sub/../../x", "sub/..", "./", "sub/../sub/./l2"])
def test_relative_links_that_stay_inside_are_kept(sandbox, link):
    """`..` in a link is fine as long as the link resolves inside the target."""
    archive = write_tar(sandbox.archives / "in.tar", [M("sub", "dir"), M("sub/l", "symlink", link=link)])
    extract(archive, sandbox.target)
    assert os.readlink(sandbox.target / "sub/l") == link


def test_entries_already_in_the_target_are_never_replaced(sandbox):
    """A member that would overwrite a file already in the target is refused; the file stays."""
    sandbox.target.mkdir()
    (sandbox.target / "keep").write_text("mine")
    archive = write_tar(sandbox.archives / "over.tar", [M("new", data=b"n"), M("keep", data=b"theirs")])
    err = refused(sandbox, archive, UnsafeArchiveError)
    assert "would replace a file that was already in the target" in str(err)
    assert (sandbox.target / "keep").read_text() == "mine"


def test_a_symlink_already_in_the_target_is_not_followed(sandbox):
    """A symlink the target already holds is never written through."""
    sandbox.target.mkdir()
    os.symlink(sandbox.root / "outside", sandbox.target / "lib")
    archive = write_tar(sandbox.archives / "pre.tar", [M("lib/evil", data=b"pwned")])
    err = refused(sandbox, archive, UnsafeArchiveError)
    assert "goes through 'lib', which is a symlink" in str(err)


# -- limits -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_too_many_members(sandbox, fmt):
    """More members than max_members is refused, naming the limit."""
    members = [M(f"f{i}", data=b"x") for i in range(10)]
    archive = (write_tar(sandbox.archives / "m.tar", members) if fmt == "tar"
               else write_zip(sandbox.archives / "m.zip", members))
    err = refused(sandbox, archive, ArchiveLimitError, Limits(max_members=5))
    assert err.limit == "max_members" and "max_members = 5" in str(err)
    if fmt == "zip":
        assert sandbox.inside() == []  # the zip's directory is checked before anything is written
    else:
        assert len(sandbox.inside()) == 5


def test_the_ratio_guard_lets_ordinary_archives_through(sandbox):
    """A normal archive with some compressible content passes the default ratio guard."""
    members = [M("a", data=os.urandom(300_000)), M("b", data=b"log line 42\n" * 200_000)]
    archive = write_tar(sandbox.archives / "ok.tgz", members, "w:gz")
    assert extract(archive, sandbox.target).total_bytes == 300_000 + 12 * 200_000


# -- errors and limits ---------------------------------------------------------------------
def test_every_unpack_error_is_an_ion_error():
    """All unpack errors share one root under IonError, with the codes the service answers with."""
    for cls in (UnsafeArchiveError, ArchiveLimitError, CorruptArchiveError, NotAnArchiveError,
                ArchiveAccessError):
        assert issubclass(cls, UnpackError) and issubclass(cls, IonError)
    assert UnsafeArchiveError.code == ArchiveLimitError.code == CorruptArchiveError.code == 422
    assert ArchiveAccessError.code == 400


def test_limits_defaults_match_the_shipped_config():
    """Limits() and the ion.services.unpack section of res/config/ion.config agree."""
    section = test_config().for_module("ion.services.unpack")
    assert Limits.from_config(section) == Limits()
    assert Limits().max_total_bytes == 8 * 1024 ** 3 and Limits().max_members == 100_000


@pytest.mark.parametrize("key, value", [("max_members", 0), ("max_ratio", "200"), ("max_total_bytes", -1),
                                        ("ratio_threshold", True)])
def test_bad_limits_are_a_configuration_error(key, value):
    """A limit that is not a positive number is refused, naming the key."""
    with pytest.raises(ConfigurationError, match=key):
        Limits.from_config({key: value})


def test_a_target_that_cannot_be_made_is_a_target_error(sandbox):
    """A target whose parent is missing is a TargetError (code 500) naming the target."""
    from ion.services.unpack import TargetError

    archive = write_tar(sandbox.archives / "ok.tar", [M("a", data=b"a")])
    sandbox.arm()
    with pytest.raises(TargetError) as info:
        extract(archive, sandbox.root / "missing" / "target")
    assert "missing/target" in str(info.value) and info.value.code == 500
    sandbox.assert_untouched()


def test_an_archive_read_through_a_callers_descriptor_without_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without /proc, a caller's descriptor is read through a copy rewound to its start: detect then
    extract read the archive whole; a FIFO's descriptor is refused as no regular file, and no copy
    of it is left open."""
    from ion.services.unpack import core as unpack_core

    archive = tmp_path / "dep.tar"
    archive.write_bytes(tar_bytes([M("pkg/a.txt", data=b"a")]))
    real_open = os.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/self/fd/"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(unpack_core.os, "open", no_proc)
    fd = real_open(archive, os.O_RDONLY)
    try:
        os.read(fd, 100)  # (the caller's offset: the copies read from the start anyway)
        found = unpack_core.detect(archive, archive_fd=fd)
        result = unpack_core.extract(archive, tmp_path / "out", format=found.format, archive_fd=fd)
    finally:
        os.close(fd)
    assert "pkg/a.txt" in result.members
    assert (tmp_path / "out" / "pkg" / "a.txt").read_bytes() == b"a"
    os.mkfifo(tmp_path / "fifo")
    fifo = real_open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(unpack_core.ArchiveAccessError, match="not a regular file"):
            unpack_core.detect(tmp_path / "fifo", archive_fd=fifo)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(fifo)

