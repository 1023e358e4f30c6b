# -*- test-case-name: tests.services.fetch.test_core -*-
"""The fetch of one cache entry, independent of messaging (DESIGN §8, "Fetch").

:meth:`Fetcher.fetch` takes a :class:`FetchRequest` (repository URL, platform,
name, version, unpack, keep_updated, optional sha256) and:

1. looks the entry up in the cache: a hit is done, unless ``keep_updated``
   and the remote version markers changed since it was fetched;
2. takes the entry's lock (one fetch per entry in this process and across
   processes: the cache does the locking), then looks again, since whoever
   held the lock may just have published it;
3. lists the version folder and downloads every file into a staging folder
   of its own (``Cache.new_staging()``), ``max_connections`` files at a time
   (within the repository's own bound on requests in flight), verified as it
   streams in (the repository's checksums, then the item's ``sha256``); the
   listing describes each file (an HTTP ``HEAD`` per file) only when
   ``keep_updated`` compares it with the entry;
4. with ``unpack``, extracts each archive into the content staging folder
   (an archive in a sub-folder into that sub-folder; a file that is no
   archive is kept as it is), through the injected unpack function;
5. publishes the content atomically through the cache, and
6. releases the lock and removes the staging folders on every path:
   success, error or cancellation.

Collaborators are injected, so the core runs with the local
:class:`~ion.services.cache.core.Cache` and the unpack core in process
(:class:`LocalCache`, :func:`local_unpack`) or with the Cache and Unpack
services over messages (:class:`RemoteCache`, :func:`remote_unpack`).

**What the entry remembers of the remote**: each file's
:attr:`~ion.services.cache.entry.FileMeta.remote_checksum` holds tokens
``<algorithm>:<hex> marker:<...> size:<n>`` describing the remote file it
came from, plus ``from:<path>`` for files extracted from an archive. That is
what ``keep_updated`` compares with a fresh listing (:func:`entry_is_current`).
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, Self, cast
from urllib.parse import quote, unquote

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ion.services.cache.core import Cache, sha256_file
from ion.services.cache.entry import EntryInfo, EntryKey, FileMeta, repo_id
from ion.services.cache.errors import InvalidKeyError
from ion.services.fetch.errors import ChecksumMismatchError, FetchError, InvalidRequestError
from ion.services.fetch.repository import Downloaded, FetchConfig, RemoteFile, Repository, repository_for
from ion.services.records import deployer as records
from ion.services.records.deployer import DeploymentItem, FetchResult, RepositoryURL

__all__ = [
    "FetchRequest",
    "FetchResult",
    "FetchProgress",
    "Fetcher",
    "CacheAPI",
    "LocalCache",
    "RemoteCache",
    "UnpackFn",
    "local_unpack",
    "remote_unpack",
    "describe_origin",
    "entry_is_current",
    "refetch_request",
    "STATES",
]

#: What :meth:`Fetcher.fetch` says it did.
STATES = ("cached", "downloaded", "updated")

#: What an :data:`UnpackFn` reports: None when the file is no archive (left alone); else
#: ``{path: (size, sha256)}`` of the regular files it extracted, relative to the target, as far
#: as it knows them (a file it does not name is hashed from disk).
Unpacked = Mapping[str, tuple[int, str]] | None
#: ``unpack(archive, target)``: extract the archive into ``target``; fires with :data:`Unpacked`.
#: Raises for an unsafe, broken or over-limit archive.
UnpackFn = Callable[[Path, Path], "Awaitable[Unpacked] | defer.Deferred[Unpacked]"]
#: Called with each :class:`FetchProgress`.
ProgressFn = Callable[["FetchProgress"], None]


# -- requests, results, progress ---------------------------------------------------------------------
@dataclass(frozen=True)
class FetchRequest(records.FetchRequest):
    """One dependency version to have in the cache (:class:`ion.services.records.deployer.FetchRequest`,
    its keys checked as a deployment file's are), naming its cache entry."""

    @classmethod
    def from_wire(cls, data: Any, *, base_dir: Path | None = None) -> Self:
        """Read a request from message content (:meth:`DeploymentItem.to_dict` or :meth:`to_wire`).

        A relative ``file:`` URL is resolved against ``base_dir`` (or ``data["base_dir"]``).

        :raises InvalidRequestError: naming the key that is missing or wrong.
        """
        try:
            request = super().from_wire(data, base_dir=base_dir)
        except records.RecordError as exc:
            raise InvalidRequestError(str(exc), url=exc.url) from None
        request.key  # noqa: B018 - validates the components now, as a 400
        return request

    @property
    def key(self) -> EntryKey:
        """The cache entry (``unpack: false`` is another entry than ``unpack: true``).

        :raises InvalidRequestError: for a component that cannot name a cache folder.
        """
        try:
            return EntryKey(repo_id(self.repo_url), self.platform, self.name, self.version, self.unpack)
        except InvalidKeyError as exc:
            raise InvalidRequestError(f"{self.describe()}: {exc}") from None


@dataclass(frozen=True)
class FetchProgress:
    """Where a fetch stands.

    :ivar phase: ``lookup``, ``checking`` (keep_updated), ``waiting`` (for the lock),
        ``listing``, ``downloading``, ``unpacking``, ``publishing`` or ``done``.
    :ivar file: the file concerned (downloading, unpacking).
    :ivar done: bytes done of ``file`` (downloading).
    :ivar total: its size, when known.
    :ivar state: with ``done``: cached, downloaded or updated.
    """

    key: EntryKey
    phase: str
    file: str | None = None
    done: int | None = None
    total: int | None = None
    state: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.key.name, "version": self.key.version, "platform": self.key.platform,
                "unpack": self.key.unpack, "phase": self.phase, "file": self.file, "bytes": self.done,
                "total": self.total, "state": self.state}


