"""The deployer's helpers in the ``cc`` shell: ``deploy``, ``deploy_async``, ``jobs``, ``job_status``, ``cache_ls``,
``cache_verify``, ``cache_reap``, ``job_cancel``, ``generations``, ``rollback``.

Loaded by :class:`ion.core.shell.ShellHelpers` because ``res/config/ion.config``
names this module under ``ion.core.shell: helpers`` (the core imports no
service). Each helper talks to the Deploy or Cache service by RPC from the
shell's own process; the deployment file is read where the shell runs, so
``$VARS`` and relative paths mean what they mean for the user.

``job = deploy_async(file)`` gives a :class:`DeployJob` at once (it is no
Deferred, so the shell's line does not wait for the deployment); ``job_status(job)`` takes it or a job id and
shows RUNNING, PARTIAL (with the finished items) or FINISHED.

``cache_verify()`` shows the Cache service's last periodic-verify round as a
table (one row per entry: good, bad, good→bad, bad→good or skipped, and what
was done); ``cache_verify(run=True)`` runs a round first.

``generations(file)`` lists the kept generations of a deployment file (one row
each, newest first: each successful deploy records one); ``rollback(file)``
puts the previous one back in place, ``rollback(file, n)`` generation ``n``,
and shows each item's state and the generation it recorded.

``cache_reap()`` shows the system reaper's last round (who reaped, the
policy, and each entry removed); ``cache_reap(run=True)`` has the elected
reaper run a round now.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet import defer

from ion.core.shell import Listing, Size, Text, When, human_size
from ion.services.deploy.spec import DeploymentError, load_deployment

__all__ = ["shell_helpers", "DeployShellHelpers", "DeployJob", "ReapReportText", "VerifyReportText",
           "GenerationsText", "RollbackText"]

_ITEM_COLUMNS = ("item", "version", "state", "destination", "note")


def shell_helpers(shell: Any) -> dict[str, Any]:
    """The helpers this module gives the shell (``shell``: its :class:`ShellHelpers`)."""
    helpers = DeployShellHelpers(shell.proc)
    return {"deploy": helpers.deploy, "deploy_async": helpers.deploy_async, "jobs": helpers.jobs,
            "job_status": helpers.job_status, "job_cancel": helpers.job_cancel, "cache_ls": helpers.cache_ls, "cache_verify": helpers.cache_verify,
            "cache_reap": helpers.cache_reap, "generations": helpers.generations, "rollback": helpers.rollback}


class DeployJob:
    """An async deployment started from the shell: its id once the service answered."""

    def __init__(self, source: str, started: defer.Deferred[str]) -> None:
        self.source = source
        self.id: str | None = None
        self.error: Any = None
        self._waiters: list[defer.Deferred[str]] = []
        started.addCallbacks(self._started, self._failed)

    def _started(self, job_id: str) -> None:
        self.id = job_id
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(job_id)

    def _failed(self, failure: Any) -> None:
        self.error = failure
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.errback(failure)

    def wait(self) -> defer.Deferred[str]:
        """Fires with the job id once the service answered (at once if it has)."""
        if self.id is not None:
            return defer.succeed(self.id)
        if self.error is not None:
            return defer.fail(self.error)
        d: defer.Deferred[str] = defer.Deferred()
        self._waiters.append(d)
        return d

    def __str__(self) -> str:
        return self.id or ""

    def __repr__(self) -> str:
        if self.id is not None:
            return f"deploy job {self.id} ({self.source}); job_status(job) shows how it stands"
        if self.error is not None:
            return f"deploy job of {self.source} not started: {self.error.getErrorMessage()}"
        return f"deploy job of {self.source} (starting)"


def item_rows(items: list[Mapping[str, Any]]) -> Listing:
    """One row per item result: item, version, state, destination, note (already deployed / reason)."""
    rows = []
    for r in items:
        label = str(r.get("item", ""))
        platform, _, rest = label.partition("/")
        name, _, version = rest.rpartition("/")
        note = r.get("reason") or ("Already deployed" if r.get("already") else "")
        rows.append({"item": f"{platform}/{name}" if name else label, "version": version, "state": r.get("state"),
                     "destination": r.get("destination"), "note": note})
    return Listing(rows, _ITEM_COLUMNS)


class DeployShellHelpers:
    """The helpers, bound to the shell's process ``proc``."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc

    def _deploy_client(self) -> Any:
        from ion.services.deploy.service import DeployClient

        return DeployClient(self.proc)

    def deploy(self, file: str, timeout: float | None = 3600, partial: bool = False) -> Any:
        """Deploy a deployment file through the Deploy service; shows each item's state.

        All or nothing unless ``partial``: an item that fails switches back the others (``rolled back``).
        """
        try:
            deployment = load_deployment(file)
        except DeploymentError as exc:
            return Text("\n".join(f"Error: {p}" for p in exc.problems))
        d = self._deploy_client().deploy(deployment, timeout=timeout, partial=partial)
        d.addCallback(lambda answer: item_rows(answer["items"]))
        return d

    def deploy_async(self, file: str, partial: bool = False) -> Any:
        """Start deploying a file (``partial``: see ``deploy``); gives the job at once (use job_status(job))."""
        try:
            deployment = load_deployment(file)
        except DeploymentError as exc:
            return Text("\n".join(f"Error: {p}" for p in exc.problems))
        return DeployJob(deployment.source, self._deploy_client().deploy_async(deployment, partial=partial))

    def jobs(self) -> Any:
        """The Deploy service's jobs: id, state, items done of total."""
        d = self._deploy_client().jobs()
        d.addCallback(lambda records: Listing(
            [{"job": j.get("job"), "state": j.get("state"), "done": f"{len(j.get('results') or {})}/{j.get('total')}",
              "error": j.get("error") or ""} for j in records], ("job", "state", "done", "error")))
        return d

    @defer.inlineCallbacks
    def job_status(self, job: Any) -> Any:
        """A job's state (RUNNING, PARTIAL with the items done, FINISHED, ...) and its items' results."""
        if isinstance(job, DeployJob):
            job = yield job.wait()
        record = yield self._deploy_client().job_status(str(job))
        return JobStatusText(record)

    @defer.inlineCallbacks
    def job_cancel(self, job: Any) -> Any:
        """Cancel a running async job (operators only): its downloads stop, its locks and staging
        folders are released; its status then lists the items that did not finish."""
        if isinstance(job, DeployJob):
            job = yield job.wait()
        answer = yield self._deploy_client().cancel_job(str(job))
        return Text(f"job {answer['job']}: " + ("cancelled" if answer["cancelled"] else "not running"
                                               + (f" ({answer['error']})" if answer.get("error") else "")))

    def generations(self, file: str) -> Any:
        """The kept generations of a deployment file, newest first: number, when, who, items."""
        client = self._deploy_client()
        d = client.deployment_file(file).addCallback(client.generations)
        d.addCallback(GenerationsText)
        return d

    def rollback(self, file: str, n: int | None = None, timeout: float | None = 3600) -> Any:
        """Put generation n of a deployment file back in place (None: the previous one); shows each
        item's state and the generation recorded for it."""
        client = self._deploy_client()
        d = client.deployment_file(file).addCallback(client.rollback, n, timeout=timeout)
        d.addCallback(RollbackText)
        return d

    def cache_ls(self) -> Any:
        """The cache's entries: dependency, version, size, files, last use."""
        from ion.services.cache.service import CacheClient

        d = CacheClient(self.proc).list()
        d.addCallback(_entry_rows)
        return d

    def cache_verify(self, run: bool = False, timeout: float = 3600) -> Any:
        """The cache's last periodic-verify round, one row per entry; run=True runs a round now first."""
        from ion.core.control import SystemControl
        from ion.services.cache.service import CacheClient
        from ion.services.cache.verify import VerifyReport

        if run:  # an action: the one control path (operators only; audited)
            d = defer.ensureDeferred(SystemControl(self.proc).verify_cache(timeout=timeout))
            d.addCallback(VerifyReport.from_wire)
        else:
            d = CacheClient(self.proc).verify_report()
        d.addCallback(VerifyReportText)
        return d


    def cache_reap(self, run: bool = False, timeout: float = 3600) -> Any:
        """The reaper's last round (who, the policy, what it removed); run=True has it run one now."""
        from ion.core.control import SystemControl
        from ion.services.cache.reaper import ReapReport
        from ion.services.cache.service import CacheClient

        if run:  # an action: the one control path (operators only; audited)
            d = defer.ensureDeferred(SystemControl(self.proc).reap_cache(timeout=timeout))
            d.addCallback(ReapReport.from_wire)
        else:
            d = CacheClient(self.proc).reap_report()
        d.addCallback(ReapReportText)
        return d


