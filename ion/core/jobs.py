"""Asynchronous jobs: an id now, the status and partial results later (Func's job model).

A service that starts long work answers at once with a job id; callers poll
``status(job_id)``, which answers one of Func's codes:

==============  ====  =====================================================
``RUNNING``       0   started, nothing finished yet
``FINISHED``      1   done; ``results`` holds every part's outcome
``LOST_IN_SPACE`` 2   no such job here (never was, or its record expired)
``PARTIAL``       3   running, ``results`` holds the parts finished so far
``REMOTE_ERROR``  4   the job itself failed; ``error`` says why
==============  ====  =====================================================

Records are kept ``retention`` seconds after the job ends (default 1 h).

**Cancelled parts.** A job whose work was cancelled before every part finished
(its service stopped: drain timeout, second signal) ends as ``REMOTE_ERROR``
with ``error`` starting ``cancelled:``; ``results`` holds every part, the
finished ones as they ended and the others as their cancelled outcome, and
``cancelled`` lists the parts that did not finish. ``REMOTE_ERROR``, not
``PARTIAL``: the job is over, a poller must stop polling.

**Durable records.** With a :class:`JobStore` (a folder, e.g. beside the
cache), each job's record is also written to ``<folder>/<quoted id>.json``
(temp file + ``os.replace``, through the blocking pool) when it starts, when a
part finishes and when it ends, with its ``owner`` (container, host, OS pid,
process id). :meth:`JobTable.lookup` answers from that file when the job is
not in memory (another instance ran it, or this container restarted); a record
still RUNNING/PARTIAL whose owner is gone (judged by the ``owner_alive``
function the service supplies) answers ``LOST_IN_SPACE`` with ``error``
saying the container died, never RUNNING forever. Files expire like the
in-memory records and are removed by :meth:`JobTable.prune`.

**Takeover** (a job that survives its container). A job started with ``resume``
data (what its service needs to run the rest: for a deployment, the request as
validated) keeps it in its record. Every instance sharing the folder scans it
(:meth:`JobTable.scan`, every few seconds) and so does ``lookup``: a record still
RUNNING/PARTIAL whose owner is judged gone twice, ``takeover_grace`` seconds
apart, is *claimed* by creating ``.<quoted id>.claim-<n>`` (a hard link to a
written temporary file: it fails if the name exists; ``n``: the takeover's
number, so exactly one instance wins each takeover), read again
(the owner may have ended it just before dying; a claimer that backs out then, or
because it began to stop, removes its claim), and handed to the ``resume``
hook, which starts the parts not yet in ``results``. The record then names the
new owner and lists ``takeovers`` (``from``, ``by``, ``at``), which ``status`` /
``job_status`` show; the finished parts are kept. After ``max_takeovers`` (3) a
further dead owner ends the job ``REMOTE_ERROR`` instead of resuming it forever.
A record without ``resume`` (or a table without the hook) still answers
``LOST_IN_SPACE`` when its owner is gone.

**One writer per record** (an owner judged gone while it still runs: its broker
connection was lost, not its process). Every write of a record first reads the
one on disk, in the same pool job: one that lists more ``takeovers`` than the
writer's job knows of was written by an instance that took the job over since,
and is left as it is; the owner's own :meth:`JobTable.scan` finds that record
too, between two writes. The superseded owner then forgets the job (``status``
and ``lookup`` answer the new owner's record) and cancels what is left of its
work, unrecorded (the new owner runs every part not finished at its takeover);
:meth:`JobTable.taken_over` (which reads the record) tells that work to keep
what it did (the Deploy service's deployment then commits its switches instead
of switching them back: the new owner counts the items finished there as done,
and the service publishes no more progress for the job). A run is superseded by
its number of takeovers: a job this table takes over again later is a new run.
A write that lands between a taker's claim and its first record is read by the
taker (it reads the record after its claim) or replaced by that record; at
worst the new owner runs a part again.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.core.deferreds import observe

__all__ = ["JobStatus", "Job", "JobTable", "JobStore", "OwnerAlive", "Resume"]

#: Version of the record files (``"record"`` key): 2 added ``resume`` and ``takeovers`` (1 is still read).
RECORD_VERSION = 2

#: ``resume(job_id, record)``: start the parts of a taken-over job not in ``record["results"]``;
#: awaits to the work's Deferred, which fires with ``{part: result}`` like a started job's.
Resume = Callable[[str, Mapping[str, Any]], Awaitable["defer.Deferred[Any]"]]

#: Statuses of a job still running (its record may need a new owner).
_RUNNING = (0, 3)

#: ``owner_alive(owner)``: whether the container that wrote a record still runs the job;
#: a bool or a Deferred of one.
OwnerAlive = Callable[[Mapping[str, Any]], "bool | defer.Deferred[bool]"]


class JobStatus(IntEnum):
    """Func's job status codes."""

    RUNNING = 0
    FINISHED = 1
    LOST_IN_SPACE = 2
    PARTIAL = 3
    REMOTE_ERROR = 4


