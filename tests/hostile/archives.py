"""Hostile archives: every trick an archive can play on the code that extracts it.

Pure data, built with the builders of ``tests/services/unpack/archives.py``.
``test_archives.py`` writes each case into the ``archives`` folder of a
:class:`~tests.services.unpack.archives.Sandbox` (next to a sentinel ``outside/secret``)
and unpacks it with the real unpack core (``ion/services/unpack/core.py``,
``unpack()``: detection, then extraction) into ``staging/target``.

Each case expects one of:

- an error: the exact :class:`~ion.services.unpack.UnpackError` subclass, and fragments
  of its message (which always names the archive);
- :data:`KEPT`: the file is no archive and stays as it is, nothing is extracted;
- :data:`EXTRACTED`: it is extracted, defused (:attr:`Case.files` gives what must be
  on disk, with its mode).

In every case nothing outside the target is created, changed or removed, and no more
is written than the limits allow.

Add a case: one :class:`Case` entry in :data:`CASES`.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ion.services.unpack import (
    ArchiveAccessError,
    ArchiveFormat,
    ArchiveLimitError,
    CorruptArchiveError,
    Limits,
    UnpackError,
    UnsafeArchiveError,
)
from tests.services.unpack.archives import M, tar_bytes, zip_bytes

#: The file is kept as it is (no archive).
KEPT = "kept as a plain file"
#: The archive is extracted (what it tried is defused).
EXTRACTED = "extracted"

#: Builds the archive at the path given (in the sandbox's ``archives`` folder), or returns its bytes.
Builder = Callable[[Path], "bytes | None"]


@dataclass(frozen=True)
class Case:
    """One hostile archive.

    :ivar name: the archive's file name (its suffix takes part in detection).
    :ivar build: the archive's bytes, or a function of the archive's path returning them
        (or making the file itself and returning None); the sandbox root is
        ``path.parent.parent``.
    :ivar expect: the error class, :data:`KEPT` or :data:`EXTRACTED`.
    :ivar message: fragments of the error's text; ``{root}`` stands for the sandbox root.
    :ivar limits: the limits to extract with (default ``Limits()``).
    :ivar format: extract as this format, skipping detection.
    :ivar clean: the code promises nothing is written at all (a zip is checked whole first).
    :ivar absent: paths (relative to the target) that must not exist afterwards.
    :ivar files: for :data:`EXTRACTED`: ``(path, content, mode)`` of files that must be there.
    :ivar xfail: why the code does not give this answer yet (the runner fails, strictly).
    """

    id: str
    name: str
    build: bytes | Builder
    expect: type[UnpackError] | str
    message: tuple[str, ...] = ()
    limits: Limits | None = None
    format: ArchiveFormat | None = None
    clean: bool = False
    absent: tuple[str, ...] = ()
    files: tuple[tuple[str, bytes, int], ...] = ()
    xfail: str = ""


# -- builders ---------------------------------------------------------------------------------------
def _tar(*members: M, mode: str = "w") -> bytes:
    return tar_bytes(members, mode)


def _zip(*members: M, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    return zip_bytes(members, compression)


def _archive(fmt: str, *members: M) -> bytes:
    """``members`` as a plain tar (``tar``) or a zip (``zip``)."""
    return _tar(*members) if fmt == "tar" else _zip(*members)


def _absolute(fmt: str) -> Builder:
    """A member named by an absolute path into the sandbox's sentinel folder."""
    return lambda path: _archive(fmt, M(str(path.parent.parent / "outside" / "evil"), data=b"pwned"))


