# -*- test-case-name: tests.services.unpack.test_core -*-
"""Safe archive detection and extraction, independent of messaging (DESIGN §8, Unpack).

Everything here blocks; the service runs it in the container's
:class:`~ion.core.threads.BlockingPool`.

**Detection** (:func:`detect`) looks at the name and the content:

- a name ending in ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``/``.tbz2``/``.tbz``,
  ``.tar.xz``/``.txz`` or ``.zip`` *claims* an archive: the content picks the
  actual format (a ``.zip`` that is really a tgz is extracted as a tgz), and
  content that is no archive at all raises :class:`CorruptArchiveError`;
- a name with no type suffix (``tool``, ``tool-1.2.3``) or only a compression
  suffix (``.gz``, ``.bz2``, ``.xz``) is an archive if its content is one;
- any other suffix keeps the file as it is, whatever its content: ``.jar``,
  ``.whl``, ``.docx``, ``.npz``, ``.pt`` … are zips on purpose.

**Extraction** (:func:`extract`) never uses ``TarFile.extractall``: every
member is checked, then written through directory file descriptors opened with
``O_NOFOLLOW``, so no write can pass through a symlink, whatever the archive
holds. Refused (:class:`UnsafeArchiveError`): absolute names, ``..``
components, names that go through a symlink, symlinks that are absolute or
resolve outside the target (checked when made and again once the whole tree
exists, so chains of links cannot escape either), hard links to anything but
a regular file extracted earlier, device files, FIFOs, sockets, and entries
that would replace something already in the target. Tar members are also put
through ``tarfile.data_filter`` when Python has it (3.11.4+), as a second
opinion. File modes keep the owner's executable bit; setuid, setgid, sticky
and group/other write bits are dropped; owners are never changed.

A zip's whole central directory (names, kinds, declared sizes, member count)
is checked before anything is written; a tar is checked member by member as
it streams, so a tar refused half-way leaves its first members in the target.
Integrity is checked too: a tar must end with its end-of-archive block (tarfile
alone stops quietly at a short or broken header), a compressed stream must end
with a good trailer, and a zip member must match its CRC.

**Limits** (:class:`Limits`, :class:`ArchiveLimitError`) count what is really
read and written, never what a header claims: total bytes written (hard links
count their size again, since a copy of the tree would; sparse members are
written out in full), members, and the ratio of bytes written to archive bytes
read (the zip-bomb guard). Headers that claim too much fail early.

**Errors** are all :class:`UnpackError`; on any of them the caller deletes the
target (a fresh folder in its staging dir). Nothing is ever written outside
the target, even partially. They are
:class:`~ion.core.exceptions.ApplicationError` s, each with the response code
the Unpack service answers with when one escapes its op.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import lzma
import os
import re
import stat
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, BinaryIO, ClassVar, Self

from ion.core.config import Settings, setting
from ion.core.exceptions import ApplicationError

__all__ = [
    "ArchiveFormat",
    "Limits",
    "UnpackSettings",
    "Detection",
    "ExtractResult",
    "UnpackResult",
    "claimed_format",
    "detect",
    "extract",
    "extract_stream",
    "unpack",
    "UnpackError",
    "UnsafeArchiveError",
    "ArchiveLimitError",
    "CorruptArchiveError",
    "NotAnArchiveError",
    "ArchiveAccessError",
    "TargetError",
    "CONFIG_SECTION",
]

#: The config section the limits are read from.
CONFIG_SECTION = "ion.services.unpack"

_CHUNK = 1024 * 1024
#: The largest single read tarfile may make for a header (pax, GNU long name);
#: a header claiming more is a memory bomb, not a name.
_MAX_HEADER_READ = 4 * 1024 * 1024
#: Compressed data past the tar end-of-archive marker that is still read to
#: check the compression trailer (CRC, length); more is left unread.
_MAX_DRAIN = 1024 * 1024
_MAX_NAME_BYTES = 4096
_MAX_COMPONENT_BYTES = 255
_MAX_SYMLINK_BYTES = 4096
_MAX_SYMLINK_HOPS = 40
#: Folder fds kept open per extraction (see ``_Tree._dir_fd``).
_OPEN_LEVELS = 16


# -- errors ------------------------------------------------------------------------------
class UnpackError(ApplicationError):
    """Root of every error of the unpack core.

    :ivar code: the response code the service answers with.
    :ivar archive: the archive concerned, when known (added to the message).
    """

    code = 422

    def __init__(self, message: str, *, archive: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.detail = message
        self.archive = str(archive) if archive is not None else None

    def __str__(self) -> str:
        return f"{self.archive}: {self.detail}" if self.archive else self.detail

    @classmethod
    def from_reply(cls, message: str, code: int, details: Mapping[str, Any]) -> Self:
        exc = super().from_reply(message, code, details)
        exc.detail, exc.archive = message, None  # the message names the archive already
        return exc


class UnsafeArchiveError(UnpackError):
    """Raised when a member would write outside the target, or is a kind of file never extracted.

    :ivar member: the member's name as the archive gives it.
    :ivar reason: why it is refused (``"escapes the target"``).
    """

    def __init__(self, member: str, reason: str, *, archive: str | os.PathLike[str] | None = None) -> None:
        super().__init__(f"member {member!r} {reason}", archive=archive)
        self.member = member
        self.reason = reason


class ArchiveLimitError(UnpackError):
    """Raised when an archive goes past a configured limit (size, members, expansion ratio).

    :ivar limit: the config key of the limit (``"max_total_bytes"``).
    :ivar value: its configured value.
    """

    def __init__(self, limit: str, value: float, detail: str, *,
                 archive: str | os.PathLike[str] | None = None) -> None:
        super().__init__(f"{detail} (limit {limit} = {value:g})", archive=archive)
        self.limit = limit
        self.value = value


class CorruptArchiveError(UnpackError):
    """Raised when an archive cannot be read: truncated, bad checksum, broken headers,
    a name that claims an archive over content that is none, an encrypted member.

    :ivar cause: what is wrong, as the reader reported it.
    """

    def __init__(self, archive: str | os.PathLike[str], cause: str) -> None:
        super().__init__(f"corrupt archive: {cause}", archive=archive)
        self.cause = cause


class NotAnArchiveError(UnpackError):
    """Raised by :func:`extract` for a file that :func:`detect` keeps as it is."""

    def __init__(self, archive: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"not an archive: {reason}", archive=archive)


class ArchiveAccessError(UnpackError):
    """Raised when the archive cannot be opened: missing, unreadable, not a regular file."""

    code = 400


class TargetError(UnpackError):
    """Raised when the target cannot be created or written (disk full, permissions)."""

    code = 500


# -- limits ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits(Settings):
    """What one archive may expand to (the limit keys of ``ion.services.unpack``, read by the
    service as security bounds).

    :param max_total_bytes: most bytes written (hard links count again), 8 GiB.
    :param max_members: most members of any kind, 100 000.
    :param max_ratio: most bytes written per archive byte read (zip-bomb guard), 200.
    :param ratio_threshold: the ratio is checked once this many bytes are written, 1 MiB.
    """

    SECTION: ClassVar[str] = CONFIG_SECTION

    max_total_bytes: int = setting(8 * 1024 ** 3, positive=True)
    max_members: int = setting(100_000, positive=True)
    max_ratio: float = setting(200.0, positive=True)
    ratio_threshold: int = setting(1024 ** 2, positive=True)


@dataclass(frozen=True)
class UnpackSettings(Settings):
    """The other keys of ``ion.services.unpack`` (not bounds).

    :param rpc_timeout: seconds an ``UnpackClient`` call waits for the extraction unless told otherwise.
    """

    SECTION: ClassVar[str] = CONFIG_SECTION

    rpc_timeout: float = 900.0


# -- detection ---------------------------------------------------------------------------
class ArchiveFormat(StrEnum):
    """The archive formats extracted."""

    TAR = "tar"
    TAR_GZ = "tar.gz"
    TAR_BZ2 = "tar.bz2"
    TAR_XZ = "tar.xz"
    ZIP = "zip"


_CLAIMING_SUFFIXES: tuple[tuple[str, ArchiveFormat], ...] = (
    (".tar.gz", ArchiveFormat.TAR_GZ), (".tgz", ArchiveFormat.TAR_GZ),
    (".tar.bz2", ArchiveFormat.TAR_BZ2), (".tbz2", ArchiveFormat.TAR_BZ2), (".tbz", ArchiveFormat.TAR_BZ2),
    (".tar.xz", ArchiveFormat.TAR_XZ), (".txz", ArchiveFormat.TAR_XZ),
    (".tar", ArchiveFormat.TAR), (".zip", ArchiveFormat.ZIP),
)
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")
#: A "type suffix" starts with a letter, so version numbers (``tool-1.2.3``) are none.
_TYPE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9_+~-]{0,15}$")
_COMPRESSED_TAR = {"gzip": ArchiveFormat.TAR_GZ, "bzip2": ArchiveFormat.TAR_BZ2, "xz": ArchiveFormat.TAR_XZ}
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")


@dataclass(frozen=True)
class Detection:
    """What :func:`detect` found.

    :ivar format: the format to extract with, or ``None``: keep the file as it is.
    :ivar claimed: the format the file's name claims, if any.
    :ivar reason: one line saying why.
    """

    format: ArchiveFormat | None
    claimed: ArchiveFormat | None
    reason: str

    @property
    def is_archive(self) -> bool:
        return self.format is not None


def claimed_format(name: str) -> ArchiveFormat | None:
    """The archive format a file name claims by its suffix (case-insensitive), if any."""
    lower = name.lower()
    for suffix, fmt in _CLAIMING_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return fmt
    return None


def _open_archive(path: Path, archive_fd: int | None = None) -> BinaryIO:
    """Open a regular file for reading (never blocking on a FIFO or a device); with ``archive_fd``
    (the file, opened by a caller that checked it), that very file again, read from its start."""
    try:
        if archive_fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        else:
            try:  # a reading of its own (offset 0), of the same open file
                fd = os.open(f"/proc/self/fd/{archive_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:  # (no /proc: a copy of the descriptor, rewound below)
                fd = os.dup(archive_fd)
    except OSError as exc:
        raise ArchiveAccessError(f"cannot open archive: {exc.strerror or exc}", archive=path) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ArchiveAccessError("cannot open archive: not a regular file", archive=path)
        if archive_fd is not None:
            os.lseek(fd, 0, os.SEEK_SET)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _tar_block_kind(block: bytes) -> str | None:
    """``"header"`` for a valid tar header, ``"end"`` for an all-zero block, else None."""
    if len(block) < tarfile.BLOCKSIZE:
        return None
    block = block[:tarfile.BLOCKSIZE]
    if block.count(0) == tarfile.BLOCKSIZE:
        return "end"
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None
    return "header"


def _sniff(path: Path, archive_fd: int | None = None) -> tuple[ArchiveFormat | None, str, ArchiveFormat | None]:
    """What the content is: the format it shows (or None), a description, and the tar
    format it would be if it is an all-zero block (an empty tar, valid only if so named)."""
    with _open_archive(path, archive_fd) as f:
        head = f.read(tarfile.BLOCKSIZE)
        if not head:
            return None, "an empty file", None
        if head[:4] in _ZIP_MAGICS:
            # Only the end record: the directory is read (and counted) by extraction.
            if not zipfile.is_zipfile(f):
                return None, "zip data without its end of central directory (truncated?)", None
            return ArchiveFormat.ZIP, "zip data", None
        compression = ("gzip" if head[:2] == b"\x1f\x8b" else
                       "bzip2" if head[:3] == b"BZh" else
                       "xz" if head[:6] == b"\xfd7zXZ\x00" else None)
        if compression is None:
            fmt, what = ArchiveFormat.TAR, "tar"
            block = head
        else:
            fmt, what = _COMPRESSED_TAR[compression], f"{compression}-compressed tar"
            f.seek(0)
            try:
                with _decompressor(fmt, f) as z:  # type: ignore[arg-type]
                    block = z.read(tarfile.BLOCKSIZE)
            except _READ_ERRORS as exc:
                return None, f"{compression} data that cannot be decompressed ({_read_error_cause(exc)})", None
        kind = _tar_block_kind(block)
        if kind == "header":
            return fmt, what, None
        if kind == "end":
            return None, f"{what} with no members or zeros", fmt
        if compression is not None:
            return None, f"{compression}-compressed data that is not a tar", None
        if zipfile.is_zipfile(f):
            return ArchiveFormat.ZIP, "zip data after a prefix (self-extracting?)", None
        return None, "not an archive", None


def detect(path: str | os.PathLike[str], *, archive_fd: int | None = None) -> Detection:
    """Decide whether ``path`` is an archive, and of which format (see the module doc).

    :param archive_fd: the file, opened by a caller that checked it: read instead of ``path``
        (which then gives its name, and names it in messages).
    :raises CorruptArchiveError: when the name claims an archive and the content is none.
    :raises ArchiveAccessError: when the file cannot be opened or is not a regular file.
    """
    path = Path(path)
    name = path.name
    claimed = claimed_format(name)
    lower = name.lower()
    if claimed is None and not lower.endswith(_COMPRESSION_SUFFIXES) and _TYPE_SUFFIX.search(name):
        # Still refuse what cannot be read at all, so a FIFO or a folder is not "kept".
        _open_archive(path, archive_fd).close()
        suffix = _TYPE_SUFFIX.search(name).group(0)  # type: ignore[union-attr]
        return Detection(None, None, f"{suffix} files are kept as they are")
    content, what, empty_tar = _sniff(path, archive_fd)
    if content is not None:
        if claimed is None:
            return Detection(content, None, f"content is {what}")
        if claimed is content:
            return Detection(content, claimed, f"named and made as {content.value}")
        return Detection(content, claimed, f"named like {claimed.value} but content is {what}")
    if claimed is not None:
        if empty_tar is not None and claimed is not ArchiveFormat.ZIP:
            return Detection(empty_tar, claimed, f"an empty {empty_tar.value}")
        raise CorruptArchiveError(path, f"named like a .{claimed.value} archive, but the content is {what}")
    return Detection(None, None, f"content is {what}")


# -- results -----------------------------------------------------------------------------
@dataclass
class ExtractResult:
    """What :func:`extract` wrote.

    :ivar format: the format extracted.
    :ivar members: the members written, normalised (``a/b``), in archive order.
    :ivar total_bytes: the bytes written (hard links counted again).
    :ivar files: ``{path: (size, sha256)}`` of each regular file as it was last written,
        hashed on the way to disk, so that a caller who records digests (the cache) need
        not read the extracted tree again.
    """

    format: ArchiveFormat
    members: list[str] = field(default_factory=list)
    total_bytes: int = 0
    files: dict[str, tuple[int, str]] = field(default_factory=dict)


@dataclass
class UnpackResult:
    """What :func:`unpack` did: the detection, and the extraction unless the file was kept."""

    detection: Detection
    extracted: ExtractResult | None

    @property
    def kept(self) -> bool:
        return self.extracted is None


# -- reading -----------------------------------------------------------------------------
_READ_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, lzma.LZMAError,
    OSError, ValueError, struct.error, NotImplementedError, RuntimeError, KeyError, IndexError,
)


def _read_error_cause(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, RuntimeError) and "encrypted" in text:
        return f"encrypted members are not supported ({text})"
    if isinstance(exc, NotImplementedError):
        return f"unsupported compression ({text})"
    return text


class _CountingReader:
    """A raw binary stream that counts the bytes read through it (the ratio guard's denominator)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.count = 0
        self.name = getattr(raw, "name", None)
        self.mode = "rb"

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        return data

    def readinto(self, b: Any) -> int:
        n = self.raw.readinto(b)  # type: ignore[attr-defined]
        self.count += n or 0
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def seekable(self) -> bool:
        return self.raw.seekable()

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass

    @property
    def closed(self) -> bool:
        return False


class _ForwardReader:
    """The decompressed tar stream as tarfile sees it: forward-only seeks (no re-decompression),
    bounded single reads, and the last read kept to tell how the archive ended."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.pos = 0
        self.last_pos = -1
        self.last = b""

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > _MAX_HEADER_READ:
            raise tarfile.ReadError(f"a header or member asks to read {n} bytes at once")
        data = self.stream.read(n)
        self.last_pos, self.last = self.pos, data
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self.pos
        elif whence != 0:
            raise tarfile.ReadError("seek from the end of a stream")
        if offset < self.pos:
            raise tarfile.ReadError(f"backward seek to {offset} from {self.pos}")
        while self.pos < offset:
            data = self.stream.read(min(offset - self.pos, _CHUNK))
            if not data:
                break
            self.pos += len(data)
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


class _Budget:
    """Counts members and bytes against the limits, before anything is written."""

    def __init__(self, limits: Limits, raw: _CountingReader) -> None:
        self.limits = limits
        self.raw = raw
        self.members = 0
        self.written = 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveLimitError("max_members", self.limits.max_members,
                                    f"more than {self.limits.max_members} members")

    def declare(self, member: str, size: int, before: int | None = None) -> None:
        """Fail early on a member whose header already says it does not fit
        (after ``before`` bytes, default: those written so far)."""
        if (self.written if before is None else before) + size > self.limits.max_total_bytes:
            raise ArchiveLimitError("max_total_bytes", self.limits.max_total_bytes,
                                    f"member {member!r} ({size} bytes) takes the archive past "
                                    f"{self.limits.max_total_bytes} bytes")

    def add(self, member: str, n: int) -> None:
        """Count ``n`` bytes about to be written; raises instead of letting them be written."""
        total = self.written + n
        limits = self.limits
        if total > limits.max_total_bytes:
            raise ArchiveLimitError("max_total_bytes", limits.max_total_bytes,
                                    f"member {member!r} takes the archive past {limits.max_total_bytes} bytes")
        if total > limits.ratio_threshold and total > limits.max_ratio * max(self.raw.count, 1):
            raise ArchiveLimitError(
                "max_ratio", limits.max_ratio,
                f"member {member!r} expands {total} bytes from {self.raw.count} archive bytes "
                f"(over {limits.max_ratio:g} to 1: a compression bomb?)")
        self.written = total


# -- names -------------------------------------------------------------------------------
def _escapes_lexically(parts: list[str]) -> bool:
    """Whether a path's components climb above where it starts (no symlinks considered)."""
    depth = 0
    for part in parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def _member_parts(name: str, member: str | None = None, what: str = "") -> tuple[str, ...]:
    """The normalised components of a member name (or of a hard link's target).

    :raises UnsafeArchiveError: for NULs, absolute names, ``..`` components, over-long names.
    """
    member = name if member is None else member
    if "\x00" in name:
        raise UnsafeArchiveError(member, f"{what}has a NUL byte in its name")
    if name.startswith("/"):
        raise UnsafeArchiveError(member, f"{what}is an absolute path")
    raw = name.split("/")
    if ".." in raw:
        if _escapes_lexically(raw):
            raise UnsafeArchiveError(member, f"{what}escapes the target")
        raise UnsafeArchiveError(member, f"{what}has a '..' component")
    if len(os.fsencode(name)) > _MAX_NAME_BYTES:
        raise UnsafeArchiveError(member, f"{what}has a name longer than {_MAX_NAME_BYTES} bytes")
    parts = tuple(p for p in raw if p not in ("", "."))
    for part in parts:
        if len(os.fsencode(part)) > _MAX_COMPONENT_BYTES:
            raise UnsafeArchiveError(member, f"{what}has a name component longer than {_MAX_COMPONENT_BYTES} bytes")
    return parts


def _file_mode(mode: int | None) -> int:
    """``tarfile.data_filter``'s rule: owner may read and write, the owner's x bit decides
    all x bits, no setuid/setgid/sticky, no group or other write."""
    mode = 0o644 if mode is None else mode & 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


# -- the target tree ---------------------------------------------------------------------
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Tree:
    """The target folder, written only through directory fds opened with ``O_NOFOLLOW``.

    Keeps the chain of open folders of the last member (archives list members
    depth-first, so most members reuse it) and what this run created, so an
    entry is only ever replaced by one of the same kind that this run made.
    """

    def __init__(self, target: Path, target_fd: int | None = None) -> None:
        self.target = target
        try:
            if target_fd is not None:  # opened by the caller (walked from a root it trusts): a copy
                self.root_fd = os.dup(target_fd)
            else:
                target.mkdir(exist_ok=True)
                # The target itself is not followed either: swapped for a link after the service
                # checked it, it is refused (ELOOP), not written through.
                self.root_fd = os.open(target, _DIR_FLAGS)
        except OSError as exc:
            raise TargetError(f"cannot use target {target}: {exc.strerror or exc}") from exc
        self._chain: list[tuple[str, int]] = []
        self.created: dict[tuple[str, ...], str] = {}
        self.symlinks: dict[tuple[str, ...], str] = {}
        self.dir_times: dict[tuple[str, ...], float] = {}
        self.members: list[str] = []
        #: (size, sha256) of each regular file as written (a hard link: its source's).
        self.digests: dict[tuple[str, ...], tuple[int, str]] = {}

    def close(self) -> None:
        for _name, fd in self._chain:
            if fd >= 0:
                os.close(fd)
        self._chain = []
        os.close(self.root_fd)

    # -- folders -------------------------------------------------------------------
    def _dir_fd(self, parts: tuple[str, ...], member: str, *, create: bool = True) -> int:
        """An fd of the folder ``parts``, made if missing (when ``create``), never through a symlink.

        Only the deepest ``_OPEN_LEVELS`` folders of the chain stay open, so a deeply
        nested archive cannot exhaust the process's file descriptors; a closed level is
        reopened (without following links) from its nearest open ancestor.
        """
        chain = self._chain
        n = 0
        while n < len(chain) and n < len(parts) and chain[n][0] == parts[n]:
            n += 1
        for _name, fd in chain[n:]:
            if fd >= 0:
                os.close(fd)
        del chain[n:]
        start = n
        while start > 0 and chain[start - 1][1] < 0:
            start -= 1
        fd = chain[start - 1][1] if start else self.root_fd
        for k in range(start, len(parts)):
            fd = self._open_dir(fd, parts, k, member, create)
            if k < len(chain):
                chain[k] = (parts[k], fd)
            else:
                chain.append((parts[k], fd))
            if k >= _OPEN_LEVELS:
                name, old = chain[k - _OPEN_LEVELS]
                if old >= 0:
                    os.close(old)
                    chain[k - _OPEN_LEVELS] = (name, -1)
        return fd

    def parent(self, parts: tuple[str, ...], member: str) -> int:
        """The folder a member goes in, made if missing; refused if any part of it is not a real folder."""
        return self._dir_fd(parts[:-1], member)

    def _open_dir(self, parent: int, parts: tuple[str, ...], k: int, member: str, create: bool) -> int:
        name = parts[k]
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._not_a_folder(parent, parts[:k + 1], member) from exc
            raise TargetError(f"cannot open folder {'/'.join(parts[:k + 1])!r} for member {member!r}: "
                              f"{exc.strerror or exc}") from exc
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
            self.created[parts[:k + 1]] = "dir"
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
                raise self._not_a_folder(parent, parts[:k + 1], member) from exc
            raise TargetError(f"cannot create folder {'/'.join(parts[:k + 1])!r} for member {member!r}: "
                              f"{exc.strerror or exc}") from exc

    def _not_a_folder(self, parent: int, parts: tuple[str, ...], member: str) -> UnsafeArchiveError:
        path = "/".join(parts)
        try:
            st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a folder"
        except OSError:
            kind = "not a folder"
        return UnsafeArchiveError(member, f"goes through {path!r}, which is {kind}")

    def _make_room(self, parent: int, parts: tuple[str, ...], member: str, kind: str) -> None:
        """Clear the way for a new entry: only an entry of the same kind made by this run may go."""
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise TargetError(f"cannot inspect {'/'.join(parts)!r} for member {member!r}: "
                              f"{exc.strerror or exc}") from exc
        existing = ("dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode)
                    else "file" if stat.S_ISREG(st.st_mode) else "special file")
        if kind == existing == "dir":
            return  # folders merge, whoever made them
        made = self.created.get(parts)
        if made is None:
            raise UnsafeArchiveError(member, f"would replace a {existing} that was already in the target")
        if made != kind or existing != kind:
            raise UnsafeArchiveError(member, f"would replace the {existing} of an earlier member with a {kind}")
        try:
            os.unlink(name, dir_fd=parent)
        except OSError as exc:
            raise TargetError(f"cannot replace {'/'.join(parts)!r}: {exc.strerror or exc}") from exc
        self.symlinks.pop(parts, None)

    # -- entries ---------------------------------------------------------------------
    def make_dir(self, parts: tuple[str, ...], member: str, mtime: float | None) -> None:
        if parts:
            parent = self._dir_fd(parts[:-1], member)
            self._make_room(parent, parts, member, "dir")
            self._dir_fd(parts, member)
            if mtime is not None:
                self.dir_times[parts] = mtime
        self.members.append("/".join(parts) or ".")

    def write_file(self, parts: tuple[str, ...], member: str, chunks: Iterator[bytes], mode: int,
                   mtime: float | None, budget: _Budget) -> None:
        if not parts:
            raise UnsafeArchiveError(member, "has an empty name")
        parent = self._dir_fd(parts[:-1], member)
        self._make_room(parent, parts, member, "file")
        try:
            fd = os.open(parts[-1], _NEW_FILE_FLAGS, 0o600, dir_fd=parent)
        except OSError as exc:
            raise TargetError(f"cannot create {'/'.join(parts)!r}: {exc.strerror or exc}") from exc
        self.created[parts] = "file"
        self.digests.pop(parts, None)
        digest = hashlib.sha256()
        size = 0
        try:
            for chunk in chunks:
                budget.add(member, len(chunk))
                digest.update(chunk)
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    try:
                        view = view[os.write(fd, view):]
                    except OSError as exc:
                        raise TargetError(f"cannot write {'/'.join(parts)!r}: {exc.strerror or exc}") from exc
            try:
                os.fchmod(fd, mode)
            except OSError as exc:
                raise TargetError(f"cannot set the mode of {'/'.join(parts)!r}: {exc.strerror or exc}") from exc
            _set_mtime(fd, mtime)
        finally:
            os.close(fd)
        self.digests[parts] = (size, digest.hexdigest())
        self.members.append("/".join(parts))

    def check_symlink(self, parts: tuple[str, ...], member: str, linkname: str) -> None:
        """Refuse a symlink that is absolute or leads out of the target as the tree stands."""
        if not parts:
            raise UnsafeArchiveError(member, "has an empty name")
        if not linkname:
            raise UnsafeArchiveError(member, "is a symlink with an empty target")
        if "\x00" in linkname:
            raise UnsafeArchiveError(member, "is a symlink whose target has a NUL byte")
        if linkname.startswith("/"):
            raise UnsafeArchiveError(member, f"is a symlink to an absolute path {linkname!r}")
        if len(os.fsencode(linkname)) > _MAX_SYMLINK_BYTES:
            raise UnsafeArchiveError(member, f"is a symlink whose target is longer than {_MAX_SYMLINK_BYTES} bytes")
        problem = self._escapes(parts[:-1], linkname)
        if problem:
            raise UnsafeArchiveError(member, f"is a symlink to {linkname!r}, which {problem}")

    def make_symlink(self, parts: tuple[str, ...], member: str, linkname: str) -> None:
        self.check_symlink(parts, member, linkname)
        parent = self._dir_fd(parts[:-1], member)
        self._make_room(parent, parts, member, "symlink")
        try:
            os.symlink(linkname, parts[-1], dir_fd=parent)
        except OSError as exc:
            raise TargetError(f"cannot create symlink {'/'.join(parts)!r}: {exc.strerror or exc}") from exc
        self.created[parts] = "symlink"
        self.symlinks[parts] = member
        self.members.append("/".join(parts))

    def hardlink_source(self, parts: tuple[str, ...], member: str, linkname: str) -> tuple[str, ...]:
        """The source of a hard link: a regular file this run extracted, or refused."""
        if not parts:
            raise UnsafeArchiveError(member, "has an empty name")
        if linkname.startswith("/"):
            raise UnsafeArchiveError(member, f"is a hard link to an absolute path {linkname!r}")
        if _escapes_lexically(linkname.split("/")):
            raise UnsafeArchiveError(member, f"is a hard link to {linkname!r}, outside the target")
        source = _member_parts(linkname, member, f"is a hard link to {linkname!r}, which ")
        if self.created.get(source) != "file":
            raise UnsafeArchiveError(member, f"is a hard link to {linkname!r}, which is not a file extracted before it")
        return source

    def make_hardlink(self, parts: tuple[str, ...], member: str, linkname: str, budget: _Budget) -> None:
        source = self.hardlink_source(parts, member, linkname)
        if source == parts:
            # A hard link to itself: how tar stores a file named twice (``tar -cf x.tar f f``); the name
            # holds that very file already (GNU tar extracts it so too).
            return
        src_parent = self._dir_fd(source[:-1], member)
        try:
            st = os.stat(source[-1], dir_fd=src_parent, follow_symlinks=False)
        except OSError as exc:
            raise TargetError(f"cannot inspect {linkname!r}: {exc.strerror or exc}") from exc
        if not stat.S_ISREG(st.st_mode):  # pragma: no cover - created[] says it is a file
            raise UnsafeArchiveError(member, f"is a hard link to {linkname!r}, which is not a regular file")
        budget.add(member, st.st_size)
        src_fd = os.dup(src_parent)
        try:
            parent = self._dir_fd(parts[:-1], member)
            self._make_room(parent, parts, member, "file")
            try:
                os.link(source[-1], parts[-1], src_dir_fd=src_fd, dst_dir_fd=parent, follow_symlinks=False)
            except OSError as exc:
                raise TargetError(f"cannot create hard link {'/'.join(parts)!r}: {exc.strerror or exc}") from exc
        finally:
            os.close(src_fd)
        self.created[parts] = "file"
        self.digests[parts] = self.digests[source]  # the source is a file this run wrote (hardlink_source)
        self.members.append("/".join(parts))

    # -- links ---------------------------------------------------------------------------
    def _peek(self, folder: list[str], name: str) -> tuple[str | None, str]:
        """What ``folder/name`` is on disk (``folder`` holds no symlink): kind and link target."""
        try:
            parent = self._dir_fd(tuple(folder), "", create=False)
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except (OSError, UnpackError):
            return None, ""
        if stat.S_ISLNK(st.st_mode):
            try:
                return "symlink", os.readlink(name, dir_fd=parent)
            except OSError:  # pragma: no cover - raced away
                return None, ""
        return ("dir" if stat.S_ISDIR(st.st_mode) else "file"), ""

    def _escapes(self, folder: tuple[str, ...], linkname: str) -> str | None:
        """Why a link in ``folder`` to ``linkname`` leaves the target, following the links
        already on disk as the kernel would, else None."""
        stack = list(folder)
        todo = list(reversed(linkname.split("/")))
        hops = 0
        missing = False
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if not stack:
                    return "points outside the target"
                stack.pop()
                continue
            if not missing:
                kind, target = self._peek(stack, part)
                if kind == "symlink":
                    hops += 1
                    if hops > _MAX_SYMLINK_HOPS:
                        return "is part of a symlink loop"
                    if target.startswith("/"):
                        return f"goes through {'/'.join([*stack, part])!r}, a symlink to an absolute path"
                    todo.extend(reversed(target.split("/")))
                    continue
                missing = kind is None
            stack.append(part)
        return None

    def verify_links(self) -> None:
        """Check every symlink made against the finished tree: links made later may have
        turned an earlier, harmless one into a way out."""
        for parts, member in self.symlinks.items():
            kind, target = self._peek(list(parts[:-1]), parts[-1])
            if kind != "symlink":  # pragma: no cover - _make_room keeps symlinks[] exact
                continue
            problem = self._escapes(parts[:-1], target)
            if problem:
                raise UnsafeArchiveError(member, f"is a symlink to {target!r}, which {problem} "
                                                 "once the whole archive is extracted")

    def set_dir_times(self) -> None:
        for parts, mtime in sorted(self.dir_times.items(), key=lambda kv: -len(kv[0])):
            try:
                fd = self._dir_fd(parts, "", create=False)
            except (OSError, UnpackError):
                continue
            _set_mtime(fd, mtime)


def _set_mtime(fd: int, mtime: float | None) -> None:
    if mtime is None:
        return
    try:
        os.utime(fd, (mtime, mtime))
    except (OSError, OverflowError, ValueError):
        pass  # best effort: a bogus timestamp is no reason to fail


# -- tar -----------------------------------------------------------------------------------
def _chunks(stream: IO[bytes], member: str) -> Iterator[bytes]:
    while True:
        try:
            chunk = stream.read(_CHUNK)
        except _READ_ERRORS as exc:
            raise _Corrupt(f"member {member!r}: {_read_error_cause(exc)}") from exc
        if not chunk:
            return
        yield chunk


class _Corrupt(Exception):
    """A read failure deep inside; turned into CorruptArchiveError with the archive's name."""


def _decompressor(fmt: ArchiveFormat, raw: _CountingReader) -> Any:
    if fmt is ArchiveFormat.TAR_GZ:
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if fmt is ArchiveFormat.TAR_BZ2:
        return bz2.BZ2File(raw)
    if fmt is ArchiveFormat.TAR_XZ:
        return lzma.LZMAFile(raw)  # type: ignore[arg-type]
    return raw


_FILTER = getattr(tarfile, "data_filter", None)
_SPECIAL = {tarfile.CHRTYPE: "is a character device", tarfile.BLKTYPE: "is a block device",
            tarfile.FIFOTYPE: "is a FIFO"}


def _extract_tar(fmt: ArchiveFormat, raw: _CountingReader, tree: _Tree, budget: _Budget) -> None:
    stream = _decompressor(fmt, raw)
    src = _ForwardReader(stream)
    try:
        tf = tarfile.open(fileobj=src, mode="r:")  # type: ignore[call-overload]
    except _READ_ERRORS as exc:
        raise _Corrupt(_read_error_cause(exc)) from exc
    dest = str(tree.target)
    while True:
        try:
            member = tf.next()
        except _READ_ERRORS as exc:
            raise _Corrupt(_read_error_cause(exc)) from exc
        if member is None:
            break
        tf.members.clear()  # nothing looks members up; keep memory flat
        budget.member()
        name = member.name
        parts = _member_parts(name)
        if member.type in _SPECIAL:
            raise UnsafeArchiveError(name, _SPECIAL[member.type])
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise UnsafeArchiveError(name, f"has an unsupported type {member.type!r}")
        # Our own checks first (their messages are the clearer), then tarfile's as a second opinion.
        if member.issym():
            tree.check_symlink(parts, name, member.linkname)
        elif member.islnk():
            tree.hardlink_source(parts, name, member.linkname)
        if parts:
            tree.parent(parts, name)
        if _FILTER is not None:
            try:
                _FILTER(member, dest)
            except tarfile.FilterError as exc:
                raise UnsafeArchiveError(name, f"is refused by tarfile.data_filter: {exc}") from exc
        mtime = float(member.mtime) if isinstance(member.mtime, (int, float)) else None
        if member.isdir():
            tree.make_dir(parts, name, mtime)
        elif member.issym():
            tree.make_symlink(parts, name, member.linkname)
        elif member.islnk():
            tree.make_hardlink(parts, name, member.linkname, budget)
        else:
            budget.declare(name, member.size)
            try:
                data = tf.extractfile(member)
            except _READ_ERRORS as exc:
                raise _Corrupt(f"member {name!r}: {_read_error_cause(exc)}") from exc
            assert data is not None
            tree.write_file(parts, name, _chunks(data, name), _file_mode(member.mode), mtime, budget)
    _check_tar_end(tf, src)
    try:
        drained = 0
        while drained < _MAX_DRAIN and (chunk := stream.read(64 * 1024)):
            drained += len(chunk)
    except _READ_ERRORS as exc:
        raise _Corrupt(f"after the last member: {_read_error_cause(exc)}") from exc


def _check_tar_end(tf: tarfile.TarFile, src: _ForwardReader) -> None:
    """tarfile stops quietly at a short or broken header; only a zero block is a real end."""
    block = src.last if src.last_pos == tf.offset else None
    if block is None:  # pragma: no cover - tarfile reads the header last
        return
    if not block:
        if tf.offset == 0:
            raise _Corrupt("the archive is empty")
        raise _Corrupt(f"the archive ends at offset {tf.offset} without an end-of-archive marker (truncated?)")
    if len(block) < tarfile.BLOCKSIZE:
        raise _Corrupt(f"the archive ends inside a header at offset {tf.offset} (truncated)")
    if block.count(0) != len(block):
        raise _Corrupt(f"invalid header at offset {tf.offset} (damaged data, or a size in an earlier "
                       "header that does not match its data)")


# -- zip -----------------------------------------------------------------------------------
def _zip_entry_count(f: _CountingReader) -> int | None:
    """The member count the end-of-central-directory record declares, read before zipfile
    loads the whole directory into memory."""
    try:
        size = f.seek(0, 2)
        tail_len = min(size, 0xFFFF + 22)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        i = tail.rfind(b"PK\x05\x06")
        if i < 0 or len(tail) - i < 22:
            return None
        count = int.from_bytes(tail[i + 10:i + 12], "little")
        if count == 0xFFFF and i >= 20 and tail[i - 20:i - 16] == b"PK\x06\x07":
            f.seek(int.from_bytes(tail[i - 12:i - 4], "little"))
            record = f.read(56)
            if record[:4] == b"PK\x06\x06" and len(record) >= 40:
                count = int.from_bytes(record[32:40], "little")
        return count
    finally:
        f.seek(0)


def _zip_kind(info: zipfile.ZipInfo, name: str) -> tuple[str, int | None]:
    """``("file"|"dir"|"symlink", permission bits or None)``; Unix modes only when made on Unix."""
    st_mode = info.external_attr >> 16 if info.create_system == 3 else 0
    fmt = stat.S_IFMT(st_mode)
    perms = stat.S_IMODE(st_mode) if st_mode else None
    if fmt == stat.S_IFLNK:
        return "symlink", None
    if fmt == stat.S_IFDIR or (fmt in (0, stat.S_IFREG) and info.filename.endswith("/")):
        return "dir", None
    if fmt in (0, stat.S_IFREG):
        return "file", perms
    kinds = {stat.S_IFCHR: "is a character device", stat.S_IFBLK: "is a block device",
             stat.S_IFIFO: "is a FIFO", stat.S_IFSOCK: "is a socket"}
    raise UnsafeArchiveError(name, kinds.get(fmt, f"has an unknown file type {oct(fmt)}"))


def _zip_mtime(info: zipfile.ZipInfo) -> float | None:
    try:
        return time.mktime((*info.date_time, 0, 0, -1))
    except (OverflowError, ValueError):
        return None


def _extract_zip(raw: _CountingReader, tree: _Tree, budget: _Budget) -> None:
    declared = _zip_entry_count(raw)
    if declared is not None and declared > budget.limits.max_members:
        raise ArchiveLimitError("max_members", budget.limits.max_members,
                                f"{declared} members declared, more than {budget.limits.max_members}")
    try:
        zf = zipfile.ZipFile(raw)
    except _READ_ERRORS as exc:
        raise _Corrupt(_read_error_cause(exc)) from exc
    with zf:
        # Check every member before writing anything.
        plan: list[tuple[zipfile.ZipInfo, str, tuple[str, ...], str, int | None]] = []
        declared_bytes = 0
        for info in zf.infolist():
            budget.member()
            name = info.orig_filename
            parts = _member_parts(name.replace("\\", "/"), name)
            kind, perms = _zip_kind(info, name)
            if info.flag_bits & 0x1:
                raise _Corrupt(f"member {name!r} is encrypted (not supported)")
            if kind == "file":
                budget.declare(name, info.file_size, declared_bytes)
                declared_bytes += info.file_size
            plan.append((info, name, parts, kind, perms))
        for info, name, parts, kind, perms in plan:
            if kind == "dir":
                tree.make_dir(parts, name, _zip_mtime(info))
                continue
            try:
                stream = zf.open(info)
            except _READ_ERRORS as exc:
                raise _Corrupt(f"member {name!r}: {_read_error_cause(exc)}") from exc
            with stream:
                if kind == "symlink":
                    try:
                        target = stream.read(_MAX_SYMLINK_BYTES + 1)
                    except _READ_ERRORS as exc:
                        raise _Corrupt(f"member {name!r}: {_read_error_cause(exc)}") from exc
                    if len(target) > _MAX_SYMLINK_BYTES:
                        raise UnsafeArchiveError(name, f"is a symlink whose target is longer than "
                                                       f"{_MAX_SYMLINK_BYTES} bytes")
                    tree.make_symlink(parts, name, os.fsdecode(target))
                else:
                    tree.write_file(parts, name, _chunks(stream, name), _file_mode(perms), _zip_mtime(info),
                                    budget)


# -- entry points ----------------------------------------------------------------------------
def _run(fmt: ArchiveFormat, raw: IO[bytes], target: Path, limits: Limits, archive: str,
         target_fd: int | None = None) -> ExtractResult:
    counting = _CountingReader(raw)
    budget = _Budget(limits, counting)
    try:
        tree = _Tree(target, target_fd)
    except UnpackError as exc:
        exc.archive = exc.archive or archive
        raise
    try:
        if fmt is ArchiveFormat.ZIP:
            _extract_zip(counting, tree, budget)
        else:
            _extract_tar(fmt, counting, tree, budget)
        tree.verify_links()
        tree.set_dir_times()
    except _Corrupt as exc:
        raise CorruptArchiveError(archive, str(exc)) from exc.__cause__
    except UnpackError as exc:
        exc.archive = exc.archive or archive
        raise
    finally:
        tree.close()
    return ExtractResult(fmt, tree.members, budget.written,
                         {"/".join(parts): known for parts, known in tree.digests.items()})


def extract(archive: str | os.PathLike[str], target: str | os.PathLike[str], limits: Limits | None = None, *,
            format: ArchiveFormat | None = None, target_fd: int | None = None,
            archive_fd: int | None = None) -> ExtractResult:
    """Extract ``archive`` into ``target`` (made if missing; its parent must exist), filtered.

    :param format: skip detection and read the archive as this format.
    :param target_fd: the target folder, already opened by the caller (who walked to it without
        following links from a root it trusts); ``target`` then names it in messages only.
    :param archive_fd: the archive, likewise (see :func:`detect`).
    :raises UnsafeArchiveError: naming the member and why.
    :raises ArchiveLimitError: naming the limit.
    :raises CorruptArchiveError: naming the file and the cause.
    :raises NotAnArchiveError: when :func:`detect` keeps the file as it is.
    :raises ArchiveAccessError, TargetError: when the archive or the target cannot be used.

    On any error the target may hold part of the archive: delete it. Nothing is
    ever written outside it.
    """
    path = Path(archive)
    if format is None:
        detection = detect(path, archive_fd=archive_fd)
        if detection.format is None:
            raise NotAnArchiveError(path, detection.reason)
        format = detection.format
    with _open_archive(path, archive_fd) as raw:
        return _run(format, raw, Path(target), limits or Limits(), str(path), target_fd)


def extract_stream(stream: IO[bytes], format: ArchiveFormat, target: str | os.PathLike[str],
                   limits: Limits | None = None, *, name: str = "<stream>") -> ExtractResult:
    """Extract a tar archive from a readable stream that need not seek (a download in progress).

    Same checks and errors as :func:`extract`; ``name`` is used in messages.

    :raises ValueError: for :attr:`ArchiveFormat.ZIP`, which needs a seekable file.
    """
    if format is ArchiveFormat.ZIP:
        raise ValueError("zip archives need a seekable file: use extract()")
    return _run(format, stream, Path(target), limits or Limits(), name)


def unpack(archive: str | os.PathLike[str], target: str | os.PathLike[str],
           limits: Limits | None = None) -> UnpackResult:
    """Detect, then extract an archive into ``target``; a file that is no archive is left alone.

    Raises as :func:`detect` and :func:`extract` do.
    """
    detection = detect(archive)
    if detection.format is None:
        return UnpackResult(detection, None)
    return UnpackResult(detection, extract(archive, target, limits, format=detection.format))
