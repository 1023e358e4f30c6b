# -*- test-case-name: tests.core.test_control -*-
"""The one control API of the core (issue #16 §1, "One control path").

:class:`SystemControl` is what the shell, the ``ion`` command and the web
console use to look at a running system and to change it: ``nodes``, ``ps``,
``ping``, ``call``, ``spawn``, ``kill`` and ``follow_audit``. Every one of
them goes out as a message from one process (the caller's own), so an action
that changes the system is authorized where it runs, on the broker-validated
user of that message (:mod:`ion.core.security`), and recorded there in the
audit trail (:mod:`ion.core.audit`): no tool has a copy of an action of its
own, and none bypasses the checks by calling into a container directly.

- ``nodes()``: the live containers, as the caller's container's agent hears
  them (:class:`~ion.core.agent.ContainerAgent`). A container that has just
  started learns the others from the heartbeats they send at once in answer
  to its ``container.start``: :meth:`SystemControl.discover` waits a short
  settle time for those answers (one broker round trip is enough).
- ``ps(node)``: the processes of one container (its agent's ``ps`` op), or
  of every live container when ``node`` is None.
- ``spawn(what, node=...)``: the ``spawn`` op of that container's agent (a
  control operation: ``agent.spawn``).
- ``kill(pid)``: the ``terminate`` op of that process (a control operation:
  ``process.terminate``).
- ``follow_audit(callback)``: a listener process bound to ``control.#`` on
  the system's events exchange; each audit record goes to ``callback``.

Deploy and cache actions stay in their service clients
(:class:`~ion.services.deploy.service.DeployClient`,
:class:`~ion.services.cache.service.CacheClient`): the core imports no
service; a tool composes them with this API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from ion.core.agent import ContainerAgent, agent_queue
from ion.core.exceptions import ConversationError, IonError, ReceivedError
from ion.core.process import Process, Receiver
from ion.core.settings import MessagingSettings, ProcessSettings

__all__ = ["SystemControl", "ControlError", "AuditListener", "DEFAULT_SETTLE", "AUDIT_BINDING", "has_consumer",
           "connection_settled", "reconnected", "RECONNECT_POLL"]

_log = Logger()

#: Seconds :meth:`SystemControl.discover` waits for the other containers' answers to our start.
DEFAULT_SETTLE = 1.0

#: The binding of :class:`AuditListener` on the events exchange: every audit record.
AUDIT_BINDING = "control.#"


def has_consumer(transport: Any, queue: str) -> defer.Deferred[bool | None]:
    """Whether the broker shows a consumer on ``queue``; on a process's own queue (its pid):
    whether that process still listens (a dead container's connection, and so its consumers,
    are gone at once). True or False (no consumer, or no such queue); None when the broker
    cannot tell (the call failed). One check for every caller that judges a process gone by
    it: the job takeover, a cancel's routing, the Cache service's leases.
    """
    def judged(counts: tuple[int, int] | None) -> bool:
        return counts is not None and counts[1] > 0

    def unknown(f: Any) -> None:
        _log.debug("the broker could not tell whether {queue} has a consumer: {e}", queue=queue,
                   e=f.getErrorMessage())
        return None

    d: defer.Deferred[bool | None] = defer.maybeDeferred(transport.queue_depth, queue).addCallbacks(judged, unknown)
    return d


def connection_settled(container: Any, settle: float | None = None) -> bool:
    """Whether ``container``'s connection to the broker has been up ``settle`` seconds (None:
    ``reconnect_max`` of ``ion.core.messaging`` plus 10 s). Before that, a queue without consumer
    (:func:`has_consumer` False) may be a live process whose container is still reconnecting (a broker
    restart drops every connection at once, and each comes back after its own backoff): nobody may be
    judged gone by it yet. The job takeover and the Cache service's lease check both ask this first."""
    since = getattr(container.exchange_manager, "connected_since", None)
    if since is None:
        return False
    if settle is None:
        settle = container.config.settings(MessagingSettings).reconnect_max + 10.0
    return bool(container.clock.seconds() - since >= settle)


#: Seconds between two looks at the connection while :func:`reconnected` waits for it.
RECONNECT_POLL = 0.1


async def reconnected(container: Any, timeout: float, clock: Any = None) -> None:
    """Wait (polling on ``clock``, the container's by default) until ``container``'s connection to the
    broker is up again: what a call cut off by its loss (:func:`ion.core.exceptions.cut_off`) waits for
    before it is asked again.

    :raises ConversationError: 503 after ``timeout`` seconds without a connection.
    """
    clock = clock if clock is not None else container.clock
    waited = 0.0
    while not container.exchange_manager.connected:
        if waited >= timeout:
            raise ConversationError("broker", "", f"not reconnected to the broker within {timeout:g} s")
        await task.deferLater(clock, RECONNECT_POLL, lambda: None)
        waited += RECONNECT_POLL