# -- the remote origin of an entry's files ---------------------------------------------------------------
@dataclass(frozen=True)
class _Origin:
    path: str
    marker: str | None
    size: int | None
    checksum: str | None


def describe_origin(remote: RemoteFile, got: Downloaded, *, extracted: bool) -> str:
    """The ``remote_checksum`` text recorded for a file that came from ``remote``."""
    tokens = [str(c) for c in got.verified[:1]] or [f"sha256:{got.sha256}"]
    marker = got.marker or remote.marker
    if marker:
        tokens.append("marker:" + quote(marker, safe=""))
    tokens.append(f"size:{got.size}")
    if extracted:
        tokens.append("from:" + quote(remote.path, safe=""))
    return " ".join(tokens)


def _origins(info: EntryInfo) -> dict[str, _Origin] | None:
    """The remote files an entry was made from, as its ``remote_checksum`` texts say (None: unknown)."""
    found: dict[str, _Origin] = {}
    for rel, meta in info.files.items():
        if not meta.remote_checksum:
            return None
        values: dict[str, str] = {}
        checksum = None
        for token in meta.remote_checksum.split():
            kind, _, value = token.partition(":")
            if kind in ("md5", "sha256") and checksum is None:
                checksum = token
            else:
                values[kind] = unquote(value)
        path = values.get("from", rel)
        size = int(values["size"]) if values.get("size", "").isdigit() else None
        found[path] = _Origin(path, values.get("marker"), size, checksum)
    return found


def entry_is_current(info: EntryInfo, listing: list[RemoteFile]) -> bool:
    """Whether an entry still matches the version folder's listing (``keep_updated``).

    The same files, each with the same version marker (or, without markers, the
    same checksum, else the same size). An entry that does not say where its
    files came from counts as outdated.
    """
    recorded = _origins(info)
    if recorded is None or set(recorded) != {f.path for f in listing}:
        return False
    for f in listing:
        r = recorded[f.path]
        if f.marker and r.marker:
            if f.marker != r.marker:
                return False
        elif f.checksum is not None and r.checksum is not None and f.checksum.algorithm == r.checksum.split(":")[0]:
            if str(f.checksum) != r.checksum:
                return False
        elif f.size is not None and r.size is not None and f.size != r.size:
            return False
    return True