def _raw_zip(name: str, data: bytes = b"pwned", create_system: int = 0) -> bytes:
    """A zip of one member named exactly ``name`` (no Unix attributes: made elsewhere)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo(name)
        info.create_system = create_system
        zf.writestr(info, data)
    return buf.getvalue()


def _tar_with_size(real: bytes, claimed: int) -> bytes:
    """A one-member tar whose header says ``claimed`` bytes while ``real`` follows."""
    info = tarfile.TarInfo("liar")
    info.size = claimed
    return info.tobuf(tarfile.USTAR_FORMAT) + real + bytes((-len(real)) % 512) + bytes(1024)


def _pax_size_liar(real: bytes, claimed: int) -> bytes:
    """A one-member pax tar whose ustar size is right but whose pax ``size`` record says ``claimed``."""
    info = tarfile.TarInfo("liar")
    info.size = len(real)
    info.pax_headers = {"size": str(claimed)}
    return info.tobuf(tarfile.PAX_FORMAT) + real + bytes((-len(real)) % 512) + bytes(1024)


def _pax_path(path: str) -> bytes:
    """A one-member pax tar whose member's name comes from a pax ``path`` record."""
    info = tarfile.TarInfo("innocent")
    info.size = 1
    info.pax_headers = {"path": path}
    return info.tobuf(tarfile.PAX_FORMAT, errors="surrogateescape") + b"x" + bytes(511) + bytes(1024)


def _huge_pax_header() -> bytes:
    """A tgz whose first header is a pax header claiming 3 GiB (a memory bomb, not a name)."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = 3 * 1024 ** 3
    return gzip.compress(info.tobuf(tarfile.USTAR_FORMAT) + bytes(4096))


def _unknown_type() -> bytes:
    """A tar member of a type no tar defines ('Z')."""
    info = tarfile.TarInfo("odd")
    info.type = b"Z"
    return info.tobuf(tarfile.USTAR_FORMAT) + bytes(1024)


def _patch_zip_sizes(data: bytes, name: bytes, new_size: int) -> bytes:
    """Rewrite the uncompressed size of ``name`` in its local header and central directory."""
    out = bytearray(data)
    local = out.find(b"PK\x03\x04")
    assert out[local + 30:local + 30 + len(name)] == name
    struct.pack_into("<I", out, local + 22, new_size)
    struct.pack_into("<I", out, out.find(b"PK\x01\x02") + 24, new_size)
    return bytes(out)


def _zip_declaring(count: int) -> bytes:
    """A one-member zip whose end record declares ``count`` members."""
    data = bytearray(_zip(M("a", data=b"a")))
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, eocd + 8, count, count)
    return bytes(data)


def _encrypted_zip() -> bytes:
    """A zip whose member has the 'encrypted' flag set (in both headers)."""
    data = bytearray(_zip(M("a", data=b"secret"), compression=zipfile.ZIP_STORED))
    struct.pack_into("<H", data, data.find(b"PK\x03\x04") + 6, 1)
    struct.pack_into("<H", data, data.find(b"PK\x01\x02") + 8, 1)
    return bytes(data)


def _damaged_zip() -> bytes:
    """A stored zip with one byte of its member's data flipped (its CRC no longer matches)."""
    data = bytearray(_zip(M("a", data=b"hello world " * 1000), compression=zipfile.ZIP_STORED))
    data[data.find(b"hello world") + 100] ^= 0xFF
    return bytes(data)


def _cut(data: bytes, keep: float | int) -> bytes:
    return data[:keep] if isinstance(keep, int) else data[:int(len(data) * keep)]


def _two_random(mode: str, size: int = 50_000) -> bytes:
    return _tar(M("a", data=os.urandom(size)), M("b", data=os.urandom(size)), mode=mode)


def _bad_crc_tgz() -> bytes:
    data = bytearray(_tar(M("a", data=b"x" * 100), mode="w:gz"))
    data[-8] ^= 0xFF
    return bytes(data)


