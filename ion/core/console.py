# -*- test-case-name: tests.core.test_console -*-
"""The web console of a system, served at ``/`` by the container's HTTP port (:mod:`ion.core.http`).

One page (``ion/core/webconsole/``: plain HTML, JS and CSS, no build step)
shows the whole system: its containers (from the agent's nodes table, fed by
the announce/heartbeat events), each container's process tree with lifecycle
states, the apps, the queues and their depth, the conversations in flight,
the Deploy service's jobs with their progress, the cache (entries, sizes,
the last verification, the quarantined entries), a tail of the observer and
of the audit trail. It reads JSON from ``/api/...`` and keeps itself up to
date from ``/api/events`` (Server-Sent Events).

========================  ===================================================
``GET /api/system``       the containers, this container's apps, and the
                          processes of every container as one tree (paged)
``GET /api/queues``       queues and their depth (paged; depth is known on
                          the embedded broker only, ``null`` on RabbitMQ)
``GET /api/convs``        this container's conversations in flight (paged)
``GET /api/jobs``         the Deploy service's jobs (its ``jobs`` op)
``GET /api/cache``        the Cache service's entries (``list``, paged), its
                          last verification (``verify_report``), quarantine
``GET /api/observer``     the last lines of the observers of the system
``GET /api/audit``        the last ``control.*`` events (the audit trail)
``GET /api/events``       ``text/event-stream``: ``process``, ``container``,
                          ``audit`` and ``cache`` events; a comment every
                          :data:`HEARTBEAT` seconds; closed when the
                          container stops
``POST /api/kill``        ``{pid}``: the ``terminate`` op of that process
``POST /api/job_cancel``  ``{job}``: Deploy's ``job_cancel``
``POST /api/verify``      ``{}``: Cache's ``verify_round``
========================  ===================================================

Paged lists take ``?offset=&limit=`` (at most :data:`MAX_LIMIT`) and answer
``{total, offset, limit, items}``.

**Where the data comes from.** This container's own state is read on the
reactor thread. Other containers' process tables come from their agents'
``ps`` op, and the services' views from their read ops (Deploy ``jobs``,
Cache ``list`` and ``verify_report``), all called over messages by the
console's own process (:class:`ConsoleProcess`, named ``console``) and kept
for a second or two, so many viewers cost one call. The core imports no
service: ``deploy`` and ``cache`` are only names to send to.

**Actions** (the POSTs) need the operator token: ``Authorization: Bearer
<token>``. The token is ``ion.core.http: token`` if configured, else one
generated at start into ``ion.core.http: token_file`` (default
``ion-console-<container id>.token`` in the working folder), mode 0600,
removed at stop. An allowed action is sent as a message by the console's
process, so its target authorizes it (the console's login is the
container's, an operator) and audits it, with ``claimed_user`` naming the
web client. A POST without the token, or with a wrong one, is refused with
403 and recorded in the audit trail (no broker user; the remote address as
the claimed user). Before the token is looked at, a POST must be
``Content-Type: application/json`` (415) and not come from another origin
(``Origin`` or ``Sec-Fetch-Site: cross-site``: 403), so a page of another site
cannot make the browser send one; a refusal's audit record holds the action,
the target (cut) and the client, never the body, and at most
:data:`REFUSALS_RECORDED` refusals of one client are recorded a minute (the
rest are counted in the log), so a flood cannot fill the audit file.

**Limits.** At most :data:`MAX_STREAMS` event streams at once (503 beyond),
:data:`STREAMS_PER_CLIENT` per client address (its oldest closed for a new one);
a stream whose reader does not keep up (its connection's send buffer stays
full) is dropped once :data:`STREAM_BACKLOG` bytes of events were held back
for it (the page reconnects and reloads). The audit view keeps only the
``control.*`` events sent by one of the system's operators (their broker user
shown), each cut to a few hundred characters a field.

**Types.** The views check the types of what other processes answer (numbers
are numbers, else null); the page escapes every value it shows.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet import defer, task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ion.core import trace
from ion.core.agent import agent_queue, app_table
from ion.core.deferreds import observe
from ion.core.http import MAX_BODY
from ion.core.log import LogLimiter
from ion.core.process import Process, Receiver

if TYPE_CHECKING:
    from ion.core.container import Container

__all__ = ["Console", "ConsoleProcess", "ConsoleError", "page", "MAX_LIMIT", "DEFAULT_LIMIT", "HEARTBEAT",
           "STATIC"]

#: The page's files (package data).
STATIC = Path(__file__).resolve().parent / "webconsole"
#: Largest ``limit`` of a paged list.
MAX_LIMIT = 1000
#: ``limit`` when none is given.
DEFAULT_LIMIT = 100
#: Seconds between two keep-alive comments on an event stream.
HEARTBEAT = 5.0
#: Seconds another container's process table is kept before its agent is asked again.
PS_TTL = 1.0
#: Seconds the services' answers are kept (the jobs: less, their progress is live).
SERVICE_TTL = 2.0
JOBS_TTL = 0.5
#: Seconds a read call over messages may take.
READ_TIMEOUT = 5.0
#: Lines of the audit trail kept for the page.
AUDIT_TAIL = 200
#: Characters kept of each field of an audit entry shown (the whole entry stays small).
AUDIT_FIELD = 300
#: Event streams open at once, at most (503 beyond).
MAX_STREAMS = 32
#: Rows of another container's conversations taken from one answer.
MAX_REMOTE_ROWS = 5000
#: Event streams one client address may hold (a page needs one; a reload opens the next).
STREAMS_PER_CLIENT = 4
#: Bytes of events held back for a stream whose connection cannot send before it is dropped.
STREAM_BACKLOG = 256 * 1024
#: Refused actions recorded in the audit trail per client per :data:`REFUSAL_WINDOW` seconds.
REFUSALS_RECORDED = 20
REFUSAL_WINDOW = 60.0
#: Clients whose refusals are counted at once (the oldest window is forgotten first).
REFUSAL_CLIENTS = 1000

#: The actions the page may ask for: ``name -> (what the content must hold, control action)``.
ACTIONS: dict[str, tuple[str | None, str]] = {
    "kill": ("pid", "process.terminate"),
    "job_cancel": ("job", "job.cancel"),
    "verify": (None, "cache.verify"),
}


class ConsoleError(Exception):
    """A request the console answers with an error code (400 bad parameters, 403 refused ...)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def page(rows: list[Any], offset: int, limit: int) -> dict[str, Any]:
    """``{total, offset, limit, items}``: one page of ``rows``."""
    return {"total": len(rows), "offset": offset, "limit": limit, "items": rows[offset:offset + limit]}