def refetch_request(key: EntryKey, url: str | None) -> FetchRequest:
    """The request that fetches the entry ``key`` again from ``url``, the version folder its ``.entry``
    recorded (``Repository.version_url``: a path for ``file:``, ``http(s)://.../<platform>/<name>/<version>/``,
    ``s3://bucket/prefix/.../``), as the cache's verifier heals a quarantined entry (issue 17 §3).

    The repository is the URL without its last three parts, and must name the entry's repository
    folder (``repo_id``): a URL that does not is refused, never fetched from.

    :raises InvalidRequestError: no URL, or one that does not lead back to the entry's repository.
    """
    if not url:
        raise InvalidRequestError(f"entry {key}: its .entry names no repository URL to fetch it from")
    parts = (key.platform, key.name, key.version)
    candidates: list[str] = []
    if "://" not in url:  # a file: repository's folder
        folder = Path(url)
        if folder.is_absolute() and folder.parts[-3:] == parts:
            candidates.append("file://" + quote(str(folder.parents[2])))
    else:
        for tail in ("/".join(quote(p, safe="") for p in parts) + "/", "/".join(parts) + "/"):
            if url.endswith("/" + tail):
                candidates.append(url[: -len(tail)].rstrip("/"))
    for candidate in candidates:
        try:
            repository = records.parse_repository_url(candidate)
            if repo_id(repository.wire_url) == key.repo_id:
                return FetchRequest(repository, key.platform, key.name, key.version, key.unpack,
                                    label="cache verify (refetch)")
        except (ValueError, InvalidKeyError):
            continue
    raise InvalidRequestError(f"entry {key}: its recorded URL {url} does not name a version folder of its "
                              f"repository ({key.repo_id}); not fetching from it", url=url)


# -- collaborators ---------------------------------------------------------------------------------------
class CacheAPI(Protocol):
    """What the Fetcher needs of the cache (all return Deferreds or awaitables)."""

    def lookup(self, key: EntryKey) -> Any: ...

    def lock(self, key: EntryKey) -> Any: ...

    def unlock(self, lock: Any) -> Any: ...

    def new_staging(self) -> Any: ...

    def discard_staging(self, path: Path) -> Any: ...

    def publish(self, key: EntryKey, lock: Any, staging: Path, files: Mapping[str, FileMeta], url: str) -> Any: ...