def _broken_deflate() -> bytes:
    """A gzip header over deflate data with a byte flipped in the middle."""
    raw = bytearray(zlib.compress(_tar(M("a", data=b"a" * 5000)))[2:-4])
    raw[len(raw) // 2] ^= 0x55
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + bytes(raw) + bytes(8)


def _small(data: bytes) -> bytes:
    """``data``, checked to be small (a bomb must be a small archive)."""
    assert len(data) < 20_000, len(data)
    return data


def _fifo(path: Path) -> None:
    os.mkfifo(path)


_GOOD = M("ok", data=b"fine")
_MIB = 1024 * 1024

_DOTDOT = [("dotdot", "../evil", "escapes the target"),
           ("dir-dotdot-dotdot", "a/../../evil", "escapes the target"),
           ("dotdot-inside", "a/../b", "has a '..' component"),
           ("dot-dotdot-to-sentinel", "./../../../outside/secret", "escapes the target")]
_SYMLINKS_OUT = [("absolute", "/etc/passwd", "is a symlink to an absolute path '/etc/passwd'"),
                 ("to-sentinel", "../../outside/secret",
                  "is a symlink to '../../outside/secret', which points outside the target"),
                 ("up-two", "../..", "is a symlink to '../..', which points outside the target"),
                 ("up-through-sub", "../sub/../../x",
                  "is a symlink to '../sub/../../x', which points outside the target")]
_HARD_LINKS_OUT = [("to-sentinel", "../../outside/secret",
                    "is a hard link to '../../outside/secret', outside the target"),
                   ("absolute", "/etc/passwd", "is a hard link to an absolute path '/etc/passwd'"),
                   ("missing", "missing", "is a hard link to 'missing', which is not a file extracted before it"),
                   ("to-symlink", "l", "is a hard link to 'l', which is not a file extracted before it")]
_SPECIAL = [("chr", "is a character device"), ("blk", "is a block device"), ("fifo", "is a FIFO")]

CASES: list[Case] = [
    # -- names that leave the target -------------------------------------------------------------------
    *[Case(f"{fmt}-{label}", f"t.{fmt}", _archive(fmt, _GOOD, M(name, data=b"pwned")), UnsafeArchiveError,
           (f"member {name!r} {why}",), clean=fmt == "zip")
      for label, name, why in _DOTDOT for fmt in ("tar", "zip")],
    Case("tar-dotdot-after-nested-folders", "t.tar", _tar(M("a/b/c/f", data=b"x"), M("../evil", data=b"x")),
         UnsafeArchiveError, ("member '../evil' escapes the target",)),
    *[Case(f"{fmt}-absolute-name", f"t.{fmt}", _absolute(fmt), UnsafeArchiveError,
           ("member '{root}/outside/evil' is an absolute path",), clean=fmt == "zip") for fmt in ("tar", "zip")],
    Case("zip-backslash-dotdot", "b.zip", _raw_zip("..\\evil"), UnsafeArchiveError,
         ("member '..\\\\evil' escapes the target",), clean=True),
    Case("zip-backslash-absolute", "b.zip", _raw_zip("\\evil"), UnsafeArchiveError,
         ("is an absolute path",), clean=True),
    Case("zip-backslash-dotdot-unix", "b.zip", _raw_zip("a\\..\\..\\evil", create_system=3), UnsafeArchiveError,
         ("escapes the target",), clean=True),
    # A drive letter is no root on Unix: 'C:' is a folder inside the target.
    Case("zip-drive-letter-name", "b.zip", _raw_zip("C:\\evil\\x"), EXTRACTED, files=(("C:/evil/x", b"pwned", 0o644),)),
    Case("tar-nul-in-pax-path", "t.tar", _pax_path("ok\x00/../../evil"), UnsafeArchiveError,
         ("has a NUL byte in its name",)),
    Case("tar-name-over-4096-bytes", "t.tar", _pax_path("a/" * 2100 + "f"), UnsafeArchiveError,
         ("has a name longer than 4096 bytes",)),
    Case("tar-component-over-255-bytes", "t.tar", _pax_path("x" * 300), UnsafeArchiveError,
         ("has a name component longer than 255 bytes",)),
    # -- links ----------------------------------------------------------------------------------------------
    *[Case(f"{fmt}-symlink-{label}", f"t.{fmt}",
           _archive(fmt, M("sub" if fmt == "tar" else "sub/", "dir"), M("sub/l", "symlink", link=link)),
           UnsafeArchiveError, (f"member 'sub/l' {why}",), absent=("sub/l",))
      for label, link, why in _SYMLINKS_OUT for fmt in ("tar", "zip")],
    Case("tar-symlink-chain-leads-out", "chain.tar",
         _tar(M("d", "dir"), M("d/l", "symlink", link=".."), M("e", "symlink", link="d/l/..")),
         UnsafeArchiveError, ("member 'e'", "points outside the target"), absent=("e",)),
    Case("zip-symlink-made-harmful-by-a-later-link", "later.zip",
         _zip(M("e", "symlink", link="d/l/.."), M("d/", "dir"), M("d/l", "symlink", link="..")),
         UnsafeArchiveError, ("member 'e'", "once the whole archive is extracted")),
    Case("tar-symlink-loop", "loop.tar",
         _tar(M("a", "symlink", link="b"), M("b", "symlink", link="a"), M("c", "symlink", link="a/x")),
         UnsafeArchiveError, ("member 'c'", "symlink loop")),
    Case("tar-write-through-symlink", "through.tar",
         _tar(M("real", "dir"), M("alias", "symlink", link="real"), M("alias/file", data=b"x")),
         UnsafeArchiveError, ("member 'alias/file' goes through 'alias', which is a symlink",),
         absent=("real/file",)),
    Case("tar-write-through-symlink-to-sentinel", "through.tar",
         _tar(M("out", "symlink", link="../../outside"), M("out/secret", data=b"pwned")),
         UnsafeArchiveError, ("member 'out' is a symlink to '../../outside', which points outside the target",)),
    Case("tar-symlink-then-file", "swap.tar", _tar(M("x", "symlink", link="y"), M("x", data=b"pwned")),
         UnsafeArchiveError, ("would replace the symlink of an earlier member with a file",)),
    Case("zip-symlink-then-file", "swap.zip", _zip(M("x", "symlink", link="y"), M("x", data=b"pwned")),
         UnsafeArchiveError, ("would replace the symlink of an earlier member with a file",)),
    Case("tar-symlink-then-dir", "swap.tar", _tar(M("x", "symlink", link="."), M("x", "dir"), M("x/f", data=b"f")),
         UnsafeArchiveError, ("member 'x'", "would replace the symlink of an earlier member")),
    *[Case(f"tar-hard-link-{label}", "h.tar",
           _tar(M("f", data=b"f"), M("l", "symlink", link="f"), M("h", "hardlink", link=link)),
           UnsafeArchiveError, (f"member 'h' {why}",), absent=("h",))
      for label, link, why in _HARD_LINKS_OUT],
    # A file over an earlier hard link replaces the link: never written through it into 'f'.
    Case("tar-hard-link-then-file-through-it", "h.tar",
         _tar(M("f", data=b"mine"), M("h", "hardlink", link="f"), M("h", data=b"pwned")),
         EXTRACTED, files=(("f", b"mine", 0o644), ("h", b"pwned", 0o644))),
    # -- kinds of file never made --------------------------------------------------------------------------
    *[Case(f"{fmt}-{kind}", f"d.{fmt}", _archive(fmt, M("dev", kind)), UnsafeArchiveError,
           (f"member 'dev' {why}",), absent=("dev",), clean=fmt == "zip")
      for kind, why in _SPECIAL for fmt in ("tar", "zip")],
    Case("tar-unknown-member-type", "odd.tar", _unknown_type(), UnsafeArchiveError,
         ("member 'odd' has an unsupported type",), absent=("odd",)),
    # -- modes and duplicates: extracted, defused ---------------------------------------------------------
    *[Case(f"{fmt}-setuid-setgid-group-write", f"m.{fmt}",
           _archive(fmt, M("tool", data=b"#!/bin/sh\n", mode=0o6775), M("data", data=b"d", mode=0o4666),
                    M("open", data=b"o", mode=0o777)),
           EXTRACTED, files=(("tool", b"#!/bin/sh\n", 0o755), ("data", b"d", 0o644), ("open", b"o", 0o755)))
      for fmt in ("tar", "zip")],
    Case("tar-same-name-twice-later-wins", "d.tar", _tar(M("a", data=b"old"), M("a", data=b"new")),
         EXTRACTED, files=(("a", b"new", 0o644),)),
    Case("zip-same-name-twice-later-wins", "d.zip", _zip(M("a", data=b"old"), M("a", data=b"new")),
         EXTRACTED, files=(("a", b"new", 0o644),)),
    Case("tar-file-then-dir-of-the-same-name", "d.tar", _tar(M("a", data=b"f"), M("a", "dir")),
         UnsafeArchiveError, ("member 'a'", "would replace the file of an earlier member")),
    # -- limits ---------------------------------------------------------------------------------------------
    *[Case(f"{fmt}-member-count-bomb", f"m.{fmt}", _archive(fmt, *[M(f"f{i}", data=b"x") for i in range(10)]),
           ArchiveLimitError, ("limit max_members = 5",), limits=Limits(max_members=5), clean=fmt == "zip")
      for fmt in ("tar", "zip")],
    Case("zip-declaring-60000-members", "many.zip", _zip_declaring(60_000), ArchiveLimitError,
         ("60000 members declared",), limits=Limits(max_members=100), format=ArchiveFormat.ZIP, clean=True),
    Case("tgz-size-bomb", "b.tgz", _small(_tar(M("bomb", data=bytes(3 * _MIB)), mode="w:gz")), ArchiveLimitError,
         ("'bomb'", "limit max_total_bytes"), limits=Limits(max_total_bytes=_MIB)),
    Case("zip-size-bomb", "b.zip", _small(_zip(M("bomb", data=bytes(3 * _MIB)))), ArchiveLimitError,
         ("'bomb'", "limit max_total_bytes"), limits=Limits(max_total_bytes=_MIB), clean=True),
    *[Case(f"{fmt}-ratio-bomb", f"b.{fmt}",
           _zip(M("a", data=os.urandom(2000)), M("bomb", data=bytes(4 * _MIB))) if fmt == "zip"
           else _tar(M("a", data=os.urandom(2000)), M("bomb", data=bytes(4 * _MIB)), mode=mode),
           ArchiveLimitError, ("member 'bomb'", "limit max_ratio"),
           limits=Limits(max_ratio=50, ratio_threshold=256 * 1024))
      for fmt, mode in [("tgz", "w:gz"), ("tbz2", "w:bz2"), ("txz", "w:xz"), ("zip", "")]],
    Case("tar-hard-links-over-the-size-limit", "h.tar",
         _tar(M("a", data=bytes(1000)), *[M(f"h{i}", "hardlink", link="a") for i in range(5)]),
         ArchiveLimitError, ("limit max_total_bytes",), limits=Limits(max_total_bytes=3500)),
    Case("zip-header-lies-about-size", "liar.zip", _patch_zip_sizes(_zip(M("liar", data=bytes(_MIB))), b"liar", 10),
         CorruptArchiveError, ("member 'liar'", "CRC"), limits=Limits(max_total_bytes=1000)),
    Case("tar-header-claims-more-than-follows", "liar.tar", _tar_with_size(b"A" * 5000, 10_000),
         CorruptArchiveError, ("unexpected end of data",)),
    Case("tar-header-claims-less-than-follows", "liar.tar", _tar_with_size(b"A" * 5000, 100),
         CorruptArchiveError, ("invalid header at offset 1024",)),
    Case("tar-pax-size-claims-more", "pax.tar", _pax_size_liar(b"A" * 5000, 100_000),
         CorruptArchiveError, ("pax.tar: corrupt archive",)),
    Case("tar-pax-size-claims-less", "pax.tar", _pax_size_liar(b"A" * 5000, 10),
         CorruptArchiveError, ("invalid header",)),
    Case("tgz-pax-header-asks-for-3-gib", "pax.tgz", _huge_pax_header(), CorruptArchiveError,
         ("bytes at once",)),
    # -- broken archives --------------------------------------------------------------------------------------
    *[Case(f"{suffix}-truncated", f"cut.{suffix}", _cut(_two_random(mode), 2 / 3), CorruptArchiveError,
           (f"cut.{suffix}: corrupt archive",))
      for suffix, mode in [("tgz", "w:gz"), ("tar.bz2", "w:bz2"), ("tar.xz", "w:xz")]],
    Case("tgz-cut-inside-its-trailer", "cut.tgz", _tar(M("a", data=b"x" * 100), mode="w:gz")[:-4],
         CorruptArchiveError, ("corrupt archive",)),
    Case("tgz-bad-crc", "crc.tgz", _bad_crc_tgz(), CorruptArchiveError, ("CRC",)),
    Case("tgz-broken-deflate-data", "z.tgz", _broken_deflate(), CorruptArchiveError, ("corrupt archive",)),
    Case("tar-cut-between-members", "cut.tar", _cut(_tar(M("a", data=b"a" * 600), M("b", data=b"b")), 512 + 1024),
         CorruptArchiveError, ("without an end-of-archive marker",)),
    Case("tar-cut-inside-a-header", "cut.tar",
         _cut(_tar(M("a", data=b"a" * 600), M("b", data=b"b")), 512 + 1024 + 100),
         CorruptArchiveError, ("inside a header",)),
    *[Case(f"zip-truncated-{int(keep * 100)}", "cut.zip",
           _cut(_zip(M("a", data=os.urandom(20_000)), M("b", data=os.urandom(20_000))), keep),
           CorruptArchiveError, ("cut.zip: corrupt archive",), clean=True) for keep in (0.5, 0.9)],
    Case("zip-damaged-member-data", "bad.zip", _damaged_zip(), CorruptArchiveError, ("member 'a'", "CRC")),
    Case("zip-encrypted-member", "enc.zip", _encrypted_zip(), CorruptArchiveError, ("encrypted",), clean=True),
    # -- a name that claims an archive over something else ---------------------------------------------------
    *[Case(f"claims-{name}-but-{label}", name, data, CorruptArchiveError, (f"{name}: corrupt archive",), clean=True)
      for name, label, data in [
          ("dep.tgz", "text", b"this is no archive at all" * 40),
          ("dep.zip", "broken-zip-header", b"PK\x03\x04" + bytes(100)),
          ("dep.tar.gz", "gzip-garbage", b"\x1f\x8b\x08\x00garbage-garbage"),
          ("dep.tar.xz", "empty", b""),
          ("dep.tar.bz2", "gzip-of-text", gzip.compress(b"not a tar, just compressed text " * 40))]],
    Case("archive-path-is-a-fifo", "dep.tgz", _fifo, ArchiveAccessError, ("not a regular file",), clean=True),
    # -- no archive at all: kept as it is ------------------------------------------------------------------------
    *[Case(f"kept-{name}", name, data, KEPT) for name, data in [
        ("notes.txt", b"just text\n" * 100),
        ("tool-1.2.3", b"\x7fELF\x02\x01\x01" + bytes(600)),
        ("data.json.gz", gzip.compress(b'{"a": 1}' * 100)),
        ("lib.jar", zip_bytes([M("META-INF/MANIFEST.MF", data=b"Manifest-Version: 1.0\n")])),
        ("blob.bin", tar_bytes([M("../evil", data=b"pwned")], "w:gz")),
        ("evil.whl", zip_bytes([M("../../outside/secret", data=b"pwned")])),
        ("empty", b"")]],
]
