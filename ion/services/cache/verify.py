# -*- test-case-name: tests.services.cache.test_verify -*-
"""Periodic integrity verification of the cache (issue 6; Sentry 2's mirror checker applied to the cache).

:class:`CacheVerifier` re-hashes every complete entry of a :class:`~ion.services.cache.core.Cache`
on a schedule and remembers each entry's previous outcome, so that a round
reports every entry as one of:

- ``good``: its files hash to what ``.entry`` says, as they did last time;
- ``bad``: still (or again) not; quarantined, or still waiting to be fetched again;
- ``good→bad``: it was good (or never checked: a published entry was verified
  while it streamed in) and is bad now;
- ``bad→good``: it was bad and is good now (fetched again since it was quarantined).

``skipped`` marks an entry this round left alone (``action`` says why:
``locked`` while a fetch holds it, ``changed`` when it was republished while
it was being hashed, ``incomplete`` when its ``.entry`` went away); its
previous outcome is kept and it is never reported bad for it.

Decisions:

- **One check, one quarantine**: an entry is compared with its ``.entry`` by
  :func:`~ion.services.cache.store.plan_check` (the walk ``Cache.verify`` does
  too, through :func:`~ion.services.cache.store.verify_entry`); only the
  hashing is the verifier's own, paced. A bad entry is quarantined by
  :meth:`Cache.quarantine`, as :meth:`Cache.repair` does it (its
  ``.entry`` removed first, then the folder moved under ``quarantine/``), under
  the entry's lock taken with ``timeout=0`` and only if its ``.entry`` is
  still the one it was hashed against. From then on :meth:`Cache.lookup`
  misses it.
- **Healing** (issue 17 §3): with a ``refetch`` function (the Cache service:
  a ``fetch`` of the Fetch service, so the usual locks, checksum checks and
  address/folder bounds apply; ``ion-deploy``-like callers: an in-process
  :class:`~ion.services.fetch.core.Fetcher`), a quarantined entry is fetched
  again at once, in the round that found it (``action``: ``refetched``), from
  the version folder its ``.entry`` names (``url``, recorded since the first
  entry format: :func:`~ion.services.fetch.core.refetch_request` turns it back
  into a request, checked to name the entry's repository). The next round
  then reports it ``bad→good`` without anyone deploying. Before a refetch the
  entry's size is reserved on the verifier's :class:`RateLimiter` (the fetch
  path has no cap of its own), so hashing and refetching together keep
  within ``verify_bandwidth``. A refetch that fails leaves the entry
  quarantined (``refetch failed: <why>; next try in N s``) and is tried again
  by the first round after ``verify_refetch_backoff`` seconds, doubled on each
  failure up to ``verify_refetch_max_backoff``: a repository that is down is
  asked once per backoff, never in a loop. Without a ``refetch`` function, or
  for an entry whose ``.entry`` named no URL, the next deploy that needs it
  fetches it again (``action``: ``awaiting refetch (...)``, saying why).
  Scheduled rounds run on the elected instance only, so that is where
  entries are healed; a round requested of another instance heals what it
  quarantines itself.
- **Hashing does not hold the entry's lock**: a fetch is never kept waiting by
  a slow, paced re-hash. The lock is only probed (taken with ``timeout=0`` and
  released at once) to skip entries being fetched or published, and taken
  again for the quarantine. A republish during the hash is caught by comparing
  the ``.entry`` bytes before and after.
- **Bandwidth**: files are hashed in ``chunk``-byte pool jobs (each one opens,
  seeks, reads and closes: no descriptor outlives a job, so a cancelled round
  leaks nothing), and before each job :class:`RateLimiter` reserves its bytes
  at ``bandwidth`` bytes/s on the injected clock, shared by every worker. The
  issue asks for "a configured share of disk bandwidth": the cache cannot know
  the disk's speed, so the share is configured as the byte rate it amounts to,
  ``verify_bandwidth = share x the disk's sequential read rate`` (the default,
  50 MiB/s, is a quarter of a 200 MB/s disk; ``None`` or ``0``: no cap).
- **Parallelism**: at most ``workers`` entries are checked at once, each one
  file and one chunk at a time; the pool bounds the threads anyway.
- **State** (each entry's last good/bad outcome, and the last round's report)
  is kept in memory and in ``<root>/.verify-<host>.json``, written atomically
  (temporary file, fsync, rename) after each round, so a restarted service
  still knows an entry was bad and reports ``bad→good``. One file per host:
  several hosts sharing a cache disk each keep their own view.
- **Events**: every change (``good→bad``, ``bad→good``) is handed to
  ``publish`` as ``cache.verify.change``, and every round's summary as
  ``cache.verify.round`` (the service publishes them on the events exchange;
  bind ``cache.verify.#`` for both).
- **Schedule**: a ``LoopingCall`` on the injected clock, first round one
  ``interval`` after :meth:`CacheVerifier.start`; a round that outlasts the
  interval delays the next one (never two at once). A round asked for while
  one runs joins it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.core.config import Settings, setting
from ion.services.cache import store
from ion.services.cache.core import Cache
from ion.services.cache.entry import EntryKey
from ion.services.cache.errors import LockTimeoutError
from ion.services.cache.store import FoundEntry

__all__ = [
    "CONFIG_SECTION",
    "GOOD",
    "BAD",
    "GOOD_TO_BAD",
    "BAD_TO_GOOD",
    "SKIPPED",
    "EVENT_CHANGE",
    "EVENT_ROUND",
    "REFETCHED",
    "RefetchFn",
    "DEFAULT_VERIFY_INTERVAL",
    "DEFAULT_VERIFY_WORKERS",
    "DEFAULT_VERIFY_BANDWIDTH",
    "DEFAULT_VERIFY_CHUNK",
    "VerifyConfig",
    "RateLimiter",
    "EntryOutcome",
    "VerifyReport",
    "CacheVerifier",
]

CONFIG_SECTION: Final = "ion.services.cache"

GOOD: Final = "good"
BAD: Final = "bad"
GOOD_TO_BAD: Final = "good→bad"
BAD_TO_GOOD: Final = "bad→good"
SKIPPED: Final = "skipped"
#: Every outcome a report row may have, in the order a summary lists them.
OUTCOMES: Final = (GOOD_TO_BAD, BAD, BAD_TO_GOOD, GOOD, SKIPPED)

#: Routing keys of the events (on the system's events exchange).
EVENT_CHANGE: Final = "cache.verify.change"
EVENT_ROUND: Final = "cache.verify.round"

_MIN_CHUNK: Final = 4096
_STATE_FORMAT: Final = 1

PublishFn = Callable[[str, dict[str, Any]], None]
"""Where events go: ``publish(routing_key, content)`` (``Container.publish_event``)."""

RefetchFn = Callable[[EntryKey, str], "defer.Deferred[Any] | Awaitable[Any]"]
"""``refetch(key, url)``: fetch the entry ``key`` again from the version folder ``url`` (what its
``.entry`` recorded) into the cache, through the fetch path (lock, checksums, publish); fails
with the reason when it cannot."""

#: What the ``action`` of a quarantined entry fetched again in the round says.
REFETCHED: Final = "refetched"


# -- configuration ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyConfig(Settings):
    """The verifier's settings (``ion.services.cache`` keys ``verify_*``; ``verify_interval`` and
    ``verify_bandwidth``: ``0`` or ``None`` mean off, no schedule and no cap).

    :ivar interval: seconds between rounds; None: no schedule (rounds only on request).
    :ivar workers: entries checked at once.
    :ivar bandwidth: bytes/s all rounds together may read; None: no cap.
    :ivar chunk: bytes read and hashed per pool job (the pacing unit).
    :ivar refetch: whether the Cache service fetches a quarantined entry again at once (through
        the Fetch service); False: the next deploy that needs it does.
    :ivar refetch_backoff: seconds before a failed refetch is tried again (by a later round);
        doubled after each failure.
    :ivar refetch_max_backoff: the most that wait grows to.
    """

    SECTION: ClassVar[str] = CONFIG_SECTION

    interval: float | None = setting(86400.0, key="verify_interval", off=True, finite=True)
    workers: int = setting(2, key="verify_workers", minimum=1)
    bandwidth: float | None = setting(50.0 * 1024 * 1024, key="verify_bandwidth", off=True, finite=True)
    chunk: int = setting(1024 * 1024, key="verify_chunk", minimum=_MIN_CHUNK)
    refetch: bool = setting(True, key="verify_refetch")
    refetch_backoff: float = setting(300.0, key="verify_refetch_backoff", positive=True, finite=True)
    refetch_max_backoff: float = setting(86400.0, key="verify_refetch_max_backoff", positive=True, finite=True)

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed refetch in a row."""
        return min(self.refetch_max_backoff, self.refetch_backoff * 2.0 ** max(0, min(failures - 1, 60)))