class LocalCache:
    """:class:`CacheAPI` over a :class:`~ion.services.cache.core.Cache` in this process."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def lookup(self, key: EntryKey) -> Any:
        return self.cache.lookup(key)

    def lock(self, key: EntryKey) -> Any:
        # The fetcher's lookup after the lock is made in the job that takes it (see Fetcher._fetch).
        return self.cache.lock(key, lookup=True)

    def unlock(self, lock: Any) -> Any:
        return self.cache.unlock(lock)

    def new_staging(self) -> Any:
        return self.cache.new_staging()

    def discard_staging(self, path: Path) -> Any:
        return self.cache.discard_staging(path)

    def publish(self, key: EntryKey, lock: Any, staging: Path, files: Mapping[str, FileMeta], url: str) -> Any:
        # Released in the publish's own pool job (the fetcher's unlock then does nothing).
        return self.cache.publish(key, staging, files, lock=lock, url=url, release=True)


class RemoteCache:
    """:class:`CacheAPI` over a :class:`~ion.services.cache.service.CacheClient` (the Cache service).

    A lock held over messages has a lease: it is renewed every third of it
    while the fetch runs (``clock``), and released by :meth:`unlock`.
    """

    _log = Logger()

    def __init__(self, client: Any, clock: IReactorTime, *, wait: float | None = None) -> None:
        self.client = client
        self.clock = clock
        self.wait = wait
        self._renewals: dict[str, task.LoopingCall] = {}

    def lookup(self, key: EntryKey) -> Any:
        return self.client.lookup(key)

    @defer.inlineCallbacks
    def lock(self, key: EntryKey) -> Any:
        lock = yield (self.client.lock(key, timeout=self.wait) if self.wait is not None else self.client.lock(key))
        loop = task.LoopingCall(self._renew, lock)
        loop.clock = self.clock
        self._renewals[lock.token] = loop
        loop.start(max(1.0, lock.lease / 3), now=False).addErrback(
            lambda f: self._log.warn("renewing the lock of {key} failed: {e}", key=str(key), e=f.getErrorMessage()))
        return lock

    def _renew(self, lock: Any) -> Any:
        # A renewal that fails for a passing reason (a timeout, a busy service) is
        # tried again at the next tick; only a lock the service no longer knows ends it.
        from ion.services.cache.errors import LockNotHeldError, UnknownLockError

        def failed(failure: Any) -> Any:
            if failure.check(LockNotHeldError, UnknownLockError):
                return failure
            self._log.warn("renewing the lock of {key} failed, retrying: {e}", key=str(lock.key),
                           e=failure.getErrorMessage())
            return None

        return defer.maybeDeferred(self.client.renew, lock).addErrback(failed)

    def unlock(self, lock: Any) -> Any:
        loop = self._renewals.pop(lock.token, None)
        if loop is not None and loop.running:
            loop.stop()
        return self.client.unlock(lock)

    def new_staging(self) -> Any:
        return self.client.new_staging()

    def discard_staging(self, path: Path) -> Any:
        return self.client.discard_staging(path)

    def publish(self, key: EntryKey, lock: Any, staging: Path, files: Mapping[str, FileMeta], url: str) -> Any:
        return self.client.publish(lock, staging, files, url=url)


def as_cache_api(cache: Any, clock: IReactorTime | None = None) -> CacheAPI:
    """A :class:`Cache` becomes a :class:`LocalCache`, a ``CacheClient`` a :class:`RemoteCache`;
    anything else is taken to implement :class:`CacheAPI`."""
    if isinstance(cache, Cache):
        return LocalCache(cache)
    from ion.services.cache.service import CacheClient

    if isinstance(cache, CacheClient):
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        return RemoteCache(cache, clock)
    return cast(CacheAPI, cache)


def local_unpack(pool: Any, limits: Any = None) -> UnpackFn:
    """An :data:`UnpackFn` running the unpack core in ``pool`` (``limits``: its :class:`Limits`)."""
    from ion.services.unpack import core as unpack_core

    def run(archive: Path, target: Path) -> defer.Deferred[Unpacked]:
        # The files were hashed as they were written: the cache records those digests.
        d = pool.run(unpack_core.unpack, archive, target, limits)
        d.addCallback(lambda result: None if result.extracted is None else result.extracted.files)
        return d

    return run


def remote_unpack(client: Any) -> UnpackFn:
    """An :data:`UnpackFn` asking the Unpack service (an ``UnpackClient``)."""

    def run(archive: Path, target: Path) -> defer.Deferred[Unpacked]:
        # The service's answer names no digests (it may be many files): they are read from disk.
        d = client.unpack(archive, target)
        d.addCallback(lambda content: None if content.get("kept", False) else {})
        return d

    return run


# -- blocking steps (in the pool) ------------------------------------------------------------------------
def _regular_files(top: Path) -> dict[str, os.stat_result]:
    out: dict[str, os.stat_result] = {}
    for dirpath, _dirnames, filenames in os.walk(top, followlinks=False):
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                out[os.path.relpath(full, top).replace(os.sep, "/")] = st
    return out


def _describe_new(top: Path, known: set[str], origin: str, chunk: int,
                  digests: Mapping[str, tuple[int, str]]) -> dict[str, FileMeta]:
    """FileMeta of every regular file under ``top`` not in ``known``: its digest from ``digests``
    (hashed as it was extracted) when that names it with its size, else hashed from disk."""
    metas: dict[str, FileMeta] = {}
    for rel, st in _regular_files(top).items():
        if rel not in known:
            size, digest = digests.get(rel, (-1, ""))
            if size != st.st_size:
                digest = sha256_file(top / rel, chunk)
            metas[rel] = FileMeta(st.st_size, origin, digest)
    return metas


def _keep(src: Path, dest: Path) -> None:
    """Move a file that is no archive into the content folder, never over something there."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(dest):
        raise FetchError(f"{dest.name}: an archive of the same version already extracted a file of that name")
    os.rename(src, dest)


