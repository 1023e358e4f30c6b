"""The deployer's cache, independent of messaging (DESIGN §8): entries, locks, publish, verify, prune.

:class:`Cache` is the async facade: it takes the locks
(:mod:`~ion.services.cache.locks`) and runs the store's blocking file
operations (:mod:`~ion.services.cache.store`, where the tree is laid out) in
the pool. It is the one home of the quarantine (:meth:`Cache.quarantine`,
used by :meth:`Cache.repair` and the periodic verifier) and of eviction
(:meth:`Cache.evict`, used by ``prune``, ``clear`` and the reaper, with
:class:`~ion.services.cache.eviction.EvictionPolicy` choosing).

Decisions:

- **``.entry`` lives inside the entry folder**, as DESIGN says, and is never
  content: the entry's content is every other name in the folder.
  :meth:`EntryInfo.content_names` is what a deployer places (one link or copy
  per top-level name); :meth:`Cache.publish` refuses staged content with a
  top-level ``.entry``. A folder without ``.entry`` is an incomplete entry:
  :meth:`Cache.lookup` never serves it, the next fetch replaces it.
- **Publish is two renames and a replace**: the staged folder (on the same
  filesystem, under ``staging/``) is renamed over the entry path (an older or
  incomplete folder there is first renamed aside), the parent folder is
  fsynced, then ``.entry`` is written to a temporary file, fsynced, renamed
  into place with ``os.replace`` and the folder fsynced. A crash at any point
  leaves either the old state or an incomplete entry, never a half entry
  served as good. File contents are not fsynced unless ``fsync_content``:
  :meth:`lookup` compares every file's size with ``.entry`` (cheap), which
  catches the truncated files a power cut leaves; ``verify`` re-hashes.
- **Last use** is the mtime of ``.entry``, set by ``lookup``; ``prune`` goes by it.
- **Time** comes from the injected clock (``task.Clock`` in tests); mtimes
  the cache sets (lock refreshes, last use) are in that clock's frame.
- **Blocking work** (every filesystem call, hashing) runs through ``pool``
  (:class:`~ion.core.threads.BlockingPool`), one pool job per step; public
  methods return Deferreds and never block the reactor.
- ``evict`` (``prune``, ``clear``, the reaper) takes each entry's lock with ``timeout=0`` before
  removing it, so a locked entry (being fetched or published) is never
  removed; the ``.entry`` goes first, then the folder is renamed aside and
  deleted, so a reader never sees a half-removed entry as complete.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, ParamSpec, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ion.core.config import Settings, setting
from ion.core.threads import BlockingPool, housekeeping_pool, run_short
from ion.core.tokens import random_hex
from ion.services.cache import store
from ion.services.cache.entry import (
    LOCK_SUFFIX,
    EntryInfo,
    EntryKey,
    EntryReport,
    FileMeta,
    PruneReport,
    check_relpath,
    repo_id,
)
from ion.services.cache.errors import (
    CacheError,
    CorruptEntryError,
    EntryNotFoundError,
    InvalidKeyError,
    LockNotHeldError,
    LockTimeoutError,
    OutsideCacheError,
)
from ion.services.cache.eviction import EvictionPolicy
from ion.services.cache.locks import BrokerLocks, CacheLock, LockTable, resolve_host_id
from ion.services.cache.store import QUARANTINE, STAGING, FoundEntry, describe, sha256_file

__all__ = [
    "Cache",
    "EntryKey",
    "EntryInfo",
    "FileMeta",
    "EntryReport",
    "PruneReport",
    "CacheLock",
    "repo_id",
    "default_root",
    "sha256_file",
    "DEFAULT_LOCK_TIMEOUT",
    "CacheSettings",
    "STAGING",
    "QUARANTINE",
    "CacheError",
    "CorruptEntryError",
    "EntryNotFoundError",
    "InvalidKeyError",
    "LockNotHeldError",
    "LockTimeoutError",
    "OutsideCacheError",
]

@dataclass(frozen=True)
class CacheSettings(Settings):
    """The ``ion.services.cache`` section (the ``verify_*`` keys: :class:`~ion.services.cache.verify.VerifyConfig`;
    the ``reap_*`` keys: :class:`~ion.services.cache.reaper.ReapPolicy`).

    :ivar root: the cache folder; None: :func:`default_root`. The Cache service reads it as a
        security bound (``bounded_config``); this is the plain value (Deploy's job folder, ion-deploy).
    :ivar lock_timeout: seconds a lock file may go without refresh before another host takes it over.
    :ivar lock_wait_timeout: seconds a lock request waits by default; None: 2 x ``lock_timeout``.
    :ivar host_id: the id written in lock files; None: :func:`~ion.services.cache.locks.resolve_host_id`.
    :ivar fsync: fsync every file at publish.
    :ivar lock_lease: seconds a lock held over messages lasts without renewal.
    :ivar lock_holder_check: seconds between two checks, while a lock is held over messages, that
        its holder still listens (its process queue has a consumer); one that does not on two checks
        in a row loses the lock then, not at the end of its lease. 0 or None: the lease only.
    :ivar max_concurrent: requests the Cache service handles at once.
    :ivar lock_method: how lock files are created (``excl`` or ``link``, checked by :class:`Cache`).
    :ivar broker_locks: the Cache service takes each lock through the broker as well
        (:class:`~ion.services.cache.locks.BrokerLocks`), so the lock of a host that dies is free
        within seconds instead of ``lock_timeout``; off: lock files only.
    """

    SECTION: ClassVar[str] = "ion.services.cache"

    root: str | None = None
    lock_timeout: float = 600.0
    lock_wait_timeout: float | None = None
    host_id: str | None = None
    fsync: bool = False
    lock_lease: float = 60.0
    lock_holder_check: float | None = setting(5.0, off=True)
    max_concurrent: int = 32
    lock_method: str = "excl"
    broker_locks: bool = True

    def open(self, root: str | os.PathLike[str], *, clock: IReactorTime | None = None,
             pool: BlockingPool | None = None, broker_locks: BrokerLocks | None = None) -> Cache:
        """The :class:`Cache` of ``root`` with these settings (and ``broker_locks``, if given)."""
        return Cache(root, host_id=self.host_id or None, lock_timeout=self.lock_timeout, clock=clock, pool=pool,
                     wait_timeout=self.lock_wait_timeout, fsync_content=self.fsync, lock_method=self.lock_method,
                     broker_locks=broker_locks)


#: Seconds without refresh after which another host may take a lock over (config ``lock_timeout``).
DEFAULT_LOCK_TIMEOUT: Final = CacheSettings.lock_timeout
#: The most keys whose entry and lock paths a :class:`Cache` keeps made (:meth:`Cache.entry_path`).
_PATHS_KEPT: Final = 4096

P = ParamSpec("P")
T = TypeVar("T")


def _deferred(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, defer.Deferred[T]]:
    """Make an ``async def`` method return a Deferred (errors, even early ones, as failures)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> defer.Deferred[T]:
        return defer.Deferred.fromCoroutine(fn(*args, **kwargs))

    return wrapper


def default_root(env: Mapping[str, str] | None = None) -> Path:
    """``$ION_CACHE_DIR``, else ``$XDG_CACHE_HOME/ion/deploy`` (``~/.cache/ion/deploy``)."""
    env = os.environ if env is None else env
    if env.get("ION_CACHE_DIR"):
        return Path(env["ION_CACHE_DIR"]).expanduser()
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ion" / "deploy"


def configured_root(config: Any) -> Path:
    """The cache root a container's config names (``root`` of ``ion.services.cache``), else
    :func:`default_root`. Read from the container's own layers (files, command line), never
    an app's config: where the cache is bounds what Unpack may write and Deploy must not."""
    root = config.container_get("ion.services.cache", "root", None) if config is not None else None
    return Path(root).expanduser() if root else default_root()


def _publish_locked(owned: Callable[[CacheLock], bool], lock: CacheLock, removal: Callable[[], Any] | None,
                    staging: Path, path: Path, info: EntryInfo, trash: Path, now: float,
                    fsync_content: bool) -> tuple[EntryInfo | None, Any]:
    """:meth:`Cache.publish`'s one pool job: the lock checked (None: not ours any more, nothing done),
    the staged folder published (:func:`~ion.services.cache.store.publish_staged`), then, given a
    ``removal`` (:meth:`LockTable.removal`), the lock file removed; the entry and that outcome."""
    if not owned(lock):
        return None, None
    published = store.publish_staged(staging, path, info, trash, now, fsync_content)
    return published, removal() if removal is not None else None


# -- the cache ------------------------------------------------------------------------------------------
class Cache:
    """The cache of one root folder, shared by every process (on every host) that uses it.

    :param root: the cache folder (created on first use).
    :param host_id: this machine's id in lock files (default :func:`resolve_host_id`).
    :param lock_timeout: seconds without refresh after which another host's
        lock is taken over; also the age after which another host's staging
        folder counts as abandoned.
    :param clock: time and scheduling (default: the reactor); a ``task.Clock`` in tests.
    :param pool: runs blocking work: ``run(fn, *args, **kwargs)`` -> Deferred
        (the container's :class:`~ion.core.threads.BlockingPool`; a new one by default).
        With a ``BlockingPool``, lock files go through the reactor's
        :func:`~ion.core.threads.housekeeping_pool` instead, never behind long jobs.
    :param wait_timeout: default seconds :meth:`lock` waits (2 x ``lock_timeout``).
    :param fsync_content: fsync every file at publish (slower; see the module notes).
    :param hash_chunk: bytes read at a time when hashing.
    :param lock_method: how lock files are created: ``excl`` (``O_EXCL``) or ``link``
        (link count, for filesystems where ``O_EXCL`` is not atomic); see locks.py.
    :param broker_locks: take each lock through the broker too (see :class:`~ion.services.cache.locks.BrokerLocks`);
        closed with the cache.
    """

    _log = Logger()

    def __init__(self, root: str | os.PathLike[str], *, host_id: str | None = None,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT, clock: IReactorTime | None = None,
                 pool: Any = None, wait_timeout: float | None = None, refresh_interval: float | None = None,
                 fsync_content: bool = CacheSettings.fsync, hash_chunk: int = 1 << 20,
                 lock_method: str = CacheSettings.lock_method, broker_locks: BrokerLocks | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        if pool is None:
            pool = BlockingPool()
        assert clock is not None
        self.root = Path(os.path.abspath(Path(root).expanduser()))
        self.clock: IReactorTime = clock
        self.pool = pool
        self.host_id = host_id or resolve_host_id()
        self.lock_timeout = float(lock_timeout)
        self.fsync_content = fsync_content
        self.hash_chunk = hash_chunk
        # Lock files are handled beside the long jobs (hashing, extraction), never queued behind them.
        lock_pool = housekeeping_pool(pool.reactor) if isinstance(pool, BlockingPool) else pool
        self.locks = LockTable(host_id=self.host_id, lock_timeout=self.lock_timeout, clock=clock, pool=lock_pool,
                               wait_timeout=wait_timeout, refresh_interval=refresh_interval, method=lock_method,
                               broker=broker_locks, root=self.root)
        self.staging_root = self.root / STAGING
        self.quarantine_root = self.root / QUARANTINE
        self._host_tag = hashlib.sha256(self.host_id.encode()).hexdigest()[:8]
        #: Staging folders handed out and not yet published or discarded.
        self._staging: set[Path] = set()
        #: (entry path, lock path) of the keys met lately: made once, not at each of the five or so
        #: times a fetch asks (a pathlib join costs more than the dict look-up). Emptied when full.
        self._paths: dict[EntryKey, tuple[Path, Path]] = {}

    def __repr__(self) -> str:
        return f"<Cache {self.root} host={self.host_id}>"

    # -- paths ------------------------------------------------------------------------------------
    def entry_path(self, key: EntryKey) -> Path:
        """``<root>/<repo-id>/<platform>/<name>/<version>[~packed]``."""
        return self._paths_of(key)[0]

    def lock_path(self, key: EntryKey) -> Path:
        """``<root>/<repo-id>/<platform>/<name>/<version>[~packed].lock``."""
        return self._paths_of(key)[1]

    def _paths_of(self, key: EntryKey) -> tuple[Path, Path]:
        paths = self._paths.get(key)
        if paths is None:
            entry = self.root.joinpath(*key.relpath.parts)
            paths = (entry, entry.with_name(key.folder_name + LOCK_SUFFIX))
            if len(self._paths) >= _PATHS_KEPT:
                self._paths.clear()
            self._paths[key] = paths
        return paths

    def _unique(self) -> str:
        return f"{self._host_tag}-{os.getpid()}-{int(time.time() * 1000)}-{random_hex(12)}"

    def _trash(self) -> Path:
        return self.staging_root / f"{self._unique()}-trash"

    # -- reading ------------------------------------------------------------------------------------
    @_deferred
    async def lookup(self, key: EntryKey, *, verify: bool = False) -> EntryInfo | None:
        """The complete entry of ``key``, or None (missing, incomplete, or damaged).

        Checks each file's size (``verify=True``: re-hashes them too) and
        records the use (``last_used``, what ``prune`` goes by). A damaged
        entry is logged and not served; the fetch that follows replaces it.

        A complete entry that still has a lock file, which nobody of this
        process holds, is one whose holder may have died after publishing it
        (killed between publish and release): the lock file is judged as a
        contender would (:meth:`LockTable.judge`) and removed if stale, with
        the temporary files dead processes left beside it. A hit never takes
        the lock, so nothing else would ever meet that file.
        """
        path = self.entry_path(key)
        lock_path = self.lock_path(key)
        # Without verify, a lookup is a few stats and one small read: it runs with the
        # other lookups of this reactor turn (a deploy of many items looks them all up at once).
        run = self.pool.run if verify else functools.partial(run_short, self.pool)
        info, problem, litter = await run(store.lookup_entry, path, key, self.clock.seconds(),
                                          self.hash_chunk if verify else None, lock_path)
        if problem:
            self._log.warn("not serving {entry}: {problem}; it will be fetched again",
                           entry=str(key), problem=problem)
        if litter and not self.locks.in_use(lock_path):
            try:
                await self.locks.remove_if_stale(lock_path, entry=str(key))
            except Exception as exc:  # serving the entry does not depend on it
                self._log.warn("could not check the lock {path} of {entry}: {exc}", path=str(lock_path),
                               entry=str(key), exc=exc)
        return info

    @_deferred
    async def info(self, key: EntryKey) -> EntryInfo:
        """The complete entry of ``key`` (does not count as a use).

        :raises EntryNotFoundError: no entry, or an incomplete one.
        :raises CorruptEntryError: its ``.entry`` cannot be read.
        """
        return await self.pool.run(store.require_info, self.entry_path(key), key)

    @_deferred
    async def list(self) -> list[EntryInfo]:
        """Every complete entry, sorted by key."""
        found, _locks = await self.pool.run(store.scan, self.root)
        return [f.info for f in found if f.info is not None]

    # -- locks ----------------------------------------------------------------------------------------
    def lock(self, key: EntryKey, timeout: float | None = None, *, lookup: bool = False) -> defer.Deferred[CacheLock]:
        """Take the lock of ``key``: in this process, one holder per entry (others wait
        on a Deferred); across processes and hosts, the lock file (see
        :mod:`ion.services.cache.locks`).

        Once it is held, look the entry up again: whoever held it before may
        have published it while this call waited. Release it with
        :meth:`unlock` on every path (or use :meth:`with_lock`).

        :param timeout: seconds to wait (default ``wait_timeout``; 0: do not wait).
        :param lookup: that second lookup is made in the pool job that takes the lock (one job,
            not two): the lock's :attr:`~CacheLock.looked_up` is then what :meth:`lookup` would
            answer (None where it failed: look again).
        :raises LockTimeoutError: naming the holder, when the wait times out.
        """
        if not lookup:
            return self.locks.acquire(key, self.lock_path(key), timeout)
        path = self.entry_path(key)

        def look(now: float) -> tuple[EntryInfo | None, str | None]:
            info, problem, _litter = store.lookup_entry(path, key, now, None)  # (the lock is ours: no litter)
            return info, problem

        def looked(lock: CacheLock) -> CacheLock:
            found = lock.then[0] if lock.then is not None else None
            if isinstance(found, tuple):
                info, problem = found
                if problem:
                    self._log.warn("not serving {entry}: {problem}; it will be fetched again",
                                   entry=str(key), problem=problem)
                lock.looked_up = (info,)
            return lock

        return self.locks.acquire(key, self.lock_path(key), timeout, then=look).addCallback(looked)

    def unlock(self, lock: CacheLock) -> defer.Deferred[None]:
        """Release ``lock`` (never fails; twice is harmless).

        The folders its lock file leaves empty are removed with it, up to the
        root, in the same pool job: a fetch that failed before publishing (a
        missing version, a 404) leaves no empty ``<repo-id>/<platform>/<name>/``
        behind. Only empty folders go (``rmdir``), so a folder holding another
        lock or an entry stays; a contender creating its lock meanwhile makes
        the folder again (:meth:`LockTable.acquire` retries a vanished folder).
        A lock released already (by :meth:`publish` with ``release``) is left
        as it is: its folder holds the entry.
        """
        if not lock.held:
            return defer.succeed(None)
        return self.locks.release(lock, tidy=functools.partial(store.remove_empty_parents, self.root, [lock.path]))

    def with_lock(self, key: EntryKey, fn: Callable[..., Awaitable[T] | T], *args: Any,
                  timeout: float | None = None, **kwargs: Any) -> defer.Deferred[T]:
        """Call ``fn(lock, *args, **kwargs)`` holding the lock of ``key``; fires with its result.

        The lock is released however ``fn`` ends: result, exception, or the
        returned Deferred being cancelled (which cancels what ``fn`` returned).
        """

        async def run() -> T:
            lock = await self.lock(key, timeout)
            try:
                result = fn(lock, *args, **kwargs)
                if isinstance(result, Coroutine):
                    result = await defer.Deferred.fromCoroutine(result)
                elif isinstance(result, defer.Deferred):
                    result = await result
                return result  # type: ignore[return-value]
            finally:
                await self.unlock(lock)

        return defer.Deferred.fromCoroutine(run())

    # -- staging and publishing --------------------------------------------------------------------------
    def new_staging(self) -> defer.Deferred[Path]:
        """A new empty folder ``<root>/staging/<unique>/`` for one fetch (same filesystem as the entries)."""
        path = self.staging_root / self._unique()
        self._staging.add(path)
        d = self.pool.run(store.make_staging, self.staging_root, path)

        def failed(f: Any) -> Any:
            self._staging.discard(path)
            return f

        d.addErrback(failed)
        return d

    def _check_staging(self, staging_dir: str | os.PathLike[str]) -> Path:
        path = Path(os.path.abspath(staging_dir))
        if path.parent != self.staging_root or path.name in ("", ".", ".."):
            raise OutsideCacheError(f"{staging_dir} is not a staging folder of the cache {self.root} "
                                    f"(expected {self.staging_root}/<name>)")
        return path

    @_deferred
    async def discard_staging(self, staging_dir: str | os.PathLike[str]) -> None:
        """Remove a staging folder (a failed or cancelled fetch)."""
        path = self._check_staging(staging_dir)
        self._staging.discard(path)
        await self.pool.run(shutil.rmtree, path, True)

    @_deferred
    async def publish(self, key: EntryKey, staging_dir: str | os.PathLike[str],
                      files: Mapping[str, FileMeta | Mapping[str, Any]], *, lock: CacheLock | None = None,
                      url: str | None = None, release: bool = False) -> EntryInfo:
        """Make the staged content the entry of ``key``, atomically; fires with its EntryInfo.

        ``files`` describes every regular file in the staging folder (path
        relative to it, ``/``-separated -> :class:`FileMeta`); symlinks inside
        the folder are recorded as they are. The caller must hold the entry's
        lock (``lock``, or one this Cache holds on ``key``).

        ``release``: once published, the lock is released in the same pool job (its file removed;
        see :meth:`unlock`, which then does nothing); a failed publish keeps it.

        The lock is checked (its file still ours) in the pool job that publishes, right before.

        :raises LockNotHeldError: no lock, or it was taken over.
        :raises OutsideCacheError: ``staging_dir`` is not one of this cache's staging folders.
        :raises CorruptEntryError: the staged tree and ``files`` disagree (nothing is published).
        """
        staging = self._check_staging(staging_dir)
        metas = {check_relpath(rel): m if isinstance(m, FileMeta) else FileMeta.from_wire(m)
                 for rel, m in files.items()}
        held = lock if lock is not None else self.locks.held.get(self.lock_path(key))
        if held is None or held.key != key or not held.held:
            raise LockNotHeldError(f"publishing {key} needs its lock ({self.lock_path(key)}); it is not held")
        taken_over = LockNotHeldError(f"the lock of {key} ({held.path}) was taken over by another process; "
                                      "not publishing")
        if not held.active:
            held.lost = True
            raise taken_over
        path = self.entry_path(key)
        now = self.clock.seconds()
        info = EntryInfo(key=key, path=path, files=metas, fetched_at=now, last_used=now, url=url)
        removal = self.locks.removal(held) if release else None
        try:
            published, removed = await self.pool.run(_publish_locked, self.locks.owned, held, removal, staging,
                                                     path, info, self._trash(), now, self.fsync_content)
        except BaseException:
            self.locks.keep(held)
            raise
        if published is None:
            self.locks.keep(held)
            held.lost = True
            raise taken_over
        info = published
        self._staging.discard(staging)
        if removal is not None:
            await self.locks.release(held, removed=removed)
        self._log.info("published {entry} at {path}: {n} files, {size} bytes",
                       entry=str(key), path=str(path), n=len(info.files), size=info.size)
        return info

    # -- integrity -----------------------------------------------------------------------------------------
    def verify_entry(self, key: EntryKey, path: Path | None = None) -> defer.Deferred[EntryReport]:
        """Re-hash one entry in one pool job (:func:`~ion.services.cache.store.verify_entry`):
        its report, ``good``, ``bad``, ``incomplete``, ``missing`` or ``changed``. Takes no lock."""
        return self.pool.run(store.verify_entry, path if path is not None else self.entry_path(key), key,
                             self.hash_chunk)

    @_deferred
    async def quarantine(self, key: EntryKey, path: Path, problems: Mapping[str, str], *,
                         log_prefix: str = "") -> Path:
        """Move the bad entry of ``key`` at ``path`` under ``quarantine/`` (its ``.entry`` removed
        first: the next deploy fetches it again); where it went. The caller holds its lock.

        The one quarantine of the cache: :meth:`repair` and the periodic
        :class:`~ion.services.cache.verify.CacheVerifier` use it.
        """
        dest = store.quarantine_dest(self.quarantine_root, key, self.clock.seconds())
        await self.pool.run(store.quarantine_entry, path, dest)
        self._log.warn("{prefix}quarantined bad entry {entry} ({problems}) to {dest}; the next deploy "
                       "fetches it again", prefix=log_prefix, entry=str(key), problems=describe(problems),
                       dest=str(dest))
        return dest

    @_deferred
    async def verify(self, key: EntryKey | None = None) -> builtins.list[EntryReport]:
        """Re-hash entries against the sha256 in their ``.entry``: one key, or every entry.

        Each entry is one pool job (:meth:`verify_entry`, files hashed in
        ``hash_chunk`` pieces), one entry at a time so a full verify never fills the pool.

        :raises EntryNotFoundError: ``key`` given and no folder for it.
        """
        if key is not None:
            report = await self.verify_entry(key)
            if report.status == "missing":
                raise EntryNotFoundError(f"no entry {key} in the cache (looked for {report.path})")
            return [report]
        found, _locks = await self.pool.run(store.scan, self.root)
        reports = []
        for f in found:
            reports.append(await self.verify_entry(f.key, f.path))
        bad = [r for r in reports if r.status == "bad"]
        self._log.info("verified {n} entries of {root}: {bad} bad", n=len(reports), root=str(self.root), bad=len(bad))
        return reports

    @_deferred
    async def repair(self, key: EntryKey | None = None) -> builtins.list[EntryReport]:
        """Verify, then make every bad entry incomplete so the next deploy fetches it again.

        A bad entry loses its ``.entry`` and is moved to ``quarantine/`` (kept
        for a look until ``prune``/``clear``); an incomplete one is removed. An
        entry whose lock is held is left alone (``busy``): its fetch replaces it.
        """
        reports = await self.verify(key)
        for report in reports:
            if report.status not in ("bad", "incomplete"):
                report.action = "kept"
                continue
            try:
                lock = await self.lock(report.key, timeout=0)
            except LockTimeoutError:
                report.action = "busy"
                continue
            try:
                again = await self.verify_entry(report.key, report.path)
                if again.status == "good":
                    report.status, report.problems, report.action = "good", {}, "kept"  # republished meanwhile
                elif again.status == "missing":
                    report.action = "removed"
                elif report.status == "bad":
                    report.moved_to = await self.quarantine(report.key, report.path, report.problems)
                    report.action = "quarantined"
                else:
                    await self.pool.run(store.remove_entry, report.path, self._trash())
                    report.action = "removed"
            finally:
                await self.unlock(lock)
        return reports

    # -- cleanup ---------------------------------------------------------------------------------------------
    @_deferred
    async def prune(self, older_than: float | None = None, keep: int | None = None) -> PruneReport:
        """Remove entries by last use; never one that is locked.

        An entry goes if it was not used for ``older_than`` seconds, or if it is
        beyond the ``keep`` most recently used of its dependency (repository,
        platform, name, unpack): the :class:`~ion.services.cache.eviction.EvictionPolicy`
        ``max_age=older_than, keep=keep``, removed by :meth:`evict`. Incomplete
        entries, stale lock files, abandoned staging folders and quarantined entries go too.
        """
        if older_than is not None and (not isinstance(older_than, (int, float)) or older_than < 0):
            raise InvalidKeyError(f"older_than must be a number of seconds >= 0, not {older_than!r}")
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 0):
            raise InvalidKeyError(f"keep must be an integer >= 0, not {keep!r}")
        found, lock_files = await self.pool.run(store.scan, self.root)
        policy = EvictionPolicy(max_age=older_than, keep=keep)
        return await self.evict(policy.targets(found, self.clock.seconds()), lock_files, quarantine=True)

    @_deferred
    async def clear(self) -> PruneReport:
        """Remove every entry, abandoned staging folder, stale lock and quarantined entry;
        locked entries (and their locks) stay."""
        found, lock_files = await self.pool.run(store.scan, self.root)
        return await self.evict(found, lock_files, quarantine=True)

    @_deferred
    async def evict(self, targets: builtins.list[FoundEntry], lock_files: builtins.list[Path], *,
                    quarantine: bool, check: Callable[[FoundEntry], Awaitable[bool]] | None = None) -> PruneReport:
        """Remove ``targets`` (rows of a :func:`~ion.services.cache.store.scan`), then the stale
        ones of ``lock_files``, abandoned staging folders and, if ``quarantine``, quarantined entries.

        Each entry is removed under its lock, taken with ``timeout=0`` (a locked
        one is left as busy), unless it was used or republished since the scan
        or, when given, ``check(row)`` says no under the lock. The one evictor
        of the cache: :meth:`prune`, :meth:`clear` and the reaper use it.
        """
        report = PruneReport()
        gone: builtins.list[Path] = []
        for f in targets:
            try:
                lock = await self.lock(f.key, timeout=0)
            except LockTimeoutError:
                report.busy.append(f.key)
                continue
            try:
                # Under the lock: an entry used (or republished) since the scan stays.
                try:
                    now_info: EntryInfo | None = await self.pool.run(store.read_info, f.path, f.key)
                except (FileNotFoundError, CorruptEntryError):
                    now_info = None
                if f.info is not None and (now_info is None or now_info.last_used != f.info.last_used
                                           or now_info.fetched_at != f.info.fetched_at):
                    continue
                if check is not None and not await check(f):
                    continue
                await self.pool.run(store.remove_entry, f.path, self._trash())
                gone.append(f.path)
                if f.info is not None:
                    report.removed.append(f.info)
                else:
                    report.incomplete.append(f.path)
            finally:
                await self.unlock(lock)
        for path in lock_files:
            if await self.locks.remove_if_stale(path):
                report.locks.append(path)
        report.staging = await self.cleanup_staging()
        if quarantine:
            report.quarantine = await self.pool.run(store.clear_quarantine, self.quarantine_root)
        await self.pool.run(store.remove_empty_parents, self.root, gone + report.locks)
        self._log.info("removed {n} entries ({size} bytes), {inc} incomplete, {stg} staging folders from {root}; "
                       "{busy} locked entries left", n=len(report.removed), size=report.bytes_freed,
                       inc=len(report.incomplete), stg=len(report.staging), root=str(self.root),
                       busy=len(report.busy))
        return report

    def cleanup_staging(self) -> defer.Deferred[builtins.list[Path]]:
        """Remove abandoned staging folders: a local one whose pid is dead, another
        host's one untouched for ``lock_timeout``; never one of a live local process."""
        live = frozenset(p.name for p in self._staging)
        return self.pool.run(store.cleanup_staging, self.staging_root, self.clock.seconds(), self.lock_timeout,
                             self._host_tag, live)

    def close(self) -> defer.Deferred[Any]:
        """Stop waiting for locks and release every lock held (service terminate, drain); close
        the broker locks' connection."""
        d = self.locks.release_all()
        broker = self.locks.broker
        if broker is not None:
            d.addBoth(lambda _: broker.close())
        return d

