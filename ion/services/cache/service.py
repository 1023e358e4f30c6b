"""The Cache service: :class:`~ion.services.cache.core.Cache` as ION ops, and its client.

``res/apps/cache.app`` starts it. Config (``ion.services.cache``, or spawnargs):
``root`` (default ``$ION_CACHE_DIR``, else ``~/.cache/ion/deploy``),
``lock_timeout`` (600 s), ``lock_wait_timeout`` (2 x lock_timeout),
``lock_lease`` (60 s), ``lock_holder_check`` (5 s, see "Locks over RPC"),
``host_id`` (default: see :func:`~ion.services.cache.locks.resolve_host_id`),
``broker_locks`` (true: each lock is taken through the broker as well, on a
connection of the service's own, see :class:`~ion.services.cache.locks.BrokerLocks`),
``fsync`` (fsync file contents at publish), ``max_concurrent`` (requests
handled at once: a ``lock`` waiting for its entry must not keep ``unlock``
from being handled).

**Periodic verification** (:mod:`~ion.services.cache.verify`): ``verify_interval``
(seconds between rounds, default 86400; 0 or None: no schedule),
``verify_workers`` (entries checked at once, 2), ``verify_bandwidth``
(bytes/s the rounds may read, 50 MiB/s; 0 or None: no cap -- set it to the
share of the disk's read rate you grant it), ``verify_chunk`` (bytes per
paced read, 1 MiB). Each round publishes ``cache.verify.change`` per entry
that went ``good→bad`` or ``bad→good`` and ``cache.verify.round`` with the
summary; a bad entry is quarantined and, with ``verify_refetch`` (default
true), fetched again at once through the Fetch service (a failure is tried
again by a later round after ``verify_refetch_backoff`` seconds, 300, doubled
on each failure up to ``verify_refetch_max_backoff``, 86400); else the next
deploy fetches it again. ``verify_round`` runs a round now; ``verify_report``
answers the last one.

Ops (content: plain dicts; an entry key in its wire form ``{repo_id | url,
platform, name, version, unpack}``): ``lookup``, ``info``, ``list``,
``lock``, ``renew``, ``unlock``, ``new_staging``, ``discard_staging``,
``publish``, ``verify``, ``repair``, ``prune``, ``clear``, ``verify_round``,
``verify_report``. Errors answer with
their :class:`~ion.services.cache.errors.CacheError` code: 400 bad request,
403 staging folder outside the cache, 404 unknown entry or lock token, 409
lock conflict or timeout, 422 corrupt entry or staged content.

**Locks over RPC** belong to this service process: ``lock`` answers with a
random token and this instance's pid; ``renew``, ``unlock`` and ``publish``
name the token and go to that pid (several instances may share the service
queue; :class:`CacheClient` routes them). A lock lasts for its ``lease``
(default ``lock_lease``, 60 s) unless renewed, so a caller that dies or gives up
waiting never pins an entry for good. A caller that dies loses it sooner: while
locks are held, every ``lock_holder_check`` seconds (5; 0: off) the service
asks the broker whether each holder's process queue (the request's ``sender``)
still has a consumer (:func:`~ion.core.control.has_consumer`, the check the job
takeover uses); a holder without one on two checks in a row (a dead
container's connection takes its consumers with it) has its locks released,
logged with the holder; a caller that lives on through the loss of its own
connection sends the ``unlock`` (and ``discard_staging``) the loss cut off again
once reconnected (:class:`CacheClient`); no check counts until this container's own connection has been up
``reconnect_max`` + 10 s (:func:`~ion.core.control.connection_settled`: after a broker restart,
holders may still be reconnecting). Every lock is released when the
service terminates, and pending ``lock`` waits are cancelled then (the first
phase of its terminate, :meth:`CacheService.slc_drain`: they answer 503).

From any process::

    cache = CacheClient(proc)
    info = yield cache.lookup(key)
    if info is None:
        lock = yield cache.lock(key)
        try:
            staging = yield cache.new_staging()
            ...  # fetch into staging
            info = yield cache.publish(lock, staging, files)
        finally:
            yield cache.unlock(lock)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from ion.core.control import connection_settled, has_consumer, reconnected
from ion.core.deferreds import shielded
from ion.core.exceptions import ConversationError, cut_off
from ion.core.process import Receiver
from ion.core.security import control, narrow_root
from ion.core.service import ServiceClient, ServiceProcess
from ion.services.cache.core import DEFAULT_LOCK_TIMEOUT, CacheSettings, default_root
from ion.services.cache.entry import EntryInfo, EntryKey, EntryReport, FileMeta, PruneReport
from ion.services.cache.errors import (
    CacheError,
    InvalidKeyError,
    LockError,
    LockNotHeldError,
    UnknownLockError,
)
from ion.services.cache.locks import BrokerLocks, CacheLock, lock_transport_factory
from ion.services.cache.reaper import (
    TICK_OP,
    CacheReaper,
    ReaperElection,
    ReapPolicy,
    ReapReport,
    election_queue,
    election_receiver,
)
from ion.services.cache.verify import CacheVerifier, VerifyConfig, VerifyReport

__all__ = ["CacheService", "CacheClient", "RemoteLock"]

#: Seconds a client's ``lock`` waits by default (2 x the default lock_timeout).
DEFAULT_CLIENT_WAIT = 2 * DEFAULT_LOCK_TIMEOUT
#: Seconds a clean-up call (``unlock``, ``discard_staging``) cut off by the loss of the broker
#: connection waits for the connection to come back, to be sent again.
CLEANUP_RECONNECT_WAIT = 30.0


def _dict(content: Any, op: str) -> dict[str, Any]:
    if content is None:
        return {}
    if not isinstance(content, Mapping):
        raise InvalidKeyError(f"{op}: content must be a dict, not {type(content).__name__}")
    return dict(content)


def _number(content: Mapping[str, Any], name: str, *, minimum: float = 0) -> float | None:
    value = content.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum or math.isnan(value):
        raise InvalidKeyError(f"{name} must be a number >= {minimum:g}, not {value!r}")
    return float(value)


@dataclass
class _Lease:
    """A lock held by the service on behalf of a caller."""

    lock: CacheLock
    owner: str
    lease: float
    call: IDelayedCall | None = None
    busy: int = 0
    #: (sender, conv-id) of the lock request: a cancel of it that comes late frees the lock.
    conv: tuple[str, str] | None = None
    #: The pid of the process that asked for the lock (its queue is checked for a consumer).
    holder: str | None = None
    #: Checks in a row that found nobody consuming the holder's queue.
    missed: int = 0


class CacheService(ServiceProcess):
    """Serves one cache root to the system (DESIGN §8, "Cache")."""

    service_name = "cache"
    version = "0.1.0"
    _log = Logger()

    #: A lock waiting for its entry must not keep the unlock that frees it waiting.
    max_concurrent = CacheSettings.max_concurrent
    #: Terminate cancels the lock waits at once (its first phase, see :mod:`ion.core.service`):
    #: a lock op waiting for its entry would hold up the drain of the ops.
    drain_timeout = 0.0

    @defer.inlineCallbacks
    def slc_init(self) -> Any:
        # A security bound (clear and prune delete below it): the container's setting, which
        # an app's config or the spawnargs may narrow to a folder inside it, never move out of
        # (checked on resolved paths: realpath, in the pool).
        root = yield self.container.blocking.run(self.bounded_config, "root", narrow_root, str(default_root()))
        self.settings = CacheSettings.from_config(self.get_config)
        broker_locks: BrokerLocks | None = None
        connect = lock_transport_factory(self.container.transport) if self.settings.broker_locks else None
        if connect is not None:
            broker_locks = BrokerLocks(connect, self.clock)
        self.cache = self.settings.open(root, clock=self.clock, pool=self.container.blocking,
                                        broker_locks=broker_locks)
        self.reaper = CacheReaper(self.cache, ReapPolicy.from_config(self.get_config), name=self.id,
                                  publish=self._publish_event, clock=self.clock)
        #: The last reap round's report this instance saw (its own, or another's event).
        self.last_reap: dict[str, Any] | None = None
        self.election = ReaperElection(self, self.reaper)
        # One instance of the system verifies on schedule, the elected one (a shared cache is
        # read once per round, within one bandwidth cap); any instance verifies on request.
        verify_config = VerifyConfig.from_config(self.get_config)
        self.verifier = CacheVerifier(self.cache, verify_config, publish=self.container.publish_event,
                                      clock=self.clock, should_run=self.election.is_elected,
                                      refetch=self._refetch if verify_config.refetch else None)
        self._leases: dict[str, _Lease] = {}
        #: Checks, while any lock is held over messages, that each holder still listens.
        self._holder_check: task.LoopingCall | None = None

    def _publish_event(self, routing_key: str, content: Any) -> None:
        if routing_key == "cache.reap" and isinstance(content, Mapping):
            self.last_reap = dict(content)
        self.container.publish_event(routing_key, content)

    def _refetch(self, key: EntryKey, url: str) -> Any:
        """The verifier's refetch: a ``fetch`` of the Fetch service (its locks, checksum checks and
        repository bounds), from the version folder the bad entry's ``.entry`` recorded."""
        from ion.services.fetch.core import refetch_request
        from ion.services.fetch.service import FetchClient

        return FetchClient(self).fetch(refetch_request(key, url))

    def metric_families(self) -> Any:
        """The cache as this instance last saw it: entries and bytes after the last reap round,
        entries by verify state. (Several instances on one cache report one series: the
        families are added up, so each gives the gauges only once, the elected one.)"""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if not self.election.is_elected():
            return []
        families: list[Any] = []
        reap = self.last_reap
        if reap is not None and not reap.get("error"):
            pruned = reap.get("pruned") or {}
            removed = pruned.get("removed") or []
            freed = sum(int(e.get("size") or 0) for e in removed if isinstance(e, Mapping))
            families.append(GaugeMetricFamily("ion_cache_entries", "Entries in the cache after the last reap round.",
                                              value=int(reap.get("entries") or 0) - len(removed)))
            families.append(GaugeMetricFamily("ion_cache_bytes", "Bytes in the cache after the last reap round.",
                                              value=int(reap.get("bytes_before") or 0) - freed))
        verify = GaugeMetricFamily("ion_cache_verify_entries", "Entries by the outcome of their last periodic "
                                   "verification (good or bad).", labels=("state",))
        states = [s.state for s in self.verifier.states.values()]
        for state in ("good", "bad"):
            verify.add_metric((state,), states.count(state))
        families.append(verify)
        refetches = CounterMetricFamily("ion_cache_verify_refetches", "Bad entries the periodic verification "
                                        "fetched again, by result (refetched or failed).", labels=("result",))
        for result, n in sorted(self.verifier.refetches.items()):
            refetches.add_metric((result,), n)
        families.append(refetches)
        families.append(GaugeMetricFamily("ion_cache_verify_refetch_failing", "Quarantined entries whose last "
                                          "refetch failed (tried again after a backoff).",
                                          value=sum(1 for s in self.verifier.states.values()
                                                    if s.state == "bad" and s.failures)))
        return families

    def receivers_to_create(self) -> list[Receiver]:
        # After the service's own: the election queue keeps its one-at-a-time window.
        return super().receivers_to_create() + [election_receiver(self)]

    def slc_activate(self) -> None:
        self.election.start()
        def done(removed: list[Path]) -> None:
            if removed:
                self._log.info("{pid}: removed {n} abandoned staging folders from {root}", pid=self.id,
                               n=len(removed), root=str(self.cache.root))

        d = self.cache.cleanup_staging()
        d.addCallback(done)
        d.addErrback(lambda f: self._log.warn("{pid}: staging cleanup failed: {err}", pid=self.id,
                                              err=f.getErrorMessage()))
        v = self.verifier.start()
        v.addErrback(lambda f: self._log.warn("{pid}: cache verify not scheduled: {err}", pid=self.id,
                                              err=f.getErrorMessage()))

    def slc_drain(self) -> Any:
        """Terminate's first phase: no more reaper ticks; lock ops refuse (503), lock waits are cancelled."""
        self.election.stop()
        return super().slc_drain()

    @defer.inlineCallbacks
    def slc_terminate(self) -> Any:
        self._stop_holder_check()
        for lease in self._leases.values():
            if lease.call is not None and lease.call.active():
                lease.call.cancel()
        self._leases.clear()
        yield self.verifier.stop()
        yield self.cache.close()

    # -- helpers -----------------------------------------------------------------------------------------
    def _key(self, content: Mapping[str, Any]) -> EntryKey:
        return EntryKey.from_wire(content.get("key"))

    def _lease(self, content: Mapping[str, Any]) -> _Lease:
        token = content.get("token")
        lease = self._leases.get(token) if isinstance(token, str) else None
        if lease is None:
            raise UnknownLockError(f"cache service {self.id} holds no lock with token {token!r} "
                                   "(released, expired, or granted by another instance)")
        return lease

    def _schedule_expiry(self, token: str, lease: _Lease) -> None:
        if lease.call is not None and lease.call.active():
            lease.call.cancel()
        lease.call = self.clock.callLater(lease.lease, self._expire, token)

    def _expire(self, token: str) -> None:
        lease = self._leases.get(token)
        if lease is None:
            return
        lease.call = None
        if lease.busy:
            return  # rescheduled when the publish in progress ends
        del self._leases[token]
        self._log.warn("{pid}: the lock of {entry} held for {owner} was neither renewed nor released within "
                       "{lease:g} s: released", pid=self.id, entry=str(lease.lock.key), owner=lease.owner,
                       lease=lease.lease)
        self.cache.unlock(lease.lock)

    # -- holders that died (see the module notes) ----------------------------------------------------------
    def _watch_holders(self) -> None:
        """Start checking the holders of the locks held over messages (once; ``lock_holder_check``)."""
        interval = self.settings.lock_holder_check
        if not interval or self._holder_check is not None or self.draining:
            return
        self._holder_check = self.repeat(interval, self._check_holders, "the lock holder check")

    def _stop_holder_check(self) -> None:
        check, self._holder_check = self._holder_check, None
        if check is not None and check.running:
            check.stop()

    async def _ask_holders(self) -> None:
        if not connection_settled(self.container):
            return  # (just (re)connected: holders may still be reconnecting; no check counts yet)
        leases = [(token, lease) for token, lease in self._leases.items() if lease.holder]
        consumed: dict[str, bool | None] = {}
        for holder in {lease.holder for _, lease in leases if lease.holder}:
            consumed[holder] = await has_consumer(self.container.transport, holder)
        for token, lease in leases:
            if self._leases.get(token) is not lease:
                continue  # released meanwhile
            if consumed.get(lease.holder or "") is not False:  # listening, or the broker cannot tell
                lease.missed = 0
                continue
            lease.missed += 1
            if lease.missed < 2 or lease.busy:
                continue  # a publish in progress: the next check, after it
            del self._leases[token]
            if lease.call is not None and lease.call.active():
                lease.call.cancel()
            # (The sender of a request is the process's backend queue: its pid and "b".)
            holder_pid = (lease.holder or "").removesuffix("b")
            self._log.warn("{pid}: the lock of {entry} held for process {holder_pid} released: it no longer listens "
                           "(no consumer on its queue {holder} at {n} checks {interval:g} s apart; {owner})",
                           pid=self.id, entry=str(lease.lock.key), owner=lease.owner, holder=lease.holder,
                           holder_pid=holder_pid, n=lease.missed, interval=self.settings.lock_holder_check or 0)
            await self.cache.unlock(lease.lock)

    def _check_holders(self) -> defer.Deferred[None]:
        """One check of every lock holder: a holder whose process queue had no consumer on this
        check and the one before loses its locks (a check that fails is logged; the next comes)."""
        def failed(f: Any) -> None:
            self._log.warn("{pid}: checking the lock holders failed: {e}", pid=self.id, e=f.getErrorMessage())

        def done(_: Any) -> None:
            if not self._leases:
                self._stop_holder_check()  # started again by the next lock

        return defer.ensureDeferred(self._ask_holders()).addErrback(failed).addCallback(done)

    # -- ops ------------------------------------------------------------------------------------------------
    async def op_lookup(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{key, verify?}`` -> the entry's info, or None (missing, incomplete, damaged); counts as a use."""
        c = _dict(content, "lookup")
        info = await self.cache.lookup(self._key(c), verify=bool(c.get("verify", False)))
        return info.to_wire() if info is not None else None

    async def op_info(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{key}`` -> the entry's info; 404 if there is no complete entry."""
        return (await self.cache.info(self._key(_dict(content, "info")))).to_wire()

    async def op_list(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{}`` -> ``{entries: [info, ...]}``, every complete entry."""
        return {"entries": [e.to_wire() for e in await self.cache.list()], "root": str(self.cache.root)}

    @control("cache.write", audited=False)
    async def op_lock(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{key, timeout?, lease?}`` -> ``{token, pid, key, path, lease}``; 409 after ``timeout`` seconds."""
        c = _dict(content, "lock")
        key = self._key(c)
        timeout = _number(c, "timeout")
        # A short default lease: a lock granted to a caller that gave up waiting (its
        # RPC timed out or was cancelled) is freed after one lease, not lock_timeout.
        lease_s = _number(c, "lease", minimum=1) or self.settings.lock_lease
        if self.draining:
            raise LockError(f"cache service {self.id} is terminating", 503)
        # The caller may cancel the wait (CacheClient.lock: when its call is cancelled or times out);
        # so does terminate (slc_drain).
        try:
            lock = await self.cancellable(msg, self.cache.lock(key, timeout))
        except defer.CancelledError:
            if self.draining:
                raise LockError(f"cache service {self.id} terminated while {key} was waiting for its lock",
                                503) from None
            raise LockError(f"the lock wait for {key} was cancelled by its caller", 409) from None
        if self.draining:
            await self.cache.unlock(lock)
            raise LockError(f"cache service {self.id} is terminating", 503)
        owner = f"{msg.get('sender-name') or '?'} ({msg.get('sender')})"
        sender = msg.get("sender")
        lease = _Lease(lock, owner, lease_s, conv=(str(msg.get("broker-user")), str(msg.get("conv-id"))),
                       holder=sender if isinstance(sender, str) and sender else None)
        self._leases[lock.id] = lease
        self._schedule_expiry(lock.id, lease)
        self._watch_holders()
        return {"token": lock.id, "pid": self.id, "key": key.to_wire(), "path": str(lock.path), "lease": lease_s}

    @control("cache.write", audited=False)
    def op_renew(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{token, lease?}`` -> ``{lease}``: the lock lasts ``lease`` more seconds; 409 if it was taken over."""
        c = _dict(content, "renew")
        lease = self._lease(c)
        if not lease.lock.active:
            raise LockNotHeldError(f"the lock of {lease.lock.key} ({lease.lock.path}) was taken over")
        lease.lease = _number(c, "lease", minimum=1) or lease.lease
        self._schedule_expiry(lease.lock.id, lease)
        return {"lease": lease.lease}

    async def op_cancel(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{conv}``: cancel a lock wait; a lock granted to that request meanwhile (its answer
        crossed the cancel) is released, not left to its lease."""
        result = super().op_cancel(content, headers, msg)
        if result.get("cancelled"):
            return result
        if not msg.get("broker-user"):
            return result  # no broker-validated user: it owns no lock
        wanted = (str(msg.get("broker-user")), str(content.get("conv")))
        for token, lease in list(self._leases.items()):
            if lease.conv == wanted and not lease.busy:
                del self._leases[token]
                if lease.call is not None and lease.call.active():
                    lease.call.cancel()
                self._log.info("{pid}: released the lock of {key}: its requester cancelled", pid=self.id,
                               key=str(lease.lock.key))
                await self.cache.unlock(lease.lock)
                return {"cancelled": True, "released": True}
        return result

    @control("cache.write", audited=False)
    async def op_unlock(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{token}`` -> ``{released: true}``; 404 for an unknown token."""
        lease = self._lease(_dict(content, "unlock"))
        del self._leases[lease.lock.id]
        if lease.call is not None and lease.call.active():
            lease.call.cancel()
        await self.cache.unlock(lease.lock)
        return {"released": True}

    @control("cache.write", audited=False)
    async def op_new_staging(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{}`` -> ``{path}``: a new staging folder for one fetch."""
        return {"path": str(await self.cache.new_staging())}

    @control("cache.write", audited=False)
    async def op_discard_staging(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{path}`` -> ``{}``: remove a staging folder (fetch failed)."""
        await self.cache.discard_staging(str(_dict(content, "discard_staging").get("path", "")))
        return {}

    @control("cache.write", audited=False)
    async def op_publish(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{token, staging, files: {path: {size, remote_checksum, sha256}}, url?, key?}`` -> the entry's info."""
        c = _dict(content, "publish")
        lease = self._lease(c)
        if c.get("key") is not None and self._key(c) != lease.lock.key:
            raise InvalidKeyError(f"lock {c['token']!r} is the lock of {lease.lock.key}, not of {self._key(c)}")
        files = c.get("files")
        if not isinstance(files, Mapping):
            raise InvalidKeyError("publish: files must be a dict of path -> {size, remote_checksum, sha256}")
        url = c.get("url")
        if url is not None and not isinstance(url, str):
            raise InvalidKeyError(f"publish: url must be a string, not {type(url).__name__}")
        lease.busy += 1
        try:
            info = await self.cache.publish(lease.lock.key, str(c.get("staging", "")), files, lock=lease.lock,
                                            url=url)
        finally:
            lease.busy -= 1
            if lease.call is None and self._leases.get(lease.lock.id) is lease:
                self._schedule_expiry(lease.lock.id, lease)
        return info.to_wire()

    @control("cache.verify")
    async def op_verify(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{key?}`` -> ``{reports: [...]}``: re-hash one entry or all of them."""
        c = _dict(content, "verify")
        key = self._key(c) if c.get("key") is not None else None
        return {"reports": [r.to_wire() for r in await self.cache.verify(key)]}

    @control("cache.repair")
    async def op_repair(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{key?}`` -> ``{reports: [...]}``: bad entries quarantined, incomplete ones removed."""
        c = _dict(content, "repair")
        key = self._key(c) if c.get("key") is not None else None
        return {"reports": [r.to_wire() for r in await self.cache.repair(key)]}

    @control("cache.verify")
    async def op_verify_round(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{}`` -> the report of a verification round run now (joins one already running)."""
        return (await self.verifier.run_round("request")).to_wire()

    async def op_verify_report(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{}`` -> the last verification round's report (kept across restarts), or None."""
        report = await self.verifier.report()
        return report.to_wire() if report is not None else None

    @control("cache.reap")
    async def op_reap_tick(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """The reaper election's tick (see :mod:`~ion.services.cache.reaper`): it reached this
        instance, so this one reaps. ``{force: true}`` (by RPC) runs a round now and returns it."""
        report = await self.election.handle(content)
        return report.to_wire() if report is not None else None

    async def op_reap_report(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{}`` -> the last reap round's report (of whichever instance reaped), or None."""
        report = await self.reaper.last_report()
        return report.to_wire() if report is not None else None

    @control("cache.prune")
    async def op_prune(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{older_than?, keep?}`` -> what was removed and what was left locked."""
        c = _dict(content, "prune")
        keep = c.get("keep")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int)):
            raise InvalidKeyError(f"keep must be an integer >= 0, not {keep!r}")
        return (await self.cache.prune(_number(c, "older_than"), keep)).to_wire()

    @control("cache.clear")
    async def op_clear(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{}`` -> what was removed; locked entries and their locks stay."""
        return (await self.cache.clear()).to_wire()


@dataclass(frozen=True)
class RemoteLock:
    """A lock the cache service holds for us: ``token`` names it at the service instance ``pid``."""

    token: str
    key: EntryKey
    path: Path
    pid: str
    lease: float


class CacheClient(ServiceClient):
    """Calls the cache service; raises the service's :mod:`~ion.services.cache.errors` classes as they are."""

    _log = Logger()
    #: The outage (reconnections so far, False) in which a clean-up's wait for the connection timed out.
    _gave_up_in: tuple[int, bool] | None = None

    service_name = "cache"
    errors = (CacheError,)
    #: A system service: its answers are taken from the system's operators only.
    trusted = True

    @defer.inlineCallbacks
    def _call(self, op: str, content: Any = None, *, target: str | None = None,
              timeout: float | None = None, cancellable: bool = False) -> Any:
        if cancellable:
            result, _headers = yield self.cancellable_call(op, content, target=target, timeout=timeout)
        else:
            result, _headers = yield self.rpc_send(op, content, timeout=timeout, target=target)
        return result

    @defer.inlineCallbacks
    def reap(self, timeout: float = 3600) -> Any:
        """Have the system's elected reaper run a round now; its :class:`ReapReport`."""
        data = yield self._call(TICK_OP, {"force": True}, target=election_queue(self.proc.sysname),
                                timeout=timeout)
        return ReapReport.from_wire(data)

    @defer.inlineCallbacks
    def reap_report(self) -> Any:
        """The last reap round's :class:`ReapReport`, or None."""
        data = yield self._call("reap_report", {})
        return ReapReport.from_wire(data) if data is not None else None

    @defer.inlineCallbacks
    def lookup(self, key: EntryKey, *, verify: bool = False) -> Any:
        """The complete entry (:class:`EntryInfo`) or None."""
        data = yield self._call("lookup", {"key": key.to_wire(), "verify": verify},
                                timeout=3600 if verify else None)
        return EntryInfo.from_wire(data) if data is not None else None

    @defer.inlineCallbacks
    def info(self, key: EntryKey) -> Any:
        """The complete entry (:class:`EntryInfo`); EntryNotFoundError otherwise."""
        data = yield self._call("info", {"key": key.to_wire()})
        return EntryInfo.from_wire(data)

    @defer.inlineCallbacks
    def list(self) -> Any:
        """Every complete entry, as :class:`EntryInfo`."""
        data = yield self._call("list", {}, timeout=600)
        return [EntryInfo.from_wire(e) for e in data["entries"]]

    @defer.inlineCallbacks
    def lock(self, key: EntryKey, timeout: float = DEFAULT_CLIENT_WAIT, lease: float | None = None) -> Any:
        """Take the entry's lock (waiting at most ``timeout`` s); a :class:`RemoteLock`.

        Cancelling the returned Deferred, or its call timing out, cancels the wait at the
        service instance, and releases a lock it granted meanwhile (see
        :mod:`ion.core.service`). A lock granted to a request whose cancel could not reach
        its instance is released when its lease ends.
        """
        if not math.isfinite(timeout):
            raise InvalidKeyError("a remote lock wait needs a finite timeout")
        content: dict[str, Any] = {"key": key.to_wire(), "timeout": timeout}
        if lease is not None:
            content["lease"] = lease
        data = yield self._call("lock", content, timeout=timeout + 30, cancellable=True)
        return RemoteLock(data["token"], EntryKey.from_wire(data["key"]), Path(data["path"]), data["pid"],
                          float(data["lease"]))

    @defer.inlineCallbacks
    def renew(self, lock: RemoteLock, lease: float | None = None) -> Any:
        """Extend the lock's lease; fires with the lease in seconds."""
        data = yield self._call("renew", {"token": lock.token, "lease": lease}, target=lock.pid)
        return data["lease"]

    def unlock(self, lock: RemoteLock) -> defer.Deferred[None]:
        """Release the lock.

        Cut off by the loss of this container's connection to the broker, it is sent again once
        reconnected (within :data:`CLEANUP_RECONNECT_WAIT` s): a caller that lives on must not leave
        the entry locked for every other fetch until the lease ends. A lock the service no longer
        holds by then (the first unlock reached it, or the lease ended) counts as released.
        Cancelling the returned Deferred does not cancel the release (a cancelled fetch's clean-up).
        """
        return shielded(defer.ensureDeferred(self._resent_once_reconnected(
            lambda: self._call("unlock", {"token": lock.token}, target=lock.pid), done_if=UnknownLockError)))

    @defer.inlineCallbacks
    def new_staging(self) -> Any:
        """A new staging folder (a Path on the service's filesystem)."""
        data = yield self._call("new_staging", {})
        return Path(data["path"])

    def discard_staging(self, path: str | Path) -> defer.Deferred[None]:
        """Remove a staging folder; sent again once reconnected if cut off (as :meth:`unlock`)."""
        return shielded(defer.ensureDeferred(self._resent_once_reconnected(
            lambda: self._call("discard_staging", {"path": str(path)}))))

    async def _resent_once_reconnected(self, call: Callable[[], defer.Deferred[Any]],
                                       done_if: type[Exception] | None = None) -> None:
        """``call()``; if the loss of the broker connection cut it off (it may or may not have run),
        ``call()`` again once reconnected, where ``done_if`` (the first call ran) counts as done: for
        the idempotent clean-ups only."""
        try:
            await call()
            return
        except ConversationError as exc:
            manager = self.proc.container.exchange_manager
            # (One wait per outage: once one clean-up waited in vain, the others of that outage fail at once.)
            if not cut_off(exc) or self._gave_up_in == (manager.reconnects, manager.connected):
                raise
            self._log.info("cache call cut off by the loss of the broker connection ({e}); sending it again "
                           "once reconnected", e=exc)
        try:
            await reconnected(self.proc.container, CLEANUP_RECONNECT_WAIT)
        except ConversationError:
            self._gave_up_in = (manager.reconnects, manager.connected)
            raise
        try:
            await call()
        except Exception as exc:
            if done_if is None or not isinstance(exc, done_if):
                raise

    @defer.inlineCallbacks
    def publish(self, lock: RemoteLock, staging: str | Path, files: Mapping[str, FileMeta | Mapping[str, Any]],
                url: str | None = None) -> Any:
        """Publish the staged folder as the entry of ``lock.key``; its :class:`EntryInfo`."""
        wire = {rel: m.to_wire() if isinstance(m, FileMeta) else dict(m) for rel, m in files.items()}
        data = yield self._call("publish", {"token": lock.token, "key": lock.key.to_wire(), "staging": str(staging),
                                            "files": wire, "url": url}, target=lock.pid, timeout=600)
        return EntryInfo.from_wire(data)

    @defer.inlineCallbacks
    def verify(self, key: EntryKey | None = None, timeout: float = 3600) -> Any:
        """:class:`EntryReport` per entry checked."""
        data = yield self._call("verify", {"key": key.to_wire() if key else None}, timeout=timeout)
        return [EntryReport.from_wire(r) for r in data["reports"]]

    @defer.inlineCallbacks
    def repair(self, key: EntryKey | None = None, timeout: float = 3600) -> Any:
        """:class:`EntryReport` per entry checked, with the action taken."""
        data = yield self._call("repair", {"key": key.to_wire() if key else None}, timeout=timeout)
        return [EntryReport.from_wire(r) for r in data["reports"]]

    @defer.inlineCallbacks
    def verify_round(self, timeout: float = 3600) -> Any:
        """Run a periodic-verify round now (outcomes good, bad, good→bad, bad→good); its :class:`VerifyReport`."""
        data = yield self._call("verify_round", {}, timeout=timeout)
        return VerifyReport.from_wire(data)

    @defer.inlineCallbacks
    def verify_report(self) -> Any:
        """The last periodic-verify round's :class:`VerifyReport`, or None if there was none."""
        data = yield self._call("verify_report", {})
        return VerifyReport.from_wire(data) if data is not None else None

    @defer.inlineCallbacks
    def prune(self, older_than: float | None = None, keep: int | None = None, timeout: float = 600) -> Any:
        """A :class:`PruneReport`."""
        data = yield self._call("prune", {"older_than": older_than, "keep": keep}, timeout=timeout)
        return PruneReport.from_wire(data)

    @defer.inlineCallbacks
    def clear(self, timeout: float = 600) -> Any:
        """A :class:`PruneReport`."""
        data = yield self._call("clear", {}, timeout=timeout)
        return PruneReport.from_wire(data)
