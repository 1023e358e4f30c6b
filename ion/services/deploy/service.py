"""The Deploy service and its client: deployments by message, sync or as async jobs.

Callers send items already read from their deployment file
(:meth:`DeploymentItem.to_dict`: variables expanded, paths absolute), because
``$VARS`` and relative paths mean what they mean where the user runs the
command. The service fetches through the Fetch service, places each item and
answers per item.

**Who may write where** (DESIGN §8): a request can name any path, so the
service writes only under ``allowed_destinations`` (default: the container's
working folder) and reads ``file:`` repositories only under
``allowed_file_repositories`` (default: none); anything else refuses the whole
request with 403 naming the roots, after symlinks are resolved, and nothing
is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer

from ion.core.exceptions import ApplicationError
from ion.core.jobs import JobTable
from ion.core.service import ServiceClient, ServiceProcess
from ion.services.deploy.core import Deployer, ItemResult, check_allowed
from ion.services.deploy.spec import Deployment, DeploymentError, DeploymentItem, item_from_dict

__all__ = ["DeployService", "DeployClient", "JOB_SEP"]

#: Separates the pid of the Deploy instance that runs a job from the rest of its id.
JOB_SEP = "/"


class DeployService(ServiceProcess):
    """Ops: ``deploy``, ``deploy_async``, ``job_status``, ``jobs``.

    Config (``ion.services.deploy``): ``max_parallel`` (8), ``allowed_destinations``,
    ``allowed_file_repositories``, ``job_retention`` (3600 s), ``fetch_timeout`` (3600 s),
    ``max_concurrent`` (requests handled at once, 16).
    """

    service_name = "deploy"
    version = "0.1.0"

    #: A sync deploy (minutes long) must not keep job_status, jobs and other deploys waiting.
    max_concurrent = 16

    def slc_init(self) -> None:
        self.jobs = JobTable(self.clock, float(self.get_config("job_retention", 3600)))

    def slc_terminate(self) -> None:
        self.jobs.cancel_all()

    # -- request handling ---------------------------------------------------------------
    def _deployment(self, content: Any) -> Deployment:
        if not isinstance(content, Mapping) or not isinstance(content.get("items"), list):
            raise ApplicationError("a deploy request is {'items': [item, ...], 'source': name}", 400)
        source = str(content.get("source") or "<request>")
        items: list[DeploymentItem] = []
        problems: list[str] = []
        for raw in content["items"]:
            try:
                items.append(item_from_dict(raw, source))
            except DeploymentError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ApplicationError("\n".join(problems), 400)
        if not items:
            raise ApplicationError(f"{source}: the request lists no item", 400)
        return Deployment(source, items)

    def _authorize(self, items: list[DeploymentItem]) -> None:
        # None means the default (the working folder); an empty list means no root at all.
        destinations = self.get_config("allowed_destinations")
        if destinations is None:
            destinations = [os.getcwd()]
        repositories = self.get_config("allowed_file_repositories")
        if repositories is None:
            repositories = []
        for item in items:
            check_allowed(item.destination, destinations, f"{item.label}: destination")
            if item.repository.scheme == "file":
                check_allowed(item.repository.location_path, repositories, f"{item.label}: file repository")

    def _deployer(self, job: str | None = None) -> Deployer:
        timeout = float(self.get_config("fetch_timeout", 3600))

        async def fetch(item: DeploymentItem, progress: Any) -> dict[str, Any]:
            request = item.to_dict()
            if job is not None:
                # The Fetch service copies these into its progress events (bytes per file),
                # so a job's watcher sees its downloads, not only its items' phases.
                request["job"], request["item"] = job, item.label
            content, _ = await self.rpc_send("fetch", "fetch", request, timeout=timeout)
            return {"state": content["state"], "path": content["path"],
                    "names": content.get("content") or content.get("names") or [],
                    # The entry's content digest: a copy is redone only when the content changed.
                    "stamp": content.get("stamp") or ""}

        def run_fetch(item: DeploymentItem, progress: Any) -> defer.Deferred[dict[str, Any]]:
            return defer.ensureDeferred(fetch(item, progress))

        return Deployer(run_fetch, self.container.blocking, max_parallel=int(self.get_config("max_parallel", 8)))

    def _run(self, deployment: Deployment, job: str | None) -> defer.Deferred[list[ItemResult]]:
        def progress(item: DeploymentItem, phase: str, info: Mapping[str, Any]) -> None:
            self.container.publish_event("deploy.progress", {
                "job": job, "item": item.label, "position": item.position, "phase": phase,
                "bytes": info.get("done") if isinstance(info, Mapping) else None})

        def on_result(result: ItemResult) -> None:
            if job is not None:
                self.jobs.partial(job, _part(result), result.to_wire())

        return self._deployer(job).deploy(deployment, progress=progress, on_result=on_result)

    # -- ops --------------------------------------------------------------------------------
    async def op_deploy(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
        """Deploy now; answer every item's state when all are done."""
        deployment = self._deployment(content)
        # realpath may touch slow filesystems: resolve off the reactor thread.
        await self.container.blocking.run(self._authorize, deployment.items)
        results = await self._run(deployment, None)
        return _summary(deployment, results)

    async def op_deploy_async(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
        """Start a deployment and answer its job id at once; poll ``job_status``."""
        deployment = self._deployment(content)
        await self.container.blocking.run(self._authorize, deployment.items)
        # The id names this instance, so status polls reach the one holding the job
        # even when several Deploy instances share the service queue.
        job_id = f"{self.id}{JOB_SEP}{os.urandom(8).hex()}"
        work = self._run(deployment, job_id)
        work.addCallback(lambda results: {_part(r): r.to_wire() for r in results})
        job = self.jobs.start("deploy", work, total=len(deployment.items), job_id=job_id)
        return {"job": job.job_id, "total": len(deployment.items)}

    def op_job_status(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
        """Func's status of a job: 0 RUNNING, 1 FINISHED, 2 LOST_IN_SPACE, 3 PARTIAL, 4 REMOTE_ERROR."""
        job = content.get("job") if isinstance(content, Mapping) else content
        if not isinstance(job, str):
            raise ApplicationError("job_status takes a job id", 400)
        return self.jobs.status(job)

    def op_jobs(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> list[dict[str, Any]]:
        """Every job on record."""
        return self.jobs.list()


def _part(result: ItemResult) -> str:
    return f"{result.item.position} {result.item.label}".strip()


def _summary(deployment: Deployment, results: list[ItemResult]) -> dict[str, Any]:
    return {"source": deployment.source, "ok": all(r.ok for r in results),
            "items": [r.to_wire() for r in results]}


class DeployClient(ServiceClient):
    """Calls the Deploy service."""

    service_name = "deploy"

    @staticmethod
    def request_content(deployment: Deployment) -> dict[str, Any]:
        """The content of a deploy request for a deployment read where the caller runs.

        (Not ``request``: that is ServiceClient's conversation call, which this must not hide.)
        """
        return {"source": deployment.source, "items": [item.to_dict() for item in deployment.items]}

    @defer.inlineCallbacks
    def deploy(self, deployment: Deployment, timeout: float | None = 3600) -> Any:
        """Deploy and wait: ``{"ok", "items": [{item, state, already, reason, ...}]}``."""
        content, _ = yield self.rpc_send("deploy", self.request_content(deployment), timeout=timeout)
        return content

    @defer.inlineCallbacks
    def deploy_async(self, deployment: Deployment) -> Any:
        """Start a deployment; fires with its job id."""
        content, _ = yield self.rpc_send("deploy_async", self.request_content(deployment))
        return content["job"]

    @defer.inlineCallbacks
    def job_status(self, job: str) -> Any:
        """The job's record: ``{"status", "state", "results", ...}``, asked of the instance that runs it."""
        target = job.split(JOB_SEP, 1)[0] if JOB_SEP in job else self.target
        content, _ = yield self.proc.rpc_send(target, "job_status", {"job": job})
        return content

    @defer.inlineCallbacks
    def jobs(self) -> Any:
        """Every job the service (instance that answers) has on record."""
        content, _ = yield self.rpc_send("jobs", None)
        return content