def _mkdirs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


async def _each(items: list[RemoteFile], fn: Callable[[RemoteFile], Coroutine[Any, Any, None]], at_once: int) -> None:
    """``fn(item)`` for every item, ``at_once`` at a time. On the first failure no other item is
    started, those running are cancelled, and that failure is raised once every one has ended (so
    nothing still writes into a staging folder the caller removes next)."""
    if len(items) == 1:  # (a one-file version, most of a deploy of many small items: no workers to start)
        await fn(items[0])
        return
    todo = iter(items)
    running: set[defer.Deferred[None]] = set()
    failures: list[BaseException] = []

    async def worker() -> None:
        for item in todo:  # one iterator for all the workers: each item is taken once
            if failures:
                return
            d: defer.Deferred[None] = defer.ensureDeferred(fn(item))
            running.add(d)
            try:
                await d
            except BaseException as exc:
                if not failures:
                    failures.append(exc)
                    for other in list(running - {d}):
                        other.cancel()
                return
            finally:
                running.discard(d)

    workers = [defer.ensureDeferred(worker()) for _ in range(max(1, min(at_once, len(items))))]
    try:
        await defer.DeferredList(workers, consumeErrors=True)
    except defer.CancelledError:  # (the list gives up at once; its workers end their cleanup first)
        await defer.DeferredList(workers, consumeErrors=True)
        raise
    if failures:
        raise failures[0]