class ReapReportText(Text):
    """A reap round as the shell prints it: a summary line, then one row per entry removed (``rows``)."""

    report: Any
    rows: Listing

    def __new__(cls, report: Any) -> ReapReportText:
        import time

        rows = Listing([{"dependency": f"{e.key.platform}/{e.key.name}",
                         "version": e.key.version + ("" if e.key.unpack else " (packed)"), "size": Size(e.size),
                         "last used": When(e.last_used)}
                        for e in (report.pruned.removed if report is not None else [])],
                       ("dependency", "version", "size", "last used"))
        if report is None:
            text = "no reap round yet (cache_reap(run=True) runs one)"
        else:
            policy = ", ".join(f"{k}={v}" for k, v in sorted(report.policy.items()) if v is not None) or "none"
            pruned = report.pruned
            text = (f"reap round by {report.reaper} at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(report.started))}: "
                    f"{len(pruned.removed)} of {report.entries} entries removed ({human_size(pruned.bytes_freed)}), "
                    f"{len(pruned.busy)} locked, {report.linked} linked, {report.kept} kept by generations, "
                    f"{len(pruned.incomplete)} incomplete, "
                    f"{len(pruned.staging)} staging folders; policy: {policy}"
                    + (f"; error: {report.error}" if report.error else "")
                    + ("\n" + repr(rows) if rows else ""))
        obj = super().__new__(cls, text)
        obj.report = report
        obj.rows = rows
        return obj