#: Seconds between rounds (config ``verify_interval``): daily.
DEFAULT_VERIFY_INTERVAL: Final = VerifyConfig.interval
#: Entries checked at once (config ``verify_workers``).
DEFAULT_VERIFY_WORKERS: Final = VerifyConfig.workers
#: Bytes/s the rounds may read (config ``verify_bandwidth``): a quarter of a 200 MB/s disk.
DEFAULT_VERIFY_BANDWIDTH: Final = VerifyConfig.bandwidth
#: Bytes hashed per pool job, the unit of pacing (config ``verify_chunk``).
DEFAULT_VERIFY_CHUNK: Final = VerifyConfig.chunk


# -- pacing -----------------------------------------------------------------------------------------------
class RateLimiter:
    """Paces readers to ``rate`` bytes/s on ``clock``, without bursts.

    :meth:`acquire` reserves ``n`` bytes at the earliest time the rate allows
    (each reservation starts where the previous one ends, or now if that is
    later) and fires then, through ``clock.callLater``: nothing sleeps. So
    in any clock interval of ``T`` seconds, reads start for at most
    ``rate x T`` bytes plus one reservation. Cancelling a wait gives up its
    turn (its slot stays used: the limiter errs on the slow side).
    """

    def __init__(self, rate: float | None, clock: IReactorTime) -> None:
        self.rate = rate
        self.clock = clock
        self._next = -math.inf

    def acquire(self, n: int) -> defer.Deferred[None]:
        """Fires when ``n`` bytes may be read (at once when there is no cap)."""
        if not self.rate or n <= 0:
            return defer.succeed(None)
        now = self.clock.seconds()
        start = max(now, self._next)
        self._next = start + n / self.rate
        if start <= now:
            return defer.succeed(None)
        call: list[IDelayedCall] = []

        def cancel(d: defer.Deferred[None]) -> None:
            if call and call[0].active():
                call[0].cancel()

        d: defer.Deferred[None] = defer.Deferred(cancel)
        call.append(self.clock.callLater(start - now, d.callback, None))
        return d