class ControlError(IonError):
    """A control action that cannot be asked for as given (no agent, an ambiguous node, ...)."""


class AuditListener(Process):
    """Hands every ``control.<action>`` event of its system (an audit record, see
    :mod:`ion.core.audit`) to ``callback(record)``.

    Spawn args: ``callback`` (called on the reactor thread, once per record).
    """

    name = "audit-listener"
    _log = Logger()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.callback: Callable[[dict[str, Any]], Any] | None = self.spawnargs.get("callback")

    def receivers_to_create(self) -> list[Receiver]:
        return super().receivers_to_create() + [
            Receiver(self, f"{self.id}.audit", self._event, exchange=self.container.events_exchange,
                     bindings=[AUDIT_BINDING])]

    def _event(self, msg: dict[str, Any], receiver: Receiver) -> None:
        content = msg.get("content")
        if not isinstance(content, Mapping) or self.callback is None:
            return
        record = dict(content)
        record.setdefault("action", str(msg.get("receiver") or "").removeprefix("control."))
        try:
            self.callback(record)
        except Exception:
            self._log.failure("{pid}: audit callback failed", pid=self.id)


#: Seconds an app's start or stop by its agent may take (its processes' own starts and stops).
APP_TIMEOUT = 300.0

#: Separates the pid of the Deploy instance that runs a job from the rest of its id (the Deploy
#: service makes its job ids with it).
JOB_SEP = "/"