@dataclass
class Job:
    """One job's record."""

    job_id: str
    kind: str
    created: float
    total: int | None = None
    results: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    error: str | None = None
    ended: float | None = None
    deferred: defer.Deferred[Any] | None = None
    #: Parts that were cancelled rather than finished, in the order they ended.
    cancelled: list[str] = field(default_factory=list)
    #: Who runs the job (written into its durable record).
    owner: dict[str, Any] | None = None
    #: The last write of its durable record (writes of one job are chained, oldest first).
    saving: defer.Deferred[None] | None = field(default=None, repr=False)
    #: What its service needs to run the rest if its owner dies (kept in the record, never on the wire).
    resume: dict[str, Any] | None = field(default=None, repr=False)
    #: Each time another instance took the job over: ``{"from": owner, "by": owner, "at": time}``.
    takeovers: list[dict[str, Any]] = field(default_factory=list)
    #: Another instance took it over while this one still ran it: its record is no longer written here.
    superseded: bool = field(default=False, repr=False)

    @property
    def status(self) -> JobStatus:
        if self.error is not None:
            return JobStatus.REMOTE_ERROR
        if self.done:
            return JobStatus.FINISHED
        return JobStatus.PARTIAL if self.results else JobStatus.RUNNING

    def to_wire(self) -> dict[str, Any]:
        """What ``job_status`` answers (``takeovers`` only for a job that was taken over)."""
        wire = {
            "job": self.job_id, "kind": self.kind, "status": int(self.status), "state": self.status.name,
            "results": dict(self.results), "total": self.total, "error": self.error,
            "created": self.created, "ended": self.ended, "cancelled": list(self.cancelled),
        }
        if self.takeovers:
            wire["takeovers"] = [dict(t) for t in self.takeovers]
        return wire