# -- reports --------------------------------------------------------------------------------------------------
@dataclass
class EntryOutcome:
    """One entry's outcome in a round.

    :ivar outcome: ``good``, ``bad``, ``good→bad``, ``bad→good`` or ``skipped``.
    :ivar previous: the entry's state before the round (``good``/``bad``; None: never checked).
    :ivar problems: bad file (or ``.entry``) -> what is wrong.
    :ivar action: ``quarantined`` (moved to ``moved_to``; not fetched again: no refetch
        function, or its ``.entry`` named no URL), ``refetched`` (quarantined, or found
        quarantined, and fetched again in this round: the next round says ``bad→good``),
        ``refetch failed: <why>; next try in N s``, ``awaiting refetch (<why>)``
        (quarantined earlier, not fetched again yet); for ``skipped``: ``locked``,
        ``changed`` or ``incomplete``.
    :ivar bytes: bytes hashed for it this round.
    :ivar url: the version folder it was fetched from (its ``.entry``), when known.
    :ivar retry_at: clock time from which a later round tries its refetch again (after a failure).
    """

    key: EntryKey
    path: Path
    outcome: str
    previous: str | None = None
    problems: dict[str, str] = field(default_factory=dict)
    action: str | None = None
    moved_to: Path | None = None
    bytes: int = 0
    checked_at: float = 0.0
    url: str | None = None
    retry_at: float | None = None

    @property
    def state(self) -> str | None:
        """``good`` or ``bad`` after this round; None when skipped."""
        if self.outcome in (GOOD, BAD_TO_GOOD):
            return GOOD
        if self.outcome in (BAD, GOOD_TO_BAD):
            return BAD
        return None

    @property
    def changed(self) -> bool:
        """True for ``good→bad`` and ``bad→good``: what is published as an event."""
        return self.outcome in (GOOD_TO_BAD, BAD_TO_GOOD)

    def to_wire(self) -> dict[str, Any]:
        return {"key": self.key.to_wire(), "entry": str(self.key), "path": str(self.path), "outcome": self.outcome,
                "previous": self.previous, "problems": dict(self.problems), "action": self.action,
                "moved_to": str(self.moved_to) if self.moved_to else None, "bytes": self.bytes,
                "checked_at": self.checked_at, "url": self.url, "retry_at": self.retry_at}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> EntryOutcome:
        moved = data.get("moved_to")
        retry_at = data.get("retry_at")
        return cls(EntryKey.from_wire(data["key"]), Path(data["path"]), str(data["outcome"]), data.get("previous"),
                   dict(data.get("problems") or {}), data.get("action"), Path(moved) if moved else None,
                   int(data.get("bytes", 0)), float(data.get("checked_at", 0.0)), data.get("url"),
                   float(retry_at) if retry_at is not None else None)


