"""The unpack core: detection, round trips, and every way an archive may try to get out."""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
import tarfile
import threading
import zipfile
import zlib
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


def test_later_member_of_the_same_name_wins(sandbox):
    """As with tar itself, a file listed twice ends with the later content."""
    archive = write_tar(sandbox.archives / "d.tar", [M("a", data=b"old"), M("a", data=b"new")])
    extract(archive, sandbox.target)
    assert (sandbox.target / "a").read_bytes() == b"new"


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


def test_no_descriptor_leaks_on_refusal(sandbox):
    """A refused archive leaves no file descriptor open."""
    archive = write_tar(sandbox.archives / "bad.tar", [M("a/b/c/f", data=b"x"), M("../evil", data=b"x")])
    before = _open_fds()
    refused(sandbox, archive, UnsafeArchiveError)
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


@pytest.mark.parametrize("name, data", [
    ("notes.txt", b"just text\n" * 100),
    ("tool-1.2.3", b"\x7fELF\x02\x01\x01" + bytes(600)),
    ("data.json.gz", gzip.compress(b'{"a": 1}' * 100)),
    ("lib.jar", zip_bytes([M("META-INF/MANIFEST.MF", data=b"Manifest-Version: 1.0\n")])),
    ("blob.bin", tar_bytes(GOOD, "w:gz")),
    ("empty", b""),
])
def test_a_non_archive_is_kept_as_is(sandbox, name, data):
    """Files that are no archive, or whose suffix names another format (.jar, .bin), are kept."""
    path = sandbox.archives / name
    path.write_bytes(data)
    sandbox.arm()
    result = unpack(path, sandbox.target)
    assert result.kept and result.detection.format is None
    assert not sandbox.target.exists()
    assert path.read_bytes() == data
    with pytest.raises(NotAnArchiveError):
        extract(path, sandbox.target)
    sandbox.assert_untouched()


@pytest.mark.parametrize("name, data", [
    ("dep.tgz", b"this is no archive at all" * 40),
    ("dep.zip", b"PK\x03\x04" + bytes(100)),
    ("dep.tar.gz", b"\x1f\x8b\x08\x00garbage-garbage"),
    ("dep.tar.xz", b""),
    ("dep.tar.bz2", gzip.compress(b"not a tar, just compressed text " * 40)),
])
def test_a_name_that_claims_an_archive_over_other_content_is_corrupt(sandbox, name, data):
    """A file named like an archive whose content is none fails, naming the file and the cause."""
    path = sandbox.archives / name
    path.write_bytes(data)
    with pytest.raises(CorruptArchiveError) as info:
        detect(path)
    assert str(path) in str(info.value) and "corrupt archive" in str(info.value)
    refused(sandbox, path, CorruptArchiveError)


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
@pytest.mark.parametrize("name, why", [
    ("../evil", "escapes the target"),
    ("a/../../evil", "escapes the target"),
    ("a/../b", "has a '..' component"),
    ("./../../../outside/secret", "escapes the target"),
])
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_dotdot_names_are_refused(sandbox, name, why, kind):
    """A member name with `..` is refused, naming the member, and nothing is written outside."""
    members = [M("ok", data=b"fine"), M(name, data=b"pwned")]
    archive = (write_tar(sandbox.archives / "t.tar", members) if kind == "tar"
               else write_zip(sandbox.archives / "t.zip", members))
    err = refused(sandbox, archive, UnsafeArchiveError)
    assert str(err).endswith(f"member {name!r} {why}")
    assert err.member == name and str(archive) in str(err)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_absolute_names_are_refused(sandbox, kind):
    """An absolute member name is refused (never stripped and written)."""
    absolute = str(sandbox.root / "outside" / "evil")
    members = [M(absolute, data=b"pwned")]
    archive = (write_tar(sandbox.archives / "t.tar", members) if kind == "tar"
               else write_zip(sandbox.archives / "t.zip", members))
    err = refused(sandbox, archive, UnsafeArchiveError)
    assert f"member {absolute!r} is an absolute path" in str(err)
    assert not Path(absolute).exists()