class JobTable:
    """The jobs of one service process.

    :param clock: measures retention (a ``task.Clock`` in tests).
    :param retention: seconds a finished job's record is kept.
    :param store: where durable records are written (None: memory only).
    :param owner: who runs this table's jobs (container, host, pid, process), kept in each record.
    :param owner_alive: judges the owner of a record read back (see :data:`OwnerAlive`);
        None: an owner other than ``owner`` is taken to be alive.
    :param resume: runs the rest of a job taken over from a dead owner (see :data:`Resume`);
        None: this table takes no job over.
    :param max_takeovers: takeovers a job may have; its owner dying once more ends it REMOTE_ERROR.
    :param takeover_grace: seconds an owner must stay judged gone before its jobs are claimed.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, retention: float = 3600.0, *, store: JobStore | None = None,
                 owner: Mapping[str, Any] | None = None, owner_alive: OwnerAlive | None = None,
                 resume: Resume | None = None, max_takeovers: int = 3, takeover_grace: float = 0.0) -> None:
        self.clock = clock
        self.retention = retention
        self.jobs: dict[str, Job] = {}
        self.store = store
        self.owner = dict(owner) if owner is not None else None
        self.owner_alive = owner_alive
        self._saving: set[defer.Deferred[None]] = set()
        #: Seconds between two prunes of the durable records (done as jobs are started and asked about).
        self.prune_interval = min(retention, 600.0)
        self._pruned = clock.seconds()
        self.resume = resume
        self.max_takeovers = max_takeovers
        self.takeover_grace = takeover_grace
        #: Job ids whose owner was judged gone, and when first (cleared when judged alive).
        self._gone_since: dict[str, float] = {}
        #: Record files seen ended by :meth:`scan` (an ended job never runs again: not read again).
        self._ended: set[str] = set()
        #: Job ids this table is taking over now (claimed, not yet running here): a ``lookup`` or a
        #: scan meanwhile must not claim the next takeover of its own claim.
        self._taking: set[str] = set()
        #: (job id, takeovers its run here knew of) of the runs another instance took over while this
        #: table still ran them, and when it found out (a job this table takes over again later is a
        #: new run, with more takeovers, and is not superseded).
        self._superseded_at: dict[tuple[str, int], float] = {}

    def start(self, kind: str, work: defer.Deferred[Any], *, total: int | None = None,
              job_id: str | None = None, resume: Mapping[str, Any] | None = None) -> Job:
        """Record a job whose ``work`` Deferred fires with a dict of results (or fails).

        :param resume: kept in its durable record, for an instance that takes it over (JSON-able).
        """
        self.expire()
        job = Job(job_id or secrets.token_hex(8), kind, self.clock.seconds(), total=total, owner=self.owner,
                  resume=dict(resume) if resume is not None else None)
        self.jobs[job.job_id] = job
        job.deferred = work
        self._save(job)
        work.addCallbacks(self._finished, self._failed, callbackArgs=(job,), errbackArgs=(job,))
        return job

    def partial(self, job_id: str, part: str, result: Any, *, cancelled: bool = False) -> None:
        """Record one ended part of a running job; ``cancelled``: it was cancelled, not finished."""
        job = self.jobs.get(job_id)
        if job is not None and not job.done:
            job.results[part] = result
            if cancelled and part not in job.cancelled:
                job.cancelled.append(part)
            self._save(job)

    def _finished(self, results: Any, job: Job) -> Any:
        if isinstance(results, dict):
            job.results.update(results)
        job.done = True
        job.ended = self.clock.seconds()
        if job.cancelled:
            finished = len(job.results) - len(job.cancelled)
            job.error = (f"cancelled: {len(job.cancelled)} part(s) did not finish "
                         f"({', '.join(job.cancelled)}); {finished} finished")
            self._log.warn("job {job} ({kind}) {error}", job=job.job_id, kind=job.kind, error=job.error)
        self._save(job)
        return results

    def _failed(self, failure: Failure, job: Job) -> None:
        job.done = True
        job.ended = self.clock.seconds()
        job.error = f"{getattr(failure.type, '__name__', 'Error')}: {failure.getErrorMessage()}"
        self._log.warn("job {job} ({kind}) failed: {error}", job=job.job_id, kind=job.kind, error=job.error)
        self._save(job)

    # -- durable records ---------------------------------------------------------------------
    def record(self, job: Job) -> dict[str, Any]:
        """The job's durable record: its wire form, its owner and when it was written."""
        record = job.to_wire()
        record.update(record=RECORD_VERSION, owner=job.owner, updated=self.clock.seconds())
        if job.resume is not None:
            record["resume"] = job.resume
        return record

    def _save(self, job: Job) -> None:
        """Write the job's record now, after its earlier writes (a later state never loses to an older one)."""
        store = self.store
        if store is None or job.superseded:
            return
        record = self.record(job)
        previous = job.saving if job.saving is not None else defer.succeed(None)

        def write(_: Any) -> defer.Deferred[None]:
            return store.save_unless_taken_over(job.job_id, record, len(job.takeovers)).addCallback(
                lambda current: None if current is None else self._superseded(job, current))

        def failed(f: Failure) -> None:
            self._log.warn("job {job}: could not write its record in {dir}: {err}", job=job.job_id,
                           dir=str(store.directory), err=f.getErrorMessage())

        d: defer.Deferred[None] = observe(previous).addCallback(write).addErrback(failed)
        job.saving = d
        self._saving.add(d)

        def written(_: Any) -> None:
            self._saving.discard(d)

        d.addBoth(written)

    def _superseded(self, job: Job, current: Mapping[str, Any]) -> None:
        """Another instance took ``job`` over while this table still ran it (``current``: its record):
        stop writing the record, forget the job and cancel what is left of its work (see the module's
        "One writer per record")."""
        if job.superseded:
            return
        job.superseded = True
        self._superseded_at[(job.job_id, len(job.takeovers))] = self.clock.seconds()
        if self.jobs.get(job.job_id) is job:
            del self.jobs[job.job_id]
        last = (current.get("takeovers") or [None])[-1]
        self._log.warn("job {job} ({kind}) was taken over by {by} while this instance still ran it (judged gone, "
                       "its broker connection lost?): its record is theirs now; the work left here is cancelled",
                       job=job.job_id, kind=job.kind, by=last.get("by") if isinstance(last, dict) else "another instance")
        if not job.done and job.deferred is not None:
            # The new owner runs every part not finished at its takeover: running them here too would
            # only race it. What the work finished stays (it asks taken_over(), which now says True).
            # On the next turn: this may run inside the work's own callbacks (a part's record write).
            self.clock.callLater(0, _cancel_unless_called, job.deferred)

    def superseded(self, job_id: str, takeovers: int | None = None) -> bool:
        """Whether another instance took ``job_id`` over while this table still ran it, as far as
        this table's writes and scans found out (:meth:`taken_over` asks the record itself).

        :param takeovers: the takeovers the asking run's job knew of (0 for a job started here):
            that run only; None: any run of the job here.
        """
        if takeovers is not None:
            return (job_id, takeovers) in self._superseded_at
        return any(key[0] == job_id for key in self._superseded_at)

    async def taken_over(self, job_id: str, takeovers: int | None = None) -> bool:
        """Whether another instance took ``job_id`` over while this table ran it: its record on disk
        lists more takeovers than this table's job (read now, in the pool; the job is then
        superseded here, as by a refused write, and its work cancelled). That work must keep what
        it did: the new owner counts it as done.

        :param takeovers: as for :meth:`superseded`; None: the run of the job here now.
        """
        job = self.jobs.get(job_id)
        if takeovers is None:
            if job is None:
                return self.superseded(job_id)
            takeovers = len(job.takeovers)
        if (job_id, takeovers) in self._superseded_at:
            return True
        if job is not None and len(job.takeovers) > takeovers:
            return True  # this table took the job over again since: the asking run was superseded
        if job is None or self.store is None:
            return False
        return self._superseded_if_taken(job, await self.store.load(job_id))

    def _superseded_if_taken(self, job: Job, record: Mapping[str, Any] | None) -> bool:
        """Whether ``record`` (``job``'s, read back) shows a takeover since ``job`` began here; if so,
        ``job`` is superseded (:meth:`_superseded`)."""
        if record is None or not _taken_over_since(record, len(job.takeovers)):
            return False
        self._superseded(job, record)
        return True

    def flush(self) -> defer.Deferred[None]:
        """Fires once every record write asked for so far is done (written or logged as failed)."""
        pending = [observe(d) for d in self._saving]
        return defer.DeferredList(pending, consumeErrors=True).addCallback(lambda _: None)

    def lookup(self, job_id: str) -> defer.Deferred[dict[str, Any]]:
        """Like :meth:`status`, but a job not in memory is answered from its durable record.

        A record of a job still RUNNING/PARTIAL whose owner is gone (this table's own owner
        lost it in a restart, or ``owner_alive`` says so) answers ``LOST_IN_SPACE``.
        """
        answer = self.status(job_id)
        if self.store is None or answer["status"] != JobStatus.LOST_IN_SPACE:
            return defer.succeed(answer)
        return defer.ensureDeferred(self._from_record(job_id, answer))

    async def _from_record(self, job_id: str, missing: dict[str, Any]) -> dict[str, Any]:
        assert self.store is not None
        try:
            record = await self.store.load(job_id)
        except Exception as exc:
            self._log.warn("job {job}: its record could not be read: {exc}", job=job_id, exc=exc)
            record = None
        if record is None:
            return missing
        now = self.clock.seconds()
        ended = record.get("ended")
        if isinstance(ended, (int, float)) and now - ended > self.retention:
            return missing
        if record.get("status") in _RUNNING:
            owner = record.get("owner") or {}
            if not await self._alive(owner):
                if not self._resumable(record):
                    return self._lost(record, owner)
                if self._confirmed_gone(job_id):
                    job = await self._take_over(job_id, record)
                    if job is not None:
                        return job.to_wire()
                    # Another instance won the claim (or the job ended meanwhile): its record says.
                    record = await self.store.load(job_id) or record
            else:
                self._gone_since.pop(job_id, None)
        record.pop("resume", None)
        record["from_record"] = True
        return record

    async def _alive(self, owner: Mapping[str, Any]) -> bool:
        """Whether ``owner`` still runs its jobs; a job of our own owner is in memory when it runs."""
        if self.owner is not None and dict(owner) == self.owner:
            return False
        if self.owner_alive is None:
            return True
        try:
            return bool(await defer.maybeDeferred(self.owner_alive, owner))
        except Exception as exc:
            self._log.warn("could not tell whether {owner} is alive: {exc}", owner=owner, exc=exc)
            return True

    # -- takeover ----------------------------------------------------------------------------
    def _resumable(self, record: Mapping[str, Any]) -> bool:
        """Whether this table can take the job of ``record`` over (see the module notes)."""
        return (self.resume is not None and self.store is not None and self.owner is not None
                and isinstance(record.get("resume"), Mapping))

    def _confirmed_gone(self, job_id: str) -> bool:
        """Note that the owner of ``job_id`` was judged gone now; True once it has been for
        ``takeover_grace`` seconds (a connection blip of a live owner does not lose it its jobs)."""
        now = self.clock.seconds()
        first = self._gone_since.setdefault(job_id, now)
        return now - first >= self.takeover_grace

    def scan(self) -> defer.Deferred[list[str]]:
        """Take over every job of the store whose owner is gone (see the module notes);
        fires with the ids this table took over (or ended, past ``max_takeovers``)."""
        if self.store is None or self.resume is None:
            return defer.succeed([])
        return defer.ensureDeferred(self._scan(self.store))

    async def _scan(self, store: JobStore) -> list[str]:
        taken: list[str] = []
        suspects: set[str] = set()
        running = await store.load_running(self._ended)
        # This table's own runs, found taken over here rather than only at their next write (a run
        # whose new owner has ended the job already is read on its own: no longer among the running).
        for job_id, mine in list(self.jobs.items()):
            if mine.done or mine.superseded:
                continue
            self._superseded_if_taken(mine, running[job_id] if job_id in running else await store.load(job_id))
        for job_id, record in running.items():
            if job_id in self.jobs or not self._resumable(record):
                continue
            if await self._alive(record.get("owner") or {}):
                continue
            suspects.add(job_id)
            if self._confirmed_gone(job_id) and await self._take_over(job_id, record) is not None:
                taken.append(job_id)
        for job_id in set(self._gone_since) - suspects:
            del self._gone_since[job_id]
        return taken

    async def _take_over(self, job_id: str, record: Mapping[str, Any]) -> Job | None:
        """Claim the job of ``record`` and run its rest here; None if another instance claimed it
        (or it ended meanwhile). Past ``max_takeovers``, it is ended REMOTE_ERROR instead."""
        assert self.store is not None and self.resume is not None and self.owner is not None
        if job_id in self._taking:
            return None
        self._taking.add(job_id)
        try:
            return await self._claim_and_resume(job_id, record)
        finally:
            self._taking.discard(job_id)

    async def _claim_and_resume(self, job_id: str, record: Mapping[str, Any]) -> Job | None:
        assert self.store is not None and self.resume is not None and self.owner is not None
        number = len(record.get("takeovers") or []) + 1
        while True:
            if job_id in self.jobs:
                return None
            if await self.store.claim(job_id, number, self.owner):
                break
            # Claimed already: by a live instance (it runs the job now), or by one that died
            # between its claim and its record (then the next number is free to claim).
            claimer = await self.store.load_claim(job_id, number)
            if claimer is None or await self._alive(claimer) or number > self.max_takeovers + 1:
                return None
            number += 1
        self._gone_since.pop(job_id, None)
        fresh = await self.store.load(job_id)  # as it is now that nobody else may take it
        resume = self.resume
        if (resume is None or fresh is None or fresh.get("status") not in _RUNNING
                or fresh.get("owner") != record.get("owner")):
            # Backing out (this table began to stop, the job ended, or the record read was stale):
            # the claim is given back, else a live claimer that runs nothing would keep every
            # other instance from this takeover number (the job RUNNING forever).
            await self.store.unclaim(job_id, number)
            return None
        previous = fresh.get("owner") or {}
        takeovers = [*list(fresh.get("takeovers") or []),
                     {"from": previous, "by": self.owner, "at": self.clock.seconds()}]
        work: defer.Deferred[Any]
        if number > self.max_takeovers:
            work = defer.fail(RuntimeError(
                f"its owner died {number} times while running it (at most {self.max_takeovers} takeovers); "
                f"not resumed again"))
        else:
            try:
                work = await resume(job_id, fresh)
            except Exception as exc:
                work = defer.fail(exc)
        job = Job(job_id, str(fresh.get("kind") or "job"), float(fresh.get("created") or self.clock.seconds()),
                  total=fresh.get("total"), results=dict(fresh.get("results") or {}),
                  cancelled=list(fresh.get("cancelled") or []), owner=self.owner,
                  resume=dict(fresh.get("resume") or {}), takeovers=takeovers)
        self._log.warn("job {job} ({kind}) taken over from {previous} (takeover {n}); {done} part(s) had finished",
                       job=job_id, kind=job.kind, previous=previous, n=number, done=len(job.results))
        self.jobs[job_id] = job
        job.deferred = work
        self._save(job)
        work.addCallbacks(self._finished, self._failed, callbackArgs=(job,), errbackArgs=(job,))
        return job

    @staticmethod
    def _lost(record: dict[str, Any], owner: Mapping[str, Any]) -> dict[str, Any]:
        who = ", ".join(f"{k} {owner[k]}" for k in ("container", "host", "pid", "process") if k in owner)
        record.update(status=int(JobStatus.LOST_IN_SPACE), state=JobStatus.LOST_IN_SPACE.name,
                      error=f"container died while running the job ({who or 'owner unknown'}); "
                            f"{len(record.get('results') or {})} part(s) had finished",
                      died=True, from_record=True)
        record.pop("resume", None)
        return record

    def prune(self) -> defer.Deferred[list[str]]:
        """Remove durable records that expired: ended more than ``retention`` ago, or left
        RUNNING by a dead owner and not written for ``retention``. Fires with the removed ids."""
        if self.store is None:
            return defer.succeed([])
        return defer.ensureDeferred(self._prune(self.store))

    async def _prune(self, store: JobStore) -> list[str]:
        now = self.clock.seconds()
        removed: list[str] = []
        for job_id, record in (await store.load_all()).items():
            if job_id in self.jobs:
                continue
            ended, updated = record.get("ended"), record.get("updated")
            if isinstance(ended, (int, float)):
                old = now - ended > self.retention
            elif isinstance(updated, (int, float)):
                old = now - updated > self.retention and not await self._alive(record.get("owner") or {})
            else:
                old = True  # not a record we wrote
            if old:
                await store.remove(job_id)
                removed.append(job_id)
        return removed

    def status(self, job_id: str) -> dict[str, Any]:
        """The job's record on the wire; ``LOST_IN_SPACE`` for an unknown or expired id."""
        self.expire()
        job = self.jobs.get(job_id)
        if job is None:
            return {"job": job_id, "status": int(JobStatus.LOST_IN_SPACE), "state": JobStatus.LOST_IN_SPACE.name,
                    "results": {}, "error": f"no job {job_id!r} here (unknown, or expired)"}
        return job.to_wire()

    def list(self) -> list[dict[str, Any]]:
        """Every job still on record, oldest first."""
        self.expire()
        return [job.to_wire() for job in self.jobs.values()]

    def expire(self) -> None:
        """Forget jobs that ended more than ``retention`` seconds ago (and, every
        ``prune_interval`` seconds, remove the durable records that expired)."""
        now = self.clock.seconds()
        for job_id in [j.job_id for j in self.jobs.values() if j.ended is not None and now - j.ended > self.retention]:
            del self.jobs[job_id]
        for key in [k for k, at in self._superseded_at.items() if now - at > self.retention]:
            del self._superseded_at[key]
        if self.store is not None and now - self._pruned >= self.prune_interval:
            self._pruned = now
            self.prune().addErrback(lambda f: self._log.warn("pruning job records in {dir} failed: {err}",
                                                             dir=str(self.store.directory if self.store else ""),
                                                             err=f.getErrorMessage()))

    def cancel(self, job_id: str) -> bool:
        """Cancel one running job (its record then says REMOTE_ERROR: cancelled, listing the
        parts that did not finish); False if it is not running here."""
        job = self.jobs.get(job_id)
        if job is None or job.done or job.deferred is None:
            return False
        job.deferred.cancel()
        return True

    def cancel_all(self) -> None:
        """Cancel every job still running (its record then says REMOTE_ERROR: cancelled)."""
        for job in list(self.jobs.values()):
            if not job.done and job.deferred is not None:
                job.deferred.cancel()