@dataclass
class VerifyReport:
    """One verification round: when, what it read, and every entry's outcome (sorted by key)."""

    started: float
    finished: float | None = None
    trigger: str = "schedule"
    outcomes: list[EntryOutcome] = field(default_factory=list)
    bytes_hashed: int = 0
    bandwidth: float | None = None

    @property
    def seconds(self) -> float:
        """Clock seconds the round took (0 while it runs)."""
        return max(0.0, (self.finished or self.started) - self.started)

    @property
    def rate(self) -> float | None:
        """Bytes hashed per clock second; None for an instant round."""
        return self.bytes_hashed / self.seconds if self.seconds > 0 else None

    def counts(self) -> dict[str, int]:
        """Entries per outcome, every outcome listed."""
        out = dict.fromkeys(OUTCOMES, 0)
        for o in self.outcomes:
            out[o.outcome] = out.get(o.outcome, 0) + 1
        return out

    def summary(self) -> str:
        """One line: ``verify round (schedule): 4 entries, 3 good, 1 good→bad, ...; 12.0 MB in 2.5 s``."""
        counts = ", ".join(f"{n} {name}" for name, n in self.counts().items() if n)
        rate = f", {self.rate / 1e6:.1f} MB/s" if self.rate else ""
        return (f"verify round ({self.trigger}): {len(self.outcomes)} entries{': ' + counts if counts else ''}; "
                f"{self.bytes_hashed / 1e6:.1f} MB hashed in {self.seconds:.1f} s{rate}")

    def to_wire(self) -> dict[str, Any]:
        return {"started": self.started, "finished": self.finished, "trigger": self.trigger,
                "outcomes": [o.to_wire() for o in self.outcomes], "bytes_hashed": self.bytes_hashed,
                "bandwidth": self.bandwidth, "seconds": self.seconds, "rate": self.rate, "counts": self.counts()}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> VerifyReport:
        finished = data.get("finished")
        bandwidth = data.get("bandwidth")
        return cls(float(data["started"]), float(finished) if finished is not None else None,
                   str(data.get("trigger", "schedule")),
                   [EntryOutcome.from_wire(o) for o in data.get("outcomes", [])], int(data.get("bytes_hashed", 0)),
                   float(bandwidth) if bandwidth is not None else None)


