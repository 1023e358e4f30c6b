"""One reaper for the whole system: cache entries evicted by policy (issue 6; DESIGN §8 ``prune``).

**Policy** (``ion.services.cache`` config, see :class:`ReapPolicy`): an entry
goes when it was not used for ``reap_max_age`` seconds, when it is beyond
the ``reap_keep`` most recently used versions of its dependency, or, least
recently used first, while the cache holds more than ``reap_max_bytes``.
The choice is :attr:`ReapPolicy.eviction`, the
:class:`~ion.services.cache.eviction.EvictionPolicy` ``Cache.prune`` uses too;
the removal is :meth:`Cache.evict`, as for ``prune``. Never evicted:

- a **locked** entry (being fetched, published or verified): removal takes
  the entry's lock with ``timeout=0`` (:meth:`Cache.evict`);
- an entry **used within** ``reap_min_idle`` seconds (default 600): a deploy
  looks an entry up before it places it, so one between its lookup and its
  placement is safe;
- an entry a **live destination links to**;
- an entry a **kept generation names** (:func:`kept_entries`).

**Link records.** Placing a dependency by symlink records the destination
beside the entry, before the links are made (:func:`record_link`, called by
``ion.services.deploy.place``)::

    <root>/<repo>/<platform>/<name>/.links/<version folder>/<digest>.json
        {"destination": ..., "host": ..., "entry": ...}

one small file per (host, destination), written atomically and refreshed
by every deploy that finds the links already right. A record of this host
is live while its destination still holds a symlink into the entry (checked
on the spot; a dead one is removed); a record of another host, whose disks
this host cannot see, is live until it is older than ``reap_link_ttl``
(default 7 days). The names start with ``.``, which no entry key may, so
the cache never mistakes them for entries.

**Generation records.** Each successful deploy of a deployment file records
a generation (``ion.services.deploy.generations``) in
``<root>/generations/<32 hex>.json``, one file per deployment file, which
lists at its top the entries its kept generations name::

    {"entries": ["<repo-id>/<platform>/<name>/<version folder>", ...], ...}

The reaper reads that key of each file (one small read per deployment file)
and evicts none of those entries, so a rollback finds them cached. The rest
of the file is the deployer's.

**Election.** Every Cache service instance consumes one queue,
``<sysname>.cache.reaper``, declared with ``x-single-active-consumer``: the
broker (RabbitMQ, or the embedded one, which gives the same semantics)
delivers its messages to one consumer at a time (:func:`election_receiver`,
handled by :meth:`Process.receive <ion.core.process.Process.receive>`). Every instance sends a
``reap_tick`` to it every ``reap_tick`` seconds (default 5); the instance
that receives them is the reaper, and runs a round when the last one (kept
in ``<root>/.reaper.json``, shared with the other containers and hosts) is
``reap_interval`` old. A round runs inside the tick's handling, so the
broker does not hand the queue on while it runs. When the reaper's
container dies, the broker makes another consumer active; the next tick,
from any live instance, reaches it: a takeover within one tick interval.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.core.config import Settings, setting
from ion.core.safefs import SafeDir
from ion.services.cache import store
from ion.services.cache.core import Cache
from ion.services.cache.entry import PruneReport
from ion.services.cache.eviction import EvictionPolicy
from ion.services.cache.locks import this_host_id
from ion.services.cache.store import FoundEntry

if TYPE_CHECKING:  # the messaging core is imported only where an election runs (not by ion-deploy)
    from ion.core.process import Process, Receiver

__all__ = ["ReapPolicy", "ReapReport", "CacheReaper", "ReaperElection", "record_link", "live_links", "choose",
           "LINKS_DIR", "STATE_FILE", "TICK_OP", "GENERATIONS_DIR", "kept_entries", "KeptEntries", "election_queue",
           "election_receiver"]

#: The folder, beside a dependency's versions, that holds their link records.
LINKS_DIR = ".links"
#: The last round's report, in the cache root (shared by every reaper of the cache).
STATE_FILE = ".reaper.json"
#: The op of the election ticks (a one-way send; an RPC of it with ``force`` runs a round at once).
TICK_OP = "reap_tick"
#: Refresh a link record at most this often (seconds) when a deploy finds it in place.
_REFRESH_AFTER = 3600.0
#: The folder, in the cache root, of the deployment files' generation records.
GENERATIONS_DIR = "generations"
#: The largest generation record read (bytes): a bigger one is skipped (and protects nothing).
_MAX_GENERATIONS_BYTES = 64 << 20

_log = Logger()


# -- link records (blocking: run in a pool thread) ---------------------------------------------------------
def links_folder(entry: Path) -> Path:
    """Where the link records of the entry folder ``entry`` live."""
    return entry.parent / LINKS_DIR / entry.name


def _record_name(host: str, destination: Path) -> str:
    return hashlib.sha256(f"{host}\0{destination}".encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".json"




def record_link(entry: Path, destination: Path, host_id: str | None = None, now: float | None = None) -> Path:
    """Record that ``destination`` links into the cache entry folder ``entry`` (blocking).

    Written (atomically) before the links are made, so a reaper that scans in
    between sees it; refreshed at most hourly when already there. Written by
    descriptors below the dependency's folder, following no link
    (:class:`~ion.core.safefs.SafeDir`): a ``.links`` swapped for a link is refused.
    """
    host = host_id or this_host_id()
    folder = links_folder(entry)
    name = _record_name(host, destination)
    path = folder / name
    now = time.time() if now is None else now
    with SafeDir.open_root(entry.parent) as dependency, dependency.walk((LINKS_DIR, entry.name),
                                                                        create=True) as links:
        st = links.lstat(name)
        if st is not None and stat.S_ISREG(st.st_mode):
            if now - st.st_mtime >= _REFRESH_AFTER:
                os.utime(name, (now, now), dir_fd=links.fd, follow_symlinks=False)
            return path
        links.write_atomic(name, json.dumps({"destination": str(destination), "host": host,
                                             "entry": str(entry)}).encode("utf-8"), mtime=now)
    return path


def _links_here(destination: Path, entry: Path) -> bool:
    """True if ``destination`` holds a symlink that points into ``entry``."""
    try:
        names = os.listdir(destination)
    except OSError:
        return False
    prefix = str(entry) + os.sep
    for name in names:
        target = destination / name
        try:
            if target.is_symlink() and (os.readlink(target) + os.sep).startswith(prefix):
                return True
        except OSError:
            continue
    return False


def live_links(entry: Path, host_id: str, now: float, link_ttl: float) -> int:
    """How many live destinations link into ``entry`` (blocking); dead local records are removed."""
    folder = links_folder(entry)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    live = 0
    for name in names:
        path = folder / name
        if name.startswith("."):
            continue  # a record being written
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            mtime = os.stat(path).st_mtime
            destination, host = Path(record["destination"]), str(record["host"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # unreadable: it protects nothing
            continue
        if host == host_id:
            if _links_here(destination, entry):
                live += 1
            else:
                path.unlink(missing_ok=True)
        elif now - mtime <= link_ttl:
            live += 1
    return live


def _drop_links(entry: Path) -> None:
    folder = links_folder(entry)
    if folder.is_dir():
        for child in folder.iterdir():
            child.unlink(missing_ok=True)
        try:
            folder.rmdir()
            folder.parent.rmdir()  # .links, once no version has records
        except OSError:
            pass


# -- generation records (blocking) -----------------------------------------------------------------------
def kept_entries(root: Path) -> set[Path]:
    """The entry folders the kept generations of every deployment file name (blocking).

    Reads the ``entries`` key of each ``<root>/generations/*.json`` (see the module
    notes); an unreadable record is logged and protects nothing.
    """
    kept: set[Path] = set()
    try:
        top = SafeDir.open_root(root)
    except OSError:
        return kept
    with top:
        try:
            folder = top.open_dir(GENERATIONS_DIR)
        except OSError:
            return kept
        with folder:
            for name in folder.listdir():
                if name.startswith(".") or not name.endswith(".json"):
                    continue  # the lock file, a record being written
                try:
                    raw = folder.read_bytes(name, limit=_MAX_GENERATIONS_BYTES + 1)
                    if raw is None or len(raw) > _MAX_GENERATIONS_BYTES:
                        continue
                    entries = json.loads(raw.decode("utf-8")).get("entries")
                except (OSError, ValueError, AttributeError) as exc:
                    _log.warn("cannot read the generation record {path}: {exc}", path=str(folder.path / name),
                              exc=exc)
                    continue
                for rel in entries if isinstance(entries, list) else ():
                    parts = Path(rel).parts if isinstance(rel, str) else ()
                    if len(parts) == 4 and not any(p in ("..", ".", "/") for p in parts):
                        kept.add(root.joinpath(*parts))
    return kept


class KeptEntries:
    """:func:`kept_entries` of ``root`` for one reap round, read again only when the generations
    folder has changed since (blocking; safe to call from several pool threads).

    A round asks for the kept entries once per eviction candidate, just before removing it: with
    thousands of entries and hundreds of records, reading every record each time made a round
    quadratic. A record is only ever written whole under a new name and renamed into the folder
    (``generations.append_generation``), which changes the folder's modification time; so an
    unchanged ``(device, inode, mtime)`` of the folder means unchanged records. A folder modified
    within the last :data:`RACY_SECONDS` is never trusted that way (a second write within one tick
    of the file system's clock would leave the same mtime): it is read every time.
    """

    #: Seconds a folder's mtime must lie in the past before an unchanged one is trusted.
    RACY_SECONDS = 2.0

    def __init__(self, root: Path) -> None:
        self.root = root
        self.reads = 0
        self._stamp: tuple[int, int, int] | None = None
        self._kept: set[Path] = set()
        self._lock = threading.Lock()

    def _folder_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.root / GENERATIONS_DIR, follow_symlinks=False)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode) or time.time_ns() - st.st_mtime_ns < self.RACY_SECONDS * 1e9:
            return None  # (a link is never followed: kept_entries finds nothing there either)
        return st.st_dev, st.st_ino, st.st_mtime_ns

    def __call__(self) -> set[Path]:
        with self._lock:
            stamp = self._folder_stamp()  # before reading: a change during the read shows next time
            if stamp is not None and stamp == self._stamp:
                return self._kept
            self._kept = kept_entries(self.root)
            self._stamp = stamp
            self.reads += 1
            return self._kept


# -- policy ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReapPolicy(Settings):
    """What the reaper evicts, and how often it runs (``ion.services.cache`` config keys ``reap_*``).

    :ivar interval: seconds between rounds (``reap_interval``, default 3600; 0 or None: never).
    :ivar max_age: evict entries unused for longer than this (seconds; None: no age limit).
    :ivar keep: keep at most this many versions of each dependency, most recently used first (None: all).
    :ivar max_bytes: evict least recently used entries while the cache is larger (None: no limit).
    :ivar min_idle: never evict an entry used within this many seconds (default 600).
    :ivar link_ttl: another host's link record protects its entry this long after its last refresh.
    :ivar tick: seconds between election ticks (default 5): the longest a takeover waits.
    """

    SECTION: ClassVar[str] = "ion.services.cache"

    interval: float | None = setting(3600.0, key="reap_interval", off=True)
    max_age: float | None = setting(None, key="reap_max_age")
    keep: int | None = setting(None, key="reap_keep")
    max_bytes: int | None = setting(None, key="reap_max_bytes")
    min_idle: float = setting(600.0, key="reap_min_idle")
    link_ttl: float = setting(7 * 86400.0, key="reap_link_ttl")
    tick: float = setting(5.0, key="reap_tick", positive=True)

    @property
    def eviction(self) -> EvictionPolicy:
        """What it evicts, as the chooser ``Cache.prune`` uses too."""
        return EvictionPolicy(max_age=self.max_age, keep=self.keep, max_bytes=self.max_bytes,
                              min_idle=self.min_idle)

    def to_wire(self) -> dict[str, Any]:
        return {"interval": self.interval, "max_age": self.max_age, "keep": self.keep,
                "max_bytes": self.max_bytes, "min_idle": self.min_idle, "link_ttl": self.link_ttl}


def choose(complete: builtins.list[FoundEntry], policy: ReapPolicy, now: float,
           linked: Mapping[Path, int]) -> builtins.list[FoundEntry]:
    """The complete entries the policy evicts, least recently used first (pure: no I/O):
    :meth:`EvictionPolicy.choose` of ``policy.eviction``.

    ``linked`` maps an entry folder to its number of live link records.
    """
    return policy.eviction.choose(complete, now, linked)


# -- one round ---------------------------------------------------------------------------------------------
@dataclass
class ReapReport:
    """One round: when, by whom, under which policy, and what it removed."""

    started: float
    finished: float = 0.0
    reaper: str = ""
    policy: dict[str, Any] = field(default_factory=dict)
    entries: int = 0
    bytes_before: int = 0
    linked: int = 0
    pruned: PruneReport = field(default_factory=PruneReport)
    error: str | None = None
    #: Complete entries a kept generation names (never evicted).
    kept: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"started": self.started, "finished": self.finished, "reaper": self.reaper,
                "policy": dict(self.policy), "entries": self.entries, "bytes_before": self.bytes_before,
                "linked": self.linked, "kept": self.kept, "pruned": self.pruned.to_wire(), "error": self.error}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ReapReport:
        return cls(started=float(data.get("started", 0.0)), finished=float(data.get("finished", 0.0)),
                   reaper=str(data.get("reaper", "")), policy=dict(data.get("policy") or {}),
                   entries=int(data.get("entries", 0)), bytes_before=int(data.get("bytes_before", 0)),
                   linked=int(data.get("linked", 0)), pruned=PruneReport.from_wire(data.get("pruned") or {}),
                   error=data.get("error"), kept=int(data.get("kept", 0)))


def _read_state(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_state(root: Path, data: Mapping[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{STATE_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
    os.replace(tmp, root / STATE_FILE)


def _survey(root: Path, host_id: str, now: float, link_ttl: float, kept: KeptEntries
            ) -> tuple[builtins.list[FoundEntry], builtins.list[Path], dict[Path, int], set[Path]]:
    found, lock_files = store.scan(root)
    linked = {f.path: live_links(f.path, host_id, now, link_ttl) for f in found if f.info is not None}
    return found, lock_files, linked, kept()


def _still_free(entry: Path, host_id: str, now: float, link_ttl: float, kept: KeptEntries) -> bool:
    """No live link and no kept generation names ``entry`` now (blocking; under its lock, just
    before removal: a deploy may have linked it, or recorded a generation naming it, since)."""
    return not live_links(entry, host_id, now, link_ttl) and entry not in kept()


class CacheReaper:
    """Runs reap rounds over one :class:`Cache` when this instance is the elected reaper.

    :param cache: the cache to reap.
    :param policy: what to evict and how often.
    :param name: who reaps (the service's process id), recorded in the report.
    :param publish: ``publish(routing_key, content)`` for the ``cache.reap`` event of each round.
    :param clock: time (a ``task.Clock`` in tests).
    """

    _log = Logger()

    def __init__(self, cache: Cache, policy: ReapPolicy, *, name: str,
                 publish: Callable[[str, Any], Any] | None = None, clock: IReactorTime | None = None) -> None:
        self.cache = cache
        self.policy = policy
        self.name = name
        self.publish = publish
        self.clock: IReactorTime = clock or cache.clock
        self.rounds = 0
        self.last: ReapReport | None = None
        self._running: defer.Deferred[ReapReport] | None = None

    def due(self) -> defer.Deferred[bool]:
        """Whether a round is due: ``interval`` since the last round of any reaper of this cache."""
        if not self.policy.interval:
            return defer.succeed(False)
        now = self.clock.seconds()

        def check(state: dict[str, Any] | None) -> bool:
            last = float(state.get("started", 0.0)) if state else 0.0
            return now - last >= (self.policy.interval or 0)

        return self.cache.pool.run(_read_state, self.cache.root).addCallback(check)

    def tick(self) -> defer.Deferred[ReapReport | None]:
        """Handle an election tick: run a round if one is due (fires with its report, else None)."""
        return defer.Deferred.fromCoroutine(self._tick())

    async def _tick(self) -> ReapReport | None:
        if self._running is not None or not await self.due():
            return None
        return await self.run()

    def run(self) -> defer.Deferred[ReapReport]:
        """Run one round now (or join the one running)."""
        if self._running is not None:
            joined: defer.Deferred[ReapReport] = defer.Deferred()

            def relay(result: Any) -> Any:
                if isinstance(result, Failure):
                    joined.errback(result)
                else:
                    joined.callback(result)
                return result

            self._running.addBoth(relay)
            return joined
        self._running = defer.Deferred.fromCoroutine(self._round())

        def done(result: Any) -> Any:
            self._running = None
            return result

        return self._running.addBoth(done)

    async def _round(self) -> ReapReport:
        cache, policy = self.cache, self.policy
        now = self.clock.seconds()
        report = ReapReport(started=now, reaper=self.name, policy=policy.to_wire())
        # Claim the round first, so that a takeover in the middle does not start another at once.
        await cache.pool.run(_write_state, cache.root, {**report.to_wire(), "running": True})
        try:
            generations = KeptEntries(cache.root)
            found, lock_files, linked, kept = await cache.pool.run(_survey, cache.root, cache.host_id, now,
                                                                   policy.link_ttl, generations)
            complete = [f for f in found if f.info is not None]
            report.entries = len(complete)
            report.bytes_before = sum(f.info.size for f in complete if f.info is not None)
            report.linked = sum(1 for n in linked.values() if n)
            report.kept = sum(1 for f in complete if f.path in kept)
            # A kept generation's entry is protected as a linked one is.
            protected = {f.path: linked.get(f.path, 0) + (f.path in kept) for f in complete}

            async def still_free(f: FoundEntry) -> bool:
                return f.info is None or await cache.pool.run(_still_free, f.path, cache.host_id,
                                                              self.clock.seconds(), policy.link_ttl, generations)

            report.pruned = await cache.evict(policy.eviction.targets(found, now, protected), lock_files,
                                              quarantine=False, check=still_free)
            for info in report.pruned.removed:
                await cache.pool.run(_drop_links, info.path)
        except Exception as exc:
            report.error = f"{type(exc).__name__}: {exc}"
            self._log.failure("{name}: reap round failed", name=self.name)
        report.finished = self.clock.seconds()
        self.rounds += 1
        self.last = report
        await cache.pool.run(_write_state, cache.root, report.to_wire())
        self._log.info("{name}: reap round over {n} entries ({size} bytes): removed {removed} "
                       "({freed} bytes), {busy} locked, {linked} linked, {kept} kept by generations{error}",
                       name=self.name, n=report.entries,
                       size=report.bytes_before, removed=len(report.pruned.removed),
                       freed=report.pruned.bytes_freed, busy=len(report.pruned.busy), linked=report.linked,
                       kept=report.kept,
                       error=f"; error: {report.error}" if report.error else "")
        if self.publish is not None:
            try:
                self.publish("cache.reap", report.to_wire())
            except Exception:
                self._log.failure("{name}: could not publish the reap event", name=self.name)
        return report

    def last_report(self) -> defer.Deferred[ReapReport | None]:
        """The last round's report of any reaper of this cache (from ``.reaper.json``)."""
        def parse(state: dict[str, Any] | None) -> ReapReport | None:
            return ReapReport.from_wire(state) if state else None

        return self.cache.pool.run(_read_state, self.cache.root).addCallback(parse)



# -- election --------------------------------------------------------------------------------------------
def election_queue(sysname: str) -> str:
    """The single-active-consumer queue of the reaper election of system ``sysname``."""
    return f"{sysname}.cache.reaper"


def election_receiver(process: Process) -> Receiver:
    """A process's consumer of the election queue (for its ``receivers_to_create``): the queue is
    shared and single-active-consumer; one message at a time, none waiting (prefetch 1)."""
    from ion.core.process import Receiver

    return Receiver(process, election_queue(process.sysname), process.receive, shared=True, prefetch=1,
                    max_concurrent=1, queue_arguments={"x-single-active-consumer": True})


class ReaperElection:
    """Makes one Cache service instance of the system its reaper (see the module notes).

    The process consumes the election queue (:func:`election_receiver`);
    ``start()`` sends a tick to that queue every ``policy.tick`` seconds. The
    process handles :data:`TICK_OP` with :meth:`handle`.
    """

    _log = Logger()

    def __init__(self, process: Process, reaper: CacheReaper) -> None:
        self.process = process
        self.reaper = reaper
        self.queue = election_queue(process.sysname)
        self.ticks_received = 0
        #: When the last tick reached this instance (clock seconds), or None.
        self.last_tick: float | None = None
        self._loop: task.LoopingCall | None = None

    def start(self) -> None:
        """Send ticks every ``policy.tick`` seconds, the first now."""
        if self._loop is not None:
            return
        self._loop = task.LoopingCall(self._send_tick)
        self._loop.clock = self.process.clock
        self._loop.start(self.reaper.policy.tick, now=True).addErrback(
            lambda f: self._log.failure("{pid}: reaper ticks stopped", f, pid=self.process.id))

    def stop(self) -> None:
        """Stop sending ticks."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def is_elected(self) -> bool:
        """Whether this instance is the elected one: ticks reached it within the last three tick intervals."""
        return self.last_tick is not None and self.process.clock.seconds() - self.last_tick <= 3 * self.reaper.policy.tick

    def _send_tick(self) -> None:
        d = self.process.send(self.queue, TICK_OP, {"from": self.process.id})
        d.addErrback(lambda f: self._log.debug("{pid}: reaper tick not sent: {e}", pid=self.process.id,
                                               e=f.getErrorMessage()))

    def handle(self, content: Any) -> defer.Deferred[ReapReport | None]:
        """A tick reached this instance, so it is the reaper: run a round if due (or if ``force``)."""
        self.ticks_received += 1
        self.last_tick = self.process.clock.seconds()
        return defer.Deferred.fromCoroutine(self._handle(isinstance(content, Mapping) and content.get("force") is True))

    async def _handle(self, force: bool) -> ReapReport | None:
        if force:
            return await self.reaper.run()
        return await self.reaper.tick()