def _paging(request: Request) -> tuple[int, int]:
    def number(name: str, default: int, low: int, high: int) -> int:
        raw = request.args.get(name.encode(), [b""])[0]
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConsoleError(400, f"{name} must be an integer, not {raw.decode(errors='replace')!r}") from None
        if not low <= value <= high:
            raise ConsoleError(400, f"{name} must be between {low} and {high}, not {value}")
        return value

    return number("offset", 0, 0, 2**31), number("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)


def _arg(request: Request, name: str) -> str:
    return request.args.get(name.encode(), [b""])[0].decode(errors="replace")


def _write_json(request: Request, code: int, body: Any) -> None:
    if request.finished or getattr(request, "_disconnected", False):
        return
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.write(json.dumps(body, default=repr, separators=(",", ":")).encode())
    request.finish()


def _serve(request: Request, make: Callable[[], Awaitable[Any]]) -> int:
    """Answer ``request`` with the JSON of ``await make()`` (an error as ``{error}`` with its code)."""
    log = Console._log

    def done(result: Any) -> None:
        if isinstance(result, Failure):
            exc = result.value
            if isinstance(exc, ConsoleError):
                _write_json(request, exc.code, {"error": str(exc)})
                return
            log.failure("console: {path} failed", result, path=request.path.decode(errors="replace"))
            _write_json(request, 500, {"error": f"{type(exc).__name__}: {exc}"})
            return
        _write_json(request, 200, result)

    async def run() -> Any:
        return await make()

    defer.ensureDeferred(run()).addBoth(done)
    return NOT_DONE_YET


def _error_of(exc: BaseException) -> tuple[int, str]:
    """The code and text of a failed call over messages."""
    code = getattr(exc, "response_code", None)
    if not isinstance(code, int):
        code = getattr(exc, "code", None)
    return (code if isinstance(code, int) and 400 <= code < 600 else 502), str(exc) or type(exc).__name__


class ConsoleProcess(Process):
    """The console's process: its calls over messages, and the events it pushes to the page.

    It listens on the events exchange to ``process.*``, ``container.start``/``stop``,
    ``control.*`` (the audit trail) and ``cache.*``, hands each to :meth:`Console.on_event`,
    and makes the console's calls (agents' ``ps``, the services' read ops, the actions) with
    the container's login.
    """

    name: ClassVar[str | None] = "console"
    _log = Logger()

    #: The routing keys of the events the console shows.
    EVENT_KEYS: ClassVar[list[str]] = ["process.#", "container.start", "container.stop", "control.#", "cache.#"]

    def receivers_to_create(self) -> list[Receiver]:
        queue = f"{agent_queue(self.sysname, self.container.id)}.console.events"
        return super().receivers_to_create() + [
            Receiver(self, queue, self._on_event, exchange=self.container.events_exchange,
                     bindings=list(self.EVENT_KEYS)),
        ]

    def _on_event(self, msg: dict[str, Any], receiver: Receiver) -> None:
        self.container.http.console.on_event(str(msg.get("receiver") or ""), msg.get("content"),
                                             msg.get("broker-user"))

    def slc_terminate(self) -> None:
        self.container.http.console.process_gone(self)


@implementer(IPushProducer)
class _Stream:
    """One open event stream, and the producer registered on its request: the connection pauses it while
    its send buffer is full; what is pushed meanwhile is held back (not buffered) and counted."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.paused = False
        #: Bytes of events held back since the connection paused.
        self.held_back = 0

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.held_back and self.open:
            # What was missed: the page reloads its view on any event.
            self.held_back = 0
            self.request.write(b"event: process\ndata: {}\n\n")

    def stopProducing(self) -> None:
        self.paused = True

    @property
    def open(self) -> bool:
        return not self.request.finished and not getattr(self.request, "_disconnected", False)


class Console:
    """The console of one container: its JSON views, its event streams, its token and actions."""

    _log = Logger()

    def __init__(self, container: Container) -> None:
        self.container = container
        #: The operator token (None until :meth:`prepare_token`).
        self.token: str | None = None
        #: The file the token was written to (removed at stop), if generated.
        self.token_path: str | None = None
        self.proc: ConsoleProcess | None = None
        #: The open event streams.
        self.streams: dict[Request, _Stream] = {}
        #: Streams dropped for a reader that did not keep up (for tests and stats).
        self.streams_dropped = 0
        self.audit_tail: deque[dict[str, Any]] = deque(maxlen=AUDIT_TAIL)
        self._heartbeat: task.LoopingCall | None = None
        self._memo: dict[Any, tuple[float, Any]] = {}
        self._pending: dict[Any, defer.Deferred[Any]] = {}
        #: Per client: (start of its window, refusals recorded in it).
        self._refusals: dict[str, tuple[float, int]] = {}
        self._limiter = LogLimiter(container.reactor)

    # -- the token -------------------------------------------------------------------------------
    async def prepare_token(self, configured: str | None, token_file: str | None) -> None:
        """Take the configured token, or generate one into ``token_file`` (mode 0600, in the pool)."""
        if configured:
            self.token = configured
            return
        token = secrets.token_urlsafe(32)
        path = os.path.abspath(token_file or f"ion-console-{self.container.id}.token")
        await self.container.blocking.run(_write_token, path, token)
        self.token, self.token_path = token, path
        self._log.info("console: operator token written to {path} (readable by its owner only)", path=path)

    def allowed(self, request: Request) -> bool:
        """Whether ``request`` carries the operator token (``Authorization: Bearer <token>``)."""
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = (header if isinstance(header, bytes) else header.encode()).partition(b" ")
        if self.token is None or scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(given.strip(), self.token.encode())

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn the console's process (after the agent) and start the streams' keep-alive."""
        if self.proc is None:
            pid = await self.container.spawn(ConsoleProcess)
            proc = self.container.proc_manager.get(pid)
            assert isinstance(proc, ConsoleProcess)
            self.proc = proc
        if self._heartbeat is None:
            self._heartbeat = task.LoopingCall(self._keep_alive)
            self._heartbeat.clock = self.container.reactor
            self._heartbeat.start(HEARTBEAT, now=False)

    def process_gone(self, proc: ConsoleProcess) -> None:
        """The console's process ended: with the container, the streams end too; otherwise (it was
        killed) the views of this container still answer, the calls over messages say 503."""
        if self.proc is proc:
            self.proc = None
        if self.container.stopping:
            self.close_streams()
        else:
            self._log.warn("console: its process {pid} ended while the container runs; events and the "
                           "other containers' views stop until the container restarts", pid=proc.id)

    def close_streams(self) -> None:
        """End every event stream (the container stops)."""
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None
        streams, self.streams = self.streams, {}
        for request, stream in streams.items():
            if stream.open:
                request.unregisterProducer()
                request.finish()

    async def stop(self) -> None:
        """Close the streams, say what the log limiter counted (its timer cancelled), remove the generated
        token file."""
        self.close_streams()
        self._limiter.flush()
        path, self.token_path = self.token_path, None
        self.token = None
        if path is not None:
            await self.container.blocking.run(_remove, path)

    # -- events --------------------------------------------------------------------------------------
    def subscribe(self, request: Request) -> bool:
        """Add ``request`` as an event stream; False if :data:`MAX_STREAMS` are open already. One
        client (address) holds at most :data:`STREAMS_PER_CLIENT`: its oldest is closed for a new one,
        so no client can take every stream."""
        client = _client(request)
        mine = [r for r in self.streams if _client(r) == client]
        if len(mine) >= STREAMS_PER_CLIENT:
            oldest = mine[0]
            self.streams.pop(oldest, None)
            try:
                oldest.finish()
            except Exception:  # noqa: BLE001 - its connection is gone already
                pass
        if len(self.streams) >= MAX_STREAMS:
            return False
        stream = self.streams[request] = _Stream(request)
        request.registerProducer(stream, True)
        request.notifyFinish().addBoth(lambda _: self.streams.pop(request, None))
        return True

    def _send(self, stream: _Stream, chunk: bytes) -> None:
        """Write ``chunk`` to ``stream``, or hold it back while its connection cannot send; drop the stream
        once :data:`STREAM_BACKLOG` bytes were held back (a reader that does not keep up)."""
        request = stream.request
        if not stream.open:
            self.streams.pop(request, None)
            return
        if not stream.paused:
            request.write(chunk)
            return
        stream.held_back += len(chunk)
        if stream.held_back > STREAM_BACKLOG:
            self.streams.pop(request, None)
            self.streams_dropped += 1
            self._limiter.warn(self._log, "slow-stream", "console: an event stream to {client} dropped: its "
                               "reader did not keep up ({n} bytes held back)", client=_client(request),
                               n=stream.held_back)
            transport = getattr(request.channel, "transport", None)
            if transport is not None:
                transport.abortConnection()

    def push(self, kind: str, data: Any) -> None:
        """Send one event to every open stream."""
        if not self.streams:
            return
        chunk = f"event: {kind}\ndata: {json.dumps(data, default=repr, separators=(',', ':'))}\n\n".encode()
        for stream in list(self.streams.values()):
            self._send(stream, chunk)

    def _keep_alive(self) -> None:
        for stream in list(self.streams.values()):
            self._send(stream, b": keep-alive\n\n")

    def on_event(self, key: str, content: Any, broker_user: Any = None) -> None:
        """An event of the system (from :class:`ConsoleProcess`): forget what it makes stale, tell the page.

        A ``control.*`` event (an audit record) is kept only if its message's ``broker_user`` (set by the
        broker, not by the sender) is one of the system's operators: any process may publish an event,
        only the containers' own logins record actions."""
        if not isinstance(content, Mapping):
            return
        if key.startswith("process."):
            self._forget(("ps", content.get("container")))
            self._forget(("apps", content.get("container")))
            self.push("process", {k: content.get(k) for k in ("pid", "name", "state", "previous", "container")})
        elif key.startswith("container."):
            self._forget(("ps", content.get("container")))
            self._forget(("apps", content.get("container")))
            self.push("container", {"event": key, "container": content.get("container")})
        elif key.startswith("control."):
            from ion.core.security import is_operator

            if not is_operator(self.container, broker_user):
                self._limiter.warn(self._log, "forged-audit", "console: a {key} event from broker user {user!r} "
                                   "(not an operator) left out of the audit view", key=key, user=broker_user)
                return
            entry = audit_entry(content, broker_user)
            self.audit_tail.append(entry)
            self.push("audit", entry)
        elif key.startswith("cache."):
            self._forget("cache")
            self._forget("verify")
            self.push("cache", {"event": key})

    # -- calls over messages, kept briefly ----------------------------------------------------------------
    def _forget(self, key: Any) -> None:
        self._memo.pop(key, None)

    async def _kept(self, key: Any, ttl: float, make: Callable[[], Awaitable[Any]]) -> Any:
        """``await make()``, or its answer of less than ``ttl`` seconds ago; callers at once share one call."""
        now = self.container.reactor.seconds()
        hit = self._memo.get(key)
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
        if len(self._memo) > 1000:  # answers about processes and containers long gone
            for old in [k for k, (at, _) in self._memo.items() if now - at > 60]:
                del self._memo[old]
        pending = self._pending.get(key)
        if pending is None:
            async def run() -> Any:
                return await make()

            pending = self._pending[key] = defer.ensureDeferred(run())

            def keep(value: Any) -> Any:
                self._pending.pop(key, None)
                if not isinstance(value, Failure):
                    self._memo[key] = (self.container.reactor.seconds(), value)
                return value

            pending.addBoth(keep)
        await observe(pending)
        hit = self._memo.get(key)
        if hit is None:
            raise ConsoleError(502, f"{key}: no answer")
        return hit[1]

    async def call(self, target: str, op: str, content: Any = None, timeout: float = READ_TIMEOUT,
                   headers: Mapping[str, Any] | None = None) -> Any:
        """Call ``op`` at ``target`` from the console's process; the reply's content."""
        proc = self.proc
        if proc is None:
            raise ConsoleError(503, f"the console of container {self.container.id} is not running")
        answer, _ = await proc.rpc_send(target, op, content, headers=headers, timeout=timeout)
        return answer

    async def _read(self, target: str, op: str, content: Any = None) -> dict[str, Any]:
        """``{"value": answer}``, or ``{"error", "code"}``: a read call whose failure the page shows."""
        try:
            return {"value": await self.call(target, op, content)}
        except ConsoleError:
            raise
        except Exception as exc:
            code, text = _error_of(exc)
            return {"error": text, "code": code}

    # -- the views -----------------------------------------------------------------------------------------
    def nodes(self) -> list[dict[str, Any]]:
        """The live containers (this one first if the agent is off)."""
        c = self.container
        agent = c.proc_manager.get(c.agent_pid) if c.agent_pid else None
        if agent is not None and hasattr(agent, "live_nodes"):
            return list(agent.live_nodes())
        return [{"container": c.id, "sysname": c.sysname, "pids": len(c.proc_manager.processes),
                 "started_at": c.started_at, "interval": None, "agent": None, "last_seen": c.clock.seconds()}]

    def local_processes(self) -> list[dict[str, Any]]:
        """This container's processes, as the agent's ``ps`` gives them, plus their queues, app and
        conversations."""
        c = self.container
        app_of = {pid: name for name, running in c.app_manager.running.items()
                  for pid in (getattr(running.state, "pids", None) or ())}
        return [
            {"pid": p.id, "name": p.proc_name, "class": type(p).__name__, "module": type(p).__module__,
             "state": p.state.value, "parent": p.parent.id if p.parent is not None else None,
             "app": app_of.get(p.id), "queues": [r.name for r in p.receivers],
             "convs": len(p.conversations)}
            for p in list(c.proc_manager.processes.values())
        ]

    async def processes_of(self, node: str) -> dict[str, Any]:
        """``{"value": rows}`` or ``{"error"}``: the process table of container ``node``, each row with
        the app it belongs to."""
        if node == self.container.id:
            return {"value": self.local_processes()}
        table, apps = await defer.gatherResults([
            defer.ensureDeferred(self._kept(("ps", node), PS_TTL, lambda: self._read(self._agent(node), "ps"))),
            defer.ensureDeferred(self.apps_of(node)),
        ])
        if "value" not in table or not isinstance(table["value"], list):
            return table
        app_list = apps.get("value")
        app_of: dict[str, Any] = {}
        for app in app_list if isinstance(app_list, list) else []:
            pids = app.get("pids") if isinstance(app, Mapping) else None
            for pid in pids if isinstance(pids, list) else []:
                if isinstance(pid, str):
                    app_of[pid] = app.get("app")
        return {"value": [_process_row(row, app_of) for row in table["value"] if isinstance(row, Mapping)]}

    async def apps_of(self, node: str) -> dict[str, Any]:
        """``{"value": apps}`` or ``{"error"}``: the apps of container ``node`` (its agent's ``apps``)."""
        if node == self.container.id:
            return {"value": app_table(self.container)}
        return await self._kept(("apps", node), SERVICE_TTL, lambda: self._read(self._agent(node), "apps"))

    def _agent(self, node: str) -> str:
        return agent_queue(self.container.sysname, node)

    async def system(self, offset: int, limit: int, query: str = "") -> dict[str, Any]:
        """The containers and their apps, and every container's processes as one tree, paged."""
        c = self.container
        nodes = self.nodes()
        ids = [n["container"] for n in nodes]
        tables, apps = await defer.gatherResults([
            defer.gatherResults([defer.ensureDeferred(self.processes_of(cid)) for cid in ids]),
            defer.gatherResults([defer.ensureDeferred(self.apps_of(cid)) for cid in ids]),
        ])
        rows: list[dict[str, Any]] = []
        containers = []
        for node, table, app_list in zip(nodes, tables, apps, strict=True):
            cid = node["container"]
            procs = table.get("value")
            containers.append({"container": cid, "local": cid == c.id, "started_at": _number(node.get("started_at")),
                               "last_seen": _number(node.get("last_seen")), "error": table.get("error"),
                               "processes": len(procs) if isinstance(procs, list) else None,
                               "apps": app_list.get("value") or []})
            if isinstance(procs, list):
                rows.extend(dict(row, container=cid) for row in tree_order(procs))
        if query:
            q = query.lower()
            rows = [r for r in rows if any(q in str(r.get(k) or "").lower()
                                           for k in ("pid", "name", "class", "state", "app"))]
        return {"system": c.sysname, "container": c.id, "containers": containers,
                "processes": page(rows, offset, limit), "audited": c.audit.path is not None}

    async def queues(self, offset: int, limit: int) -> dict[str, Any]:
        """Queues and their depth: every queue of the embedded broker; on RabbitMQ this container's
        queues, each page's depths asked of the broker (a passive declare per queue)."""
        c = self.container
        owners: dict[str, dict[str, Any]] = {}
        for p in list(c.proc_manager.processes.values()):
            for r in p.receivers:
                owners[r.name] = {"pid": p.id, "process": p.proc_name, "shared": r.shared, "prefetch": r.prefetch,
                                  "inflight": r.inflight, "buffered": len(r.buffered)}
        broker = c.broker
        if broker is not None and hasattr(broker, "queues"):
            rows: list[dict[str, Any]] = []
            for name in sorted(broker.queues):
                queue = broker.queues[name]
                rows.append({"queue": name, "depth": len(queue.messages), "consumers": len(queue.consumers),
                             **owners.get(name, {})})
            return {"depth_known": True, "broker": "memory", **page(rows, offset, limit)}
        rows = [{"queue": name, "depth": None, "consumers": None, **owner} for name, owner in sorted(owners.items())]
        answer = {"depth_known": True, "broker": "amqp", **page(rows, offset, limit)}

        async def depth(row: dict[str, Any]) -> None:
            try:
                counted = await c.transport.queue_depth(row["queue"])
            except Exception:  # noqa: BLE001 - the broker could not tell (connection lost): unknown
                counted = None
            if counted is not None:
                row["depth"], row["consumers"] = counted

        await defer.gatherResults([defer.ensureDeferred(depth(row)) for row in answer["items"]])
        return answer

    async def conversations(self, offset: int, limit: int) -> dict[str, Any]:
        """The system's conversations in flight: initiator, peer, op, age, state, trace id, container
        (oldest first): this container's read here, the others' by their agents' ``convs`` op."""
        rows = [dict(row, container=self.container.id, age=round(row["age"], 3))
                for row in trace.in_flight(self.container)]
        remote = [n["container"] for n in self.nodes() if n["container"] != self.container.id]
        answers = await defer.gatherResults([
            defer.ensureDeferred(self._kept(("convs", cid), PS_TTL,
                                            lambda cid=cid: self._read(self._agent(cid), "convs")))  # type: ignore[misc]
            for cid in remote])
        errors = []
        for cid, answer in zip(remote, answers, strict=True):
            if "value" not in answer or not isinstance(answer["value"], list):
                errors.append({"container": cid, "error": _text(answer.get("error"), 300)})
                continue
            rows.extend(_conv_row(row, cid) for row in answer["value"][:MAX_REMOTE_ROWS] if isinstance(row, Mapping))
        rows.sort(key=lambda r: -(r["age"] or 0.0))
        return {"container": self.container.id, "errors": errors, **page(rows, offset, limit)}

    async def jobs(self) -> dict[str, Any]:
        """The Deploy service's jobs (``{"error"}`` when none answers), newest first."""
        answer = await self._kept("jobs", JOBS_TTL, lambda: self._read("deploy", "jobs"))
        if "value" not in answer:
            return {"available": False, **answer, "items": []}
        jobs = [job for job in answer["value"] or [] if isinstance(job, Mapping)]
        items = []
        for job in sorted(jobs, key=lambda j: -(_number(j.get("created")) or 0)):
            results = job.get("results")
            results = results if isinstance(results, Mapping) else {}
            items.append({"job": _text(job.get("job")), "kind": _text(job.get("kind")),
                          "state": _text(job.get("state")), "done": len(results), "total": _integer(job.get("total")),
                          "error": _text(job.get("error")), "created": _number(job.get("created")),
                          "ended": _number(job.get("ended")),
                          "failed": sum(1 for r in results.values() if isinstance(r, Mapping) and r.get("ok") is False)})
        return {"available": True, "items": items}

    async def cache(self, offset: int, limit: int, query: str = "") -> dict[str, Any]:
        """The Cache service's entries (paged, largest first), its last verification and quarantine."""
        listing, verify = await defer.gatherResults([
            defer.ensureDeferred(self._kept("cache", SERVICE_TTL, lambda: self._read("cache", "list"))),
            defer.ensureDeferred(self._kept("verify", SERVICE_TTL, lambda: self._read("cache", "verify_report"))),
        ])
        if "value" not in listing:
            return {"available": False, **listing, **page([], offset, limit)}
        value = listing["value"] if isinstance(listing["value"], Mapping) else {}
        rows = []
        entries = value.get("entries")
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, Mapping):
                continue
            key = entry.get("key")
            key = key if isinstance(key, Mapping) else {}
            files = entry.get("files")
            rows.append({"name": _text(key.get("name")), "version": _text(key.get("version")),
                         "platform": _text(key.get("platform")), "size": _integer(entry.get("size")),
                         "files": len(files) if isinstance(files, (Mapping, list)) else None,
                         "last_used": _number(entry.get("last_used")), "fetched_at": _number(entry.get("fetched_at")),
                         "url": _text(entry.get("url"))})
        if query:
            q = query.lower()
            rows = [r for r in rows if q in f"{r['name']} {r['version']}".lower()]
        rows.sort(key=lambda r: (str(r["name"]), str(r["version"])))
        report = verify.get("value") if isinstance(verify, Mapping) else None
        summary = _verify_summary(report)
        return {"available": True, "root": _text(value.get("root")), "bytes": sum(r["size"] or 0 for r in rows),
                "verify": summary, "verify_error": verify.get("error"),
                "quarantine": summary.pop("quarantined") if summary else [], **page(rows, offset, limit)}

    async def observer(self, limit: int) -> dict[str, Any]:
        """The last lines of the system's observers: this container's read directly, the others'
        by their ``tail`` op (found in their containers' process tables)."""
        lines: list[dict[str, Any]] = []
        observers = []
        for p in list(self.container.proc_manager.processes.values()):
            tail = getattr(p, "tail", None)
            if isinstance(tail, deque):
                observers.append({"pid": p.id, "container": self.container.id})
                lines.extend(tail)
        remote = [n["container"] for n in self.nodes() if n["container"] != self.container.id]
        tables = await defer.gatherResults([defer.ensureDeferred(self.processes_of(cid)) for cid in remote])
        pids = [(cid, row["pid"]) for cid, table in zip(remote, tables, strict=True)
                for row in table.get("value") or [] if row.get("class") == "ObserverProcess"]
        tails = await defer.gatherResults([
            defer.ensureDeferred(self._kept(("tail", pid), PS_TTL, lambda pid=pid: self._read(pid, "tail")))  # type: ignore[misc]
            for _, pid in pids])
        for (cid, pid), tail in zip(pids, tails, strict=True):
            observers.append({"pid": pid, "container": cid, "error": tail.get("error")})
            lines.extend(dict(line) for line in tail.get("value") or [] if isinstance(line, Mapping))
        lines.sort(key=lambda line: line.get("time") or 0)
        return {"observers": observers, "items": lines[-limit:]}

    def audit(self, limit: int) -> dict[str, Any]:
        """The last ``control.*`` events this console saw, newest last."""
        return {"items": list(self.audit_tail)[-limit:]}

    # -- actions -------------------------------------------------------------------------------------------------
    def refuse(self, request: Request, action: str, target: str, reason: str, code: int = 403) -> None:
        """Record a refused action in the audit trail: the action, the target (cut) and the client, never
        the body; at most :data:`REFUSALS_RECORDED` per client per :data:`REFUSAL_WINDOW` (the rest counted
        in the log)."""
        from ion.core.security import UnauthorizedError

        control = ACTIONS[action][1]
        client = _client(request)
        now = self.container.reactor.seconds()
        start, count = self._refusals.get(client, (now, 0))
        if now - start >= REFUSAL_WINDOW:
            start, count = now, 0
        if count >= REFUSALS_RECORDED:
            self._limiter.warn(self._log, ("refusals", client), "console: refusals of {client} not recorded in the "
                               "audit trail (over {n} in {window:.0f} s): {action}: {reason}", client=client,
                               n=REFUSALS_RECORDED, window=REFUSAL_WINDOW, action=control, reason=reason)
            return
        if client not in self._refusals and len(self._refusals) >= REFUSAL_CLIENTS:
            del self._refusals[min(self._refusals, key=lambda k: self._refusals[k][0])]
        self._refusals[client] = (start, count + 1)
        target = _cut(target or "?", 200)
        error = UnauthorizedError(f"{control} on {target} from the web console ({client}): {reason}", code)
        msg: dict[str, Any] = {"broker-user": None, "user-id": client, "sender": None, "sender-name": "web console",
               "op": action, "content": {}}
        self.container.audit.record(msg, control, target, Failure(error))

    async def act(self, request: Request, action: str, body: Any) -> dict[str, Any]:
        """Run ``action`` for an allowed request, or refuse it (403, audited)."""
        field, control = ACTIONS[action]
        content = body if isinstance(body, Mapping) else {}
        target = str(content.get(field) or "")[:200] if field else "cache"
        client = _client(request)
        if not self.allowed(request):
            reason = ("no operator token" if not request.getHeader(b"authorization")
                      else "a wrong operator token")
            self.refuse(request, action, target, reason)
            raise ConsoleError(403, f"refused: {reason} (Authorization: Bearer <token>; see the token file "
                                    f"of container {self.container.id})")
        if field and not target:
            raise ConsoleError(400, f"{action} needs {field!r}")
        if self.proc is None:
            raise ConsoleError(503, f"the console of container {self.container.id} is not running")
        from ion.core.control import ControlError, SystemControl

        # The one control path (as the shell's and the ion command's), from the console's process; the
        # client's address goes as the user-id claim, for the audit record.
        system = SystemControl(self.proc, caller="the web console", headers={"user-id": client},
                               timeout=READ_TIMEOUT)
        try:
            if action == "kill":
                answer: Any = await system.kill(target)
            elif action == "job_cancel":
                answer = await system.cancel_job(target)
            else:
                answer = await system.verify_cache()
        except ControlError as exc:
            raise ConsoleError(400, str(exc)) from None
        except ConsoleError:
            raise
        except Exception as exc:
            code, text = _error_of(exc)
            raise ConsoleError(code, text) from None
        for key in ("jobs", "verify", "cache"):
            self._forget(key)
        return {"ok": True, "action": action, "target": target, "result": answer}


