"""The Deploy service and its client: deployments by message, sync or as async jobs.

Callers send items already read from their deployment file
(:meth:`DeploymentItem.to_dict`: variables expanded, paths absolute), because
``$VARS`` and relative paths mean what they mean where the user runs the
command. The service fetches through the Fetch service, places each item and
answers per item.

**Typed content** (``ion/services/records/deployer.proto``): a request may be
an ``ion.deployer.DeployRequest`` (ops ``deploy``, ``deploy_async``) or an
``ion.deployer.JobQuery`` (``job_status``), sent with ``encoding: protobuf``;
it is read as the dict it spells and checked the same way, and answered in
kind (``DeploySummary``, ``JobStarted``, ``JobStatus``). :class:`DeployClient`
sends protobuf and hands its callers the dicts a plain-dict client gets.

**Who may write where** (DESIGN §8, §10): a request can name any path, so the
service writes only under ``allowed_destinations`` (default: the container's
working folder) and reads ``file:`` repositories only under
``allowed_file_repositories`` (default: none); anything else refuses the whole
request with 403 naming the roots, after symlinks are resolved, and nothing
is written. So does a destination in the cache root. The check is done when
the request arrives; the writes, after the fetch, walk from the allowed root
the destination was found under, by descriptors following no link
(:mod:`ion.services.deploy.place`): a folder swapped for a symlink meanwhile
fails that item, never redirects it.

**Graceful drain** (terminate, SIGTERM): the instance stops taking requests
from the service queue at once (they stay there for another instance), and
refuses a deploy that still reaches it (its pid queue) with 503; it waits up
to ``drain_timeout`` seconds for the deployments in progress, then cancels
the rest: the fetches not finished are cancelled (``Deferred.cancel`` through
the :class:`Deployer`), items being placed finish. This is the service's
pre-drain phase (:meth:`DeployService.slc_drain`, see :mod:`ion.core.service`):
every deployment is tracked work of the process, and its pid queue keeps
serving meanwhile (refusals, ``job_status``). A sync ``deploy`` caller
then gets a 503 ``DeployCancelled`` whose content names the items cancelled
and carries every item's result; an async job ends ``REMOTE_ERROR`` with
``cancelled`` listing its unfinished items (see :mod:`ion.core.jobs`). Only
then does the process terminate as every process does.

**Generations** (:mod:`ion.services.deploy.generations`): a deploy request
may name the deployment file it was read from (``file``, ``host``,
``file_sha256``: :meth:`DeployClient.deploy` sends them); when every item is
in place, the service records a generation of that file in
``<cache root>/generations`` with the caller's ``broker-user`` (a sync
``deploy`` before it answers; an async job as it ends). Ops
``generations`` (``{file, host}``: the kept ones, newest first) and
``rollback`` (``{file, host, generation}``: authorized and audited as a
deploy, ``deploy.rollback``) read them.

**Durable jobs**: each async job's record is also written to
``<job_dir>/<quoted job id>.json`` (default ``<cache root>/jobs``), when it
starts, as each item ends and at its end. ``job_status`` of a job that is not
in memory answers from that file, so any instance (and a container started
again on the same cache) can tell what became of it; a record left
RUNNING/PARTIAL by a container that is gone answers ``LOST_IN_SPACE`` with
``died: true``. The owner is judged gone when it is this container's own
record but no process of ours runs it (the container restarted), when it ran
on this host under a pid that is dead, or otherwise (another host, or another
container of this OS process) when the broker shows no consumer on its
process queue (a passive declare: a dead container's connection, and so its
consumers, are gone at once); if the broker cannot be asked, when its
container is not among the live ones the agent knows (``nodes()``).

**Takeover** (issue #17 §4, see :mod:`ion.core.jobs`): an async job's record
also holds what is needed to resume it (``resume``: the request's items as
validated, the source, the caller's broker user and the allowed-roots
decision). Every instance scans the job records every ``takeover_interval``
seconds (on the reactor, the reads in the pool); a job whose owner is judged
gone on two scans ``takeover_grace`` seconds apart at least (default: the
interval; a live owner whose broker node died must reconnect within it) is
claimed by exactly one instance (an exclusive claim file beside the record),
which deploys the items not yet in its results again (placement is
idempotent: an item in place answers ``already``), under the
same job id, so its ``deploy.progress`` events reach the same followers, and
``job_status`` lists its ``takeovers``. ``job_status`` asked of a job whose
owner is gone takes it over the same way. The instance checks the items
against its own allowed roots again (a 403 ends the job REMOTE_ERROR). After
``max_takeovers`` (3) the job ends REMOTE_ERROR. A draining instance takes
nothing over. The takeover keeps the request's ``partial`` and its deployment
file (the job's generation is recorded as it ends, every item counted); all or nothing
spans one instance's run only: the items the dead owner switched in stay (each
whole), and a failure after the takeover switches back only the items it placed.
``job_cancel`` of a job taken over reaches its new owner: the client asks the
service queue when the id's instance is gone (:meth:`SystemControl.cancel_job`),
and an instance that does not run the job answers with the ``owner`` its record
names, where the client sends the cancel (authorized and audited there).
An owner judged gone while it still ran (its broker connection lost, not its
process) learns of the takeover from the record (its next write, its own scan):
it cancels the rest of that deployment, keeps what it switched in, records no
generation for it and publishes no more of its own ``deploy.progress`` (a Fetch
service may still report a download it had under way).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ion.core.audit import audited
from ion.core.control import JOB_SEP as CONTROL_JOB_SEP
from ion.core.control import SystemControl, connection_settled, has_consumer, reconnected
from ion.core.exceptions import (
    ApplicationError,
    ConfigurationError,
    ConversationError,
    ReceivedError,
    cut_off,
    not_bound,
)
from ion.core.jobs import JobStore, JobTable
from ion.core.lifecycle import State
from ion.core.process import Process, Receiver
from ion.core.safefs import lies_in
from ion.core.security import control, narrow_limit, narrow_roots
from ion.core.service import ServiceClient, ServiceProcess
from ion.services.cache.core import CacheSettings
from ion.services.deploy.core import AccessRefused, Deployer, ItemResult, check_allowed
from ion.services.deploy.generations import (
    DeploymentFile,
    GenerationStore,
    parse_number,
    record_generation,
    rollback,
)
from ion.services.deploy.place import Target
from ion.services.deploy.settings import DeploySettings
from ion.services.deploy.spec import (
    DEFAULT_MAX_DEPLOYMENT_BYTES,
    MAX_BYTES_KEY,
    Deployment,
    DeploymentError,
    DeploymentItem,
    item_from_dict,
)
from ion.services.fetch.errors import AddressNotAllowedError
from ion.services.fetch.netguard import CONFIG_KEY, AddressGuard, check_url_blocking
from ion.services.fetch.service import FetchClient
from ion.services.records import convert

__all__ = ["DeployService", "DeployClient", "JobProgressListener", "JOB_SEP"]

#: Separates the pid of the Deploy instance that runs a job from the rest of its id (the control
#: API routes a job's cancel by it: one home, ion.core.control).
JOB_SEP = CONTROL_JOB_SEP

#: An item's fetch cut off by the loss of the connection to the broker is asked again once the
#: container has reconnected, this many times at most.
FETCH_RECONNECT_RETRIES = 3
#: Seconds between two tries of a fetch no Fetch service queue took, just after a reconnection.
NOT_BOUND_RETRY = 0.5


class DeployService(ServiceProcess):
    """Ops: ``deploy``, ``deploy_async``, ``job_status``, ``jobs``, ``job_cancel`` (operators only),
    ``generations``, ``rollback``.

    Config (``ion.services.deploy``): ``max_parallel`` (8), ``allowed_destinations``,
    ``allowed_file_repositories``, ``job_retention`` (3600 s), ``fetch_timeout`` (3600 s),
    ``max_concurrent`` (requests handled at once, 16), ``drain_timeout`` (30 s),
    ``job_dir`` (durable job records; None: ``<cache root>/jobs``; ``False``: none),
    ``max_deployment_bytes`` (64 MiB: a bigger request is a 400; a bound apps and spawnargs may only
    lower), ``keep_generations`` (3). HTTP(S) repositories at addresses outside ``allowed_networks`` of ``ion.services.fetch``
    refuse the request with a 403 (see :mod:`ion.services.fetch.netguard`).
    """

    service_name = "deploy"
    version = "0.1.0"
    _log = Logger()

    #: A sync deploy (minutes long) must not keep job_status, jobs and other deploys waiting.
    max_concurrent = DeploySettings.max_concurrent
    #: Seconds the deployments in progress get when the service stops (config ``drain_timeout``).
    drain_timeout = DeploySettings.drain_timeout

    @defer.inlineCallbacks
    def slc_init(self) -> Any:
        # Security bounds: the container's config, narrowed (never widened) by app config and
        # spawnargs; a spawn that would widen one fails here. None = the working folder.
        # (Checking roots resolves them: realpath, in the pool.)
        self.allowed_destinations: list[str] = yield self.container.blocking.run(
            self.bounded_config, "allowed_destinations", narrow_roots, [os.getcwd()])
        self.allowed_file_repositories: list[str] = yield self.container.blocking.run(
            self.bounded_config, "allowed_file_repositories", narrow_roots, [])
        self.max_deployment_bytes = self.bounded_config(MAX_BYTES_KEY, narrow_limit, DEFAULT_MAX_DEPLOYMENT_BYTES)
        if isinstance(self.max_deployment_bytes, bool) or not isinstance(self.max_deployment_bytes, int) \
                or self.max_deployment_bytes < 1:
            raise ConfigurationError(f"ion.services.deploy: {MAX_BYTES_KEY} must be a whole number of bytes >= 1, "
                                     f"not {self.max_deployment_bytes!r}")
        # The Fetch service's bound on the addresses it connects to, as the container sets it.
        self.address_guard = AddressGuard.from_config(
            self.container.config.container_get("ion.services.fetch", CONFIG_KEY, None))
        self.settings = DeploySettings.from_config(self.get_config)
        self.owner = self._owner()
        interval = self.settings.takeover_interval or 0.0
        self.jobs = JobTable(self.clock, self.settings.job_retention, store=self._job_store(),
                             owner=self.owner, owner_alive=self._owner_alive,
                             resume=self._resume_job if interval > 0 else None,
                             max_takeovers=self.settings.max_takeovers,
                             takeover_grace=interval if self.settings.takeover_grace is None
                             else self.settings.takeover_grace)
        self._takeover_scan: task.LoopingCall | None = None
        self.generations = GenerationStore(self._cache_root(), self.container.blocking,
                                           self.settings.keep_generations)

    def slc_activate(self) -> None:
        # Records of jobs that ended (or died) longer than job_retention ago.
        self.jobs.prune().addErrback(lambda f: self._log.warn("{pid}: pruning job records failed: {e}",
                                                               pid=self.id, e=f.getErrorMessage()))
        self._start_takeover_scan()

    def slc_drain(self) -> Any:
        """Terminate's first phase: :meth:`drain` for ``drain_timeout`` (see the module notes)."""
        self._stop_takeover_scan()
        return self.drain(self.settings.drain_timeout or 0.0)

    def slc_terminate(self) -> Any:
        self._stop_takeover_scan()
        self.jobs.cancel_all()
        return self.jobs.flush()

    # -- drain ----------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def drain(self, timeout: float, *, clock: IReactorTime | None = None) -> Any:
        """Stop taking deploys, wait up to ``timeout`` s for those in progress, cancel the rest.

        Fires once the cancelled ones have cleaned up and every job record is written.

        :param clock: measures ``timeout`` (default: the process's clock; a ``task.Clock`` in tests).
        """
        self.draining = True
        # The shared queue first: its waiting requests go to the other instances.
        for receiver in self.receivers:
            if receiver.name == self.service_queue and receiver.state is State.ACTIVE:
                yield receiver.deactivate()
        # The cancelled ones fire once their fetches have cleaned up (locks released, staging removed).
        yield self.drain_in_flight(timeout, clock=clock, what="deployment(s)")
        yield self.jobs.flush()

    # -- durable job records --------------------------------------------------------------------
    def _job_store(self) -> JobStore | None:
        directory = self.settings.job_dir
        if directory is False:
            return None
        if isinstance(directory, str) and directory:
            folder = Path(directory)
        else:
            folder = self._cache_root() / "jobs"  # the container's own cache root, as every instance sees it
        return JobStore(folder.expanduser(), self.container.blocking)

    def _host_id(self) -> str:
        from ion.services.cache.locks import this_host_id

        configured = self.container.config.settings(CacheSettings).host_id
        return configured or this_host_id()

    def _owner(self) -> dict[str, Any]:
        """Who runs this instance's jobs: container, host, OS pid and process id."""
        return {"container": self.container.id, "host": self._host_id(), "pid": os.getpid(), "process": self.id}

    def _owner_alive(self, owner: Mapping[str, Any]) -> bool | defer.Deferred[bool]:
        """Whether the owner of a job record still runs it (see the module notes)."""
        from ion.services.cache.locks import pid_alive

        if owner.get("container") == self.container.id and owner.get("host") == self.owner["host"]:
            if owner.get("pid") != self.owner["pid"]:
                return False  # this container id, started again
            proc = self.container.proc_manager.get(str(owner.get("process")))
            return proc is not None and not proc.is_final
        if owner.get("host") == self.owner["host"] and owner.get("pid") != self.owner["pid"]:
            pid = owner.get("pid")
            return isinstance(pid, int) and pid_alive(pid)
        if not connection_settled(self.container, self.settings.takeover_settle):
            return True  # (the broker cannot tell yet: live owners may be reconnecting as we did)
        process = owner.get("process")
        if not isinstance(process, str) or not process:
            return self._owner_among_nodes(owner)
        # Its process queue, as the broker sees it: consumed while its container's connection lives.
        def judged(consumed: bool | None) -> bool:
            return self._owner_among_nodes(owner) if consumed is None else consumed

        return has_consumer(self.container.transport, process).addCallback(judged)

    async def _owner_is_alive(self, owner: Mapping[str, Any]) -> bool:
        """:meth:`_owner_alive`, awaited."""
        return bool(await defer.maybeDeferred(self._owner_alive, owner))

    def _owner_among_nodes(self, owner: Mapping[str, Any]) -> bool:
        """Whether the agent lists the owner's container among the live ones (True without an agent)."""
        agent = self.container.proc_manager.get(self.container.agent_pid or "")
        live_nodes = getattr(agent, "live_nodes", None)
        if live_nodes is None:
            return True  # no agent to ask: do not declare anyone dead
        return any(node.get("container") == owner.get("container") for node in live_nodes())

    # -- job takeover (see the module notes and ion.core.jobs) -----------------------------------
    def _start_takeover_scan(self) -> None:
        interval = self.settings.takeover_interval or 0.0
        if interval <= 0 or self.jobs.store is None or self._takeover_scan is not None:
            return
        self._takeover_scan = self.repeat(interval, self._scan_for_takeover, "the job takeover scan")

    def _stop_takeover_scan(self) -> None:
        """A stopping instance takes no job over (neither by scan nor by ``job_status``)."""
        self.jobs.resume = None
        scan, self._takeover_scan = self._takeover_scan, None
        if scan is not None and scan.running:
            scan.stop()

    def _scan_for_takeover(self) -> defer.Deferred[None]:
        """One scan of the job records (a failed scan is logged; the next one comes)."""
        def failed(f: Any) -> None:
            self._log.warn("{pid}: scanning the job records for takeover failed: {e}", pid=self.id,
                           e=f.getErrorMessage())

        return self.jobs.scan().addCallbacks(lambda _: None, failed)

    async def _resume_job(self, job_id: str, record: Mapping[str, Any]) -> defer.Deferred[Any]:
        """Deploy the items of a taken-over job that are not in its results (the JobTable's
        ``resume`` hook); the work's Deferred fires with those items' results by part."""
        resume = record.get("resume") or {}
        source = str(resume.get("source") or "<request>")
        items = [item_from_dict(dict(raw), source) for raw in resume.get("items") or []]
        done = set(record.get("results") or {})
        remaining = [item for item in items if f"{item.position} {item.label}".strip() not in done]
        self._log.info("{pid}: taking job {job} over from {owner} for broker user {user!r}: {n} of {total} "
                       "item(s) left", pid=self.id, job=job_id, owner=record.get("owner"),
                       user=resume.get("caller"), n=len(remaining), total=len(items))
        self.container.publish_event("deploy.progress", {
            "job": job_id, "phase": "takeover", "from": record.get("owner"), "by": self.owner,
            "remaining": len(remaining)})
        if not remaining:  # its owner died after its last item: only the generation is left to record
            recorded = self._record_taken_over(resume, items, record.get("results") or {}, [])
            return recorded.addCallback(lambda _: {})
        # This instance's own bounds decide what it writes (they may differ from the first owner's).
        targets = await self.container.blocking.run(self._authorize, remaining)
        takeovers = len(record.get("takeovers") or []) + 1  # (this one's)
        work = self._run(Deployment(source, remaining), job_id, targets, resume.get("partial") is True, takeovers)

        def finished(results: list[ItemResult]) -> list[ItemResult]:
            if self.jobs.superseded(job_id, takeovers):
                return results  # (taken over again: the generation is the new owner's to record)
            # The job's generation, as deploy_async records it: every item, the dead owner's ones too.
            recording = self._record_taken_over(resume, items, record.get("results") or {}, results)
            if not self.draining:
                self.track(recording)
            return results

        work.addCallback(finished)
        return work.addCallback(lambda results: {_part(r): r.to_wire() for r in results})

    def _record_taken_over(self, resume: Mapping[str, Any], items: list[DeploymentItem],
                           done: Mapping[str, Any], results: list[ItemResult]) -> defer.Deferred[Any]:
        """Record the generation of a taken-over job whose request named its file, if every item
        (those the dead owner finished, from its record, and ``results``) is in place."""
        try:
            file = DeploymentFile.from_wire(resume.get("file")) if resume.get("file") else None
        except ApplicationError:
            file = None
        if file is None:
            return defer.succeed(None)
        by_part = {_part(r): r for r in results}
        every: list[ItemResult] = []
        for item in items:
            part = f"{item.position} {item.label}".strip()
            wire = done.get(part)
            if part in by_part:
                every.append(by_part[part])
            elif isinstance(wire, Mapping) and isinstance(wire.get("state"), str):
                every.append(ItemResult(item, wire["state"], already=bool(wire.get("already"))))
            else:
                return defer.succeed(None)  # an item without a result: not a whole deployment
        digest = resume.get("file_sha256")
        deployment = Deployment(str(resume.get("source") or "<request>"), items,
                                file_sha256=digest if isinstance(digest, str) else None)
        caller = resume.get("caller")
        return self._record(file, deployment, every, {"broker-user": caller if isinstance(caller, str) else None})

    # -- request handling ---------------------------------------------------------------
    def _deployment(self, content: Any) -> Deployment:
        if isinstance(content, convert.pb.DeployRequest):  # read as the dict it spells, checked the same way
            size: int | None = content.ByteSize()
            content = convert.deploy_request_to_wire(content)
        else:
            size = None
        if not isinstance(content, Mapping) or not isinstance(content.get("items"), list):
            raise ApplicationError("a deploy request is {'items': [item, ...], 'source': name}", 400)
        source = str(content.get("source") or "<request>")
        if not source.isprintable():
            source = repr(source)
        limit = self.max_deployment_bytes
        try:
            if size is None:
                size = len(msgpack.packb(content, use_bin_type=True))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ApplicationError(f"{source}: the deploy request cannot be read ({exc})", 400) from None
        if size > limit:
            raise ApplicationError(f"{source}: the deployment is {size} bytes, more than the {limit} bytes allowed "
                                   f"({MAX_BYTES_KEY} of ion.services.deploy)", 400)
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
        # The sha256 of the deployment file it was read from (DeployClient sends it): its generations record it.
        digest = content.get("file_sha256") or None
        if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                       and all(c in "0123456789abcdef" for c in digest)):
            raise ApplicationError(f"{source}: file_sha256 must be 64 lowercase hex digits, not {digest!r}", 400)
        return Deployment(source, items, file_sha256=digest)

    @staticmethod
    def _deployment_file(content: Any) -> DeploymentFile | None:
        """The deployment file a deploy request names (its generations'), or None."""
        if isinstance(content, convert.pb.DeployRequest):
            content = {"file": content.file, "host": content.host}
        if not isinstance(content, Mapping) or not content.get("file"):
            return None
        return DeploymentFile.from_wire(content)

    def _record(self, file: DeploymentFile | None, deployment: Deployment, results: list[ItemResult],
                msg: Mapping[str, Any]) -> defer.Deferred[Any]:
        """Record a generation of ``file`` if every item is in place (the one hook after a deploy)."""
        return defer.ensureDeferred(record_generation(self.generations, file, deployment, results,
                                                      caller=msg.get("broker-user"), via=f"deploy {self.id}"))

    @staticmethod
    def _partial(content: Any) -> bool:
        """The request's ``partial`` (absent: False, all or nothing); anything but a boolean is refused (400)."""
        if isinstance(content, convert.pb.DeployRequest):
            return bool(content.partial)
        partial = content.get("partial", False) if isinstance(content, Mapping) else False
        if partial is None:
            return False
        if not isinstance(partial, bool):
            raise ApplicationError(f"partial must be true or false, not {type(partial).__name__} {partial!r}", 400)
        return partial

    def _cache_root(self) -> Path:
        """The cache root of this container's config (where the Cache service publishes entries)."""
        from ion.services.cache.core import configured_root

        return configured_root(self.container.config).absolute()

    def _authorize(self, items: list[DeploymentItem]) -> list[Target]:
        """Check every item (403 for any outside its roots); one :class:`Target` per item, to write by."""
        # (An empty list of roots allows nothing.)
        destinations, repositories = self.allowed_destinations, self.allowed_file_repositories
        cache = Path(os.path.realpath(self._cache_root()))
        targets: list[Target] = []
        # The Fetch service checks each connection's address (DNS rebinding, redirects); this
        # refuses a request naming a private address as a whole, before anything runs.
        guard = self.address_guard
        checked: set[str] = set()
        for item in items:
            root = check_allowed(item.destination, destinations, f"{item.label}: destination")
            target = Target(root, Path(os.path.realpath(item.destination)))
            if lies_in(target.path, cache):
                raise AccessRefused(f"{item.label}: destination {item.destination} (resolved: {target.path}) "
                                    f"lies in the cache root {cache}, whose entries no deployment may write")
            targets.append(target)
            if item.repository.scheme == "file":
                check_allowed(item.repository.location_path, repositories, f"{item.label}: file repository")
            elif item.repository.scheme in ("http", "https") and item.repository.url not in checked:
                checked.add(item.repository.url)
                try:
                    check_url_blocking(guard, item.repository.url)
                except AddressNotAllowedError as exc:
                    raise AccessRefused(f"{item.label}: repository {item.repository.url}: {exc}") from None
        return targets

    def _deployer(self, job: str | None = None) -> Deployer:
        timeout = self.settings.fetch_timeout

        async def fetch(item: DeploymentItem, progress: Any) -> dict[str, Any]:
            # With a job, the Fetch service copies it and the item into its progress events (bytes
            # per file), so a job's watcher sees its downloads, not only its items' phases.
            # Cancellable: a deployment cancelled (drain) cancels the download at the Fetch service.
            retries = 0
            while True:
                try:
                    content = await FetchClient(self).fetch(item, timeout=timeout, job=job,
                                                            position=item.label if job is not None else None)
                    break
                except ConversationError as exc:
                    # Cut off by the loss of the connection (a cluster node died, the broker restarted):
                    # asked again once reconnected. A fetch is idempotent (the cache has it, or its lock
                    # is waited for while the first request's download finishes).
                    if cut_off(exc) and retries < FETCH_RECONNECT_RETRIES:
                        retries += 1
                        self._log.info("{pid}: fetch of {item} cut off ({e}); asking again once reconnected",
                                       pid=self.id, item=item.label, e=exc)
                        await self._reconnected(timeout)
                    elif not_bound(exc) and self._restoring_peers():
                        # Just after a reconnection (a broker restart drops every queue; each container
                        # declares its own again after its own backoff) the Fetch service may not be
                        # back yet: asked again until our connection has settled, then a 404 is final.
                        await task.deferLater(self.clock, NOT_BOUND_RETRY, lambda: None)
                    else:
                        raise
            return {"state": content["state"], "path": content["path"],
                    "names": content.get("content") or content.get("names") or [],
                    # The entry's content digest: a copy is redone only when the content changed.
                    "stamp": content.get("stamp") or ""}

        def run_fetch(item: DeploymentItem, progress: Any) -> defer.Deferred[dict[str, Any]]:
            return defer.ensureDeferred(fetch(item, progress))

        return Deployer(run_fetch, self.container.blocking, max_parallel=self.settings.max_parallel,
                        cache_root=self._cache_root())

    def _restoring_peers(self) -> bool:
        """Whether this container reconnected to the broker so lately that other containers may still
        be declaring their queues again (see :func:`ion.core.control.connection_settled`)."""
        manager = self.container.exchange_manager
        return bool(getattr(manager, "reconnects", 0)) and not connection_settled(self.container)

    async def _reconnected(self, timeout: float) -> None:
        """Wait until the container's connection to the broker is up again (see
        :func:`ion.core.control.reconnected`)."""
        await reconnected(self.container, timeout, self.clock)

    def _run(self, deployment: Deployment, job: str | None, targets: list[Target],
             partial: bool = False, takeovers: int = 0) -> defer.Deferred[list[ItemResult]]:
        """Deploy ``deployment`` (for ``job``, whose run here knows of ``takeovers`` takeovers)."""
        def progress(item: DeploymentItem, phase: str, info: Mapping[str, Any]) -> None:
            if job is not None and self.jobs.superseded(job, takeovers):
                return  # its followers hear the new owner now, not this instance's cancelled rest
            event = {"job": job, "item": item.label, "position": item.position, "phase": phase,
                     "bytes": info.get("done") if isinstance(info, Mapping) else None}
            if isinstance(info, Mapping):  # an item's end: its state, as in the result
                event.update({k: info[k] for k in ("state", "already", "reason") if k in info})
            self.container.publish_event("deploy.progress", event)

        items = self.container.metrics.counter("ion_deploy_items", "Deployed items by outcome (downloaded, "
                                               "cached, updated, failed, cancelled; an item switched back "
                                               "is counted again as rolled back).", ("state",))

        def on_result(result: ItemResult) -> None:
            items.labels(result.state).inc()
            if job is not None and not self.jobs.superseded(job, takeovers):
                # (A superseded run's parts are not the job's any more: this table may even run the
                # job again, as a later takeover, whose record they must not reach.)
                self.jobs.partial(job, _part(result), result.to_wire(), cancelled=result.cancelled)

        self.refuse_if_draining()
        # Tracked: terminate waits for it (drain_timeout), then cancels it.
        # A job another instance took over while this one ran it keeps what it switched in (that
        # instance counts the items finished here as done), whatever happens to the rest here.
        keep = None if job is None else (lambda: self.jobs.taken_over(job, takeovers))
        return self.track(self._deployer(job).deploy(deployment, progress=progress, on_result=on_result,
                                                     targets=targets, partial=partial, keep=keep))

    # -- ops --------------------------------------------------------------------------------
    @audited("deploy.run")
    async def op_deploy(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Deploy now; answer every item's state when all are done."""
        self.refuse_if_draining()
        protobuf = isinstance(content, convert.pb.DeployRequest)
        deployment = self._deployment(content)
        file = self._deployment_file(content)
        partial = self._partial(content)
        # realpath may touch slow filesystems: resolve off the reactor thread.
        targets = await self.container.blocking.run(self._authorize, deployment.items)
        results = await self._run(deployment, None, targets, partial)
        cancelled = [r.item.label for r in results if r.cancelled]
        if not cancelled:
            await self._record(file, deployment, results, msg)
            summary = _summary(deployment, results)
            return convert.summary_to_pb(summary) if protobuf else summary
        # Stopped before every item was in place: an error naming what was cancelled, with every
        # item's result (the finished ones are in place).
        finished = [r.item.label for r in results if not r.cancelled]
        message = (f"deploy service {self.id} stopped before the deployment ended; cancelled: "
                   f"{', '.join(cancelled)}; finished: {', '.join(finished) or 'none'}")
        if not self._answered(msg):
            self._unless_sent(self.reply_err(msg, {"error": "DeployCancelled", "message": message,
                                                   "cancelled": cancelled, **_summary(deployment, results)},
                                             response_code=503), msg)
        return None

    @audited("deploy.run")
    async def op_deploy_async(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Start a deployment and answer its job id at once; poll ``job_status``."""
        self.refuse_if_draining()
        protobuf = isinstance(content, convert.pb.DeployRequest)
        deployment = self._deployment(content)
        file = self._deployment_file(content)
        partial = self._partial(content)
        targets = await self.container.blocking.run(self._authorize, deployment.items)
        # The id names this instance, so status polls reach the one holding the job
        # even when several Deploy instances share the service queue.
        job_id = f"{self.id}{JOB_SEP}{os.urandom(8).hex()}"
        work = self._run(deployment, job_id, targets, partial)

        def finished(results: list[ItemResult]) -> list[ItemResult]:
            if self.jobs.superseded(job_id, 0):
                return results  # (taken over: the generation is the new owner's to record)
            # Recorded as the job ends, not before it: its status is final with its last item.
            recording = self._record(file, deployment, results, msg)
            if not self.draining:
                self.track(recording)  # terminate waits for the record too
            return results

        work.addCallback(finished)
        work.addCallback(lambda results: {_part(r): r.to_wire() for r in results})
        job = self.jobs.start("deploy", work, total=len(deployment.items), job_id=job_id,
                              resume=_resume_data(deployment, targets, msg.get("broker-user"), partial, file))
        if protobuf:
            return convert.pb.JobStarted(job=job.job_id, total=len(deployment.items))
        return {"job": job.job_id, "total": len(deployment.items)}

    def op_job_status(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> defer.Deferred[Any]:
        """Func's status of a job: 0 RUNNING, 1 FINISHED, 2 LOST_IN_SPACE, 3 PARTIAL, 4 REMOTE_ERROR.

        A job not in memory is answered from its durable record (``from_record: true``).
        An ``ion.deployer.JobQuery`` is answered with an ``ion.deployer.JobStatus``.
        """
        protobuf = isinstance(content, convert.pb.JobQuery)
        if protobuf:
            job: Any = content.job
        else:
            job = content.get("job") if isinstance(content, Mapping) else content
        if not isinstance(job, str) or not job or "\0" in job:
            raise ApplicationError("job_status takes a job id", 400)
        answer = self.jobs.lookup(job)
        return answer.addCallback(convert.job_status_to_pb) if protobuf else answer

    @control("job.cancel")
    async def op_job_cancel(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
        """``{job}``: cancel a running async job of this instance (operators only): its downloads
        stop, its locks and staging folders are released, and its status becomes REMOTE_ERROR
        listing the items that did not finish. ``{job, cancelled: bool}``.

        A job this instance does not run is looked up in its durable record: one whose owner is
        gone is taken over here (as ``job_status`` does) and cancelled; one another live instance
        runs (it took the job over) answers ``{job, cancelled: false, owner: <its pid>}``, so the
        caller sends the cancel there (it is authorized and audited where it is done). The cancel
        is never forwarded under this instance's own identity.
        """
        job = content.get("job") if isinstance(content, Mapping) else content
        if not isinstance(job, str) or not job or "\0" in job:
            raise ApplicationError("job_cancel takes a job id", 400)
        if not self.jobs.cancel(job):
            record = await self.jobs.lookup(job)  # a dead owner's job (past the grace) is taken over here
            if not self.jobs.cancel(job):
                return await self._job_elsewhere(job, record)
        self._log.info("{pid}: job {job} cancelled by broker user {user!r}", pid=self.id, job=job,
                       user=msg.get("broker-user"))
        return {"job": job, "cancelled": True}

    async def _job_elsewhere(self, job: str, record: Mapping[str, Any]) -> dict[str, Any]:
        """The answer to a cancel of a job not running here: its live owner's pid, or why not."""
        answer: dict[str, Any] = {"job": job, "cancelled": False}
        owner = record.get("owner")
        if not record.get("from_record") or record.get("status") not in (0, 3) or not isinstance(owner, Mapping):
            return answer  # unknown here, or ended
        alive = await self._owner_is_alive(owner)
        if not alive and self.jobs.store is not None:
            # Gone: an instance may have claimed the job and be starting it (its record follows).
            number = len(record.get("takeovers") or []) + 1
            claimer = await self.jobs.store.load_claim(job, number)
            if claimer is not None and (claimer.get("process") == self.id or await self._owner_is_alive(claimer)):
                owner, alive = claimer, True
        process = owner.get("process")
        if process == self.id:
            answer["error"] = "this instance is taking the job over now: ask again"
        elif alive and isinstance(process, str) and process:
            answer["owner"] = process
        else:
            grace = self.settings.takeover_interval or 0.0
            answer["error"] = (f"its owner {process} is gone and the job is not taken over yet" +
                               (f" (within {2 * grace:g} s): ask again" if grace > 0 else
                                " (this instance takes no job over: takeover_interval is 0)"))
        return answer

    def op_jobs(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> list[dict[str, Any]]:
        """Every job on record."""
        return self.jobs.list()

    async def op_generations(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{file, host}``: the kept generations of that deployment file, newest first:
        ``{file, host, keep, generations: [{generation, time, caller, via, source, file_sha256,
        rollback_of, items}]}``."""
        file = DeploymentFile.from_wire(content)
        history = await self.generations.history(file)
        return {**file.to_wire(), "keep": self.generations.keep,
                "generations": [g.to_wire() for g in reversed(history.generations)]}

    @audited("deploy.rollback")
    async def op_rollback(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """``{file, host, generation}``: put generation N (absent or None: the previous one) of that
        deployment file back in place, authorized as a deploy of its items is; record it as a new
        generation. Answers a deploy's summary plus ``rollback_of`` and ``generation``
        (the one recorded; None when an item failed). No such generation: 404 naming the kept ones."""
        self.refuse_if_draining()
        file = DeploymentFile.from_wire(content)
        number = parse_number(content.get("generation"))
        targets: list[Target] = []

        async def authorize(deployment: Deployment) -> None:
            targets[:] = await self.container.blocking.run(self._authorize, deployment.items)

        done = await rollback(self.generations, file, number, lambda d: self._run(d, None, targets),
                              caller=msg.get("broker-user"), via=f"deploy {self.id}",
                              check=lambda d: defer.ensureDeferred(authorize(d)))
        return done.to_wire()

    def metric_families(self) -> Any:
        """``ion_deploy_jobs{state}``: the async jobs this instance holds in memory, by state."""
        from prometheus_client.core import GaugeMetricFamily

        from ion.core.jobs import JobStatus

        family = GaugeMetricFamily("ion_deploy_jobs", "Deploy jobs held in memory, by state.", labels=("state",))
        states = [job.status for job in self.jobs.jobs.values()]
        for state in JobStatus:
            if state is not JobStatus.LOST_IN_SPACE:
                family.add_metric((state.name,), states.count(state))
        return [family]


def _part(result: ItemResult) -> str:
    return f"{result.item.position} {result.item.label}".strip()


def _resume_data(deployment: Deployment, targets: list[Target], caller: Any,
                 partial: bool = False, file: DeploymentFile | None = None) -> dict[str, Any]:
    """What a takeover needs (the job record's ``resume``): the request as validated, its caller,
    where each destination was allowed (root, resolved path), ``partial``, and the deployment file
    it named (``file``, ``file_sha256``: the taken-over job records its generation as it ends)."""
    return {"source": deployment.source, "items": [item.to_dict() for item in deployment.items],
            "caller": caller if isinstance(caller, str) else None,
            "targets": [[str(t.root), str(t.path)] for t in targets], "partial": partial,
            "file": file.to_wire() if file is not None else None, "file_sha256": deployment.file_sha256}


def _summary(deployment: Deployment, results: list[ItemResult]) -> dict[str, Any]:
    return {"source": deployment.source, "ok": all(r.ok for r in results),
            "items": [r.to_wire() for r in results]}


class DeployClient(ServiceClient):
    """Calls the Deploy service."""

    service_name = "deploy"

    @staticmethod
    def request_content(deployment: Deployment, host: str | None = None, *, partial: bool = False) -> Any:
        """The content of a deploy request for a deployment read where the caller runs: an
        ``ion.deployer.DeployRequest`` (the plain-dict spelling is :meth:`DeploymentItem.to_dict`'s
        items, with ``source`` and ``partial``). With ``host`` (this host's id), a deployment read
        from a file names that file, so the service records its generations.

        (Not ``request``: that is ServiceClient's conversation call, which this must not hide.)
        """
        named = deployment.file is not None and host is not None
        return convert.deploy_request_to_pb(deployment.source, deployment.items,
                                            file=deployment.file if named else None, host=host if named else None,
                                            file_sha256=deployment.file_sha256 if named else None, partial=partial)

    def host_id(self) -> str:
        """This host's id, as the cache knows it (``host_id`` of ``ion.services.cache``, else
        :func:`~ion.services.cache.locks.this_host_id`): the host part of a deployment file's
        generations."""
        from ion.services.cache.locks import this_host_id

        return self.proc.container.config.settings(CacheSettings).host_id or this_host_id()

    def deployment_file(self, path: str | os.PathLike[str]) -> defer.Deferred[DeploymentFile]:
        """The deployment file at ``path`` on this host, as its generations are named (its path
        resolved and this host's id read in the container's blocking pool, off the reactor)."""
        d: defer.Deferred[DeploymentFile] = self.proc.container.blocking.run(
            lambda: DeploymentFile.of(path, self.host_id()))
        return d

    @defer.inlineCallbacks
    def deploy(self, deployment: Deployment, timeout: float | None = 3600, *, partial: bool = False) -> Any:
        """Deploy and wait: ``{"ok", "items": [{item, state, already, reason, ...}]}``.

        :param partial: keep each item placed whatever the others do (default: all or nothing).
        """
        content, _ = yield self.rpc_send("deploy", self.request_content(deployment, self.host_id(), partial=partial),
                                         timeout=timeout)
        return convert.summary_to_wire(content) if isinstance(content, convert.pb.DeploySummary) else content

    @defer.inlineCallbacks
    def deploy_async(self, deployment: Deployment, *, partial: bool = False) -> Any:
        """Start a deployment (``partial``: see :meth:`deploy`); fires with its job id."""
        content, _ = yield self.rpc_send("deploy_async",
                                         self.request_content(deployment, self.host_id(), partial=partial))
        return content.job if isinstance(content, convert.pb.JobStarted) else content["job"]

    @defer.inlineCallbacks
    def job_status(self, job: str) -> Any:
        """The job's record: ``{"status", "state", "results", ...}``, asked of the instance that runs it."""
        target = job.split(JOB_SEP, 1)[0] if JOB_SEP in job else self.target
        query = convert.pb.JobQuery(job=job)
        if target != self.target and not (yield self._consumed(target)):
            # Its instance died (its queue has no consumer): another instance answers, from the
            # job's record, or as the instance that took the job over.
            content, _ = yield self.rpc_send("job_status", query)
            return convert.job_status_to_wire(content) if isinstance(content, convert.pb.JobStatus) else content
        try:
            content, _ = yield self.proc.rpc_send(target, "job_status", query)
        except ReceivedError as exc:
            if target == self.target or exc.response_code not in (404, 503):
                raise
            # That instance is gone (or stopping): any instance answers from the job's durable record.
            content, _ = yield self.rpc_send("job_status", query)
        return convert.job_status_to_wire(content) if isinstance(content, convert.pb.JobStatus) else content

    def _consumed(self, queue: str) -> defer.Deferred[bool]:
        """Whether the broker shows a consumer on ``queue`` (True when it cannot tell)."""
        return has_consumer(self.proc.container.transport, queue).addCallback(lambda consumed: consumed is not False)

    @defer.inlineCallbacks
    def cancel_job(self, job: str) -> Any:
        """Cancel a running async job at the instance that runs it (operators only), also once
        another instance took it over (see :meth:`SystemControl.cancel_job`):
        ``{job, cancelled: bool}`` (and ``owner`` or ``error`` when not cancelled)."""
        if JOB_SEP not in job:  # not a job id of ours: ask the instance this client names
            content, _ = yield self.proc.rpc_send(self.target, "job_cancel", {"job": job})
            return content
        return (yield defer.ensureDeferred(SystemControl(self.proc).cancel_job(job)))

    @defer.inlineCallbacks
    def jobs(self) -> Any:
        """Every job the service (instance that answers) has on record."""
        content, _ = yield self.rpc_send("jobs", None)
        return content

    @defer.inlineCallbacks
    def generations(self, file: DeploymentFile) -> Any:
        """The kept generations of a deployment file, newest first (see ``op_generations``)."""
        content, _ = yield self.rpc_send("generations", file.to_wire())
        return content

    @defer.inlineCallbacks
    def rollback(self, file: DeploymentFile, generation: int | None = None, timeout: float | None = 3600) -> Any:
        """Put generation ``generation`` (None: the previous one) of a deployment file back in place:
        ``{"ok", "items", "rollback_of", "generation"}``."""
        content, _ = yield self.rpc_send("rollback", {**file.to_wire(), "generation": generation}, timeout=timeout)
        return content


class JobProgressListener(Process):
    """Follows one deploy job's ``deploy.progress`` events (the Deploy service's and the Fetch
    service's) and hands them to ``progress(item, phase, info)`` as the Deployer reports them in
    process (``fetch``, ``bytes``, ``place``, ``done``, ``failed``): the same progress display
    serves a deployment run here and one run by the services.

    Spawn args: ``items`` (the deployment's items), ``progress``; set :attr:`job` once known.
    """

    _FETCH_STEPS = frozenset({"lookup", "checking", "waiting", "listing", "unpacking", "publishing"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.items: list[DeploymentItem] = list(self.spawnargs.get("items") or [])
        self.progress: Any = self.spawnargs.get("progress")
        self._job: str | None = None
        #: Events that came before the job id was known (they are shown once it is).
        self._early: list[Mapping[str, Any]] = []
        self._waiting: list[defer.Deferred[None]] = []

    @property
    def job(self) -> str | None:
        """The job whose events are shown (others are ignored)."""
        return self._job

    @job.setter
    def job(self, job: str) -> None:
        self._job = job
        early, self._early = self._early, []
        for event in early:
            if event.get("job") == job:
                self._show(event)

    def receivers_to_create(self) -> list[Receiver]:
        return super().receivers_to_create() + [
            Receiver(self, f"{self.id}.progress", self._event, exchange=self.container.events_exchange,
                     bindings=["deploy.progress"])]

    def changed(self, timeout: float) -> defer.Deferred[None]:
        """Fires at the job's next event, or after ``timeout`` seconds."""
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        d.addTimeout(timeout, self.clock, onTimeoutCancel=lambda result, t: None)
        return d

    def _event(self, msg: dict[str, Any], receiver: Receiver) -> None:
        event = msg.get("content")
        if not isinstance(event, Mapping):
            return
        if self._job is None:
            if len(self._early) < 10_000:
                self._early.append(event)
            return
        if event.get("job") == self._job:
            self._show(event)

    def _show(self, event: Mapping[str, Any]) -> None:
        phase = str(event.get("phase") or "")
        if event.get("position") is not None:  # the Deploy service's: one item's phase
            for item in [i for i in self.items if i.position == event["position"]]:
                if phase in ("place", "done", "failed", "rolled back"):
                    self.progress(item, phase, event)
                elif phase == "cancelled":
                    self.progress(item, "failed", event)
        else:  # the Fetch service's: the download of a dependency (shared by the items naming it)
            for item in [i for i in self.items if i.label == event.get("item")]:
                if phase == "downloading":
                    self.progress(item, "bytes", {"file": event.get("file"), "done": event.get("bytes"),
                                                  "total": event.get("total")})
                elif phase in self._FETCH_STEPS:
                    self.progress(item, "fetch", {"step": phase})
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:
                d.callback(None)