def test_zip_backslash_names_are_folders_and_cannot_escape(sandbox):
    """Backslashes in zip names are separators: `..\\evil` is refused like `../evil`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("..\\evil"), b"pwned")
    (sandbox.archives / "b.zip").write_bytes(buf.getvalue())
    err = refused(sandbox, sandbox.archives / "b.zip", UnsafeArchiveError)
    assert "escapes the target" in str(err)


@pytest.mark.parametrize("link, why", [
    ("/etc/passwd", "is a symlink to an absolute path '/etc/passwd'"),
    ("../../outside/secret", "is a symlink to '../../outside/secret', which points outside the target"),
    ("../..", "is a symlink to '../..', which points outside the target"),
    ("../sub/../../x", "is a symlink to '../sub/../../x', which points outside the target"),
])
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_symlinks_pointing_out_are_refused(sandbox, link, why, kind):
    """A symlink that is absolute or leads out of the target is refused before it exists."""
    members = [M("sub", "dir"), M("sub/l", "symlink", link=link)] if kind == "tar" else \
        [M("sub/", "dir"), M("sub/l", "symlink", link=link)]
    archive = (write_tar(sandbox.archives / "t.tar", members) if kind == "tar"
               else write_zip(sandbox.archives / "t.zip", members))
    err = refused(sandbox, archive, UnsafeArchiveError)
    assert f"member 'sub/l' {why}" in str(err)
    assert not (sandbox.target / "sub/l").is_symlink()


@pytest.mark.parametrize("link", ["..", "sub/../../x", "sub/..", "./", "sub/../sub/./l2"])
def test_relative_links_that_stay_inside_are_kept(sandbox, link):
    """`..` in a link is fine as long as the link resolves inside the target."""
    archive = write_tar(sandbox.archives / "in.tar", [M("sub", "dir"), M("sub/l", "symlink", link=link)])
    extract(archive, sandbox.target)
    assert os.readlink(sandbox.target / "sub/l") == link


def test_a_chain_of_inside_links_that_leads_out_is_refused(sandbox):
    """Links that each stay inside but lead out together (d/l -> .., e -> d/l/..) are refused."""
    archive = write_tar(sandbox.archives / "chain.tar", [
        M("d", "dir"), M("d/l", "symlink", link=".."), M("e", "symlink", link="d/l/.."),
    ])
    err = refused(sandbox, archive, UnsafeArchiveError)
    assert "member 'e'" in str(err) and "points outside the target" in str(err)


def test_a_link_made_harmful_by_a_later_link_is_refused(sandbox):
    """A link through a path that does not exist yet is rechecked once the whole tree exists."""
    archive = write_zip(sandbox.archives / "later.zip", [
        M("e", "symlink", link="d/l/.."),  # d/l missing: lexically d/, inside
        M("d/", "dir"), M("d/l", "symlink", link=".."),  # now e resolves to the target's parent
    ])
    err = refused(sandbox, archive, UnsafeArchiveError)
    assert "member 'e'" in str(err) and "once the whole archive is extracted" in str(err)


def test_a_write_through_a_symlink_is_refused(sandbox):
    """A member below an extracted symlink is refused, even when the link points inside."""
    archive = write_tar(sandbox.archives / "through.tar", [
        M("real", "dir"), M("alias", "symlink", link="real"), M("alias/file", data=b"x"),
    ])
    err = refused(sandbox, archive, UnsafeArchiveError)
    assert "member 'alias/file' goes through 'alias', which is a symlink" in str(err)
    assert not (sandbox.target / "real/file").exists()


def test_a_symlink_replaced_by_a_file_is_refused(sandbox):
    """The classic symlink-then-file trick cannot write through the link."""
    archive = write_tar(sandbox.archives / "swap.tar", [M("x", "symlink", link="y"), M("x", data=b"pwned")])
    err = refused(sandbox, archive, UnsafeArchiveError)
    assert "would replace the symlink of an earlier member with a file" in str(err)


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


@pytest.mark.parametrize("link, why", [
    ("../../outside/secret", "is a hard link to '../../outside/secret', outside the target"),
    ("/etc/passwd", "is a hard link to an absolute path '/etc/passwd'"),
    ("missing", "is a hard link to 'missing', which is not a file extracted before it"),
    ("l", "is a hard link to 'l', which is not a file extracted before it"),
])
def test_hard_links_out_are_refused(sandbox, link, why):
    """A hard link must name a regular file extracted earlier: never outside, never a symlink."""
    archive = write_tar(sandbox.archives / "h.tar", [
        M("f", data=b"f"), M("l", "symlink", link="f"), M("h", "hardlink", link=link),
    ])
    err = refused(sandbox, archive, UnsafeArchiveError)
    assert f"member 'h' {why}" in str(err)
    assert (sandbox.root / "outside" / "secret").stat().st_nlink == 1


@pytest.mark.parametrize("kind, why", [("chr", "is a character device"), ("blk", "is a block device"),
                                       ("fifo", "is a FIFO")])
@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_devices_and_fifos_are_refused(sandbox, kind, why, fmt):
    """Device files and FIFOs are never made, in tar or zip."""
    members = [M("dev", kind)]
    archive = (write_tar(sandbox.archives / "d.tar", members) if fmt == "tar"
               else write_zip(sandbox.archives / "d.zip", members))
    err = refused(sandbox, archive, UnsafeArchiveError)
    assert f"member 'dev' {why}" in str(err)
    assert not (sandbox.target / "dev").exists()


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


@pytest.mark.parametrize("fmt", ["tgz", "zip"])
def test_a_compression_bomb_over_the_size_limit(sandbox, fmt):
    """A highly compressible member bigger than max_total_bytes is refused before it fills the disk."""
    members = [M("bomb", data=bytes(3 * 1024 * 1024))]
    archive = (write_tar(sandbox.archives / "b.tgz", members, "w:gz") if fmt == "tgz"
               else write_zip(sandbox.archives / "b.zip", members))
    assert archive.stat().st_size < 20_000
    err = refused(sandbox, archive, ArchiveLimitError, Limits(max_total_bytes=1024 * 1024))
    assert err.limit == "max_total_bytes" and "'bomb'" in str(err)
    assert sum(os.lstat(sandbox.target / n).st_size for n in sandbox.inside()) <= 1024 * 1024


@pytest.mark.parametrize("fmt", ["tgz", "tbz2", "txz", "zip"])
def test_the_ratio_guard_stops_a_bomb_under_the_size_limit(sandbox, fmt):
    """Past ratio_threshold, bytes written may be at most max_ratio times the archive bytes read."""
    members = [M("a", data=os.urandom(2000)), M("bomb", data=bytes(4 * 1024 * 1024))]
    archive = (write_zip(sandbox.archives / "b.zip", members) if fmt == "zip"
               else write_tar(sandbox.archives / f"b.{fmt}", members, TAR_MODES[fmt]))
    err = refused(sandbox, archive, ArchiveLimitError, Limits(max_ratio=50, ratio_threshold=256 * 1024))
    assert err.limit == "max_ratio" and "member 'bomb'" in str(err)
    written = sum(os.lstat(sandbox.target / n).st_size for n in sandbox.inside())
    assert written <= 50 * archive.stat().st_size + 1024 * 1024


def test_the_ratio_guard_lets_ordinary_archives_through(sandbox):
    """A normal archive with some compressible content passes the default ratio guard."""
    members = [M("a", data=os.urandom(300_000)), M("b", data=b"log line 42\n" * 200_000)]
    archive = write_tar(sandbox.archives / "ok.tgz", members, "w:gz")
    assert extract(archive, sandbox.target).total_bytes == 300_000 + 12 * 200_000


def test_hard_links_count_against_the_size_limit(sandbox):
    """Hard links cost nothing on disk here but a copy of the tree would: they count."""
    members = [M("a", data=bytes(1000))] + [M(f"h{i}", "hardlink", link="a") for i in range(5)]
    archive = write_tar(sandbox.archives / "h.tar", members)
    err = refused(sandbox, archive, ArchiveLimitError, Limits(max_total_bytes=3500))
    assert err.limit == "max_total_bytes"


def _patch_zip_sizes(data: bytes, name: bytes, new_size: int) -> bytes:
    """Rewrite the uncompressed size of ``name`` in its local header and central directory."""
    out = bytearray(data)
    local = out.find(b"PK\x03\x04")
    assert out[local + 30:local + 30 + len(name)] == name
    struct.pack_into("<I", out, local + 22, new_size)
    central = out.find(b"PK\x01\x02")
    struct.pack_into("<I", out, central + 24, new_size)
    return bytes(out)


def test_a_zip_header_that_lies_about_the_size_cannot_beat_the_limit(sandbox):
    """A zip claiming 10 bytes for a 1 MiB member is refused; no more than the limit is written."""
    data = _patch_zip_sizes(zip_bytes([M("liar", data=bytes(1024 * 1024))]), b"liar", 10)
    (sandbox.archives / "liar.zip").write_bytes(data)
    refused(sandbox, sandbox.archives / "liar.zip", UnpackError, Limits(max_total_bytes=1000))
    assert all(os.lstat(sandbox.target / n).st_size <= 1000 for n in sandbox.inside())


def _tar_with_size(real: bytes, claimed: int) -> bytes:
    """A one-member tar whose header says ``claimed`` bytes while ``real`` follows."""
    info = tarfile.TarInfo("liar")
    info.size = claimed
    header = info.tobuf(tarfile.USTAR_FORMAT)
    pad = (-len(real)) % 512
    return header + real + bytes(pad) + bytes(1024)


@pytest.mark.parametrize("real, claimed, cause", [
    (b"A" * 5000, 10_000, "unexpected end of data"),
    (b"A" * 5000, 100, "invalid header at offset 1024"),
])
def test_a_tar_header_that_lies_about_the_size_is_corrupt(sandbox, real, claimed, cause):
    """A size bigger than the data (truncated) or smaller (data read as headers) is corrupt."""
    (sandbox.archives / "liar.tar").write_bytes(_tar_with_size(real, claimed))
    err = refused(sandbox, sandbox.archives / "liar.tar", CorruptArchiveError)
    assert cause in str(err) and "liar.tar" in str(err)


def test_a_tar_header_that_asks_for_a_huge_read_is_corrupt(sandbox):
    """A pax header claiming gigabytes is refused instead of being read into memory."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = 3 * 1024 ** 3
    (sandbox.archives / "pax.tgz").write_bytes(gzip.compress(info.tobuf(tarfile.USTAR_FORMAT) + bytes(4096)))
    err = refused(sandbox, sandbox.archives / "pax.tgz", CorruptArchiveError)
    assert "bytes at once" in str(err)