class _InlinePool:
    """Runs the "blocking" calls at once (tests and tools without a thread pool)."""

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(fn, *args, **kwargs)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` at ``path`` through a temp file and ``os.replace``: a reader sees the old or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data``, whole (written aside, then ``os.link``ed: a reader never
    sees it half written); False if it exists (another claimer won)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _cancel_unless_called(d: defer.Deferred[Any]) -> None:
    if not d.called:
        d.cancel()


def _taken_over_since(record: Mapping[str, Any] | None, takeovers: int) -> bool:
    """Whether ``record`` lists more than ``takeovers`` takeovers (a malformed list: none)."""
    listed = record.get("takeovers") if record is not None else None
    return isinstance(listed, list) and len(listed) > takeovers


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        JobTable._log.warn("job record {path} is unreadable: {exc}", path=str(path), exc=exc)
        return None
    return data if isinstance(data, dict) else None


class JobStore:
    """Job records as JSON files in ``directory``, one per job (``<quoted id>.json``).

    Blocking file work runs through ``pool`` (anything with ``run(fn, *args) -> Deferred``,
    e.g. the container's blocking pool), never on the reactor thread.
    """

    SUFFIX = ".json"

    def __init__(self, directory: str | os.PathLike[str], pool: Any = None) -> None:
        self.directory = Path(directory)
        self.pool = pool if pool is not None else _InlinePool()

    def path(self, job_id: str) -> Path:
        """The record file of ``job_id``: its id quoted, so no id names a path outside the folder."""
        return self.directory / (quote(job_id, safe="") + self.SUFFIX)

    def save(self, job_id: str, record: Mapping[str, Any]) -> defer.Deferred[None]:
        """Write (replace) the record of ``job_id``."""
        data = json.dumps(record, sort_keys=True, default=str).encode()
        d: defer.Deferred[None] = self.pool.run(_write_atomic, self.path(job_id), data)
        return d

    def save_unless_taken_over(self, job_id: str, record: Mapping[str, Any],
                               takeovers: int) -> defer.Deferred[dict[str, Any] | None]:
        """Write the record of ``job_id`` unless the one on disk lists more than ``takeovers``
        takeovers (another instance took the job over since the writer's last knowledge of it): then
        that record, unwritten; None once written. The read and the write are one pool job."""
        data = json.dumps(record, sort_keys=True, default=str).encode()
        path = self.path(job_id)

        def save() -> dict[str, Any] | None:
            current = _read(path)
            if _taken_over_since(current, takeovers):
                return current
            _write_atomic(path, data)
            return None

        d: defer.Deferred[dict[str, Any] | None] = self.pool.run(save)
        return d

    def load(self, job_id: str) -> defer.Deferred[dict[str, Any] | None]:
        """The record of ``job_id``, or None (none, or unreadable)."""
        d: defer.Deferred[dict[str, Any] | None] = self.pool.run(_read, self.path(job_id))
        return d

    def load_all(self) -> defer.Deferred[dict[str, dict[str, Any]]]:
        """Every readable record, by job id."""
        def read_all() -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            try:
                names = os.listdir(self.directory)
            except FileNotFoundError:
                return out
            for name in names:
                if name.startswith(".") or not name.endswith(self.SUFFIX):
                    continue
                record = _read(self.directory / name)
                if record is not None:
                    out[unquote(name[:-len(self.SUFFIX)])] = record
            return out

        d: defer.Deferred[dict[str, dict[str, Any]]] = self.pool.run(read_all)
        return d

    def claim_path(self, job_id: str, number: int) -> Path:
        """The claim file of takeover ``number`` of ``job_id`` (hidden: not a record)."""
        return self.directory / f".{quote(job_id, safe='')}.claim-{int(number)}"

    def claim(self, job_id: str, number: int, owner: Mapping[str, Any]) -> defer.Deferred[bool]:
        """Claim takeover ``number`` of ``job_id`` for ``owner``: True for exactly one claimer
        (a hard link made where none is: atomic, also between hosts sharing the folder over NFS)."""
        path, data = self.claim_path(job_id, number), json.dumps(dict(owner), sort_keys=True, default=str).encode()
        d: defer.Deferred[bool] = self.pool.run(_create_exclusive, path, data)
        return d

    def unclaim(self, job_id: str, number: int) -> defer.Deferred[None]:
        """Give claim ``number`` of ``job_id`` back (a claimer that backs out; gone already is fine)."""
        d: defer.Deferred[None] = self.pool.run(self.claim_path(job_id, number).unlink, missing_ok=True)
        return d

    def load_claim(self, job_id: str, number: int) -> defer.Deferred[dict[str, Any] | None]:
        """Who made claim ``number`` of ``job_id`` (None: no such claim, or unreadable)."""
        d: defer.Deferred[dict[str, Any] | None] = self.pool.run(_read, self.claim_path(job_id, number))
        return d

    def load_running(self, ended: set[str]) -> defer.Deferred[dict[str, dict[str, Any]]]:
        """Every readable record still RUNNING/PARTIAL, by job id, for a periodic scan: the file
        names in ``ended`` are not read (the scan's memory of ended records; updated here)."""
        def read_running() -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            try:
                names = [n for n in os.listdir(self.directory) if not n.startswith(".") and n.endswith(self.SUFFIX)]
            except FileNotFoundError:
                names = []
            ended.intersection_update(names)
            for name in names:
                if name in ended:
                    continue
                record = _read(self.directory / name)
                if record is None:
                    continue
                if record.get("status") in _RUNNING:
                    out[unquote(name[:-len(self.SUFFIX)])] = record
                else:
                    ended.add(name)
            return out

        d: defer.Deferred[dict[str, dict[str, Any]]] = self.pool.run(read_running)
        return d

    def remove(self, job_id: str) -> defer.Deferred[None]:
        """Remove the record of ``job_id`` and its claim files (gone already is fine)."""
        def remove() -> None:
            self.path(job_id).unlink(missing_ok=True)
            prefix = f".{quote(job_id, safe='')}.claim-"
            try:
                names = os.listdir(self.directory)
            except FileNotFoundError:
                return
            for name in names:
                if name.startswith(prefix):
                    (self.directory / name).unlink(missing_ok=True)

        d: defer.Deferred[None] = self.pool.run(remove)
        return d