class SystemControl:
    """Look at and change a running system, over messages sent by ``proc``.

    :param proc: the caller's process (the shell's, the command's); its container must run an
        agent for :meth:`nodes`, :meth:`ps` of every node and :meth:`spawn`.
    :param client: ``proc``'s container is a short-lived client (the ``ion`` command), not part
        of the system: it is left out of :meth:`nodes` and :meth:`ps`.
    :param timeout: seconds each call waits for its answer (None: ``ion.core.process: rpc_timeout``).
    :param caller: who ``proc`` is, in error messages (``the shell``).
    :param headers: extra headers of every call (claims for the record, such as the web console's
        ``user-id: web <address>``: the target decides on the broker user, never on them).
    """

    def __init__(self, proc: Process, *, client: bool = False, timeout: float | None = None,
                 caller: str = "the caller", headers: Mapping[str, Any] | None = None) -> None:
        self.proc = proc
        self.caller = caller
        self.client = client
        self.timeout = timeout
        self.headers = dict(headers) if headers else None

    @property
    def container(self) -> Any:
        """``proc``'s container."""
        return self.proc.container

    @property
    def sysname(self) -> str:
        return str(self.container.sysname)

    # -- the local agent ------------------------------------------------------------------------
    def agent(self, required: bool = True) -> ContainerAgent | None:
        """The agent of ``proc``'s container (None, or :class:`ControlError` when ``required``)."""
        pid = getattr(self.container, "agent_pid", None)
        agent = self.container.proc_manager.get(pid) if pid else None
        if isinstance(agent, ContainerAgent):
            return agent
        if required:
            raise ControlError(f"container {self.container.id} runs no agent (ion.core.container: agent)")
        return None

    def resolve_node(self, node: str) -> str:
        """The container id ``node`` names: an id, or a unique prefix of a live container's id.

        An id the agent has not heard of is returned as it is: the request tells whether it is there.
        """
        agent = self.agent(required=False)
        if agent is None or node in agent.nodes:
            return node
        found = [cid for cid in agent.nodes if cid.startswith(node)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ControlError(f"node {node!r} is ambiguous: {', '.join(sorted(found))}")
        return node

    async def _rpc(self, target: str, op: str, content: Any = None, timeout: float | None = None) -> Any:
        reply, _headers = await self.proc.rpc_send(target, op, content, headers=self.headers,
                                                   timeout=timeout if timeout is not None else self.timeout)
        return reply

    async def _agent_rpc(self, cid: str, op: str, content: Any = None, timeout: float | None = None) -> Any:
        """Call ``op`` of container ``cid``'s agent; a container that is not there is a clear error."""
        try:
            return await self._rpc(agent_queue(self.sysname, cid), op, content, timeout=timeout)
        except ReceivedError as exc:
            if exc.response_code == 404 and "bound" in str(exc):
                raise ControlError(f"no container {cid!r} in system {self.sysname} (no agent answers at "
                                   f"{agent_queue(self.sysname, cid)})") from None
            raise

    # -- looking ------------------------------------------------------------------------------------
    async def discover(self, settle: float = DEFAULT_SETTLE) -> list[dict[str, Any]]:
        """:meth:`nodes` after ``settle`` seconds (on the process's clock): long enough for the
        heartbeats the other agents send at once in answer to this container's start."""
        if settle > 0:
            await task.deferLater(self.proc.clock, settle, lambda: None)
        return await self.nodes()

    async def nodes(self) -> list[dict[str, Any]]:
        """The live containers of the system, by id: ``[{container, sysname, pids, started_at,
        interval, agent, last_seen}]`` (the agent's ``nodes`` op)."""
        agent = self.agent()
        assert agent is not None
        rows = await self._rpc(agent.agent_queue, "nodes")
        if self.client:
            rows = [row for row in rows if row.get("container") != self.container.id]
        return list(rows)

    async def ps(self, node: str | None = None) -> list[dict[str, Any]]:
        """The processes of container ``node`` (an id or a unique prefix), or of every live
        container when None: ``[{container, pid, name, class, module, state, parent}]``.

        Every container is asked at once; one that does not answer gives a row with ``error``
        (its reason) and no pid, rather than failing the listing of the others.
        """
        if node is not None:
            cid = self.resolve_node(node)
            return [{"container": cid, **row} for row in await self._agent_rpc(cid, "ps")]
        nodes = await self.nodes()

        async def one(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
            cid = str(entry["container"])
            try:
                rows = await self._rpc(str(entry.get("agent") or agent_queue(self.sysname, cid)), "ps")
            except (ReceivedError, IonError) as exc:
                return [{"container": cid, "pid": None, "name": None, "class": None, "module": None,
                         "state": None, "parent": None, "error": str(exc)}]
            return [{"container": cid, **row} for row in rows]

        tables = await defer.gatherResults([defer.ensureDeferred(one(n)) for n in nodes], consumeErrors=True)
        return [row for table in tables for row in table]

    async def ping(self, target: str, timeout: float | None = None) -> dict[str, Any]:
        """Ping a service (any of its instances) or a pid: ``{pong, pid, name, state, ...}``."""
        return dict(await self._rpc(target, "ping", None, timeout))

    async def call(self, target: str, op: str, content: Any = None, timeout: float | None = None) -> Any:
        """Call ``op`` at a service or pid; the reply's content (a refused or failed call raises
        the :class:`~ion.core.exceptions.ReceivedError` that says why)."""
        return await self._rpc(target, op, content, timeout)

    # -- changing -----------------------------------------------------------------------------------
    async def spawn(self, what: str, node: str | None = None, name: str | None = None,
                    spawnargs: Mapping[str, Any] | None = None) -> str:
        """Start a process (a dotted module, or a one-process app name) in container ``node``
        (default: the caller's); its pid. The ``spawn`` op of that container's agent: operators only."""
        cid = self.container.id if node is None else self.resolve_node(node)
        if cid == self.container.id:
            self.agent()  # a clear error rather than a 404 from a queue nobody consumes
        request: dict[str, Any] = {"module" if "." in what else "app": what, "spawnargs": dict(spawnargs or {})}
        if name:
            request["name"] = name
        return str(await self._agent_rpc(cid, "spawn", request))

    async def kill(self, pid: str) -> dict[str, Any]:
        """Terminate process ``pid`` (a pid; or a name, of a process of the caller's container) by
        its ``terminate`` op (operators only; audited where it runs).

        Answers ``{pid, name, container, done}``: ``done`` when the process has ended (a process of
        the caller's own container is waited for), False when it was asked to and said it would.
        """
        pm = self.container.proc_manager
        local = pm.find(pid)  # a process of this container, by pid or by name
        if local is None and ("." not in pid or pid.rsplit(".", 1)[0] == self.container.id):
            raise ControlError(f"no process {pid!r} in container {self.container.id}")
        if local is None and not pid.rsplit(".", 1)[1].isdigit():
            # A service's or an agent's queue name would terminate whichever instance takes it.
            raise ControlError(f"{pid!r} is not a process id (<container>.<n>): kill names one process")
        if local is not None:
            pid = local.id
            if local is self.proc:
                raise ControlError(f"{pid} is {self.caller}'s own process")
            if isinstance(local, ContainerAgent):
                raise ControlError(f"{pid} is the container agent; it runs as long as its container")
        ended: defer.Deferred[None] = defer.Deferred()

        def exited(proc: Process, state: Any) -> None:
            if proc.id == pid and not ended.called:
                ended.callback(None)

        if local is not None:
            pm.add_exit_listener(exited)
        try:
            reply = await self._rpc(pid, "terminate", None)
            if local is not None and pm.get(pid) is not None:
                # It said it would; its own stop is bounded by its terminate_timeout, and so is this wait.
                limit = self.timeout if self.timeout is not None else self.proc.rpc_timeout
                try:
                    stop = self.container.config.settings(ProcessSettings).terminate_timeout
                    await ended.addTimeout(limit + stop, self.proc.clock)
                except defer.TimeoutError:
                    return {"pid": pid, "name": local.proc_name, "container": self.container.id, "done": False}
        finally:
            pm.remove_exit_listener(exited)
        container = pid.rsplit(".", 1)[0] if "." in pid else None
        answered = reply.get("terminating") if isinstance(reply, Mapping) else None
        return {"pid": str(answered or pid), "name": local.proc_name if local is not None else None,
                "container": container, "done": local is not None}

    # -- apps ---------------------------------------------------------------------------------------
    async def start_app(self, app: str, node: str | None = None) -> Any:
        """Start app ``app`` (a name) in container ``node`` (default: the caller's) by its agent's
        ``start_app`` (operators only; audited there): ``{app, container, started}``."""
        return await self._agent_rpc(self._node_or_own(node), "start_app", {"app": app}, timeout=APP_TIMEOUT)

    async def stop_app(self, app: str, node: str | None = None) -> Any:
        """Stop app ``app`` in container ``node`` (default: the caller's) by its agent's ``stop_app``
        (operators only; audited there): ``{app, container, stopped}``."""
        return await self._agent_rpc(self._node_or_own(node), "stop_app", {"app": app}, timeout=APP_TIMEOUT)

    def _node_or_own(self, node: str | None) -> str:
        return str(self.container.id) if node is None else self.resolve_node(node)

    # -- the deployer's actions (by service and op name: the core imports no service) -----------------
    async def cancel_job(self, job: str) -> Any:
        """Cancel a running deploy job (operators only; audited) at the Deploy instance that runs it:
        ``{job, cancelled: bool}`` (and ``owner`` or ``error`` when not cancelled).

        A job id names the instance that started it (``<pid>/<hex>``); when nobody consumes that
        instance's queue any more (it died; another instance took the job over) or it answers
        404/503, the ``deploy`` service's queue is asked instead, as is an id of another form. An
        instance that does not run the job answers with the ``owner`` its durable record names
        (an instance that took it over): the cancel is sent there, authorized and audited there.
        """
        target = job.split(JOB_SEP, 1)[0] if JOB_SEP in job else "deploy"
        if target != "deploy" and await has_consumer(self.container.transport, target) is False:
            target = "deploy"  # its instance is gone: any instance answers, or names the owner
        asked = {target}
        try:
            answer = await self._rpc(target, "job_cancel", {"job": job})
        except ReceivedError as exc:
            if target == "deploy" or exc.response_code not in (404, 503):
                raise
            answer = await self._rpc("deploy", "job_cancel", {"job": job})
        while isinstance(answer, Mapping) and not answer.get("cancelled"):
            owner = answer.get("owner")
            if not isinstance(owner, str) or "." not in owner or owner in asked or len(asked) > 3:
                break
            asked.add(owner)
            answer = await self._rpc(owner, "job_cancel", {"job": job})
        return answer

    async def verify_cache(self, timeout: float = 3600.0) -> Any:
        """Have the Cache service run a verification round now (operators only; audited); its report."""
        return await self._rpc("cache", "verify_round", {}, timeout=timeout)

    async def reap_cache(self, timeout: float = 3600.0) -> Any:
        """Have the system's elected cache reaper run a round now (operators only; audited); its report."""
        return await self._rpc(f"{self.sysname}.cache.reaper", "reap_tick", {"force": True}, timeout=timeout)

    async def prune_cache(self, older_than: float | None = None, keep: int | None = None,
                          timeout: float = 600.0) -> Any:
        """Remove cache entries unused for ``older_than`` seconds, or beyond the ``keep`` most recently
        used versions of each dependency (operators only; audited); what was removed."""
        return await self._rpc("cache", "prune", {"older_than": older_than, "keep": keep}, timeout=timeout)

    # -- the audit trail ----------------------------------------------------------------------------
    async def follow_audit(self, callback: Callable[[dict[str, Any]], Any]) -> AuditListener:
        """Spawn an :class:`AuditListener` in the caller's container handing every audit record of the
        system (``control.*`` events) to ``callback``; terminate it (``proc_manager.terminate_process``)
        to stop following."""
        pid = await self.container.spawn(AuditListener, {"callback": callback})
        listener = self.container.proc_manager.get(pid)
        assert isinstance(listener, AuditListener)
        return listener