class GenerationsText(Text):
    """The generations of a deployment file as the shell prints them (``listing``: the wire answer)."""

    listing: dict[str, Any]
    rows: Listing

    def __new__(cls, listing: Mapping[str, Any]) -> GenerationsText:
        gens = list(listing.get("generations") or [])
        rows = Listing([{"generation": g.get("generation"), "deployed": When(float(g.get("time") or 0)),
                         "caller": g.get("caller") or "", "via": g.get("via") or "",
                         "items": ", ".join(f"{i.get('name')} {i.get('version')}" for i in g.get("items") or []),
                         "note": ("current" if n == 0 else "")
                         + (f"{'; ' if n == 0 else ''}rollback to {g['rollback_of']}"
                            if g.get("rollback_of") is not None else "")}
                        for n, g in enumerate(gens)],
                       ("generation", "deployed", "caller", "via", "items", "note"))
        head = f"generations of {listing.get('file')} (host {listing.get('host')}), keeping {listing.get('keep')}"
        text = head + ("\n" + repr(rows) if gens else ": none recorded")
        obj = super().__new__(cls, text)
        obj.listing = dict(listing)
        obj.rows = rows
        return obj


class RollbackText(Text):
    """A rollback's outcome as the shell prints it: a line, then each item's state (``answer``: the wire one)."""

    answer: dict[str, Any]

    def __new__(cls, answer: Mapping[str, Any]) -> RollbackText:
        if answer.get("ok"):
            head = f"rolled back to generation {answer.get('rollback_of')}: now generation {answer.get('generation')}"
        else:
            head = f"rollback to generation {answer.get('rollback_of')} incomplete: no generation recorded"
        if answer.get("left"):
            head += f"\nleft in place (generation {answer.get('rollback_of')} lacks them): {'; '.join(answer['left'])}"
        obj = super().__new__(cls, head + "\n" + repr(item_rows(list(answer.get("items") or []))))
        obj.answer = dict(answer)
        return obj


class JobStatusText(Text):
    """A job's status line and its finished items, as the shell prints it; ``record`` is the wire record."""

    record: dict[str, Any]

    def __new__(cls, record: Mapping[str, Any]) -> JobStatusText:
        results = record.get("results") or {}
        head = (f"job {record.get('job')}: {record.get('state')} "
                f"({len(results)} of {record.get('total', '?')} items done)")
        if record.get("error"):
            head += f"; {record['error']}"
        items = [r for r in results.values() if isinstance(r, Mapping)] if isinstance(results, Mapping) else []
        text = head + ("\n" + repr(item_rows(items)) if items else "")
        obj = super().__new__(cls, text)
        obj.record = dict(record)
        return obj

    @property
    def state(self) -> str:
        return str(self.record.get("state"))


_VERIFY_COLUMNS = ("dependency", "version", "outcome", "action", "problem", "checked")


class VerifyReportText(Text):
    """A verify round as the shell prints it: its summary line, then one row per entry (``rows``).

    ``report`` is the :class:`~ion.services.cache.verify.VerifyReport`, or None when no round ran yet.
    """

    report: Any
    rows: Listing

    def __new__(cls, report: Any) -> VerifyReportText:

        rows = []
        for o in report.outcomes if report is not None else []:
            key = o.key
            problem = ""
            if o.problems:
                rel, why = sorted(o.problems.items())[0]
                problem = f"{rel}: {why}"
                problem = problem if len(problem) <= 60 else problem[:57] + "..."
                if len(o.problems) > 1:
                    problem += f" (+{len(o.problems) - 1})"
            rows.append({"dependency": f"{key.platform}/{key.name}",
                         "version": key.version + ("" if key.unpack else " (packed)"), "outcome": o.outcome,
                         "action": o.action or "", "problem": problem,
                         "checked": When(o.checked_at)})
        listing = Listing(rows, _VERIFY_COLUMNS)
        if report is None:
            text = "no verify round yet (cache_verify(run=True) runs one)"
        else:
            text = report.summary() + "\n" + repr(listing)
        obj = super().__new__(cls, text)
        obj.report = report
        obj.rows = listing
        return obj


def _entry_rows(entries: list[Any]) -> Listing:
    rows = []
    for e in entries:
        key = e.key
        rows.append({"dependency": f"{key.platform}/{key.name}", "version": key.version + ("" if key.unpack else " (packed)"),
                     "size": Size(e.size), "files": len(e.files), "last used": When(e.last_used),
                     "path": str(e.path)})
    return Listing(rows, ("dependency", "version", "size", "files", "last used", "path"))