def tree_order(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Process rows in tree order (each parent before its children, spawn order among siblings),
    each with its ``depth``; a row whose parent is not in the table is a root."""
    table = [dict(r) for r in rows]
    pids = {r.get("pid") for r in table}
    children: dict[Any, list[dict[str, Any]]] = {}
    roots = []
    for row in table:
        parent = row.get("parent")
        if parent is not None and parent in pids and parent != row.get("pid"):
            children.setdefault(parent, []).append(row)
        else:
            roots.append(row)
    out: list[dict[str, Any]] = []
    stack = [(row, 0) for row in reversed(roots)]
    placed: set[Any] = set()
    while stack:
        row, depth = stack.pop()
        if row.get("pid") in placed:
            continue
        placed.add(row.get("pid"))
        row["depth"] = depth
        out.append(row)
        stack.extend((child, depth + 1) for child in reversed(children.get(row.get("pid"), [])))
    return out


def _verify_summary(report: Any) -> dict[str, Any]:
    """What the page shows of a Cache ``verify_report``: when, the outcomes counted, the entries it
    quarantined."""
    if not isinstance(report, Mapping):
        return {}
    outcomes = [o for o in report.get("outcomes") or [] if isinstance(o, Mapping)]
    counts = report.get("counts")
    if not isinstance(counts, Mapping):
        counts = {}
        for outcome in outcomes:
            counts[str(outcome.get("outcome"))] = counts.get(str(outcome.get("outcome")), 0) + 1
    quarantined = []
    for outcome in outcomes:
        if outcome.get("action") == "quarantined" or outcome.get("moved_to"):
            key = outcome.get("key") or {}
            quarantined.append({"name": key.get("name"), "version": key.get("version"),
                                "moved_to": outcome.get("moved_to"), "problems": outcome.get("problems")})
    return {"started": _number(report.get("started")), "finished": _number(report.get("finished")),
            "trigger": _text(report.get("trigger")),
            "counts": {str(k): n for k, n in counts.items() if _integer(n)}, "quarantined": quarantined}


def _client(request: Request) -> str:
    peer = request.getClientAddress()
    host = getattr(peer, "host", None) or str(peer)
    return f"web {host}"


def _number(value: Any) -> float | int | None:
    """``value`` if it is a finite number (not a bool), else None: what another process answers is checked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if value == value and value not in (float("inf"), float("-inf")) else None


def _integer(value: Any) -> int | None:
    """``value`` if it is an int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _conv_row(row: Mapping[str, Any], container: str) -> dict[str, Any]:
    """A conversation row another container's agent answered, its fields checked (text cut, numbers numbers)."""
    out: dict[str, Any] = {key: _text(row.get(key), 300)
                           for key in ("conv", "role", "initiator", "peer", "op", "protocol", "state", "trace")}
    out["age"] = _number(row.get("age"))
    out["container"] = container
    return out


def _text(value: Any, limit: int = 1000) -> str | None:
    """``value`` as a string of at most ``limit`` characters (None stays None)."""
    return None if value is None else _cut(value if isinstance(value, str) else str(value), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


#: The fields of a process row of another container, and what each must be.
_ROW_TEXT = ("pid", "name", "class", "module", "state", "parent")


def _process_row(row: Mapping[str, Any], app_of: Mapping[str, Any]) -> dict[str, Any]:
    """A process row of another container's agent, its fields checked (text is text, numbers numbers)."""
    out: dict[str, Any] = {k: _text(row.get(k), 200) for k in _ROW_TEXT}
    queues = row.get("queues")
    out["queues"] = [_text(q, 200) for q in queues[:50]] if isinstance(queues, list) else []
    out["convs"] = _integer(row.get("convs"))
    out["app"] = _text(app_of.get(out["pid"]) if isinstance(out["pid"], str) else None, 200)
    return out


#: The fields of an audit record (:meth:`ion.core.audit.Audit.record`) the console keeps.
_AUDIT_FIELDS = ("time", "container", "system", "user", "claimed_user", "sender", "sender_name", "action",
                 "target", "op", "args", "result", "code", "error")


def audit_entry(content: Mapping[str, Any], broker_user: str) -> dict[str, Any]:
    """The audit view's entry of a ``control.*`` event: its known fields, each cut to
    :data:`AUDIT_FIELD` characters (numbers kept), and the broker user that sent it."""
    entry: dict[str, Any] = {}
    for key in _AUDIT_FIELDS:
        value = content.get(key)
        if value is None or isinstance(value, bool) or (isinstance(value, int) and key == "code"):
            entry[key] = value
        elif isinstance(value, str):
            entry[key] = _cut(value, AUDIT_FIELD)
        else:
            entry[key] = _cut(json.dumps(value, default=repr, ensure_ascii=False), AUDIT_FIELD)
    entry["broker_user"] = broker_user
    return entry


def _write_token(path: str, token: str) -> None:
    """Write ``token`` to a new file at ``path``, readable by its owner only: whatever is there is
    removed first, and the file is created exclusively without following a link (a file, hard link or
    symlink placed there beforehand is never written through)."""
    _remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- the resources --------------------------------------------------------------------------------------------------
class _View(Resource):
    """A GET answered with JSON from one of the console's views."""

    isLeaf = True

    def __init__(self, make: Callable[[Request], Awaitable[Any] | Any]) -> None:
        super().__init__()
        self.make = make

    def render_GET(self, request: Request) -> int:
        async def run() -> Any:
            result = self.make(request)
            if isinstance(result, Awaitable):
                result = await result
            return result

        return _serve(request, run)


class _Action(Resource):
    """A POST of an action (JSON body)."""

    isLeaf = True

    def __init__(self, console: Console, action: str) -> None:
        super().__init__()
        self.console = console
        self.action = action

    def render_POST(self, request: Request) -> int:
        refusal = _cross_site(request)
        if refusal is not None:
            code, reason = refusal
            self.console.refuse(request, self.action, "?", reason, code)

            async def refused() -> Any:
                raise ConsoleError(code, f"refused: {reason}")

            return _serve(request, refused)
        raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            body = None

        async def run() -> Any:
            if body is None and self.console.allowed(request):
                raise ConsoleError(400, "the body must be JSON")
            return await self.console.act(request, self.action, body)

        return _serve(request, run)


def _header(request: Request, name: bytes) -> str | None:
    """A request header as text (None if absent)."""
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _cross_site(request: Request) -> tuple[int, str] | None:
    """``(code, reason)`` if a POST may come from a page of another site: not ``application/json`` (a form
    or a "simple" fetch can send no other without a preflight) or an ``Origin`` not this one; else None."""
    kind = (_header(request, b"content-type") or "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        return 415, f"an action must be Content-Type: application/json, not {_cut(kind, 60) or 'none'!r}"
    origin = _header(request, b"origin")
    host = (_header(request, b"host") or "").strip().lower()
    if origin is not None and origin.strip().lower() not in (f"http://{host}", f"https://{host}"):
        return 403, f"cross-origin request (Origin {_cut(origin, 100)!r})"
    if (_header(request, b"sec-fetch-site") or "").lower() == "cross-site":
        return 403, "cross-site request (Sec-Fetch-Site)"
    return None


class _Events(Resource):
    """``/api/events``: the event stream."""

    isLeaf = True

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def render_GET(self, request: Request) -> int | bytes:
        if not self.console.subscribe(request):
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"retry-after", b"10")
            return json.dumps({"error": f"too many event streams (at most {MAX_STREAMS})"}).encode()
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b"retry: 2000\n: connected\n\n")
        return NOT_DONE_YET


class _Api(Resource):
    def getChild(self, path: bytes, request: Request) -> Any:
        from twisted.web.pages import notFound

        return notFound()


def api(console: Console) -> Resource:
    """The ``/api`` tree of ``console``."""
    root = _Api()

    def paged(view: Callable[[int, int], Any]) -> Callable[[Request], Any]:
        return lambda request: view(*_paging(request))

    root.putChild(b"system", _View(lambda r: console.system(*_paging(r), _arg(r, "q"))))
    root.putChild(b"queues", _View(paged(console.queues)))
    root.putChild(b"convs", _View(paged(console.conversations)))
    root.putChild(b"jobs", _View(lambda r: console.jobs()))
    root.putChild(b"cache", _View(lambda r: console.cache(*_paging(r), _arg(r, "q"))))
    root.putChild(b"observer", _View(lambda r: console.observer(_paging(r)[1])))
    root.putChild(b"audit", _View(lambda r: console.audit(_paging(r)[1])))
    root.putChild(b"events", _Events(console))
    for action in ACTIONS:
        root.putChild(action.encode(), _Action(console, action))
    return root


def static() -> tuple[Resource, Resource]:
    """The page (``/``) and its files (``/static/``; no folder listing)."""
    from twisted.web.pages import notFound
    from twisted.web.static import File

    class Files(File):
        def directoryListing(self) -> Resource:
            return notFound()  # type: ignore[return-value]

    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
             ".html": "text/html; charset=utf-8", ".png": "image/png"}
    index = File(str(STATIC / "index.html"), defaultType="text/html; charset=utf-8")
    files = Files(str(STATIC), defaultType="application/octet-stream")
    files.indexNames = []
    for one in (index, files):
        one.contentTypes = {**one.contentTypes, **types}
    return index, files
