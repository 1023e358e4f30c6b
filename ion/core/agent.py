# -*- test-case-name: tests.core.test_agent -*-
"""The container agent: every container's first process (DESIGN §7).

The agent makes a container visible to the rest of its system:

- it announces the container on the events exchange (``container.start``,
  then ``container.heartbeat`` every ``ion.core.container: heartbeat_interval``
  seconds, and ``container.stop`` when it terminates), with content
  ``{container, sysname, pids, started_at, interval, agent, console}`` (``console``: the
  URL of its web console, or None);
- it listens to those events (a queue of its own bound with ``container.#``)
  and keeps a table of the live containers of the system, dropping one after
  3 missed heartbeats or its ``container.stop``;
- it answers ``nodes`` (the live containers), ``ps`` (this container's
  processes), ``apps`` (its running apps) and ``spawn`` (start a process
  here) on its main queue and on
  ``<sysname>.agent.<container-id>``, which any container of the system can
  name (:func:`agent_queue`). ``spawn`` is a control operation: only the
  system's operators may call it (:mod:`ion.core.security`).

The container spawns the agent first and terminates it last.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from twisted.internet import defer, task
from twisted.logger import Logger

from ion.core.exceptions import AppError, ApplicationError, ConfigurationError, IllegalStateError
from ion.core.lifecycle import State
from ion.core.process import Process, ProcessDesc, Receiver
from ion.core.security import control, is_operator
from ion.core.settings import ContainerSettings

__all__ = ["ContainerAgent", "NodeInfo", "agent_queue", "app_table", "MISSED_HEARTBEATS",
           "DEFAULT_HEARTBEAT_INTERVAL"]

#: A container silent for this many of its heartbeat intervals is dropped from the table.
MISSED_HEARTBEATS = 3
DEFAULT_HEARTBEAT_INTERVAL = ContainerSettings.heartbeat_interval

EVENT_START = "container.start"
EVENT_HEARTBEAT = "container.heartbeat"
EVENT_STOP = "container.stop"


def agent_queue(sysname: str, container_id: str) -> str:
    """The queue (and routing key) of the agent of ``container_id`` in system ``sysname``."""
    return f"{sysname}.agent.{container_id}"


@dataclass
class NodeInfo:
    """One live container, as its last announcement said."""

    container: str
    sysname: str
    pids: int
    started_at: float | None
    interval: float
    agent: str
    last_seen: float
    #: The URL of its web console (None: it serves none).
    console: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _console_url(value: Any) -> str | None:
    """An announced console address, if it is an ``http(s)://`` URL of a host (else None)."""
    from urllib.parse import urlsplit

    if not isinstance(value, str) or len(value) > 300:
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    return value if parts.scheme in ("http", "https") and parts.hostname else None


def _app_name(value: Any) -> str:
    """An app *name* (by message, never a path: what may run is what the container's app folders hold)."""
    if not isinstance(value, str) or not value or not value.replace("_", "").replace("-", "").isalnum():
        raise ApplicationError(f"an app is named by its name (letters, digits, - and _), not {value!r}", 400)
    return value


def app_table(container: Any) -> list[dict[str, Any]]:
    """``container``'s running apps, in start order, then the failed ones (``failed``: why its
    supervisor gave up): ``[{app, version, description, pids, failed}]``."""
    apps = container.app_manager
    running = [{"app": name, "version": app.definition.version, "description": app.definition.description,
                "pids": list(getattr(app.state, "pids", None) or []), "failed": None}
               for name, app in list(apps.running.items())]
    return running + [{"app": name, "version": None, "description": None, "pids": [], "failed": reason}
                      for name, reason in list(apps.failed.items())]


