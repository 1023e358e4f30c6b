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
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["JobStatus", "Job", "JobTable"]


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

    @property
    def status(self) -> JobStatus:
        if self.error is not None:
            return JobStatus.REMOTE_ERROR
        if self.done:
            return JobStatus.FINISHED
        return JobStatus.PARTIAL if self.results else JobStatus.RUNNING

    def to_wire(self) -> dict[str, Any]:
        """What ``job_status`` answers."""
        return {
            "job": self.job_id, "kind": self.kind, "status": int(self.status), "state": self.status.name,
            "results": dict(self.results), "total": self.total, "error": self.error,
            "created": self.created, "ended": self.ended,
        }


class JobTable:
    """The jobs of one service process.

    :param clock: measures retention (a ``task.Clock`` in tests).
    :param retention: seconds a finished job's record is kept.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, retention: float = 3600.0) -> None:
        self.clock = clock
        self.retention = retention
        self.jobs: dict[str, Job] = {}

    def start(self, kind: str, work: defer.Deferred[Any], *, total: int | None = None,
              job_id: str | None = None) -> Job:
        """Record a job whose ``work`` Deferred fires with a dict of results (or fails)."""
        self.expire()
        job = Job(job_id or secrets.token_hex(8), kind, self.clock.seconds(), total=total)
        self.jobs[job.job_id] = job
        job.deferred = work
        work.addCallbacks(self._finished, self._failed, callbackArgs=(job,), errbackArgs=(job,))
        return job

    def partial(self, job_id: str, part: str, result: Any) -> None:
        """Record one finished part of a running job."""
        job = self.jobs.get(job_id)
        if job is not None and not job.done:
            job.results[part] = result

    def _finished(self, results: Any, job: Job) -> Any:
        if isinstance(results, dict):
            job.results.update(results)
        job.done = True
        job.ended = self.clock.seconds()
        return results

    def _failed(self, failure: Failure, job: Job) -> None:
        job.done = True
        job.ended = self.clock.seconds()
        job.error = f"{getattr(failure.type, '__name__', 'Error')}: {failure.getErrorMessage()}"
        self._log.warn("job {job} ({kind}) failed: {error}", job=job.job_id, kind=job.kind, error=job.error)

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
        """Forget jobs that ended more than ``retention`` seconds ago."""
        now = self.clock.seconds()
        for job_id in [j.job_id for j in self.jobs.values() if j.ended is not None and now - j.ended > self.retention]:
            del self.jobs[job_id]

    def cancel_all(self) -> None:
        """Cancel every job still running (its record then says REMOTE_ERROR: cancelled)."""
        for job in list(self.jobs.values()):
            if not job.done and job.deferred is not None:
                job.deferred.cancel()
