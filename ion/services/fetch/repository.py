# -*- test-case-name: tests.services.fetch.test_repository -*-
"""Repositories: where dependency versions come from (DESIGN §8, "Fetch").

One small interface, :class:`Repository`, with three implementations chosen by
the URL's scheme (:func:`repository_for`):

- ``file:`` (:class:`FileRepository`): a local folder; files are copied.
- ``http(s):`` (:class:`HTTPRepository`): treq, streamed; a version folder is
  listed through its index page, the links of an autoindex page as nginx,
  Apache or ``python -m http.server`` serve it (sub-folders followed; parent,
  sort and off-site links ignored), then, when the listing must describe the
  files (``describe=True``: a ``keep_updated`` check compares their markers),
  one ``HEAD`` per file for its size, ``Content-MD5``, ``ETag`` and
  ``Last-Modified``; a listing only to download (``describe=False``) makes no
  ``HEAD``: the ``GET`` of each file says all of that.
- ``s3:`` (:class:`S3Repository`): boto3 with its standard settings
  (``AWS_ENDPOINT_URL_S3``, ``AWS_PROFILE`` and the config files, the
  ``AWS_*`` credential variables...), imported only when an ``s3:`` repository
  is used. Every call is made with the credentials found and, when there are
  none or they are refused, again anonymously (botocore ``UNSIGNED``): public
  buckets work without an account. boto3 blocks, so every call runs in the
  :class:`~ion.core.threads.BlockingPool`.

**Connections**: a repository makes at most ``max_connections`` requests at
once (:attr:`Repository.slots`; ``ion-deploy`` sets it to ``--jobs``), so it
holds at most that many connections: HTTP through one persistent treq
connection pool keeping as many per host, S3 through one boto3 client whose
pool keeps as many (``max_pool_connections``). An S3 listing gives each key's
size and ETag: no request per file but its ``GET``.

Layout: ``<url>/<platform>/<name>/<version>/<files>``; every file under the
version folder belongs to the dependency, sub-folders kept, except a
``<file>.sha256`` sidecar next to ``<file>``, which gives that file's sha256.
The version folder is matched exactly (``1.1`` never matches ``1.10``).

**Downloads stream**: chunks are written and hashed (sha256, and md5 when one
is to be checked) as they arrive, in the pool, one job after the other for a
file, with at most a few MiB in flight (the HTTP transport is paused beyond
that), so memory stays bounded whatever the file size. S3 bodies and local
files are read in 256 KiB pieces into a few buffers the file reuses, written by
the reading thread and hashed meanwhile by a helper thread per digest
(:meth:`_Sink.fill_from`); a plain S3 body is read from the HTTP response under
botocore's, without urllib3's copies (:func:`_body_readinto`): a 1 GB object
comes at 0.8x boto3's ``download_file`` speed or better, sha256 included
(``bench/deploy.py``, "big"). The file's checksum from the repository (S3
single-part ETag = md5; HTTP ``Content-MD5``; a ``.sha256`` sidecar) is then
compared: a mismatch is a :class:`ChecksumMismatchError` and the file is
removed. A connection refused or dropped mid-file, a body that stalls or ends
short, an HTTP 408, 429 or 5xx gateway/server error (on a GET, or on a HEAD of
the listing: the listing is tried again), is tried again after ``retry_delay``
seconds, doubling each time, at most ``retries`` times (config, clock
injected), then :class:`TransferError`; other 4xx fail at once. A file that
cannot be written (a full disk) ends the download at once with
:class:`WriteError` naming the file and the OS reason, connection dropped.

**Version markers** (:attr:`RemoteFile.marker`) say whether a remote file
changed since it was fetched, for ``keep_updated``: the S3 ETag, the HTTP ETag
(else Last-Modified and size), a local file's mtime and size.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import hashlib
import http.client
import io
import os
import queue
import re
import stat
import threading
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from html import unescape as html_unescape
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any, ClassVar, Final
from urllib.parse import quote, unquote, urljoin, urlsplit

from twisted.internet import defer, protocol, task
from twisted.internet import error as ierror
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from ion.core.config import Settings, setting
from ion.core.deferreds import observe, shielded
from ion.core.safefs import SafeDir, lies_in
from ion.core.threads import run_short
from ion.services.fetch.errors import (
    AccessDeniedError,
    AddressNotAllowedError,
    BucketNotFoundError,
    CertificateError,
    ChecksumMismatchError,
    FetchError,
    InvalidRequestError,
    NotFoundError,
    RepositoryError,
    TransferError,
    WriteError,
)
from ion.services.records.deployer import RepositoryURL, parse_repository_url

__all__ = [
    "Checksum",
    "RemoteFile",
    "Downloaded",
    "FetchConfig",
    "Progress",
    "Repository",
    "FileRepository",
    "HTTPRepository",
    "S3Repository",
    "repository_for",
    "parse_index_links",
    "SIDECAR_SUFFIX",
    "CONFIG_SECTION",
]

#: The config section read by :meth:`FetchConfig.from_config`.
CONFIG_SECTION: Final = "ion.services.fetch"
#: A ``<file>.sha256`` next to ``<file>`` holds that file's sha256; it is no dependency file itself.
SIDECAR_SUFFIX: Final = ".sha256"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_MAX_SIDECAR = 4096
_MAX_LISTING_DEPTH = 32
#: Bytes read at a time into a :class:`_Sink`'s buffer: a piece that stays in the CPU's cache
#: between the read, the write and the hashing (1 MiB pieces were slower in our measures).
_READ_BUFFER = 256 << 10
#: Buffers of one :class:`_Sink` (read ahead of the hashing by at most this many pieces: 2 MiB).
_PIPELINE = 8
#: Files from this size on are hashed by helper threads beside the reads; smaller ones (or of
#: unknown size) in the reading thread. Measured: the helpers make a lone 1 GB download ~25%
#: faster, but slow many parallel small downloads (20 x 20 MB, 8 at once) by ~20% on 2 cores.
_HASH_BESIDE_FROM = 64 << 20

#: ``progress(bytes_done, bytes_total)``; total is None when unknown.
Progress = Callable[[int, "int | None"], None]


# -- what is listed and downloaded ------------------------------------------------------------------
@dataclass(frozen=True)
class Checksum:
    """A checksum the repository gives for a file: ``algorithm`` (``md5`` or ``sha256``)
    and the lower-case hex digest."""

    algorithm: str
    hexdigest: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a version folder.

    :ivar path: relative to the version folder, ``/``-separated (sub-folders kept).
    :ivar url: where it is, for messages (``s3://b/p/linux/z/1.2/z.tgz``, an HTTP URL, a local path).
    :ivar size: bytes, when the repository says (None: unknown until downloaded).
    :ivar checksums: what the repository vouches for (S3 ETag md5, ``Content-MD5``, sidecar sha256).
    :ivar marker: changes when the remote file changes (ETag, Last-Modified + size, mtime + size).
    :ivar source: the repository's own locator (S3 key, HTTP URL, path; ``file:``: the path the
        listing resolved, which its read must find again).
    """

    path: str
    url: str
    size: int | None
    checksums: tuple[Checksum, ...] = ()
    marker: str | None = None
    source: str = field(default="", repr=False)

    @property
    def checksum(self) -> Checksum | None:
        """The strongest checksum known (sha256 before md5), if any."""
        for algorithm in ("sha256", "md5"):
            for c in self.checksums:
                if c.algorithm == algorithm:
                    return c
        return None


@dataclass(frozen=True)
class Downloaded:
    """A file written by :meth:`Repository.download`: its size and digests (hex),
    the repository checksums it was verified against, and its version marker as
    seen when it was downloaded."""

    size: int
    #: None when the caller could do without it (see :meth:`Repository.download`).
    sha256: str | None
    #: Only computed when the repository gave an md5 to check (None otherwise).
    md5: str | None
    verified: tuple[Checksum, ...] = ()
    marker: str | None = None


@dataclass(frozen=True)
class FetchConfig(Settings):
    """The ``ion.services.fetch`` section: transfer settings, and the service's own. Its
    security bounds (``allowed_networks``, ``allowed_file_repositories``) are read by the
    service with ``bounded_config``.

    :param retries: times a dropped or refused transfer is tried again.
    :param retry_delay: seconds before the first retry; doubled (``retry_backoff``) each time,
        at most ``retry_max_delay``.
    :param connect_timeout: seconds to connect.
    :param read_timeout: seconds an HTTP response (headers, then each piece of body) may take.
    :param chunk_size: bytes handed to the pool per write (HTTP); S3 and file downloads move
        8 chunks per pool job, read in pieces of at most 256 KiB.
    :param max_buffered: bytes of one download waiting to be written before the network is paused.
    :param listing_concurrency: HTTP ``HEAD`` requests at once while listing (within ``max_connections``).
    :param max_connections: requests in flight at once per repository, and so its connections
        (HTTP and S3); ``ion-deploy`` sets it to ``--jobs``. The files of a version folder are
        downloaded that many at a time.
    :param s3_max_connections: connections boto3's pool keeps per repository (at most
        ``max_connections`` are used).
    :param max_concurrent: fetch requests the service handles at once.
    :param progress_interval: seconds between two ``deploy.progress`` events of one file.
    :param rpc_timeout: seconds a ``FetchClient`` call waits for the answer unless told otherwise.
    """

    SECTION: ClassVar[str] = CONFIG_SECTION

    retries: int = 3
    retry_delay: float = 0.5
    retry_backoff: float = 2.0
    retry_max_delay: float = 10.0
    connect_timeout: float = 30.0
    read_timeout: float = 60.0
    chunk_size: int = setting(1 << 20, minimum=1)
    max_buffered: int = setting(8 << 20, minimum=1)
    listing_concurrency: int = setting(8, minimum=1)
    max_connections: int = setting(8, minimum=1)
    s3_max_connections: int = setting(16, minimum=1)
    max_concurrent: int = 16
    progress_interval: float = 0.5
    rpc_timeout: float = 3600.0


# -- helpers ---------------------------------------------------------------------------------------
def _hex_of_content_md5(value: str) -> str | None:
    """The hex md5 of a ``Content-MD5`` header (base64 by RFC 1864; hex accepted too)."""
    value = value.strip()
    if _HEX32.match(value):
        return value.lower()
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 16 else None


def _parse_sidecar(text: bytes) -> str | None:
    """The hex digest of a ``.sha256`` file: ``<hex>`` or ``sha256sum``'s ``<hex>  <name>``."""
    try:
        first = text.decode("ascii").split()
    except UnicodeDecodeError:
        return None
    if not first or not _HEX64.match(first[0]):
        return None
    return first[0].lower()


def _version_parts(platform: str, name: str, version: str) -> tuple[str, str, str]:
    for what, value in (("platform", platform), ("name", name), ("version", version)):
        if not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
            raise FetchError(f"{what} {value!r} must be one path component")
    return platform, name, version