class ContainerAgent(Process):
    """Announces its container and keeps the table of the system's live containers."""

    name: ClassVar[str | None] = "agent"
    _log = Logger()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nodes: dict[str, NodeInfo] = {}
        self._heartbeat: task.LoopingCall | None = None
        self._node_waiters: dict[str, list[defer.Deferred[dict[str, Any]]]] = {}

    # -- names -----------------------------------------------------------------------
    @property
    def agent_queue(self) -> str:
        """``<sysname>.agent.<container-id>``: where other containers reach this agent."""
        return agent_queue(self.sysname, self.container.id)

    @property
    def events_queue(self) -> str:
        """The agent's own queue on the events exchange."""
        return f"{self.agent_queue}.events"

    @property
    def heartbeat_interval(self) -> float:
        return self.container.config.settings(ContainerSettings).heartbeat_interval

    def receivers_to_create(self) -> list[Receiver]:
        return super().receivers_to_create() + [
            Receiver(self, self.agent_queue, self._receive),
            Receiver(self, self.events_queue, self._on_event, exchange=self.container.events_exchange,
                     bindings=["container.#"]),
        ]

    # -- lifecycle -------------------------------------------------------------------------
    def slc_init(self) -> None:
        self.heartbeat_interval  # fail the spawn now on a bad setting  # noqa: B018

    @defer.inlineCallbacks
    def on_activate(self) -> Any:
        yield super().on_activate()
        me = self._announcement()
        self._remember(me, self.clock.seconds())
        self.container.publish_event(EVENT_START, me)
        self._heartbeat = task.LoopingCall(self.heartbeat)
        self._heartbeat.clock = self.clock
        self._heartbeat.start(self.heartbeat_interval, now=False).addErrback(
            lambda f: self._log.failure("{pid}: heartbeat loop failed", f, pid=self.id))

    def slc_terminate(self) -> None:
        self._stop_heartbeat()
        self.container.publish_event(EVENT_STOP, self._announcement())
        self.nodes.clear()
        waiters, self._node_waiters = self._node_waiters, {}
        for ds in waiters.values():
            for d in ds:
                if not d.called:
                    d.errback(IllegalStateError(f"agent {self.id} terminated"))

    def on_error(self, cause: Any) -> Any:
        self._stop_heartbeat()
        return super().on_error(cause)

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None

    # -- announcing ------------------------------------------------------------------------
    def _announcement(self) -> dict[str, Any]:
        container = self.container
        return {
            "container": container.id,
            "sysname": container.sysname,
            "pids": len(container.proc_manager.processes),
            "started_at": container.started_at,
            "interval": self.heartbeat_interval,
            "agent": self.agent_queue,
            "console": self._own_console_url(),
        }

    def _own_console_url(self) -> str | None:
        http = getattr(self.container, "http", None)
        url = http.url if http is not None and getattr(http, "console_on", False) else None
        if not url:
            return None
        for wildcard in ("//0.0.0.0:", "//[::]:"):  # listening everywhere: name this host
            url = url.replace(wildcard, f"//{socket.gethostname()}:")
        return f"{url}/"

    def heartbeat(self) -> None:
        """Announce this container once more and forget the containers gone silent."""
        content = self._announcement()
        self._remember(content, self.clock.seconds())
        self.container.publish_event(EVENT_HEARTBEAT, content)
        self.expire()

    def expire(self) -> list[str]:
        """Drop containers silent for :data:`MISSED_HEARTBEATS` of their intervals; returns their ids."""
        now = self.clock.seconds()
        gone = [cid for cid, node in self.nodes.items()
                if cid != self.container.id and now - node.last_seen > MISSED_HEARTBEATS * node.interval]
        for cid in gone:
            del self.nodes[cid]
            self._log.info("{pid}: container {cid} missed {n} heartbeats; dropped",
                           pid=self.id, cid=cid, n=MISSED_HEARTBEATS)
        return gone

    # -- listening -------------------------------------------------------------------------
    def _remember(self, content: Mapping[str, Any], now: float) -> NodeInfo | None:
        try:
            node = NodeInfo(
                container=str(content["container"]),
                sysname=str(content.get("sysname", self.sysname)),
                pids=int(content.get("pids", 0)),
                started_at=content.get("started_at"),
                interval=float(content.get("interval") or DEFAULT_HEARTBEAT_INTERVAL),
                agent=str(content.get("agent") or agent_queue(self.sysname, str(content["container"]))),
                last_seen=now,
                console=_console_url(content.get("console")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            self._log.warn("{pid}: ignored a malformed container announcement: {exc}", pid=self.id, exc=exc)
            return None
        if node.sysname != self.sysname:
            return None
        self.nodes[node.container] = node
        for d in self._node_waiters.pop(node.container, []):
            if not d.called:
                d.callback(node.as_dict())
        return node

    def wait_for_node(self, container_id: str, timeout: float | None = None) -> defer.Deferred[dict[str, Any]]:
        """Fire with the entry of ``container_id`` once this agent has heard of it.

        :param timeout: seconds (on the container's clock) before failing with ``TimeoutError``.
        """
        node = self.nodes.get(container_id)
        if node is not None:
            return defer.succeed(node.as_dict())
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._node_waiters.setdefault(container_id, []).append(d)
        if timeout is not None:
            d.addTimeout(timeout, self.clock)
        return d

    def _on_event(self, msg: dict[str, Any], receiver: Receiver) -> None:
        event = msg.get("receiver")
        content = msg.get("content")
        if not isinstance(content, Mapping) or "container" not in content:
            return
        cid = str(content["container"])
        if event not in (EVENT_START, EVENT_HEARTBEAT, EVENT_STOP):
            return
        if not is_operator(self.container, msg.get("broker-user")):
            # A container of this system publishes as one of its operators; anything else is a
            # claim (a fake node, a console URL to lure an operator's browser): not listed.
            self.log_limiter.warn(self._log, ("foreign-announcement", str(msg.get("broker-user"))),
                                  "{pid}: ignored an announcement of container {cid!r} by broker user {user!r}, "
                                  "not an operator of system {sysname}", pid=self.id, cid=cid,
                                  user=msg.get("broker-user"), sysname=self.sysname)
            return
        if event == EVENT_STOP:
            if cid != self.container.id and self.nodes.pop(cid, None) is not None:
                self._log.info("{pid}: container {cid} stopped", pid=self.id, cid=cid)
            return
        known = cid in self.nodes
        self._remember(content, self.clock.seconds())
        if cid == self.container.id:
            return
        if not known:
            self._log.info("{pid}: container {cid} joined system {sysname}", pid=self.id, cid=cid,
                           sysname=self.sysname)
        if event == EVENT_START and self.state is State.ACTIVE:
            # Tell the newcomer about us now rather than at our next heartbeat.
            self.container.publish_event(EVENT_HEARTBEAT, self._announcement())

    # -- queries -------------------------------------------------------------------------------
    def live_nodes(self) -> list[dict[str, Any]]:
        """The live containers of the system (this one included), by container id."""
        self._remember(self._announcement(), self.clock.seconds())
        self.expire()
        return [self.nodes[cid].as_dict() for cid in sorted(self.nodes)]

    def process_table(self) -> list[dict[str, Any]]:
        """This container's processes, in spawn order."""
        return [
            {"pid": proc.id, "name": proc.proc_name, "class": type(proc).__name__,
             "module": type(proc).__module__, "state": proc.state.value,
             "parent": proc.parent.id if proc.parent is not None else None}
            for proc in list(self.container.proc_manager.processes.values())
        ]

    def app_table(self) -> list[dict[str, Any]]:
        """This container's apps (:func:`app_table`)."""
        return app_table(self.container)

    # -- ops ------------------------------------------------------------------------------------
    def op_nodes(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """The live containers of the system: ``[{container, sysname, pids, started_at, ...}]``."""
        return self.live_nodes()

    def op_ps(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """This container's processes: ``[{pid, name, class, module, state, parent}]``."""
        return self.process_table()

    def op_apps(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """This container's apps: ``[{app, version, description, pids, failed}]`` (``failed``: why the
        supervisor gave up, else None)."""
        return self.app_table()

    def op_convs(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """This container's conversations in flight (``ion.core.trace.in_flight``): conv, role,
        initiator, peer, op, protocol, state, age (seconds), trace id."""
        from ion.core.trace import in_flight

        return [dict(row, age=round(row["age"], 3)) for row in in_flight(self.container)]

    @control("app.start")
    async def op_start_app(self, app: str) -> Any:
        """Start app ``app`` (a name from this container's app folders, with its dependencies) here:
        ``{app, container, started}`` (``started`` False: it was running already). The agent takes
        one request at a time, so a retried or concurrent start waits behind the one in progress
        and finds the app running: never started twice."""
        name = _app_name(app)
        manager = self.container.app_manager
        if name in manager.running:
            return {"app": name, "container": self.container.id, "started": False}
        try:
            await manager.start_app(name)
        except (AppError, ConfigurationError) as exc:
            raise ApplicationError(f"cannot start app {name!r} in {self.container.id}: {exc}", 400) from None
        return {"app": name, "container": self.container.id, "started": True}

    @control("app.stop")
    async def op_stop_app(self, app: str) -> Any:
        """Stop app ``app`` here (its processes in reverse start order): ``{app, container, stopped}``."""
        name = _app_name(app)
        if name not in self.container.app_manager.running:
            raise ApplicationError(f"app {name!r} is not running in {self.container.id}", 404)
        await self.container.app_manager.stop_app(name)
        return {"app": name, "container": self.container.id, "stopped": True}

    @control("process.terminate")
    def op_terminate(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Refused (409): the agent runs as long as its container; stop the container instead."""
        raise ApplicationError(f"{self.id} is the agent of container {self.container.id}: it runs as long as its "
                               f"container (stop the container instead)", 409)

    @control("agent.spawn")
    @defer.inlineCallbacks
    def op_spawn(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Start a process in this container; answers its pid.

        ``content`` is a module or one-process app name, or a dict
        ``{"module": ..., "procclass": ..., "app": ..., "spawnargs": {...}, "name": ...}``.
        """
        if isinstance(content, str):
            content = {"module": content}
        if not isinstance(content, Mapping):
            raise ApplicationError("spawn needs a module or app name, or a dict with 'module' or 'app'")
        what = content.get("module") or content.get("app")
        if not isinstance(what, str) or not what:
            raise ApplicationError("spawn needs 'module' (a dotted module name) or 'app' (an app name)")
        spawnargs = content.get("spawnargs") or {}
        if not isinstance(spawnargs, Mapping):
            raise ApplicationError("spawn: 'spawnargs' must be a dict")
        name = content.get("name")
        desc: ProcessDesc | str = what
        if content.get("procclass"):
            desc = ProcessDesc(name=name or what.rsplit(".", 1)[-1], module=what,
                               procclass=str(content["procclass"]))
        try:
            pid = yield self.container.spawn(desc, dict(spawnargs), name=name)
        except (ConfigurationError, AppError) as exc:
            raise ApplicationError(f"cannot spawn {what!r} in {self.container.id}: {exc}", 400) from exc
        self._log.info("{pid}: spawned {what} as {child} for broker user {user!r} ({sender})", pid=self.id,
                       what=what, child=pid, user=msg.get("broker-user"),
                       sender=msg.get("sender-name") or msg.get("sender"))
        return pid
