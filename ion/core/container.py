"""The capability container: one reactor, many processes, three managers (DESIGN §7).

A :class:`Container` owns its transport (a connection to the embedded broker
or RabbitMQ), a blocking pool, an exchange manager (started on initialize),
its HTTP port, a process manager (the agent first, on activate) and an app
manager; it starts them in that order and terminates them in reverse
(:func:`~ion.core.lifecycle.stop_in_reverse`, as the process manager its
processes, the last spawned first). Several containers
can live in one OS process (tests do this); nothing here is global.
"""

from __future__ import annotations

import functools
import itertools
import os
import secrets
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ion.core import trace
from ion.core.config import Config
from ion.core.exceptions import CONNECTION_LOST, NOT_BOUND, ConfigurationError, IonError
from ion.core.lifecycle import LifecycleObject, State, stop_in_reverse
from ion.core.messaging import message as wire
from ion.core.messaging.memory import MemoryBroker
from ion.core.messaging.transport import Properties, Transport, parse_broker_url
from ion.core.process import Process, ProcessDesc
from ion.core.settings import ContainerSettings, MessagingSettings, TraceSettings
from ion.core.threads import BlockingPool

if TYPE_CHECKING:
    from ion.core.apps.manager import AppManager

__all__ = ["Container", "ProcessManager", "ExchangeManager", "default_container_id"]


def default_container_id() -> str:
    """``<short hostname>-<os pid>-<4 hex>``: unique even with several containers per OS process."""
    host = socket.gethostname().split(".")[0] or "localhost"
    return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"


ExitListener = Callable[[Process, State], None]


class ProcessManager:
    """Spawns, tracks and terminates the container's processes."""

    _log = Logger()

    def __init__(self, container: Container) -> None:
        self.container = container
        self.processes: dict[str, Process] = {}
        self._exit_listeners: list[ExitListener] = []
        self._stopping: set[str] = set()

    def add_exit_listener(self, listener: ExitListener) -> None:
        """``listener(proc, final_state)`` is called when a process ends, however."""
        self._exit_listeners.append(listener)

    def remove_exit_listener(self, listener: ExitListener) -> None:
        if listener in self._exit_listeners:
            self._exit_listeners.remove(listener)

    def get(self, pid: str) -> Process | None:
        return self.processes.get(pid)

    def find(self, name_or_pid: str) -> Process | None:
        """A process by pid, else the first one with that label."""
        proc = self.processes.get(name_or_pid)
        if proc is not None:
            return proc
        for proc in self.processes.values():
            if proc.proc_name == name_or_pid:
                return proc
        return None

    @defer.inlineCallbacks
    def spawn(self, desc: ProcessDesc | type[Process] | str, spawnargs: Mapping[str, Any] | None = None,
              *, name: str | None = None, parent: Process | None = None) -> Any:
        """Create, initialize and activate a process; fires with its pid.

        :raises ConfigurationError: if the description names no loadable class.
        """
        container = self.container
        if isinstance(desc, str):
            desc = container.app_manager.process_desc_for(desc)
        if isinstance(desc, ProcessDesc):
            cls = desc.process_class()
            args = {**desc.spawnargs, **(spawnargs or {})}
            name = name or desc.name
        else:
            cls, args = desc, dict(spawnargs or {})
        proc = cls(container, args, name=name)
        self.processes[proc.id] = proc
        proc.add_state_listener(self._state_changed)
        if parent is not None:
            proc.parent = parent
            parent.children.append(proc)
        try:
            yield proc.initialize()
            yield proc.activate()
        except Exception:
            self.processes.pop(proc.id, None)
            raise
        self._log.info("spawned {name} as {pid}", name=proc.proc_name, pid=proc.id)
        return proc.id

    def _state_changed(self, obj: LifecycleObject, old: State, new: State) -> None:
        assert isinstance(obj, Process)
        proc = obj
        self.container.publish_event(f"process.{new.value.lower()}", {
            "pid": proc.id, "name": proc.proc_name, "state": new.value, "previous": old.value,
            "container": self.container.id})
        if new in (State.TERMINATED, State.ERROR):
            self.processes.pop(proc.id, None)
            if proc.parent is not None and proc in proc.parent.children:
                proc.parent.children.remove(proc)
            # Listeners may ask is_stopping(pid) (terminated on request, even if it ended in ERROR).
            try:
                for listener in list(self._exit_listeners):
                    try:
                        listener(proc, new)
                    except Exception:
                        self._log.failure("exit listener failed for {pid}", pid=proc.id)
            finally:
                self._stopping.discard(proc.id)

    def is_stopping(self, pid: str) -> bool:
        """True while a terminate was asked for (not a crash), until its exit listeners have run."""
        return pid in self._stopping

    def terminate_process(self, pid: str) -> defer.Deferred[None]:
        """Terminate one process gracefully.

        :raises IonError: (in the Deferred) if no such process runs here.
        """
        proc = self.processes.get(pid)
        if proc is None:
            return defer.fail(IonError(f"no process {pid} in container {self.container.id}"))
        if proc.is_final:
            return defer.succeed(None)
        self._stopping.add(pid)
        return proc.terminate()

    def terminate_all(self) -> defer.Deferred[None]:
        """Terminate every process, the last spawned first."""
        def terminate(pid: str) -> defer.Deferred[None] | None:
            proc = self.processes.get(pid)
            return None if proc is None or proc.is_final else self.terminate_process(pid)

        return stop_in_reverse(self.processes, terminate, lambda pid, exc: self._log.warn(
            "process {pid} did not terminate cleanly: {exc}", pid=pid, exc=exc))