# -- blocking helpers (one pool job each) -----------------------------------------------------------------------
def _load_state(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _save_state(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON at ``path`` atomically: temporary file, fsync, rename, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    store.fsync_dir(path.parent)


def _describe_error(exc: BaseException) -> str:
    """One line naming what went wrong: the error's message, else its class."""
    text = str(getattr(exc, "message", None) or exc or "").strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# -- the verifier -----------------------------------------------------------------------------------------------
@dataclass
class _State:
    key: EntryKey
    state: str  # good | bad
    since: float
    checked: float
    #: A bad entry's healing: the version folder to fetch it from (None: its .entry named none),
    #: its size (reserved on the limiter), failed refetches in a row, when to try again, the last
    #: error, and when it was fetched again (the next round checks it).
    url: str | None = None
    size: int = 0
    failures: int = 0
    retry_at: float = 0.0
    error: str | None = None
    refetched: float | None = None
    #: Where the bad entry was quarantined (None: not by this verifier, or a file written before this
    #: was kept): gone, the operator removed it (clear, prune): nothing to fetch again.
    moved_to: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"key": self.key.to_wire(), "state": self.state, "since": self.since, "checked": self.checked,
                "url": self.url, "size": self.size, "failures": self.failures, "retry_at": self.retry_at,
                "error": self.error, "refetched": self.refetched, "moved_to": self.moved_to}

    @classmethod
    def from_wire(cls, s: Mapping[str, Any]) -> _State:
        # Files written before healing have no url/size/failures: such an entry awaits a deploy.
        return cls(EntryKey.from_wire(s["key"]), str(s["state"]), float(s["since"]), float(s["checked"]),
                   s.get("url") or None, int(s.get("size") or 0), int(s.get("failures") or 0),
                   float(s.get("retry_at") or 0.0), s.get("error") or None,
                   float(s["refetched"]) if s.get("refetched") is not None else None, s.get("moved_to") or None)


def _gone(paths: list[str]) -> list[str]:
    """Those of ``paths`` that no longer exist (blocking: run in the pool)."""
    return [p for p in paths if not os.path.lexists(p)]


class CacheVerifier:
    """Re-hashes a cache's entries on a schedule, paced, and reports what changed (see the module notes).

    :param cache: the cache; its ``pool`` runs the blocking steps, its locks guard the quarantine.
    :param config: interval, workers, bandwidth, chunk.
    :param publish: where events go (``Container.publish_event``); None: nowhere.
    :param clock: schedule and pacing (default: the cache's clock); a ``task.Clock`` in tests.
    :param state_path: where outcomes persist (default ``<root>/.verify-<host>.json``).
    :param should_run: asked before each scheduled round; a round is skipped when it says no
        (the Cache service: only the elected reaper verifies, so that a cache shared by many
        containers is read once per round, within one bandwidth cap).
    :param refetch: fetches a quarantined entry again (see :data:`RefetchFn` and the module
        notes); None: bad entries wait for the next deploy that needs them.
    """

    _log = Logger()

    def __init__(self, cache: Cache, config: VerifyConfig | None = None, *, publish: PublishFn | None = None,
                 clock: IReactorTime | None = None, state_path: str | os.PathLike[str] | None = None,
                 should_run: Callable[[], bool] | None = None, refetch: RefetchFn | None = None) -> None:
        self.cache = cache
        self.should_run = should_run
        self.refetch = refetch
        #: Refetches that succeeded and that failed since start (the service's metrics).
        self.refetches: dict[str, int] = {"refetched": 0, "failed": 0}
        self.config = config or VerifyConfig()
        self.publish = publish
        self.clock: IReactorTime = clock or cache.clock
        host_tag = hashlib.sha256(cache.host_id.encode()).hexdigest()[:8]
        self.state_path = Path(state_path) if state_path is not None else cache.root / f".verify-{host_tag}.json"
        self.limiter = RateLimiter(self.config.bandwidth, self.clock)
        #: Each entry's last outcome, by its path relative to the root.
        self.states: dict[str, _State] = {}
        #: The last finished round, or None.
        self.last_report: VerifyReport | None = None
        #: The round running now, or None.
        self.current: VerifyReport | None = None
        self._loaded: defer.Deferred[None] | None = None
        self._round: defer.Deferred[VerifyReport] | None = None
        self._waiters: list[defer.Deferred[VerifyReport]] = []
        self._loop: task.LoopingCall | None = None
        self._stopped = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> defer.Deferred[None]:
        """Load the saved outcomes, then schedule rounds every ``interval`` (none if it is off)."""
        self._stopped = False
        d = self.load()

        def schedule(_: None) -> None:
            if self.config.interval and not self._stopped and self._loop is None:
                self._loop = task.LoopingCall(self._scheduled)
                self._loop.clock = self.clock
                self._loop.start(self.config.interval, now=False)
                self._log.info("cache verify of {root}: every {interval:g} s, {workers} at once, {cap}",
                               root=str(self.cache.root), interval=self.config.interval,
                               workers=self.config.workers,
                               cap=f"at most {self.config.bandwidth / 1e6:.1f} MB/s" if self.config.bandwidth
                               else "no bandwidth cap")

        d.addCallback(schedule)
        return d

    def stop(self) -> defer.Deferred[None]:
        """Stop the schedule and cancel a running round; fires when it has ended."""
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._round is None:
            return defer.succeed(None)
        ended: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(ended)  # type: ignore[arg-type]
        ended.addBoth(lambda _: None)
        self._round.cancel()
        return ended

    def load(self) -> defer.Deferred[None]:
        """Read the saved outcomes and last report (once; an unreadable file is logged and ignored)."""
        if self._loaded is None:
            self._loaded = defer.Deferred.fromCoroutine(self._load())
        d: defer.Deferred[None] = defer.Deferred()

        def loaded(result: Any) -> Any:
            d.callback(None)
            return result

        self._loaded.addBoth(loaded)
        return d

    async def _load(self) -> None:
        try:
            data = await self.cache.pool.run(_load_state, self.state_path)
            if data is None:
                return
            for rel, s in (data.get("entries") or {}).items():
                self.states[rel] = _State.from_wire(s)
            if data.get("last_report"):
                self.last_report = VerifyReport.from_wire(data["last_report"])
        except Exception as exc:
            self.states.clear()
            self._log.warn("cache verify: ignoring unreadable state file {path} ({error}); every entry counts "
                           "as good until checked", path=str(self.state_path), error=str(exc) or type(exc).__name__)

    def report(self) -> defer.Deferred[VerifyReport | None]:
        """The last finished round (once the saved state is loaded), or None."""

        async def last() -> VerifyReport | None:
            await self.load()
            return self.last_report

        return defer.Deferred.fromCoroutine(last())

    # -- rounds ----------------------------------------------------------------------------------------------------
    def run_round(self, trigger: str = "request") -> defer.Deferred[VerifyReport]:
        """Verify every entry now; fires with the round's report. Joins a round already running.

        Cancelling the returned Deferred stops waiting for the round, not the round.
        """
        d: defer.Deferred[VerifyReport] = defer.Deferred()
        self._waiters.append(d)
        if self._round is None:
            self._round = defer.Deferred.fromCoroutine(self._run(trigger))
            self._round.addBoth(self._round_ended)
        return d

    def _round_ended(self, result: Any) -> None:
        self._round = None
        self.current = None
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if w.called:
                continue
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(result)
        if isinstance(result, Failure) and not waiters:
            self._log.failure("cache verify round failed", result)

    def _scheduled(self) -> defer.Deferred[None]:
        if self.should_run is not None and not self.should_run():
            self._log.debug("scheduled cache verify round skipped: another instance verifies")
            return defer.succeed(None)
        # Never let the LoopingCall see a failure: it would stop the schedule for good.
        d = self.run_round("schedule")

        def failed(f: Failure) -> None:
            if not f.check(defer.CancelledError):
                self._log.failure("scheduled cache verify round failed; the next one runs on schedule", f)

        d.addCallbacks(lambda _: None, failed)
        return d  # type: ignore[return-value]

    async def _run(self, trigger: str) -> VerifyReport:
        await self.load()
        report = VerifyReport(started=self.clock.seconds(), trigger=trigger, bandwidth=self.config.bandwidth)
        self.current = report
        found, _locks = await self.cache.pool.run(store.scan, self.cache.root)
        targets = [f for f in found if f.problem != "incomplete"]
        sem = defer.DeferredSemaphore(self.config.workers)
        checks = [sem.run(self._check_deferred, f, report) for f in targets]
        outcomes: list[EntryOutcome] = await defer.gatherResults(checks, consumeErrors=True)
        seen = {self._rel(f.key) for f in found}
        now = self.clock.seconds()
        waiting: list[EntryOutcome] = []
        quarantined = [s.moved_to for rel, s in self.states.items()
                       if rel not in seen and s.state == BAD and s.refetched is None and s.moved_to]
        removed = set(await self.cache.pool.run(_gone, quarantined)) if quarantined else set()
        for rel, s in list(self.states.items()):
            if rel in seen:
                continue
            if s.state == BAD and s.refetched is None and s.moved_to in removed:
                # Its quarantined copy was removed (clear, prune): the operator let it go, nothing to heal.
                del self.states[rel]
            elif s.state == BAD and s.refetched is None:  # quarantined earlier, not fetched again yet: not served
                waiting.append(EntryOutcome(s.key, self.cache.entry_path(s.key), BAD, BAD, checked_at=now,
                                            url=s.url))
            else:
                # Removed (prune, clear, the reaper) while good, or after it was fetched again:
                # nothing to remember (and nothing to fetch: it is no longer wanted).
                del self.states[rel]
        await defer.gatherResults([sem.run(self._heal_deferred, o) for o in waiting], consumeErrors=True)
        outcomes.extend(waiting)
        outcomes.sort(key=lambda o: (o.key.repo_id, o.key.platform, o.key.name, o.key.version, o.key.unpack))
        report.outcomes = outcomes
        report.finished = self.clock.seconds()
        self.last_report = report
        await self._save()
        self._emit(EVENT_ROUND, {"host": self.cache.host_id, "root": str(self.cache.root), "trigger": trigger,
                                 "started": report.started, "finished": report.finished,
                                 "entries": len(outcomes), "counts": report.counts(),
                                 "bytes": report.bytes_hashed, "seconds": report.seconds, "rate": report.rate,
                                 "changes": [o.to_wire() for o in outcomes if o.changed]})
        log = self._log.warn if any(o.state == BAD for o in outcomes) else self._log.info
        log("{root}: {summary}", root=str(self.cache.root), summary=report.summary())
        return report

    def _rel(self, key: EntryKey) -> str:
        return str(key.relpath)

    def _check_deferred(self, found: FoundEntry, report: VerifyReport) -> defer.Deferred[EntryOutcome]:
        return defer.Deferred.fromCoroutine(self._check(found, report))

    async def _check(self, found: FoundEntry, report: VerifyReport) -> EntryOutcome:
        key, path = found.key, found.path
        rel = self._rel(key)
        prev = self.states.get(rel)
        out = EntryOutcome(key, path, SKIPPED, prev.state if prev else None)
        try:
            probe = await self.cache.lock(key, timeout=0)
        except LockTimeoutError:
            out.action, out.checked_at = "locked", self.clock.seconds()
            return out
        await self.cache.unlock(probe)
        plan = await self.cache.pool.run(store.plan_check, path, key)
        if plan is None:
            out.action, out.checked_at = "incomplete", self.clock.seconds()
            return out
        problems = dict(plan.problems)
        for name, size, expected in plan.to_hash:
            digest, n = await self._hash(path / name, size)
            out.bytes += n
            report.bytes_hashed += n
            problem = f"{n} bytes read, expected {size}" if n != size else store.digest_problem(digest, expected)
            if problem:
                problems[name] = problem
        out.checked_at = self.clock.seconds()
        if problems:
            out.problems = problems
            if not await self._quarantine(out, plan.entry_bytes):
                return out  # skipped: locked or republished meanwhile
            out.url = plan.url
        self._settle(out, GOOD if not problems else BAD)
        if problems:
            state = self.states[rel]
            state.url, state.size = plan.url, sum(size for _name, size, _digest in plan.to_hash)
            state.failures, state.retry_at, state.error = 0, 0.0, None
            state.moved_to = str(out.moved_to) if out.moved_to is not None else None
            await self._heal(out)
        return out

    def _heal_deferred(self, out: EntryOutcome) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._heal(out))

    async def _heal(self, out: EntryOutcome) -> None:
        """Fetch a quarantined entry again when it is due (see the module notes); sets ``out.action``."""
        state = self.states[self._rel(out.key)]
        now = self.clock.seconds()
        fresh = "quarantined; " if out.action == "quarantined" else ""  # quarantined in this round
        if self.refetch is None:
            out.action = out.action or "awaiting refetch"  # by the next deploy that needs it
            return
        if state.url is None:
            out.action = fresh + ("awaiting refetch (its .entry named no repository URL: the next deploy that "
                                  "needs it fetches it again)")
            return
        if state.retry_at > now:
            out.retry_at = state.retry_at
            out.action = (f"awaiting refetch (next try in {state.retry_at - now:.0f} s; "
                          f"{state.failures} failed, the last: {state.error})")
            return
        await self.limiter.acquire(state.size)  # the refetch's bytes count against the cap too
        if self._stopped:
            raise defer.CancelledError("the cache verifier is stopping")
        try:
            await self.refetch(out.key, state.url)
        except defer.CancelledError:
            raise
        except Exception as exc:
            state.failures += 1
            state.error = _describe_error(exc)
            delay = self.config.backoff(state.failures)
            state.retry_at = out.retry_at = self.clock.seconds() + delay
            self.refetches["failed"] += 1
            out.action = f"refetch failed: {state.error}; next try in {delay:.0f} s"
            self._log.warn("cache verify: fetching bad entry {entry} again from {url} failed ({error}); it stays "
                           "quarantined, next try in {delay:.0f} s", entry=str(out.key), url=state.url,
                           error=state.error, delay=delay)
            return
        state.failures, state.retry_at, state.error, state.refetched = 0, 0.0, None, self.clock.seconds()
        self.refetches["refetched"] += 1
        out.action = REFETCHED
        self._log.info("cache verify: fetched bad entry {entry} again from {url}", entry=str(out.key), url=state.url)

    async def _hash(self, path: Path, size: int) -> tuple[str, int]:
        hasher = hashlib.sha256()
        done = 0
        while done < size:
            n = min(self.config.chunk, size - done)
            await self.limiter.acquire(n)
            if self._stopped:
                raise defer.CancelledError("the cache verifier is stopping")
            try:
                got = await self.cache.pool.run(store.hash_range, path, hasher, done, n)
            except FileNotFoundError:
                break
            done += got
            if got < n:
                break
        return hasher.hexdigest(), done

    async def _quarantine(self, out: EntryOutcome, entry_bytes: bytes) -> bool:
        """Quarantine a bad entry under its lock; False (and ``out`` skipped) if it is locked or was republished."""
        try:
            lock = await self.cache.lock(out.key, timeout=0)
        except LockTimeoutError:
            out.outcome, out.action = SKIPPED, "locked"
            return False
        try:
            now_bytes = await self.cache.pool.run(store.read_entry_bytes, out.path)
            if now_bytes != entry_bytes:
                out.outcome, out.action, out.problems = SKIPPED, "changed" if now_bytes else "incomplete", {}
                return False
            out.moved_to = await self.cache.quarantine(out.key, out.path, out.problems, log_prefix="cache verify: ")
            out.action = "quarantined"
            return True
        finally:
            await self.cache.unlock(lock)

    def _settle(self, out: EntryOutcome, state: str) -> None:
        """Record ``state`` for the entry, set its outcome from the previous one, publish a change."""
        previous = out.previous or GOOD  # never checked: it was verified while it streamed in
        if state == GOOD:
            out.outcome = BAD_TO_GOOD if previous == BAD else GOOD
        else:
            out.outcome = GOOD_TO_BAD if previous == GOOD else BAD
        rel = self._rel(out.key)
        old = self.states.get(rel)
        since = old.since if old is not None and old.state == state else out.checked_at
        self.states[rel] = _State(out.key, state, since, out.checked_at)
        if out.changed:
            self._emit(EVENT_CHANGE, {"host": self.cache.host_id, "root": str(self.cache.root), **out.to_wire()})

    async def _save(self) -> None:
        data = {"format": _STATE_FORMAT, "host_id": self.cache.host_id,
                "entries": {rel: s.to_wire() for rel, s in sorted(self.states.items())},
                "last_report": self.last_report.to_wire() if self.last_report else None}
        try:
            await self.cache.pool.run(_save_state, self.state_path, data)
        except OSError as exc:
            self._log.warn("cache verify: could not save {path} ({error}); outcomes are kept in memory",
                           path=str(self.state_path), error=str(exc))

    def _emit(self, routing_key: str, content: dict[str, Any]) -> None:
        if self.publish is None:
            return
        try:
            self.publish(routing_key, content)
        except Exception:
            self._log.failure("cache verify: event {key} not published", key=routing_key)
