"""The async job table answers Func's status codes and forgets old jobs."""

from __future__ import annotations

from twisted.internet import defer, task

from ion.core.jobs import JobStatus, JobTable


def test_running_partial_finished():
    """A job goes RUNNING → PARTIAL (finished parts listed) → FINISHED with every result."""
    clock = task.Clock()
    table = JobTable(clock)
    work: defer.Deferred[dict] = defer.Deferred()
    job = table.start("deploy", work, total=2)
    assert table.status(job.job_id)["status"] == JobStatus.RUNNING == 0
    table.partial(job.job_id, "a", {"state": "downloaded"})
    status = table.status(job.job_id)
    assert status["status"] == JobStatus.PARTIAL == 3 and status["results"] == {"a": {"state": "downloaded"}}
    work.callback({"b": {"state": "cached"}})
    status = table.status(job.job_id)
    assert status["status"] == JobStatus.FINISHED == 1
    assert set(status["results"]) == {"a", "b"} and status["total"] == 2


def test_unknown_and_expired_jobs_are_lost_in_space():
    """An unknown id, and a job ended longer ago than the retention, answer LOST_IN_SPACE."""
    clock = task.Clock()
    table = JobTable(clock, retention=3600)
    assert table.status("nope")["status"] == JobStatus.LOST_IN_SPACE == 2
    job = table.start("deploy", defer.succeed({}))
    clock.advance(3599)
    assert table.status(job.job_id)["status"] == JobStatus.FINISHED
    clock.advance(2)
    assert table.status(job.job_id)["status"] == JobStatus.LOST_IN_SPACE


def test_failed_job_is_remote_error():
    """A job whose work fails answers REMOTE_ERROR with the reason."""
    table = JobTable(task.Clock())
    job = table.start("deploy", defer.fail(RuntimeError("disk full")))
    status = table.status(job.job_id)
    assert status["status"] == JobStatus.REMOTE_ERROR == 4
    assert status["error"] == "RuntimeError: disk full"


def test_running_job_is_not_expired_and_can_be_cancelled():
    """A running job is kept whatever its age; cancel_all ends it as REMOTE_ERROR."""
    clock = task.Clock()
    table = JobTable(clock, retention=1)
    job = table.start("deploy", defer.Deferred())
    clock.advance(100)
    assert table.status(job.job_id)["status"] == JobStatus.RUNNING
    table.cancel_all()
    assert table.status(job.job_id)["status"] == JobStatus.REMOTE_ERROR
    assert "CancelledError" in table.status(job.job_id)["error"]