def _write_error(exc: OSError, path: Path, url: str | None) -> WriteError:
    """The :class:`WriteError` of a failed write of ``path``: the file and the OS reason, one line."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    source = f" (downloading {url})" if url else ""
    return WriteError(f"cannot write {path}{source}: {reason}", url=url, path=str(path), errno=exc.errno)


class _Sink:
    """One file being written, hashed as it goes. Every method but :meth:`want_md5` and
    :attr:`closed` may block: run them in the pool. Making one does no I/O: the file is
    created (parents too) by the first write, or by :meth:`close` for an empty one, so a
    small file costs one pool job, not three.

    A failed write (a full disk, a quota, ``RLIMIT_FSIZE``, an I/O error) raises
    :class:`WriteError` naming the file and the OS reason, never a bare ``OSError``.
    """

    def __init__(self, path: Path, *, sha256: bool = True, url: str | None = None,
                 within: Path | None = None) -> None:
        self.path = path
        self.url = url
        #: The folder the file is written below (a staging folder), which must still exist: its missing
        #: parents below it are made, never it (see :meth:`_open`).
        self.within = within
        self.file: Any = None
        #: What :meth:`close` returned (it may be called again: the same answer, no I/O).
        self.closed: tuple[int, str | None, str | None] | None = None
        #: The caller needs the sha256 whatever else is checked (else: only when nothing else is).
        self.sha256_needed = sha256
        self.sha256: Any = hashlib.sha256()
        # md5 costs more than the disk write: computed only when one will be checked
        # (an S3 single-part ETag, an HTTP Content-MD5), as the transfer says before writing.
        self.md5: Any = None
        self.size = 0
        self._buffers: list[memoryview] = []
        self._inline: memoryview | None = None
        #: The file's size when known (the transfer sets it): big files are hashed beside the reads.
        self.expected: int | None = None

    def want_md5(self, wanted: bool, *, sha256_checked: bool = False) -> None:
        """Say, before the first write, whether an md5 of the bytes will be checked (and a sha256).

        A file checked by its md5 alone, whose caller can do without its sha256 (an archive
        to extract), is not sha256-hashed: that would cost as much as the write.
        """
        if self.size:
            raise RuntimeError("want_md5 after bytes were written")
        if wanted and self.md5 is None:
            self.md5 = hashlib.md5(usedforsecurity=False)
        if wanted and not (self.sha256_needed or sha256_checked):
            self.sha256 = None

    def _open(self) -> None:
        try:
            if self.within is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed by close()/abort()
                return
            # Through the folder's descriptor: a write that comes after its fetch was given up and the
            # folder removed (a pool job that a cancel could not stop) fails, never makes it again.
            parts = self.path.parent.relative_to(self.within).parts
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            with SafeDir.open_root(self.within) as top:
                if not parts:  # (a file of the folder itself: no walk)
                    fd = os.open(self.path.name, flags, 0o666, dir_fd=top.fd)
                else:
                    with top.walk(parts, create=True) as folder:
                        fd = os.open(self.path.name, flags, 0o666, dir_fd=folder.fd)
            self.file = open(fd, "wb", buffering=0)  # noqa: SIM115 - closed by close()/abort()
        except OSError as exc:
            raise _write_error(exc, self.path, self.url) from None

    def _write_all(self, view: memoryview) -> None:
        if self.file is None:
            self._open()
        try:
            while view:
                view = view[self.file.write(view):]
        except OSError as exc:
            raise _write_error(exc, self.path, self.url) from None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._write_all(memoryview(data))
        if self.sha256 is not None:
            self.sha256.update(data)
        if self.md5 is not None:
            self.md5.update(data)
        self.size += len(data)
        return len(data)

    def fill_from(self, readinto: Callable[[memoryview], int], limit: int, chunk: int) -> int:
        """Read up to ``limit`` bytes with ``readinto(buffer) -> n`` (0 at the end), write and
        hash them; returns the bytes read (0: the source is exhausted).

        The pieces (``min(chunk, _READ_BUFFER)`` bytes) go round :data:`_PIPELINE` buffers
        made once per sink: no allocation and no extra copy per piece, and a piece small
        enough to still be in the CPU cache when it is written and hashed. This thread
        reads and writes; meanwhile one helper thread per digest (sha256, then md5 when
        wanted) hashes the pieces in order, handing each on to the next digest's thread,
        the last one giving the buffer back (hashlib releases the GIL on such pieces: the
        digests cost as much as reading and writing). The helpers live for this call only
        and are joined before it returns, whatever happens: between calls nothing is in
        flight, so :meth:`reset`, :meth:`close` and :meth:`abort` need no care.
        """
        if self.expected is None or self.expected < _HASH_BESIDE_FROM:
            # (Before the pipeline's buffers are made: 2 MiB, zeroed page by page, for a 4 KB file.)
            return self._fill_inline(readinto, limit, chunk)
        size = min(chunk, _READ_BUFFER)
        if not self._buffers or len(self._buffers[0]) != size:
            self._buffers = [memoryview(bytearray(size)) for _ in range(_PIPELINE)]
        digests = [h for h in (self.sha256, self.md5) if h is not None]
        # queues[i] feeds digest i; the last queue brings buffers back for reuse.
        queues: list[queue.SimpleQueue[tuple[memoryview, int] | None]] = [
            queue.SimpleQueue() for _ in range(len(digests) + 1)]

        failed: list[BaseException] = []

        def hash_pieces(digest: Any, todo: queue.SimpleQueue[tuple[memoryview, int] | None],
                        then: queue.SimpleQueue[tuple[memoryview, int] | None]) -> None:
            while True:
                item = todo.get()
                if item is not None and not failed:
                    try:
                        digest.update(item[0][: item[1]])
                    except BaseException as exc:  # raised by the reading thread, below
                        failed.append(exc)
                then.put(item)  # always handed on: the reading thread never waits forever
                if item is None:
                    return

        helpers = [threading.Thread(target=hash_pieces, args=(digest, queues[i], queues[i + 1]),
                                    name=f"ion-sink-{digest.name}", daemon=True)
                   for i, digest in enumerate(digests)]
        for helper in helpers:
            helper.start()
        free = list(self._buffers)
        done = 0
        try:
            while done < limit:
                if free:
                    buffer = free.pop()
                else:
                    back = queues[-1].get()
                    assert back is not None  # only sent after the loop
                    buffer = back[0]
                n = readinto(buffer[: min(size, limit - done)])
                if not n:
                    break
                self._write_all(buffer[:n])
                queues[0].put((buffer, n))
                self.size += n
                done += n
        finally:
            queues[0].put(None)
            for helper in helpers:
                helper.join()
        if failed:
            raise failed[0]
        return done

    def _fill_inline(self, readinto: Callable[[memoryview], int], limit: int, size: int) -> int:
        """:meth:`fill_from` with the hashing in this thread (a small file: no helper threads), in
        ``size``-byte pieces (``chunk_size``: fewer, bigger calls through the HTTP stack)."""
        if self.expected is not None:
            # A small file of known size: a buffer of its size (and a byte more, to see the end in one
            # read), not of chunk_size: a 1 MiB buffer per 4 KB file is mostly page faults.
            size = max(1, min(size, self.expected + 1))
        if self._inline is None or len(self._inline) != size:
            self._inline = memoryview(bytearray(size))
        buffer = self._inline
        done = 0
        while done < limit:
            n = readinto(buffer[: min(size, limit - done)])
            if not n:
                break
            done += self.write(buffer[:n])
        return done

    def reset(self) -> None:
        """Start the file again from byte 0 (a retry)."""
        if self.closed is not None:
            self.closed, self.file = None, None  # (reopened, emptied, by the next write)
        elif self.file is not None:
            try:
                self.file.seek(0)
                self.file.truncate()
            except OSError as exc:
                raise _write_error(exc, self.path, self.url) from None
        self.sha256 = hashlib.sha256()
        self.md5 = None
        self.size = 0

    def close(self) -> tuple[int, str | None, str | None]:
        """Close the file (created if nothing was written); its size and hex digests."""
        if self.closed is not None:
            return self.closed
        if self.file is None:
            self._open()
        try:
            self.file.close()
        except OSError as exc:  # a network filesystem may report a failed write only now
            raise _write_error(exc, self.path, self.url) from None
        self.closed = (self.size, self.sha256.hexdigest() if self.sha256 is not None else None,
                       self.md5.hexdigest() if self.md5 is not None else None)
        return self.closed

    def abort(self) -> None:
        try:
            if self.file is not None:
                self.file.close()
        finally:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


class _Retryable(Exception):
    """A transfer failure worth another try (connection refused or dropped, body short or stalled)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: A file of at most this many bytes, come whole, is written, hashed and closed by a short pool call
#: (``BlockingPool.run_short``: one thread for them all, beside the pool's): a folder of 2,000 files
#: of 4 KB from HTTP took 16-30 % less time than with each file's job on any of ``--jobs`` threads.
_SHORT_WRITE: Final = 64 * 1024


class _PoolWriter:
    """Feeds a :class:`_Sink` from the reactor: chunks are gathered up to ``chunk_size``
    and written by one pool job at a time, in order. Beyond ``max_buffered`` bytes
    waiting, ``pause()`` is called (the HTTP transport stops reading) until the
    writes catch up."""

    def __init__(self, pool: Any, sink: _Sink, config: FetchConfig, *, progress: Callable[[int], None] | None = None,
                 pause: Callable[[], None] | None = None, resume: Callable[[], None] | None = None) -> None:
        self.pool = pool
        self.sink = sink
        self.chunk_size = int(config.chunk_size)
        self.max_buffered = int(config.max_buffered)
        self.progress = progress
        self.pause, self.resume = pause, resume
        self.paused = False
        self._pieces: list[bytes] = []
        self._gathered = 0
        self._pending = 0  # bytes handed to the pool, not yet written
        self._written = 0
        self._tail: defer.Deferred[Any] = defer.succeed(None)
        self.failure: Failure | None = None
        #: Called once with the first write failure, at once: the transfer must stop even while
        #: it is paused (no more data would arrive to notice the failure).
        self.on_failure: Callable[[Failure], None] | None = None

    def feed(self, data: bytes) -> None:
        if self.failure is not None:
            return
        self._pieces.append(data)
        self._gathered += len(data)
        if self._gathered >= self.chunk_size:
            self._flush()

    def _flush(self, close: bool = False) -> None:
        if not self._pieces and not close:
            return
        data = b"".join(self._pieces) if len(self._pieces) > 1 else (self._pieces[0] if self._pieces else b"")
        self._pieces, self._gathered = [], 0
        self._pending += len(data)
        if self._pending > self.max_buffered and not self.paused and self.pause is not None:
            self.paused = True
            self.pause()

        def write_and_close() -> int:
            n = self.sink.write(data) if data else 0
            self.sink.close()
            return n

        def write(_: Any) -> defer.Deferred[int]:
            if not close:
                return self.pool.run(self.sink.write, data)
            if not self._written and len(data) <= _SHORT_WRITE:
                return run_short(self.pool, write_and_close)  # a whole small file: see _SHORT_WRITE
            return self.pool.run(write_and_close)

        def written(n: int) -> None:
            self._pending -= n
            self._written += n
            if self.paused and self._pending <= self.max_buffered // 2:
                self.paused = False
                if self.resume is not None:
                    self.resume()
            if self.progress is not None:
                self.progress(self._written)

        def failed(f: Failure) -> Failure:
            if self.failure is None:
                self.failure = f
                if self.on_failure is not None:
                    self.on_failure(f)
            return f  # later writes are skipped: the chain stays failed

        self._tail.addCallback(write)
        self._tail.addCallbacks(written, failed)

    async def finish(self, *, close: bool = False) -> None:
        """Write what is gathered and wait for every write (raising the first write error);
        ``close``: the sink is closed by the last write's pool job (all the bytes came).

        Cancelled, it still waits for the writes handed out (a pool call is not stopped) before it
        raises: whoever removes the file next (``_Sink.abort``) comes after the last write, which
        would make the file again otherwise (a short call runs a reactor turn later)."""
        self._flush(close)
        try:
            await shielded(self._tail)
        except defer.CancelledError:
            await observe(self._tail)
            raise

    async def drain(self) -> None:
        """Wait for the writes in flight, ignoring their errors (before a retry or abort)."""
        self._pieces, self._gathered = [], 0
        try:
            await self._tail
        except Exception:
            pass
        self._tail = defer.succeed(None)
        self._pending = 0
        self.failure = None