# -- corrupt archives --------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["tgz", "tar.bz2", "tar.xz"])
def test_a_truncated_compressed_tar_is_corrupt(sandbox, suffix):
    """A compressed tar cut short fails with CorruptArchiveError naming the file."""
    mode = {"tgz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}[suffix]
    data = tar_bytes([M("a", data=os.urandom(50_000)), M("b", data=os.urandom(50_000))], mode)
    (sandbox.archives / f"cut.{suffix}").write_bytes(data[: len(data) * 2 // 3])
    err = refused(sandbox, sandbox.archives / f"cut.{suffix}", CorruptArchiveError)
    assert f"cut.{suffix}: corrupt archive" in str(err)


def test_a_tgz_cut_inside_its_trailer_is_corrupt(sandbox):
    """Even a tgz missing only its last bytes (CRC and length) is refused."""
    data = tar_bytes([M("a", data=b"x" * 100)], "w:gz")
    (sandbox.archives / "cut.tgz").write_bytes(data[:-4])
    refused(sandbox, sandbox.archives / "cut.tgz", CorruptArchiveError)


def test_a_tgz_with_a_bad_crc_is_corrupt(sandbox):
    """A tgz whose gzip CRC does not match its data is refused."""
    data = bytearray(tar_bytes([M("a", data=b"x" * 100)], "w:gz"))
    data[-8] ^= 0xFF
    (sandbox.archives / "crc.tgz").write_bytes(bytes(data))
    err = refused(sandbox, sandbox.archives / "crc.tgz", CorruptArchiveError)
    assert "CRC" in str(err)


def test_a_plain_tar_cut_between_members_is_corrupt(sandbox):
    """A .tar that stops after a member, without its end-of-archive blocks, is refused."""
    data = tar_bytes([M("a", data=b"a" * 600), M("b", data=b"b")])
    (sandbox.archives / "cut.tar").write_bytes(data[: 512 + 1024])
    err = refused(sandbox, sandbox.archives / "cut.tar", CorruptArchiveError)
    assert "without an end-of-archive marker" in str(err)


def test_a_plain_tar_cut_inside_a_header_is_corrupt(sandbox):
    """A .tar that stops inside a header is refused."""
    data = tar_bytes([M("a", data=b"a" * 600), M("b", data=b"b")])
    (sandbox.archives / "cut.tar").write_bytes(data[: 512 + 1024 + 100])
    err = refused(sandbox, sandbox.archives / "cut.tar", CorruptArchiveError)
    assert "inside a header" in str(err)


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_a_truncated_zip_is_corrupt(sandbox, cut):
    """A zip missing its end (central directory) fails detection and extraction."""
    data = zip_bytes([M("a", data=os.urandom(20_000)), M("b", data=os.urandom(20_000))])
    (sandbox.archives / "cut.zip").write_bytes(data[: int(len(data) * cut)])
    err = refused(sandbox, sandbox.archives / "cut.zip", CorruptArchiveError)
    assert "cut.zip: corrupt archive" in str(err)


def test_a_zip_with_damaged_data_is_corrupt(sandbox):
    """A zip whose member data was damaged fails on its CRC; the error names the member."""
    payload = b"hello world " * 1000
    data = bytearray(zip_bytes([M("a", data=payload)], zipfile.ZIP_STORED))
    at = data.find(b"hello world")
    data[at + 100] ^= 0xFF
    (sandbox.archives / "bad.zip").write_bytes(bytes(data))
    err = refused(sandbox, sandbox.archives / "bad.zip", CorruptArchiveError)
    assert "member 'a'" in str(err) and "CRC" in str(err)


def test_an_encrypted_zip_member_is_refused(sandbox):
    """Encrypted members cannot be checked or read: the archive is refused."""
    data = bytearray(zip_bytes([M("a", data=b"secret")], zipfile.ZIP_STORED))
    struct.pack_into("<H", data, data.find(b"PK\x03\x04") + 6, 1)
    struct.pack_into("<H", data, data.find(b"PK\x01\x02") + 8, 1)
    (sandbox.archives / "enc.zip").write_bytes(bytes(data))
    err = refused(sandbox, sandbox.archives / "enc.zip", CorruptArchiveError)
    assert "encrypted" in str(err)


def test_a_zip_declaring_more_members_than_allowed_is_refused_before_parsing(sandbox):
    """The end record's member count is checked before zipfile loads the directory."""
    data = bytearray(zip_bytes([M("a", data=b"a")]))
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, eocd + 8, 60_000, 60_000)
    (sandbox.archives / "many.zip").write_bytes(bytes(data))
    err = refused(sandbox, sandbox.archives / "many.zip", ArchiveLimitError, Limits(max_members=100),
                  format=ArchiveFormat.ZIP)
    assert "60000 members declared" in str(err)


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


def test_crafted_compression_data_is_corrupt(sandbox):
    """Deflate data that does not decode is a CorruptArchiveError, not a crash."""
    raw = zlib.compress(tar_bytes([M("a", data=b"a" * 5000)]))[2:-4]
    broken = bytearray(raw)
    broken[len(broken) // 2] ^= 0x55
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"
    (sandbox.archives / "z.tgz").write_bytes(header + bytes(broken) + bytes(8))
    refused(sandbox, sandbox.archives / "z.tgz", CorruptArchiveError)