# -- the fetcher ----------------------------------------------------------------------------------------
class Fetcher:
    """Fetches cache entries: lookup, lock, download, verify, unpack, publish (see the module notes).

    :param cache: a :class:`Cache`, a ``CacheClient``, or any :class:`CacheAPI`.
    :param unpack: an :data:`UnpackFn` (:func:`local_unpack`, :func:`remote_unpack`).
    :param pool: runs blocking work (:class:`~ion.core.threads.BlockingPool`).
    :param reactor: for network I/O; ``clock`` (retries, lock renewals) defaults to it.
    :param config: transfer settings (:class:`FetchConfig` or its config section).
    :param repositories: ``repositories(url) -> Repository`` (default :func:`repository_for`).
    :param hash_chunk: bytes read at a time when hashing extracted files.
    :param guard: an :class:`~ion.services.fetch.netguard.AddressGuard` HTTP connections must pass
        (the Fetch service: fetches requested by message); None: no restriction (``ion-deploy``).
    """

    _log = Logger()

    def __init__(self, cache: Any, unpack: UnpackFn, *, pool: Any, reactor: Any = None,
                 clock: IReactorTime | None = None, config: FetchConfig | Mapping[str, Any] | None = None,
                 repositories: Callable[[RepositoryURL], Repository] | None = None,
                 hash_chunk: int = 1 << 20, guard: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor
        self.cache: CacheAPI = as_cache_api(cache, self.clock)
        self.unpack = unpack
        self.pool = pool
        self.config = config if isinstance(config, FetchConfig) else FetchConfig.from_config(config)
        self.guard = guard
        self._make_repository = repositories or (
            lambda url: repository_for(url, self.pool, self.reactor, self.config, clock=self.clock, guard=guard))
        self._repositories: dict[tuple[str, str, str], Repository] = {}
        self.hash_chunk = hash_chunk

    def repository(self, url: RepositoryURL) -> Repository:
        """The repository of ``url``, made once (connections and clients are reused)."""
        ident = (url.scheme, url.location, url.prefix)
        repo = self._repositories.get(ident)
        if repo is None:
            repo = self._repositories[ident] = self._make_repository(url)
        return repo

    @defer.inlineCallbacks
    def close(self) -> Any:
        """Release every repository's connections."""
        repos, self._repositories = list(self._repositories.values()), {}
        for repo in repos:
            try:
                yield repo.close()
            except Exception as exc:  # pragma: no cover - best effort
                self._log.warn("closing {repo} failed: {exc}", repo=repr(repo), exc=exc)

    def refetch(self, key: EntryKey, url: str | None) -> defer.Deferred[FetchResult]:
        """Fetch the (quarantined) entry ``key`` again from ``url``, the version folder its ``.entry``
        recorded (:func:`refetch_request`): the :data:`~ion.services.cache.verify.RefetchFn` of a
        :class:`~ion.services.cache.verify.CacheVerifier` in the same process."""
        try:
            request = refetch_request(key, url)
        except InvalidRequestError:
            return defer.fail()
        return self.fetch(request)

    def fetch(self, request: FetchRequest | DeploymentItem,
              progress: ProgressFn | None = None) -> defer.Deferred[FetchResult]:
        """Have ``request``'s entry in the cache; fires with a :class:`FetchResult`.

        Cancelling the Deferred stops the fetch; the lock is released and the
        staging folders removed, as on every other path.

        :raises NotFoundError, BucketNotFoundError, AccessDeniedError, TransferError: from the repository.
        :raises ChecksumMismatchError: a file does not match a checksum (nothing published).
        :raises InvalidRequestError: a ``sha256`` naming files the version does not hold.
        :raises UnpackError: (or the Unpack service's error) for an archive that cannot be extracted.
        :raises CacheError: from the cache (lock timeout, publish refused).
        """
        if isinstance(request, DeploymentItem):
            request = FetchRequest.from_item(request)
        return defer.Deferred.fromCoroutine(self._fetch(request, progress or (lambda p: None)))

    async def _fetch(self, request: FetchRequest, progress: ProgressFn) -> FetchResult:
        key = request.key
        repo = self.repository(request.repository)

        def report(phase: str, file: str | None = None, done: int | None = None, total: int | None = None,
                   state: str | None = None) -> None:
            try:
                progress(FetchProgress(key, phase, file, done, total, state))
            except Exception:
                self._log.failure("progress callback failed for {key}", key=str(key))

        report("lookup")
        info: EntryInfo | None = await self.cache.lookup(key)
        listing: list[RemoteFile] | None = None
        warnings: list[str] = []
        if info is not None:
            if not request.keep_updated:
                return self._done(report, "cached", key, info, warnings)
            report("checking")
            try:
                listing = await repo.list_version(request.platform, request.name, request.version, describe=True)
            except FetchError as exc:
                warning = f"keep_updated: could not check {repo.version_url(request.platform, request.name, request.version)}" \
                          f" for a newer version ({exc}); using the cached entry"
                self._log.warn("{key}: {warning}", key=str(key), warning=warning)
                return self._done(report, "cached", key, info, [warning])
            if entry_is_current(info, listing):
                return self._done(report, "cached", key, info, warnings)
            self._log.info("{key}: the remote version changed; fetching it again", key=str(key))

        report("waiting")
        lock = await self.cache.lock(key)
        try:
            # Whoever held the lock before us may have published it meanwhile (looked up with the
            # lock by a local cache, in the same pool job).
            looked_up = getattr(lock, "looked_up", None)
            again: EntryInfo | None = looked_up[0] if looked_up is not None else await self.cache.lookup(key)
            if again is not None and not request.keep_updated:
                return self._done(report, "cached", key, again, warnings)
            if listing is None:
                report("listing")
                # Only a keep_updated comparison needs the files described before their download.
                listing = await repo.list_version(request.platform, request.name, request.version,
                                                  describe=request.keep_updated)
            if again is not None and entry_is_current(again, listing):
                # Published by the holder we waited for, and current: nothing to fetch.
                return self._done(report, "cached", key, again, warnings)
            published = await self._fetch_locked(request, key, repo, listing, lock, report)
        finally:
            try:
                await self.cache.unlock(lock)
            except Exception as exc:
                self._log.warn("{key}: releasing the lock failed: {exc}", key=str(key), exc=exc)
        return self._done(report, "updated" if info is not None else "downloaded", key, published, warnings)

    def _done(self, report: Callable[..., None], state: str, key: EntryKey, info: EntryInfo,
              warnings: list[str]) -> FetchResult:
        report("done", state=state)
        return FetchResult(state, key, info, warnings)

    @staticmethod
    def _expected_sha256(request: FetchRequest, listing: list[RemoteFile], where: str) -> dict[str, str]:
        if request.sha256 is None:
            return {}
        paths = {f.path for f in listing}
        if isinstance(request.sha256, str):
            if len(listing) != 1:
                raise InvalidRequestError(
                    f"{request.describe()}: 'sha256' is one digest but {where} holds {len(listing)} files "
                    f"({', '.join(sorted(paths))}); give {{file: digest}}", url=where, code=422)
            return {listing[0].path: request.sha256}
        for rel, digest in request.sha256.items():
            if rel not in paths:
                raise ChecksumMismatchError(rel, f"sha256:{digest}", None, url=where, source="the item's sha256")
        return dict(request.sha256)

    async def _fetch_locked(self, request: FetchRequest, key: EntryKey, repo: Repository, listing: list[RemoteFile],
                            lock: Any, report: Callable[..., None]) -> EntryInfo:
        where = repo.version_url(request.platform, request.name, request.version)
        expected = self._expected_sha256(request, listing, where)
        content = Path(await self.cache.new_staging())
        stagings = [content]
        published = False
        try:
            downloads = content
            if request.unpack:
                downloads = Path(await self.cache.new_staging())
                stagings.append(downloads)
            got: dict[str, Downloaded] = {}

            async def download(remote: RemoteFile) -> None:
                report("downloading", remote.path, 0, remote.size)
                # An archive to extract needs no sha256 of its own (what it holds is hashed as it is
                # extracted) unless the item pins one: an md5 check suffices where there is one.
                got[remote.path] = await repo.download(remote, downloads / PurePosixPath(remote.path),
                                                       progress=functools.partial(report, "downloading", remote.path),
                                                       sha256=not request.unpack or remote.path in expected,
                                                       within=downloads)
                digest = expected.get(remote.path)
                if digest is not None and got[remote.path].sha256 != digest:
                    raise ChecksumMismatchError(remote.path, f"sha256:{digest}", f"sha256:{got[remote.path].sha256}",
                                                url=remote.url, source="the item's sha256")

            await _each(listing, download, int(self.config.max_connections))
            if request.unpack:
                files = await self._unpack_all(listing, got, downloads, content, report)
            else:
                files = {r.path: FileMeta(got[r.path].size, describe_origin(r, got[r.path], extracted=False),
                                          cast(str, got[r.path].sha256)) for r in listing}  # asked for
            report("publishing")
            info: EntryInfo = await self.cache.publish(key, lock, content, files, where)
            published = True
            return info
        finally:
            for staging in stagings:
                if published and staging == content:
                    continue  # renamed into the entry
                try:
                    await self.cache.discard_staging(staging)
                except Exception as exc:
                    self._log.warn("{key}: could not remove staging folder {path}: {exc}", key=str(key),
                                   path=str(staging), exc=exc)

    async def _unpack_all(self, listing: list[RemoteFile], got: dict[str, Downloaded], downloads: Path,
                          content: Path, report: Callable[..., None]) -> dict[str, FileMeta]:
        files: dict[str, FileMeta] = {}
        for remote in listing:
            rel = PurePosixPath(remote.path)
            archive = downloads / rel
            target = content / rel.parent
            report("unpacking", remote.path)
            await self.pool.run(_mkdirs, target)
            extracted = await self.unpack(archive, target)
            if extracted is not None:
                prefix = "" if rel.parent == PurePosixPath(".") else f"{rel.parent}/"
                new = await self.pool.run(_describe_new, content, set(files),
                                          describe_origin(remote, got[remote.path], extracted=True), self.hash_chunk,
                                          {prefix + path: known for path, known in extracted.items()})
                files.update(new)
            else:
                await self.pool.run(_keep, archive, content / rel)
                d = got[remote.path]
                digest = d.sha256 or await self.pool.run(sha256_file, content / rel, self.hash_chunk)
                files[remote.path] = FileMeta(d.size, describe_origin(remote, d, extracted=False), digest)
        return files