class ExchangeManager:
    """Connects the transport and declares the system's exchanges."""

    _log = Logger()

    def __init__(self, container: Container) -> None:
        self.container = container
        #: Whether the transport's connection is up (``/readyz``, ``ion_broker_connected``).
        self.connected = False
        #: Why the connection was lost last (None while connected).
        self.lost_reason: str | None = None
        #: Connections restored after a loss.
        self.reconnects = 0
        #: When (the container's clock) the connection came up last; None while it is down. What
        #: the broker says of other containers (a queue without consumer) means "gone" only once
        #: this connection has been up longer than they could take to reconnect.
        self.connected_since: float | None = None

    @defer.inlineCallbacks
    def start(self) -> Any:
        transport = self.container.transport
        yield transport.connect()
        self.connected = True
        self.connected_since = self.container.clock.seconds()
        yield transport.declare_exchange(self.container.exchange_name, "topic")
        yield transport.declare_exchange(self.container.events_exchange, "topic")
        transport.add_return_callback(self._returned)
        transport.add_refused_callback(self._refused)
        transport.add_connection_listener(self._connection_changed)

    def _connection_changed(self, event: str, reason: str | None) -> None:
        # No reply can come back over a lost connection: fail every call in flight now
        # (ConversationError, 503) rather than letting each wait for its timeout.
        if event == "lost":
            self.connected, self.lost_reason, self.connected_since = False, reason or "lost", None
            self._log.warn("container {id}: connection to the broker lost ({reason}); calls in flight "
                           "fail, reconnecting", id=self.container.id, reason=reason)
            for proc in list(self.container.proc_manager.processes.values()):
                proc.conversations.fail_all(f"{CONNECTION_LOST}: {reason}")
        elif event == "restored":
            self.connected, self.lost_reason = True, None
            self.connected_since = self.container.clock.seconds()
            self.reconnects += 1
            self._log.info("container {id}: connection to the broker restored", id=self.container.id)

    def _returned(self, exchange: str, routing_key: str, properties: Properties) -> None:
        # A mandatory request nobody is bound to: fail its conversation at once (404).
        conv_id = properties.correlation_id or ""
        proc = self.container.proc_manager.get(conv_id.split("#", 1)[0])
        if proc is not None:
            proc.conversations.fail_matching(
                conv_id, f"{NOT_BOUND} {routing_key!r} in system {self.container.sysname}", code=404)

    def _refused(self, exchange: str, routing_key: str, properties: Properties, error: Exception) -> None:
        # A message sent without a confirm on a channel the broker then closed with an error (a
        # refused user_id, ACCESS_REFUSED ...): the call it belongs to fails now, with the broker's
        # reason and code, instead of waiting for its timeout. (The transport logged the closing.)
        conv_id = properties.correlation_id or ""
        proc = self.container.proc_manager.get(conv_id.split("#", 1)[0])
        if proc is not None:
            code = getattr(error, "reply_code", None)
            proc.conversations.fail_matching(
                conv_id, f"the broker refused the message to {routing_key!r}: {error}",
                code=code if isinstance(code, int) and 400 <= code < 600 else 503)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        transport = self.container.transport
        transport.remove_return_callback(self._returned)
        transport.remove_refused_callback(self._refused)
        transport.remove_connection_listener(self._connection_changed)
        self.connected = False
        yield transport.close()