# -- the interface ---------------------------------------------------------------------------------
class Repository:
    """A repository of dependency versions: ``<url>/<platform>/<name>/<version>/<files>``.

    :param url: the parsed repository URL.
    :param pool: runs blocking work: ``run(fn, *args, **kwargs)`` -> Deferred
        (:class:`~ion.core.threads.BlockingPool`).
    :param reactor: the reactor (network); ``clock`` defaults to it.
    :param config: transfer settings.
    :param clock: schedules retries and timeouts (a ``task.Clock`` in tests).
    """

    _log = Logger()

    def __init__(self, url: RepositoryURL, pool: Any, reactor: Any = None, config: FetchConfig | None = None,
                 *, clock: IReactorTime | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.url = url
        self.pool = pool
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor
        self.config = config or FetchConfig()
        #: One token per request in flight (``max_connections``): every listing request, sidecar
        #: read and download attempt holds one, so the repository holds at most that many connections.
        self.slots = defer.DeferredSemaphore(int(self.config.max_connections))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    # -- public API ---------------------------------------------------------------------------------
    def version_url(self, platform: str, name: str, version: str) -> str:
        """The version folder's URL (or path), as messages name it; ends with ``/``."""
        return self.url.child(platform, name, version).rstrip("/") + "/"

    def list_version(self, platform: str, name: str, version: str, *,
                     describe: bool = True) -> defer.Deferred[list[RemoteFile]]:
        """Every file of the version folder, sorted by path (sidecars folded into their file).

        ``describe=False``: the files are listed to be downloaded, whose transfers say their size,
        checksum and marker; a repository whose listing does not give them (HTTP) leaves them
        unknown (None) rather than asking for each file (S3 and ``file:`` give them anyway).

        :raises NotFoundError: no such version folder, or nothing in it (the URL tried named).
        :raises BucketNotFoundError, AccessDeniedError, TransferError, RepositoryError: as their names say.
        """

        async def run() -> list[RemoteFile]:
            _version_parts(platform, name, version)
            where = self.version_url(platform, name, version)
            files = await self._retrying("listing", where, lambda: self._list(platform, name, version, describe))
            if not files:
                raise NotFoundError(f"no files under {where}", url=where)
            return await self._fold_sidecars(files)

        return defer.Deferred.fromCoroutine(run())

    def download(self, remote: RemoteFile, dest: str | os.PathLike[str],
                 progress: Progress | None = None, *, sha256: bool = True,
                 within: Path | None = None) -> defer.Deferred[Downloaded]:
        """Stream ``remote`` into ``dest`` (parents made), hashing as it goes; fires with
        what was written once the repository's checksums are verified.

        ``sha256=False``: the caller needs no sha256 of the file (it extracts it, and
        hashes what it extracts). It is then computed only when no md5 checks the
        file (the fallback) or a ``.sha256`` sidecar does; else ``Downloaded.sha256``
        is None.

        On any failure (or cancellation) ``dest`` is removed. ``within``: a folder above ``dest``
        that must still exist when the file is created (a staging folder): its missing parents
        below it are made, never it, so a write that outlives a given-up fetch leaves nothing.

        :raises ChecksumMismatchError: the content does not match the repository's checksum.
        :raises TransferError: the connection kept failing after ``retries`` tries.
        :raises NotFoundError, AccessDeniedError, RepositoryError: as their names say.
        """
        return defer.Deferred.fromCoroutine(self._download(remote, Path(dest), progress, sha256, within))

    def close(self) -> defer.Deferred[None]:
        """Release connections (HTTP pool); the repository may not be used afterwards."""
        return defer.succeed(None)

    # -- for implementations ----------------------------------------------------------------------------
    async def _list(self, platform: str, name: str, version: str, describe: bool = True) -> list[RemoteFile]:
        raise NotImplementedError

    def _slot(self, fn: Callable[[], Any]) -> defer.Deferred[Any]:
        """``fn()`` once a request slot is free (:attr:`slots`), holding it until ``fn`` ends.

        (What ``slots.run`` does, in one coroutine: without its ``maybeDeferred`` and the
        Deferreds around ``fn()``'s; two requests per small item.)"""
        return defer.Deferred.fromCoroutine(self._in_slot(fn))

    async def _in_slot(self, fn: Callable[[], Any]) -> Any:
        await self.slots.acquire()  # (cancelled while waiting: not taken, nothing to release)
        try:
            return await fn()
        finally:
            self.slots.release()

    async def _read_small(self, remote: RemoteFile, limit: int) -> bytes:
        """The content of a small file (a sidecar), at most ``limit`` bytes."""
        raise NotImplementedError

    async def _transfer(self, remote: RemoteFile, sink: _Sink, progress: Callable[[int], None]) -> RemoteFile:
        """Write ``remote`` into ``sink`` once (raise :class:`_Retryable` for a dropped transfer);
        return ``remote`` updated with what the transfer said (size, checksums, marker)."""
        raise NotImplementedError

    # -- shared machinery -----------------------------------------------------------------------------
    async def _retrying(self, what: str, url: str, attempt: Callable[[], Awaitable[Any]],
                        on_retry: Callable[[], Awaitable[None]] | None = None) -> Any:
        """``attempt()``, tried again on :class:`_Retryable` with backoff; then :class:`TransferError`."""
        delay = float(self.config.retry_delay)
        retries = int(self.config.retries)
        for n in range(retries + 1):
            try:
                return await attempt()
            except _Retryable as exc:
                if n >= retries:
                    tries = f"{n + 1} attempts" if n else "1 attempt"
                    raise TransferError(f"{what} {url} failed after {tries}: {exc.reason}", url=url,
                                        attempts=n + 1) from None
                self._log.warn("{what} {url}: {reason}; retry {n} of {retries} in {delay:g} s", what=what,
                               url=url, reason=exc.reason, n=n + 1, retries=retries, delay=delay)
                if on_retry is not None:
                    await on_retry()
                if delay > 0:
                    await task.deferLater(self.clock, delay, lambda: None)
                delay = min(delay * float(self.config.retry_backoff), float(self.config.retry_max_delay))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fold_sidecars(self, files: list[RemoteFile]) -> list[RemoteFile]:
        by_path = {f.path: f for f in files}
        out: dict[str, RemoteFile] = {}
        sidecars: dict[str, RemoteFile] = {}
        for f in files:
            if f.path.endswith(SIDECAR_SUFFIX) and f.path[: -len(SIDECAR_SUFFIX)] in by_path:
                sidecars[f.path[: -len(SIDECAR_SUFFIX)]] = f
            else:
                out[f.path] = f
        for path, car in sidecars.items():
            if car.size is not None and car.size > _MAX_SIDECAR:
                raise RepositoryError(f"sidecar {car.url} is {car.size} bytes: not a sha256 file", url=car.url)
            text = await self._retrying("reading", car.url, functools.partial(self._read_sidecar, car))
            digest = _parse_sidecar(text)
            if digest is None:
                raise RepositoryError(f"sidecar {car.url} does not hold a sha256 (64 hex digits)", url=car.url)
            f = out[path]
            out[path] = replace(f, checksums=(*[c for c in f.checksums if c.algorithm != "sha256"],
                                              Checksum("sha256", digest)))
        return [out[p] for p in sorted(out)]

    def _read_sidecar(self, car: RemoteFile) -> defer.Deferred[bytes]:
        return self._slot(lambda: self._read_small(car, _MAX_SIDECAR))

    async def _download(self, remote: RemoteFile, dest: Path, progress: Progress | None,
                        need_sha256: bool = True, within: Path | None = None) -> Downloaded:
        sidecar = any(c.algorithm == "sha256" for c in remote.checksums)
        sink = _Sink(dest, sha256=need_sha256 or sidecar, url=remote.url, within=within)  # (no I/O yet)
        seen: dict[str, RemoteFile] = {}

        def report(done: int) -> None:
            if progress is not None:
                total = seen["last"].size if "last" in seen else remote.size
                progress(done, total)

        async def attempt() -> RemoteFile:
            seen["last"] = remote
            got = await self._slot(lambda: self._transfer(remote, sink, report))
            seen["last"] = got
            return got

        async def restart() -> None:
            await self.pool.run(sink.reset)

        try:
            if progress is not None:
                progress(0, remote.size)
            got = await self._retrying("downloading", remote.url, attempt, restart)
            # (A transfer that had all the bytes may have closed it in its last pool job.)
            size, sha256, md5 = sink.closed or await self.pool.run(sink.close)
            verified = self._verify(got, size, sha256, md5)
        except BaseException:
            try:
                await self.pool.run(sink.abort)
            except Exception as exc:  # pragma: no cover - best effort
                self._log.warn("could not remove {path}: {exc}", path=str(dest), exc=exc)
            raise
        if progress is not None:
            progress(size, size)
        return Downloaded(size=size, sha256=sha256, md5=md5, verified=verified, marker=got.marker)

    @staticmethod
    def _verify(remote: RemoteFile, size: int, sha256: str | None, md5: str | None) -> tuple[Checksum, ...]:
        if remote.size is not None and size != remote.size:
            # Transfers check their length; this is a repository that changed its mind.
            raise ChecksumMismatchError(remote.path, f"size:{remote.size}", f"size:{size}", url=remote.url,
                                        source="the repository's listing")
        computed = {"sha256": sha256, "md5": md5}
        for c in remote.checksums:
            if computed[c.algorithm] is None:
                raise RuntimeError(f"{remote.path}: no {c.algorithm} was computed to check")
            if computed[c.algorithm] != c.hexdigest:
                source = {"md5": "the repository's md5 (ETag or Content-MD5)",
                          "sha256": f"its {SIDECAR_SUFFIX} sidecar"}[c.algorithm]
                raise ChecksumMismatchError(remote.path, str(c), f"{c.algorithm}:{computed[c.algorithm]}",
                                            url=remote.url, source=source)
        return remote.checksums


# -- file: -----------------------------------------------------------------------------------------
def _file_marker(st: os.stat_result) -> str:
    return f"mtime:{st.st_mtime_ns}:size:{st.st_size}"


def _walk_folder(folder: Path, confine: str) -> list[RemoteFile] | None:
    """Every regular file under ``folder`` (symlinks to files followed, to folders not); None if no folder.

    The version folder and every link met must resolve inside ``confine`` (the repository's
    resolved folder), or the listing is refused (whatever the link leads to, without naming it).

    The folders are walked by descriptor, depth first (only the current branch open), each
    opened below its parent without following a link: a folder swapped for a link while it
    is listed is refused, never listed through. A link is resolved once, on a descriptor of
    what it leads to, which gives its name and size at one moment. Each file's ``source`` is
    the path it resolved to, which its read must find again (:func:`_open_source`).
    """
    try:
        top_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError as exc:
        raise AccessDeniedError(f"cannot read {folder}: {exc.strerror}", url=str(folder)) from None
    except OSError as exc:
        raise RepositoryError(f"cannot list {folder}: {exc.strerror}", url=str(folder)) from None
    files: list[RemoteFile] = []
    # The open folders of the current branch: (descriptor, path below the version folder, entries left).
    stack: list[tuple[int, str, Iterator[os.DirEntry[str]]]] = []
    try:
        real_top = _fd_path(top_fd, str(folder))
        if not lies_in(real_top, confine):
            raise AccessDeniedError(f"{folder} resolves outside the repository {confine}; refused", url=str(folder))
        stack.append((top_fd, "", _entries(top_fd, str(folder))))
        top_fd = -1
        while stack:
            fd, rel_dir, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                os.close(fd)
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            full = os.path.join(folder, rel)
            try:
                if entry.is_dir(follow_symlinks=False):
                    if len(stack) > _MAX_FILE_DEPTH:
                        raise RepositoryError(f"{full}: more than {_MAX_FILE_DEPTH} folders deep; refused", url=full)
                    sub = _open_subfolder(fd, entry.name, full)
                    if sub is not None:
                        try:
                            stack.append((sub, rel, _entries(sub, full)))
                        except BaseException:
                            os.close(sub)
                            raise
                    continue
                if entry.is_symlink():
                    found = _follow_link(fd, entry.name, full, confine)
                    if found is None:
                        continue  # dangling (inside), or a folder: not followed
                    source, fst = found
                else:
                    fst = entry.stat(follow_symlinks=False)
                    source = f"{real_top.rstrip('/')}/{rel}"
            except FileNotFoundError:
                continue  # gone since its folder was read
            except PermissionError as exc:
                raise AccessDeniedError(f"cannot read {full}: {exc.strerror}", url=full) from None
            except OSError as exc:
                raise RepositoryError(f"cannot list {full}: {exc.strerror}", url=full) from None
            if not stat.S_ISREG(fst.st_mode):
                continue
            files.append(RemoteFile(path=rel, url=full, size=fst.st_size, marker=_file_marker(fst), source=source))
    finally:
        if top_fd >= 0:
            os.close(top_fd)
        for fd, _, _ in stack:  # (a failure: the open folders of the branch)
            os.close(fd)
    return files


#: The deepest a ``file:`` version folder is walked (each level holds a descriptor while it is).
_MAX_FILE_DEPTH: Final = 128


def _entries(fd: int, named: str) -> Iterator[os.DirEntry[str]]:
    """The entries of the open folder ``fd``, by name (read whole: no descriptor kept for them)."""
    try:
        with os.scandir(fd) as it:
            return iter(sorted(it, key=lambda e: e.name))
    except PermissionError as exc:
        raise AccessDeniedError(f"cannot read {named}: {exc.strerror}", url=named) from None
    except OSError as exc:
        raise RepositoryError(f"cannot list {named}: {exc.strerror}", url=named) from None


def _open_subfolder(fd: int, name: str, full: str) -> int | None:
    """The sub-folder ``name`` of the open folder ``fd``, opened without following a link; None if
    it is gone."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise AccessDeniedError(f"{full} changed while it was listed (it is no folder now); refused",
                                    url=full) from None
        if exc.errno == errno.EACCES:
            raise
        raise RepositoryError(f"cannot list {full}: {exc.strerror}", url=full) from None


#: A link whose target cannot be reached: dangling, a loop, through a file, too long.
_UNREACHABLE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG})


def _follow_link(fd: int, name: str, full: str, confine: str) -> tuple[str, os.stat_result] | None:
    """The resolved path and status of what the link ``name`` (in the open folder ``fd``) leads to,
    both read on one descriptor of it; None for a dangling link (or one to a folder) inside
    ``confine``. A link resolving outside ``confine`` is refused, whatever it leads to."""
    out = AccessDeniedError(f"{full} is a link out of the repository {confine}; refused", url=full)
    o_path = getattr(os, "O_PATH", 0)
    if not o_path:  # (no O_PATH: the path resolved, then its status, a moment apart)
        target = os.path.realpath(full)
        if not lies_in(target, confine):
            raise out
        try:
            fst = os.stat(name, dir_fd=fd)
        except OSError as exc:
            if exc.errno in _UNREACHABLE:
                return None
            raise
        return (target, fst) if stat.S_ISREG(fst.st_mode) else None
    try:
        lfd = os.open(name, o_path | os.O_CLOEXEC, dir_fd=fd)
    except OSError as exc:
        # Unreachable or not searchable: judged by its path, so that no answer tells what is outside.
        if not lies_in(os.path.realpath(full), confine):
            raise out from None
        if exc.errno in _UNREACHABLE:
            return None
        raise
    try:
        target = _fd_path(lfd, full)
        if not lies_in(target, confine):
            raise out
        fst = os.fstat(lfd)
    finally:
        os.close(lfd)
    return (target, fst) if stat.S_ISREG(fst.st_mode) else None


def _list_folder(folder: Path, location: str) -> list[RemoteFile] | None:
    """:class:`FileRepository`'s listing, in one pool job: the files of ``folder``, confined to the
    repository's folder ``location`` resolved now."""
    return _walk_folder(folder, _resolved(location))


def _fd_path(fd: int, path: str) -> str:
    """The path the kernel gives the open file ``fd`` (``/proc``); without ``/proc``, ``path``
    resolved now (a moment after the open)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def _resolved(path: str) -> str:
    """``path`` with its links resolved, named as the kernel names what it leads to (the name a
    descriptor of it gives: :func:`_fd_path`); ``os.path.realpath`` where that cannot be had."""
    o_path = getattr(os, "O_PATH", 0)
    if not o_path:
        return os.path.realpath(path)
    try:
        fd = os.open(path, o_path | os.O_CLOEXEC)
    except OSError:
        return os.path.realpath(path)
    try:
        return _fd_path(fd, path)
    finally:
        os.close(fd)


def _open_source(path: str) -> tuple[Any, os.stat_result]:
    """``path`` (a listed file's ``source``: the path its listing resolved, inside the repository)
    opened to be read, and its status.

    The descriptor must name that path, a regular file: a file, or a folder above it, swapped since
    the listing for a link (out of the repository or anywhere else) or for anything that is no
    regular file is refused, not read (a file rewritten in place is read: it is the repository's).
    Where Linux allows (``O_PATH`` and ``/proc``) this is checked before the file is opened for
    reading, so nothing else is ever opened (no FIFO, no device); elsewhere the file is opened
    without blocking, then checked.
    """
    changed = AccessDeniedError(f"{path} changed since it was listed; refused", url=path)
    fd = -1
    try:
        o_path = getattr(os, "O_PATH", 0)
        if o_path:
            pfd = _open_checked(path, o_path | os.O_CLOEXEC)
            try:
                if _fd_path(pfd, path) != path or not stat.S_ISREG(os.fstat(pfd).st_mode):
                    raise changed
                try:  # the very file checked, opened for reading through its descriptor's name
                    fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    fd = -1  # (no /proc)
                except PermissionError as exc:
                    raise AccessDeniedError(f"cannot read {path}: {exc.strerror}", url=path) from None
            finally:
                os.close(pfd)
        if fd < 0:
            fd = _open_checked(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            if _fd_path(fd, path) != path:
                raise changed
            os.set_blocking(fd, True)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise changed
        raw = io.FileIO(fd, "rb")
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    try:
        return io.BufferedReader(raw), st
    except BaseException:
        raw.close()
        raise


def _open_checked(path: str, flags: int) -> int:
    """``os.open(path, flags)``, its failures said as a fetch says them; a path that no longer
    resolves to itself (a link swapped in above it) is "changed", whatever lies beyond."""
    try:
        return os.open(path, flags)
    except OSError as exc:
        if os.path.realpath(path) != path or exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENXIO):
            raise AccessDeniedError(f"{path} changed since it was listed; refused", url=path) from None
        if isinstance(exc, FileNotFoundError):
            raise NotFoundError(f"{path} is gone (it was listed)", url=path) from None
        if isinstance(exc, PermissionError):
            raise AccessDeniedError(f"cannot read {path}: {exc.strerror}", url=path) from None
        raise RepositoryError(f"cannot read {path}: {exc.strerror}", url=path) from None


def _open_and_fill(path: str, sink: _Sink, step: int, chunk: int) -> tuple[Any, os.stat_result, int]:
    """:class:`FileRepository`'s first pool job of a file: opened (see :func:`_open_source`), its
    first ``step`` bytes copied into ``sink``; a file that ended within them is closed, and the sink
    too (its file complete). The open file (None once closed), its status and the bytes copied."""
    src, st = _open_source(path)
    try:
        sink.expected = st.st_size
        done = sink.fill_from(src.readinto, step, chunk)
        if done >= step:
            return src, st, done  # more to come, in jobs of their own (progress between them)
    except BaseException:
        src.close()
        raise
    src.close()
    sink.close()
    return None, st, done


def _read_head(path: str, limit: int) -> bytes:
    f, _st = _open_source(path)
    with f:
        return f.read(limit)


class FileRepository(Repository):
    """A local folder (``file:///abs`` or ``file:relative``); files are copied, hashed on the way."""

    def _folder(self, platform: str, name: str, version: str) -> Path:
        return Path(self.url.child(platform, name, version))

    def version_url(self, platform: str, name: str, version: str) -> str:
        return str(self._folder(platform, name, version)) + "/"

    async def _list(self, platform: str, name: str, version: str, describe: bool = True) -> list[RemoteFile]:
        folder = self._folder(platform, name, version)
        # Files are read only from inside the repository, symlinks resolved (DESIGN §8); each read
        # must find the very file listed (_open_source).
        files = await self.pool.run(_list_folder, folder, self.url.location)
        if files is None:
            raise NotFoundError(f"no files under {folder}/ (no such folder)", url=str(folder))
        return files

    async def _read_small(self, remote: RemoteFile, limit: int) -> bytes:
        return await self.pool.run(_read_head, remote.source, limit)

    async def _transfer(self, remote: RemoteFile, sink: _Sink, progress: Callable[[int], None]) -> RemoteFile:
        chunk = int(self.config.chunk_size)
        step = chunk * 8
        # One pool job opens the file and copies its first step; a file that fits in it (most
        # small files) is closed there too, the sink with it: one job per file, not five.
        src, st, done = await self.pool.run(_open_and_fill, remote.source, sink, step, chunk)
        try:
            if done:
                progress(done)
            while src is not None:
                n = await self.pool.run(sink.fill_from, src.readinto, step, chunk)
                if not n:
                    break
                done += n
                progress(done)
        finally:
            if src is not None:
                await self.pool.run(src.close)
        # What was read is what the file holds now (it may have changed since the listing).
        return replace(remote, size=done, marker=_file_marker(st))


# -- http(s): --------------------------------------------------------------------------------------
#: What an index page holds that is not markup to read links from: comments and the raw text of
#: ``script`` and ``style`` elements, as HTMLParser skips them. An unclosed one runs to the end of
#: the page, as browsers read it (CPython 3.11's HTMLParser read on after an unclosed comment).
_NOT_MARKUP = re.compile(r"<!--.*?(?:--[\t\n\r\f ]*>|\Z)"
                         r"|<(script|style)(?=[\t\n\r\f />])(?:[^<>\"']|\"[^\"<]*\"|'[^'<]*')*+>.*?"
                         r"(?:</\1[\t\n\r\f ]*>|\Z)",
                         re.IGNORECASE | re.DOTALL)
_MAYBE_NOT_MARKUP = re.compile(r"<!--|<script|<style", re.IGNORECASE)
#: An ``a`` start tag and its attributes. A quoted value may hold ``>`` but not ``<`` (servers escape
#: both): a tag never reaches past the next ``<``, so a page of unclosed tags or quotes is read in
#: linear time, not rescanned to its end from each one. Whitespace is HTML's (ASCII), as in HTML5
#: and the HTMLParser of current CPython releases.
_ANCHOR = re.compile(r"""<a(?=[\t\n\r\f />])((?:[^<>"']|"[^"<]*"|'[^'<]*')*+)>""", re.IGNORECASE)
#: One attribute of a start tag, as HTMLParser reads it (``attrfind_tolerant``): name, value.
_ATTRIBUTE = re.compile(r"""((?<=['"\t\n\r\f /])[^\t\n\r\f />][^\t\n\r\f /=>]*)"""
                        r"""(?:[\t\n\r\f ]*=+[\t\n\r\f ]*('[^']*'|"[^"]*"|(?!['"])[^>\t\n\r\f ]*))?""")


def _index_hrefs(html: str) -> list[str]:
    """The ``href`` of every ``a`` tag of ``html``, character references decoded, in page order.

    What :class:`html.parser.HTMLParser` gives for the pages servers write (comments, scripts and
    styles skipped; attribute names in any case; values quoted either way or not), with regular
    expressions: HTMLParser took ~180 µs for a one-file page, most of a small item's listing.
    """
    if _MAYBE_NOT_MARKUP.search(html):
        html = _NOT_MARKUP.sub("", html)
    links: list[str] = []
    for tag in _ANCHOR.finditer(html):
        attrs = tag.group(1)
        if "href" not in attrs.lower():
            continue
        for match in _ATTRIBUTE.finditer(" " + attrs):
            name, value = match.group(1, 2)
            if value and name.lower() == "href":
                if value[:1] in ("'", '"'):
                    value = value[1:-1]
                if "&" in value:
                    value = html_unescape(value)
                if value:
                    links.append(value)
    return links


#: Index pages up to this size (~600-1,000 entries, ~2-3 ms; links that are neither relative nor
#: the folder's own path or URL and a name take ~12 µs each) are parsed on the reactor thread: for the
#: small pages of most versions a pool hop would cost more. Bigger ones are parsed in the pool (2,000
#: entries take ~5 ms, 20,000 ~55 ms: the reactor's heartbeats and other transfers go on meanwhile).
INLINE_INDEX_BYTES = 64 * 1024


def _parse_index_page(page: bytes, encoding: str, folder_url: str) -> tuple[list[str], list[str]]:
    """:func:`parse_index_links` of ``page`` decoded (an unknown charset is read as UTF-8)."""
    try:
        html = page.decode(encoding, errors="replace")
    except LookupError:
        html = page.decode("utf-8", errors="replace")
    return parse_index_links(html, folder_url)


#: A child's name in a link, maybe with a ``/`` after it: no scheme, no query or fragment, no ``;``
#: (which urljoin reads as parameters), no control character (which urlsplit strips or removes).
_CHILD_HREF = re.compile(r"[^/:?#;\x00-\x1f]+/?")


def parse_index_links(html: str, folder_url: str) -> tuple[list[str], list[str]]:
    """The files and sub-folders an autoindex page at ``folder_url`` links to.

    Only links to direct children of the folder count: parent links (``../``,
    Apache's "Parent Directory"), sort links (``?C=N;O=D``), fragments and links
    to other folders or hosts are ignored; each name is given once, decoded.

    :returns: (file names, sub-folder names), in page order.
    """
    if not folder_url.endswith("/"):
        folder_url += "/"
    base = urlsplit(folder_url)
    files: list[str] = []
    folders: list[str] = []
    seen: set[str] = set()
    for href in _index_hrefs(html):
        href = href.strip()
        if not href or href.startswith(("?", "#")):
            continue
        # ``name``, ``./name``, or the folder's own path or URL and ``name`` (each maybe with ``/``):
        # what urljoin would make of it, at once.
        if href.startswith("./"):
            rel = href[2:]
        elif href.startswith(base.path):
            rel = href[len(base.path):]
        elif href.startswith(folder_url):
            rel = href[len(folder_url):]
        else:
            rel = href
        if not _CHILD_HREF.fullmatch(rel):
            target = urlsplit(urljoin(folder_url, href))
            if (target.scheme, target.netloc) != (base.scheme, base.netloc):
                continue
            path = target.path
            if not path.startswith(base.path) or len(path) <= len(base.path):
                continue
            rel = path[len(base.path):]
        is_folder = rel.endswith("/")
        rel = rel.rstrip("/")
        if not rel or "/" in rel:
            continue
        name = unquote(rel)
        if name in (".", "..") or "/" in name or "\0" in name or name in seen:
            continue
        seen.add(name)
        (folders if is_folder else files).append(name)
    return files, folders


#: HTTP statuses worth another try (with the retry policy): a timeout, too many requests, a server or
#: gateway error. Other 4xx are the request's own fault: never retried.
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: A URL that is already a URI: only ASCII characters allowed in one (RFC 3986), escapes well formed;
#: no IPv6 literal (``[...]``: treq cannot request one, and says so).
_URI = re.compile(r"https?://(?:[A-Za-z0-9\-._~:/?#@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")


async def _gather(deferreds: list[defer.Deferred[Any]]) -> list[Any]:
    """Every result, in order. On the first failure the others are cancelled and that failure is
    raised as it is: its class (``_Retryable``, ``AccessDeniedError``...) decides what happens next,
    and its message reaches the user, never a ``FirstError`` wrapping a traceback."""
    try:
        return list(await defer.gatherResults(deferreds, consumeErrors=True))
    except defer.FirstError as exc:
        for d in deferreds:
            if not d.called:
                d.cancel()
        error = exc.subFailure.value
        assert error is not None
        raise error.with_traceback(exc.subFailure.getTracebackObject()) from None


_RETRYABLE_HTTP = (ierror.ConnectError, ierror.ConnectionLost, ierror.ConnectionDone, defer.TimeoutError,
                   ierror.TimeoutError)


def _cancelled(f: Failure) -> bool:
    """Whether ``f`` is a cancel (ours), bare or wrapped by the HTTP client (``ResponseNeverReceived``
    and friends carry the reasons of a request given up): never a dropped connection to retry."""
    if f.check(defer.CancelledError):
        return True
    reasons = getattr(f.value, "reasons", None) or []
    return any(isinstance(r, Failure) and r.check(defer.CancelledError) for r in reasons)


def _tls_failure(f: Failure) -> str | None:
    """What went wrong in the TLS handshake, if ``f`` (bare, or wrapped by the HTTP client as a
    ``ResponseNeverReceived`` and friends) is a TLS error; else None.

    An untrusted certificate ends the handshake with an ``OpenSSL.SSL.Error`` (``certificate
    verify failed``), a wrong name with a ``service_identity`` ``VerificationError``: both are
    facts about the server, so the caller fails at once instead of retrying.
    """
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - no TLS support at all
        return None
    try:
        from service_identity import VerificationError
        kinds: tuple[type[BaseException], ...] = (SSL.Error, VerificationError)
    except ImportError:  # pragma: no cover
        kinds = (SSL.Error,)
    candidates = [f] + [r for r in (getattr(f.value, "reasons", None) or []) if isinstance(r, Failure)]
    for candidate in candidates:
        error = candidate.value
        if not isinstance(error, kinds):
            continue
        if isinstance(error, SSL.Error):
            details = [str(part[-1]) for part in (error.args[0] if error.args and isinstance(error.args[0], list)
                                                  else []) if isinstance(part, tuple) and part]
            text = "; ".join(details) or str(error) or type(error).__name__
        else:
            text = str(error) or type(error).__name__
        hint = ""
        if "certificate" in text or not isinstance(error, SSL.Error):
            hint = (" (the server's certificate is not trusted: self-signed, expired, for another name, or "
                    "from an authority this host does not trust; add that authority to the system's trust "
                    "store or name a bundle in $SSL_CERT_FILE)")
        return f"TLS handshake failed: {text}{hint}"
    return None


def _http_retryable(f: Failure) -> str | None:
    """Why ``f`` is a transfer failure worth retrying, or None.

    :raises defer.CancelledError: if ``f`` is a cancel, however the HTTP client wrapped it.
    """
    from twisted.web._newclient import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived

    if _cancelled(f):
        raise defer.CancelledError()
    if f.check(ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed):
        reasons = getattr(f.value, "reasons", None) or []
        detail = "; ".join(r.getErrorMessage() for r in reasons if isinstance(r, Failure)) or f.getErrorMessage()
        return f"connection dropped ({type(f.value).__name__}: {detail})"
    if f.check(*_RETRYABLE_HTTP):
        return f"{type(f.value).__name__}: {f.getErrorMessage()}"
    return None


class _BodyReceiver(protocol.Protocol):
    """Receives a response body into a :class:`_PoolWriter`, aborting a body that stalls."""

    #: The reasons a body ends whole: ``ResponseDone``, ``PotentialDataLoss`` (set at first use).
    _ends: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, writer: _PoolWriter, done: defer.Deferred[None], clock: IReactorTime, idle: float) -> None:
        self.writer = writer
        self.done = done
        self.clock = clock
        self.idle = idle
        self.received = 0
        self.stalled = False
        self._timer: Any = None

    def connectionMade(self) -> None:
        self.writer.pause = self.transport.pauseProducing  # type: ignore[union-attr]
        self.writer.resume = self.transport.resumeProducing  # type: ignore[union-attr]
        self.writer.on_failure = self._write_failed
        self._arm()

    def _write_failed(self, failure: Failure) -> None:
        """The disk refused a write: end the download now, paused or not, and drop the connection."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self.done.called:
            self.done.errback(failure)
        self.transport.stopProducing()  # type: ignore[union-attr]

    def _arm(self) -> None:
        if self.idle <= 0 or self.done.called:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle)
        else:
            self._timer = self.clock.callLater(self.idle, self._stalled)

    def _stalled(self) -> None:
        if self.done.called:
            return
        self.stalled = True
        if self.writer.paused:
            # We paused it ourselves: the disk is slow, the network is not stalled.
            self._timer = self.clock.callLater(self.idle, self._stalled)
            self.stalled = False
            return
        self.transport.stopProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self._arm()
        self.writer.feed(data)
        if self.writer.failure is not None:
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.done.called:
            return
        ends = _BodyReceiver._ends
        if not ends:  # (imported once: the module proxy of twisted.web's deprecations makes each import cost)
            from twisted.web.client import ResponseDone
            from twisted.web.http import PotentialDataLoss

            ends = _BodyReceiver._ends = (ResponseDone, PotentialDataLoss)
        if reason.check(*ends):
            self.done.callback(None)
        else:
            self.done.errback(reason)


class _EndpointsOnce:
    """An ``IAgentEndpointFactory`` that makes the endpoint of each (scheme, host, port) once and
    gives it again for every later request there.

    Twisted's ``Agent`` asks its factory for an endpoint at every request, even one sent on a pooled
    connection (the endpoint is used only to connect anew): a ``HostnameEndpoint`` each time, its
    host IDNA-checked (~2 % of the reactor's time on many small files). An endpoint connects as often
    as asked, each time anew (a guarded one resolves and checks the address at every connect), so
    keeping it changes nothing else.
    """

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self._made: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:  # noqa: N802 - Twisted's interface
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._made.get(key)
        if endpoint is None:
            endpoint = self._made[key] = self.factory.endpointForURI(uri)
        return endpoint


@implementer(IAgent)
class _CookieAgent:
    """Cookies kept as treq keeps them (one jar for the requests of the repository's agent chain,
    its rules those of :mod:`http.cookiejar`), paid for only where there are some.

    Twisted's ``CookieAgent`` builds a stdlib request for the jar at every request (~7 % of the
    reactor's time over a folder of small files, where no server sets a cookie). Here a request
    is shown to the jar only when it holds a cookie, and a response only when it sets one. Header
    values are read and written as latin-1 (HTTP's bytes as they came), where Twisted's agent
    failed the response on a non-ASCII ``Set-Cookie``.
    """

    def __init__(self, agent: Any, jar: CookieJar) -> None:
        self._agent = agent
        self.cookieJar = jar

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: Any = None) -> defer.Deferred[Any]:  # noqa: N803 - IAgent's name
        seen: urllib.request.Request | None = None
        if len(self.cookieJar) and (headers is None or not headers.hasHeader(b"cookie")):
            seen = urllib.request.Request(uri.decode("ascii"), method=method.decode("ascii"))
            self.cookieJar.add_cookie_header(seen)
            cookie = seen.get_header("Cookie")
            if cookie:
                headers = headers.copy() if headers is not None else Headers()
                headers.setRawHeaders(b"cookie", [cookie.encode("latin-1")])
        d = self._agent.request(method, uri, headers, bodyProducer)
        d.addCallback(self._extract, uri, seen)
        return d

    def _extract(self, response: Any, uri: bytes, seen: urllib.request.Request | None) -> Any:
        raw = response.headers
        if raw.hasHeader(b"set-cookie") or raw.hasHeader(b"set-cookie2"):
            self.cookieJar.extract_cookies(_SetCookies(raw),  # type: ignore[arg-type]
                                           seen or urllib.request.Request(uri.decode("ascii")))
        return response


class _SetCookies:
    """What :meth:`http.cookiejar.CookieJar.extract_cookies` reads of a response: its headers."""

    def __init__(self, headers: Headers) -> None:
        self._headers = headers

    def info(self) -> _SetCookies:
        return self

    def get_all(self, name: str, default: Any = None) -> Any:
        values = self._headers.getRawHeaders(name.encode("ascii"))
        return [v.decode("latin-1") for v in values] if values else default


class HTTPRepository(Repository):
    """An HTTP(S) repository, listed through autoindex pages, read with treq (persistent connections).

    :param guard: an :class:`~ion.services.fetch.netguard.AddressGuard`: every connection (redirects
        too) is made only to a resolved address it allows (a fetch requested by message); None: any.
    """

    def __init__(self, url: RepositoryURL, pool: Any, reactor: Any = None, config: FetchConfig | None = None,
                 *, clock: IReactorTime | None = None, guard: Any = None) -> None:
        super().__init__(url, pool, reactor, config, clock=clock)
        self.guard = guard
        try:
            from treq.client import HTTPClient
        except ImportError as exc:
            raise RepositoryError("http(s):// repositories need treq, which is not installed: "
                                  "pip install treq", url=url.url) from exc
        from twisted.web.client import Agent, HTTPConnectionPool

        self._pool = HTTPConnectionPool(self.reactor, persistent=True)
        # Every request in flight holds a slot (max_connections): keep a connection for each.
        self._pool.maxPersistentPerHost = int(self.config.max_connections)
        # A request that fails on a cached connection the server had closed is sent again at once on
        # a new one (GET and HEAD only): an HTTP/1.0 server such as ``python -m http.server`` closes
        # every connection without saying so. Real failures still go through our retries, logged.
        self._pool.retryAutomatically = True
        if guard is None:
            agent = Agent(self.reactor, connectTimeout=self.config.connect_timeout or None, pool=self._pool)
            # (Twisted's own endpoints, each made once: see _EndpointsOnce.)
            standard = getattr(agent, "_endpointFactory", None)
            if standard is not None and hasattr(standard, "endpointForURI"):
                agent = Agent.usingEndpointFactory(self.reactor, _EndpointsOnce(standard), pool=self._pool)
        else:
            from ion.services.fetch.netguard import GuardedEndpointFactory

            endpoints = GuardedEndpointFactory(self.reactor, guard, self.config.connect_timeout or None)
            agent = Agent.usingEndpointFactory(self.reactor, _EndpointsOnce(endpoints), pool=self._pool)
        self._http = HTTPClient(agent)
        # treq's own chain (cookies, redirects, gzip), made once: treq builds it, and parses the URL
        # with hyperlink, for every request (a third of the reactor's time per small file).
        from twisted.web.client import ContentDecoderAgent, GzipDecoder, RedirectAgent

        self._agent = ContentDecoderAgent(RedirectAgent(_CookieAgent(agent, CookieJar())), [(b"gzip", GzipDecoder)])

    def close(self) -> defer.Deferred[None]:
        return self._pool.closeCachedConnections()

    def version_url(self, platform: str, name: str, version: str) -> str:
        base = f"{self.url.scheme}://{self.url.location}/"
        if self.url.prefix:
            base += self.url.prefix.strip("/") + "/"
        return base + "/".join(quote(p, safe="") for p in (platform, name, version)) + "/"

    async def _request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None) -> Any:
        sent: dict[bytes | str, bytes | str] = {k: v for k, v in (headers or {}).items()}
        try:
            if _URI.fullmatch(url):  # already a URI (what we build): straight to the agents
                raw = {k.encode("ascii") if isinstance(k, str) else k: [v.encode("latin-1") if isinstance(v, str) else v]
                       for k, v in sent.items()}
                d = self._agent.request(method.encode("ascii"), url.encode("ascii"), Headers(raw))
            else:  # treq makes it one (an IRI, a space in a prefix), or says why it cannot
                d = self._http.request(method, url, headers=sent, unbuffered=True, allow_redirects=True)
        except (ValueError, UnicodeError) as exc:  # the URL itself (treq/hyperlink cannot encode its host)
            raise InvalidRequestError(f"{method} {url}: the HTTP client cannot request this URL "
                                      f"({type(exc).__name__}: {exc})", url=url) from None
        if self.config.read_timeout:
            # The client wraps the cancel of a timeout (ResponseNeverReceived([CancelledError])):
            # say it is a timeout (retried), unlike a cancel by our caller (never retried).
            def timed_out(result: Any, timeout: float) -> Failure:
                return Failure(defer.TimeoutError(f"no response within {timeout:g} s"))

            d.addTimeout(self.config.read_timeout, self.clock, onTimeoutCancel=timed_out)
        try:
            return await d
        except AddressNotAllowedError as exc:  # (a redirect's target too): say which request
            raise AddressNotAllowedError(f"{method} {url}: {exc}", url=url, address=exc.address) from None
        except Exception:
            f = Failure()
            tls = _tls_failure(f)
            if tls is not None:  # the server's certificate: trying again changes nothing
                raise CertificateError(f"{method} {url}: {tls}", url=url) from None
            reason = _http_retryable(f)
            if reason is not None:
                raise _Retryable(f"{method} {url}: {reason}") from None
            raise

    @staticmethod
    def _header(response: Any, name: str) -> str | None:
        values = response.headers.getRawHeaders(name)
        if not values:
            return None
        value = values[-1]
        return value.decode("latin-1") if isinstance(value, bytes) else str(value)

    @staticmethod
    def _status(response: Any) -> str:
        """``403 Forbidden``: the code and the server's reason phrase, on one line."""
        phrase = getattr(response, "phrase", b"") or b""
        text = phrase.decode("latin-1", "replace") if isinstance(phrase, bytes) else str(phrase)
        text = "".join(ch if ch.isprintable() else "?" for ch in " ".join(text.split()))[:80]  # the server's words
        return f"{int(response.code)} {text}".rstrip()

    def _check_status(self, response: Any, url: str, what: str) -> None:
        """Nothing for a 200; else the error the status means. A 408, 429 or 5xx gateway/server
        error is :class:`_Retryable` (tried again with the retry policy); other 4xx are not."""
        code = int(response.code)
        if code == 200:
            return
        status = self._status(response)
        if code == 404 or code == 410:
            raise NotFoundError(f"{what}: {url} answered HTTP {status} (not found)", url=url)
        if code in (401, 403):
            raise AccessDeniedError(f"{what}: access denied to {url} (HTTP {status})", url=url)
        if code in _RETRYABLE_STATUS:
            raise _Retryable(f"{url} answered HTTP {status}")
        raise RepositoryError(f"{what}: {url} answered HTTP {status}", url=url)

    async def _discard(self, response: Any) -> None:
        """Read and drop a body (an error page, a HEAD), so the connection can be used again."""
        import treq

        try:
            await treq.collect(response, lambda data: None)
        except Exception:
            pass

    async def _checked(self, response: Any, url: str, what: str) -> None:
        if int(response.code) != 200:
            await self._discard(response)
        self._check_status(response, url, what)

    async def _content(self, response: Any, limit: int, url: str) -> bytes:
        import treq

        body = bytearray()

        def collect(data: bytes) -> None:
            body.extend(data)
            if len(body) > limit:
                raise RepositoryError(f"{url} is larger than {limit} bytes: not an index page or sidecar", url=url)

        try:
            await treq.collect(response, collect)
        except RepositoryError:
            raise
        except Exception:
            reason = _http_retryable(Failure())
            if reason is not None:
                raise _Retryable(f"GET {url}: {reason}") from None
            raise
        return bytes(body)

    async def _list(self, platform: str, name: str, version: str, describe: bool = True) -> list[RemoteFile]:
        top = self.version_url(platform, name, version)
        names: list[tuple[str, str]] = []  # (relative path, url)
        visited: set[str] = set()

        async def walk(folder_url: str, rel: str, depth: int) -> None:
            if folder_url in visited or depth > _MAX_LISTING_DEPTH:
                return
            visited.add(folder_url)
            response, page = await self._slot(lambda: self._index_page(folder_url, depth))
            ctype = (self._header(response, "content-type") or "").lower()
            if ctype and "html" not in ctype:
                raise RepositoryError(f"{folder_url} is not an index page (Content-Type {ctype}); an HTTP "
                                      "repository needs autoindex listings", url=folder_url)
            charset = re.search(r"charset=([\w-]+)", ctype)
            encoding = charset.group(1) if charset else "utf-8"
            if len(page) > INLINE_INDEX_BYTES:
                # (~2.7 ms per 1,000 entries: see INLINE_INDEX_BYTES.)
                files, folders = await self.pool.run(_parse_index_page, page, encoding, folder_url)
            else:
                files, folders = _parse_index_page(page, encoding, folder_url)
            for fname in files:
                names.append((rel + fname, folder_url + quote(fname, safe="")))
            for sub in folders:
                await walk(folder_url + quote(sub, safe="") + "/", rel + sub + "/", depth + 1)

        await walk(top, "", 0)
        if not describe:  # each file's GET will say its size, Content-MD5 and ETag
            return [RemoteFile(path=r, url=u, size=None, source=u) for r, u in names]
        semaphore = defer.DeferredSemaphore(int(self.config.listing_concurrency))

        async def head(rel: str, url: str) -> RemoteFile:
            return await semaphore.run(lambda: self._slot(lambda: self._head(rel, url)))

        return await _gather([defer.Deferred.fromCoroutine(head(r, u)) for r, u in names])

    async def _index_page(self, folder_url: str, depth: int) -> tuple[Any, bytes]:
        """The response and body of a folder's index page."""
        response = await self._request("GET", folder_url)
        if int(response.code) == 404 and depth == 0:
            await self._discard(response)
            raise NotFoundError(f"no files under {folder_url} (HTTP 404)", url=folder_url)
        await self._checked(response, folder_url, "listing")
        return response, await self._content(response, 16 << 20, folder_url)

    def _describe(self, rel: str, url: str, response: Any, size: int | None) -> RemoteFile:
        checksums: list[Checksum] = []
        md5 = self._header(response, "content-md5")
        if md5:
            hexmd5 = _hex_of_content_md5(md5)
            if hexmd5 is None:
                raise RepositoryError(f"{url} sent a Content-MD5 that is not an md5: {md5!r}", url=url)
            checksums.append(Checksum("md5", hexmd5))
        etag = self._header(response, "etag")
        modified = self._header(response, "last-modified")
        if etag and not etag.startswith("W/"):
            marker: str | None = f"etag:{etag}"
        elif modified:
            marker = f"modified:{modified}:size:{size}"
        else:
            marker = None
        return RemoteFile(path=rel, url=url, size=size, checksums=tuple(checksums), marker=marker, source=url)

    async def _head(self, rel: str, url: str) -> RemoteFile:
        # Not retried on its own: list_version retries the whole listing.
        response = await self._request("HEAD", url)
        await self._discard(response)
        if int(response.code) in (405, 501):
            return RemoteFile(path=rel, url=url, size=None, source=url)  # no HEAD: learnt at download
        self._check_status(response, url, "listing")
        length = self._header(response, "content-length")
        size = int(length) if length and length.isdigit() else None
        return self._describe(rel, url, response, size)

    async def _read_small(self, remote: RemoteFile, limit: int) -> bytes:
        response = await self._request("GET", remote.source)
        await self._checked(response, remote.source, "reading")
        return await self._content(response, limit, remote.source)

    async def _transfer(self, remote: RemoteFile, sink: _Sink, progress: Callable[[int], None]) -> RemoteFile:
        url = remote.source
        response = await self._request("GET", url)
        await self._checked(response, url, "downloading")
        length = self._header(response, "content-length")
        size = int(length) if length and length.isdigit() else remote.size
        got = self._describe(remote.path, remote.url, response, size)
        # Checksums from the listing stay (a sidecar); the GET's own headers describe these bytes.
        checksums = {c.algorithm: c for c in remote.checksums}
        checksums.update({c.algorithm: c for c in got.checksums})
        got = replace(got, checksums=tuple(checksums.values()), marker=got.marker or remote.marker, source=url)
        sink.want_md5("md5" in checksums, sha256_checked="sha256" in checksums)  # (no I/O: no pool job)
        writer = _PoolWriter(self.pool, sink, self.config, progress=progress)
        done: defer.Deferred[None] = defer.Deferred()
        receiver = _BodyReceiver(writer, done, self.clock, float(self.config.read_timeout))
        response.deliverBody(receiver)
        try:
            await done
        except BaseException as exc:
            # Cancelled, dropped or stalled: stop reading, let the writes in flight end.
            receiver.transport.stopProducing()  # type: ignore[union-attr]
            write_failure = writer.failure
            await writer.drain()
            if write_failure is not None:
                write_failure.raiseException()  # the disk, not the network: no retry
            if receiver.stalled:
                raise _Retryable(f"GET {url}: no data for {self.config.read_timeout:g} s") from None
            if isinstance(exc, Exception):
                reason = _http_retryable(Failure(exc))  # (a cancel is raised as CancelledError)
                if reason is not None:
                    raise _Retryable(f"GET {url}: {reason} after {receiver.received} bytes") from None
            raise
        complete = size is None or receiver.received == size
        await writer.finish(close=complete)
        if not complete:
            raise _Retryable(f"GET {url}: the body ended after {receiver.received} of {size} bytes")
        return replace(got, size=receiver.received)


# -- s3: -------------------------------------------------------------------------------------------
_REFUSED_CREDENTIALS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                                  "TokenRefreshRequired", "InvalidClientTokenId", "AuthorizationHeaderMalformed"})
_DENIED = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"})
_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})


def _import_boto3() -> Any:
    try:
        import boto3  # noqa: F401
        import botocore  # noqa: F401
    except ImportError as exc:
        raise RepositoryError("s3:// repositories need boto3, which is not installed: "
                              "pip install 'ioncore[s3]' (or pip install boto3)") from exc
    return boto3


def _body_readinto(body: Any) -> Callable[[memoryview], int]:
    """``readinto(buffer) -> n`` for a GetObject body, the fastest that keeps botocore's checks.

    botocore's ``StreamingBody.read(n)`` goes through urllib3 and ``http.client``,
    which allocate a fresh buffer for every piece and copy it once more into the
    ``bytes`` returned: on a fast link that costs as much as the sha256. A plain
    body (botocore has no checksum of its own to compute on it, and it is never
    decoded: botocore asks urllib3 for the raw bytes) is read straight from the
    ``http.client`` response under it, into the sink's buffer; ``http.client``
    still stops at ``Content-Length`` and the caller checks that all of it came.
    A body botocore checksums (a ``StreamingChecksumBody``), or another HTTP stack
    under it, is read through its own ``readinto`` (or ``read``).
    """
    from botocore.response import StreamingBody

    if type(body) is StreamingBody:
        raw = getattr(body, "_raw_stream", None)
        fp = getattr(raw, "_fp", None)
        if isinstance(fp, http.client.HTTPResponse) and not getattr(raw, "_has_decoded_content", False):
            direct: Callable[[memoryview], int] = fp.readinto
            return direct
    readinto = getattr(body, "readinto", None)
    if callable(readinto):
        return readinto

    def via_read(buffer: memoryview) -> int:
        data = body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    return via_read


class _S3Clients:
    """The signed client (None without credentials) and the anonymous one, made once, in the pool."""

    def __init__(self, config: FetchConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._made = False
        self.signed: Any = None
        self.unsigned: Any = None
        #: Set when the credentials were refused as such: later calls go anonymous at once.
        self.credentials_refused = False

    def get(self) -> tuple[Any, Any]:
        with self._lock:
            if not self._made:
                boto3 = _import_boto3()
                from botocore import UNSIGNED
                from botocore.config import Config

                # Requests in flight are at most max_connections (the repository's slots).
                options = dict(retries={"max_attempts": 2, "mode": "standard"},
                               max_pool_connections=min(int(self.config.s3_max_connections),
                                                        int(self.config.max_connections)),
                               connect_timeout=self.config.connect_timeout or 60,
                               read_timeout=self.config.read_timeout or 60)
                session = boto3.session.Session()
                try:
                    credentials = session.get_credentials()
                except Exception:  # a broken profile: anonymous it is
                    credentials = None
                if credentials is not None:
                    self.signed = session.client("s3", config=Config(**options))
                self.unsigned = session.client("s3", config=Config(signature_version=UNSIGNED, **options))
                self._made = True
            return self.signed, self.unsigned

    def close(self) -> None:
        """Close the clients' connections (blocking)."""
        with self._lock:
            for client in (self.signed, self.unsigned):
                if client is not None:
                    client.close()
            self.signed = self.unsigned = None
            self._made = False


class S3Repository(Repository):
    """An S3 bucket (and prefix), through boto3 in the blocking pool; anonymous when it must."""

    def __init__(self, url: RepositoryURL, pool: Any, reactor: Any = None, config: FetchConfig | None = None,
                 *, clock: IReactorTime | None = None) -> None:
        super().__init__(url, pool, reactor, config, clock=clock)
        self.bucket = url.location
        self.clients = _S3Clients(self.config)
        #: Calls that were answered anonymously (after no or refused credentials).
        self.anonymous_calls = 0

    def version_url(self, platform: str, name: str, version: str) -> str:
        return f"s3://{self.bucket}/{self._prefix(platform, name, version)}"

    def close(self) -> defer.Deferred[None]:
        return self.pool.run(self.clients.close)

    def _prefix(self, platform: str, name: str, version: str) -> str:
        parts = [p for p in (self.url.prefix.strip("/"), platform, name, version) if p]
        return "/".join(parts) + "/"

    # -- calls (blocking: in the pool) ------------------------------------------------------------------
    def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        """``client.<method>(**kwargs)`` signed, then anonymously if credentials are missing or refused."""
        # The clients first: making them checks that boto3 is there, with the hint to install
        # ioncore[s3]; a botocore import before it would fail with a bare "No module named".
        signed, unsigned = self.clients.get()
        from botocore.exceptions import (
            CredentialRetrievalError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        signed_tried = False
        if signed is not None and not self.clients.credentials_refused:
            signed_tried = True
            try:
                return self._translate(getattr(signed, method), url, kwargs)
            except _Refused as exc:
                if exc.credentials:
                    self.clients.credentials_refused = True
                self._log.info("{url}: refused with the credentials found ({code}); trying anonymously",
                               url=url, code=exc.code)
            except (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError):
                self.clients.credentials_refused = True
        try:
            result = self._translate(getattr(unsigned, method), url, kwargs)
        except _Refused as exc:
            if signed_tried:
                how = "with the credentials found, and anonymously"
            elif signed is not None:
                how = "anonymously (the credentials found were refused earlier)"
            else:
                how = "anonymously (no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID)"
            raise AccessDeniedError(f"access denied to {url} ({exc.code}) {how}", url=url) from None
        self.anonymous_calls += 1
        return result

    def _translate(self, fn: Callable[..., Any], url: str, kwargs: Mapping[str, Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {}) or {}
            code = str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code == "NoSuchBucket":
                raise BucketNotFoundError(f"bucket {self.bucket!r} does not exist (listing {url})", url=url) from None
            if code in _REFUSED_CREDENTIALS:
                raise _Refused(code, exc, credentials=True) from None
            if code in _DENIED:
                raise _Refused(code, exc, credentials=False) from None
            if code in _NOT_FOUND:
                raise NotFoundError(f"{url} is not there ({code})", url=url) from None
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (500, 502, 503, 504) or code in ("SlowDown", "InternalError", "ServiceUnavailable"):
                raise _Retryable(f"{url}: {code} {err.get('Message', '')}".strip()) from None
            raise RepositoryError(f"{url}: S3 error {code}: {err.get('Message', '')}".rstrip(": "), url=url) from None
        except BotoCoreError as exc:
            from botocore.exceptions import (
                ConnectionClosedError,
                CredentialRetrievalError,
                EndpointConnectionError,
                IncompleteReadError,
                NoCredentialsError,
                PartialCredentialsError,
                ReadTimeoutError,
                ResponseStreamingError,
            )
            from botocore.exceptions import ConnectTimeoutError as BotoConnectTimeout

            if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
                raise
            if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError,
                                BotoConnectTimeout, IncompleteReadError, ResponseStreamingError)):
                raise _Retryable(f"{url}: {exc}") from None
            raise RepositoryError(f"{url}: {exc}", url=url) from None

    def _list_blocking(self, prefix: str) -> list[RemoteFile]:
        files: list[RemoteFile] = []
        token: str | None = None
        url = f"s3://{self.bucket}/{prefix}"
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list_objects_v2", url, **kwargs)
            for obj in page.get("Contents", []) or []:
                key = obj["Key"]
                rel = key[len(prefix):]
                if not rel or rel.endswith("/"):
                    continue  # the folder itself, or a "folder" placeholder
                if any(p in ("", ".", "..") for p in rel.split("/")):
                    self._log.warn("{url}: skipped key {key!r}, which is no usable path", url=url, key=key)
                    continue
                etag = str(obj.get("ETag", "")).strip('"')
                files.append(RemoteFile(path=rel, url=f"s3://{self.bucket}/{key}", size=int(obj.get("Size", 0)),
                                        checksums=self._etag_checksums(etag), marker=f"etag:{etag}" if etag else None,
                                        source=key))
            if not page.get("IsTruncated"):
                return files
            token = page.get("NextContinuationToken")
            if not token:
                return files

    @staticmethod
    def _etag_checksums(etag: str) -> tuple[Checksum, ...]:
        # A single-part upload's ETag is the md5 of the content; a multipart one ("<hex>-<parts>") is not.
        return (Checksum("md5", etag.lower()),) if _HEX32.match(etag) else ()

    def _open_blocking(self, key: str, url: str) -> tuple[Any, int | None, str]:
        response = self._call("get_object", url, Bucket=self.bucket, Key=key)
        length = response.get("ContentLength")
        return response["Body"], int(length) if length is not None else None, str(response.get("ETag", "")).strip('"')

    def _read_step(self, sink: _Sink, body: Any, limit: int, chunk: int, url: str) -> int:
        try:
            return sink.fill_from(_body_readinto(body), limit, chunk)
        except Exception as exc:
            from botocore.exceptions import BotoCoreError

            try:
                from urllib3.exceptions import HTTPError as Urllib3Error
            except ImportError:  # pragma: no cover
                Urllib3Error = OSError  # type: ignore[misc,assignment]  # noqa: N806
            if isinstance(exc, (BotoCoreError, Urllib3Error, http.client.HTTPException, ConnectionError,
                                TimeoutError)) and \
                    not isinstance(exc, (PermissionError, FileNotFoundError)):
                raise _Retryable(f"{url}: connection dropped ({type(exc).__name__}: {exc})") from None
            raise

    @staticmethod
    def _close_body(body: Any) -> None:
        try:
            raw: Any = getattr(body, "_raw_stream", None)
            fp = getattr(raw, "_fp", None)
            if isinstance(fp, http.client.HTTPResponse) and fp.isclosed() and fp.length == 0:
                # Read to its end under urllib3 (_body_readinto): its connection can serve again.
                raw.release_conn()
            body.close()
        except Exception:
            pass

    # -- the interface --------------------------------------------------------------------------------
    async def _list(self, platform: str, name: str, version: str, describe: bool = True) -> list[RemoteFile]:
        prefix = self._prefix(platform, name, version)
        return await self._slot(lambda: self.pool.run(self._list_blocking, prefix))

    async def _read_small(self, remote: RemoteFile, limit: int) -> bytes:
        def read() -> bytes:
            body, _size, _etag = self._open_blocking(remote.source, remote.url)
            try:
                return bytes(body.read(limit))
            finally:
                self._close_body(body)

        return await self.pool.run(read)

    def _first_step(self, remote: RemoteFile, sink: _Sink, step: int, chunk: int) -> tuple[Any, int | None, str, int]:
        """GET the object and read its first ``step`` bytes, in one pool job; an object that fits
        (a small file) is read to its end and its body closed here: ``(None, size, etag, n)``.
        Else ``(body, size, etag, n)``: the caller reads on."""
        body, size, etag = self._open_blocking(remote.source, remote.url)
        try:
            sink.expected = size
            sink.want_md5(bool(self._etag_checksums(etag)))
            n = self._read_step(sink, body, step, chunk, remote.url)
        except BaseException:
            self._close_body(body)
            raise
        if n < step:  # fill_from stops short only at the end of the body
            self._close_body(body)
            if size is None or n == size:
                sink.close()  # all of it: no pool job of its own for that
            return None, size, etag, n
        return body, size, etag, n

    async def _transfer(self, remote: RemoteFile, sink: _Sink, progress: Callable[[int], None]) -> RemoteFile:
        chunk = int(self.config.chunk_size)
        step = chunk * 8
        body, size, etag, done = await self.pool.run(self._first_step, remote, sink, step, chunk)
        if done:
            progress(done)
        if body is not None:
            try:
                while True:
                    n = await self.pool.run(self._read_step, sink, body, step, chunk, remote.url)
                    if not n:
                        break
                    done += n
                    progress(done)
            finally:
                await self.pool.run(self._close_body, body)
        if size is not None and done != size:
            raise _Retryable(f"{remote.url}: the body ended after {done} of {size} bytes")
        # What the GET answered describes these bytes (the object may have changed since the listing).
        checksums = {c.algorithm: c for c in remote.checksums if c.algorithm != "md5"}
        checksums.update({c.algorithm: c for c in self._etag_checksums(etag)})
        return replace(remote, size=size if size is not None else done, checksums=tuple(checksums.values()),
                       marker=f"etag:{etag}" if etag else remote.marker)


class _Refused(Exception):
    """S3 refused a call (internal: leads to the anonymous retry, then AccessDeniedError)."""

    def __init__(self, code: str, cause: Exception, *, credentials: bool) -> None:
        super().__init__(code)
        self.code = code
        self.cause = cause
        self.credentials = credentials


# -- factory ---------------------------------------------------------------------------------------
_KINDS: dict[str, type[Repository]] = {"file": FileRepository, "http": HTTPRepository, "https": HTTPRepository,
                                       "s3": S3Repository}


def repository_for(url: RepositoryURL | str, pool: Any, reactor: Any = None,
                   config: FetchConfig | Mapping[str, Any] | None = None, *,
                   clock: IReactorTime | None = None, guard: Any = None) -> Repository:
    """The repository for ``url`` (a :class:`RepositoryURL`, or a string parsed with
    :func:`~ion.services.records.deployer.parse_repository_url`).

    :param guard: for ``http(s):``, the :class:`~ion.services.fetch.netguard.AddressGuard` its
        connections must pass (a fetch requested by message); None: no restriction.

    :raises FetchError: for an unknown scheme.
    """
    if isinstance(url, str):
        try:
            url = parse_repository_url(url)
        except ValueError as exc:
            raise FetchError(str(exc), url=str(url)) from None
    kind = _KINDS.get(url.scheme)
    if kind is None:
        raise FetchError(f"unknown repository scheme {url.scheme!r} in {url.url} (s3, http, https, file)", url=url.url)
    cfg = config if isinstance(config, FetchConfig) else FetchConfig.from_config(config)
    if kind is HTTPRepository:
        return HTTPRepository(url, pool, reactor, cfg, clock=clock, guard=guard)
    return kind(url, pool, reactor, cfg, clock=clock)