class Container(LifecycleObject):
    """One capability container.

    :param config: the configuration (default: read from ``res/config``).
    :param broker_url: ``memory://`` or ``amqp://user:pass@host:port/vhost``, or a list of AMQP
        URLs (the nodes of one cluster, tried in turn); default: ``brokers`` of the
        ``ion.core.messaging`` config section, else ``memory://``.
    :param broker: an embedded broker to join (several containers may share one).
    :param transport: a ready transport to use instead of ``broker_url``.
    :param sysname: the system name (default: the container id).
    :param contid: the container id (default: host, OS pid and a random suffix).
    :param reactor: the reactor for I/O and scheduling.
    :param clock: the clock for timeouts (default: ``reactor``); a ``task.Clock`` in tests.
    :param args: container args from the command line (``apparg_<app>`` ...).
    """

    _log = Logger()

    def __init__(self, *, config: Config | None = None, broker_url: str | Sequence[str] | None = None,
                 broker: MemoryBroker | None = None, transport: Transport | None = None,
                 sysname: str | None = None, contid: str | None = None, reactor: Any = None,
                 clock: IReactorTime | None = None, args: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor
        self.config = config if config is not None else Config.load()
        self.args: dict[str, Any] = dict(args or {})
        self.id: str = contid or str(self.args.get("contid") or "") or default_container_id()
        self.sysname: str = sysname or str(self.args.get("sysname") or "") or self.id
        self.exchange_name = f"ion.{self.sysname}"
        self.events_exchange = f"ion.{self.sysname}.events"
        self.max_message_size = self.config.settings(MessagingSettings).max_message_size
        self.broker = broker
        if broker_url is None:
            broker_url = self.config.settings(MessagingSettings).brokers or "memory://"
        #: The broker address(es) given; ``broker_url`` is the first.
        self.broker_urls: list[str] = [broker_url] if isinstance(broker_url, str) else list(broker_url)
        if not self.broker_urls:
            raise ConfigurationError("no broker URL given")
        self.broker_url = self.broker_urls[0]
        self.transport: Transport = transport or self._make_transport(self.broker_urls, broker)
        self._pids: Iterator[int] = itertools.count(1)
        self.proc_manager = ProcessManager(self)
        self.exchange_manager = ExchangeManager(self)
        from ion.core.apps.manager import AppManager

        self.app_manager: AppManager = AppManager(self)
        self.started_at: float | None = None
        #: The pid of this container's agent (:mod:`ion.core.agent`), once active.
        self.agent_pid: str | None = None
        #: Where blocking calls (hashing, extraction, boto3) run; stopped with the container.
        self.blocking = BlockingPool(self.reactor, maxthreads=self.config.settings(ContainerSettings).max_threads)
        #: True from the moment terminate is asked (``/readyz`` answers 503 at once).
        self.stopping = False
        #: The conversations that ended here lately, with their trace ids (the shell's ``trace()``).
        self.recent_conversations = trace.RecentConversations()
        #: ``messaging.system`` of the spans of this container's messages (:mod:`ion.core.trace`).
        self.messaging_system = "rabbitmq" if self.broker_url.startswith("amqp") else "ion"
        from ion.core.metrics import ContainerMetrics

        #: The container's Prometheus registry and metrics (:mod:`ion.core.metrics`).
        self.metrics = ContainerMetrics(self)
        from ion.core.audit import AuditLog

        #: The audit trail of actions that change the system (:mod:`ion.core.audit`).
        self.audit = AuditLog(self)
        from ion.core.http import HttpPort

        #: The container's HTTP port (health, metrics, the web console), when ``ion.core.http: port`` is set.
        self.http = HttpPort(self)

    def __repr__(self) -> str:
        return f"<Container {self.id} sys={self.sysname} {self.state.value}>"

    def _make_transport(self, urls: list[str], broker: MemoryBroker | None) -> Transport:
        every = [parse_broker_url(url) for url in urls]
        parsed = every[0]
        if any(u.scheme == "memory" for u in every) and len(every) > 1:
            raise ConfigurationError("memory:// is one broker of its own: it cannot be one of several addresses")
        if parsed.scheme == "memory":
            if broker is None:
                broker = self.broker = MemoryBroker(self.reactor)
            return broker.connect(user=self.config.settings(MessagingSettings).memory_user)
        try:
            from ion.core.messaging.amqp import AmqpTransport
        except ImportError:
            raise ConfigurationError(
                f"the AMQP transport is not available in this build; use memory:// (got {parsed})"
            ) from None
        return AmqpTransport.from_config(every, self.config.settings(MessagingSettings), reactor=self.reactor)

    @property
    def service_queue_type(self) -> str:
        """``classic`` or ``quorum``: the type of the shared queues this container declares (config
        ``ion.core.messaging: service_queue_type``; unset: quorum with more than one broker address).
        Always classic on the embedded broker."""
        if not self.broker_url.startswith("amqp"):
            return "classic"
        chosen = self.config.settings(MessagingSettings).service_queue_type
        if chosen is None:
            return "quorum" if len(self.broker_urls) > 1 else "classic"
        return chosen

    @functools.cached_property
    def confirms_service_requests(self) -> bool:
        """Whether a request to a service queue is published with a publisher confirm: for quorum
        service queues, whose leader may be in an election (its node died). RabbitMQ then refuses the
        message (``basic.nack``), or drops it unseen if no confirm was asked for; a refused request is
        sent again (``Process._refused``), never lost."""
        return self.service_queue_type == "quorum"

    def shared_queue_options(self, arguments: Mapping[str, Any] | None = None) -> tuple[bool, dict[str, Any] | None]:
        """``(durable, arguments)`` to declare a shared queue (a service queue, the reaper election's)
        with, given its own ``arguments`` (``x-single-active-consumer`` ...).

        A quorum queue is durable, never exclusive nor auto-delete (RabbitMQ refuses those), and
        has a delivery limit (``quorum_delivery_limit``): the broker drops a message delivered that
        many times unacknowledged, so a request that kills its consumer cannot go round for ever.
        """
        if self.service_queue_type != "quorum":
            return False, dict(arguments) if arguments else None
        limit = self.config.settings(MessagingSettings).quorum_delivery_limit
        return True, {"x-queue-type": "quorum", "x-delivery-limit": limit, **(arguments or {})}

    def new_pid(self) -> str:
        """The next process id, ``<container-id>.<n>``."""
        return f"{self.id}.{next(self._pids)}"

    # -- lifecycle -----------------------------------------------------------------------
    @defer.inlineCallbacks
    def on_initialize(self) -> Any:
        # Spans or not (an SDK provider, or ion.core.trace: otlp_endpoint), decided once here.
        trace.configure(self.config.settings(TraceSettings), self.sysname, self._log)
        yield self.exchange_manager.start()

    @defer.inlineCallbacks
    def on_activate(self) -> Any:
        self.started_at = self.clock.seconds()
        yield self.http.start()
        if self.config.settings(ContainerSettings).agent:
            # The agent is the first process, so terminate_all stops it last.
            from ion.core.agent import ContainerAgent

            self.agent_pid = yield self.proc_manager.spawn(ContainerAgent)
        # The web console's process, after the agent (it reads the agent's nodes table).
        yield self.http.start_console()
        # str() of the parsed URL leaves the password out.
        url = getattr(self.transport, "url", None)  # the AMQP address in use, of several
        self._log.info("container {id} of system {sysname} is up on {broker}",
                       id=self.id, sysname=self.sysname, broker=str(url or parse_broker_url(self.broker_url)))

    @defer.inlineCallbacks
    def on_terminate(self) -> Any:
        # What the container owns, in start order (the pool from the start, the exchange manager
        # on initialize, the processes from activate on, the apps last), stopped in reverse. A
        # failure fails terminate (the container ends in ERROR); the managers log their own.
        # The HTTP port stays up while the processes stop, so /readyz says why (503).
        parts: list[Callable[[], Any]] = [self.blocking.stop, self.audit.stop, self.exchange_manager.stop, self.http.stop,
                                          self.proc_manager.terminate_all, self.app_manager.stop_all]
        yield stop_in_reverse(parts, lambda stop: stop())
        self._log.info("container {id} stopped", id=self.id)

    def terminate(self, *args: Any, **kwargs: Any) -> defer.Deferred[None]:
        self.stopping = True
        return super().terminate(*args, **kwargs)

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Initialize and activate: the container is ready to spawn processes."""
        yield self.initialize()
        yield self.activate()

    # -- conveniences ------------------------------------------------------------------
    def spawn(self, desc: ProcessDesc | type[Process] | str, spawnargs: Mapping[str, Any] | None = None,
              *, name: str | None = None, parent: Process | None = None) -> defer.Deferred[str]:
        """Spawn a process here; fires with its pid."""
        return self.proc_manager.spawn(desc, spawnargs, name=name, parent=parent)

    def publish_event(self, routing_key: str, content: Any, *, confirm: bool | None = None) -> None:
        """Publish a one-off event on the system's events exchange (best effort); ``confirm``:
        ask the broker for a publisher confirm (None: ``publisher_confirms`` says)."""
        if self.transport is None or self.state in (State.TERMINATED, State.ERROR):
            return
        msg = wire.build(sender=self.id, sender_name="container", receiver=routing_key, op="event",
                         content=content, conv_id=f"{self.id}#event", protocol=wire.Protocol.NONE,
                         performative=wire.Performative.INFORM)
        try:
            body = wire.encode(msg, self.max_message_size)
            d = self.transport.publish(self.events_exchange, routing_key, body,
                                       Properties(correlation_id=msg["conv-id"]), confirm=confirm)
        except Exception as exc:
            self._log.debug("event {key} not published: {exc}", key=routing_key, exc=exc)
            return
        d.addErrback(lambda f: self._log.debug("event {key} not published: {e}", key=routing_key,
                                               e=f.getErrorMessage()))
