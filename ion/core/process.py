"""ION processes: lifecycle-managed actors that talk only by messages (DESIGN §5).

A process has a *main* receiver (queue = its pid) for requests and a
*backend* receiver (``<pid>b``) that its own sends and RPCs go out through,
so the reply to an RPC made while handling a request arrives on another queue
and cannot deadlock behind it. Each receiver handles one message at a time
and acknowledges it only when handled. The broker's prefetch window is a
separate setting (``ion.core.process: prefetch``, default 16): up to that many
deliveries wait in the receiver's FIFO, so the next message is at hand when
one ends instead of one broker round trip later; what waits there when the
receiver stops consuming is given back (rejected with requeue) for another
consumer of the queue. The price: a request to a shared service queue may
wait behind a slow op of one instance while another instance is idle; a
service with slow ops (or whose ops call back into their own service through
another one) sets ``prefetch: 1``. Beside ``broker-user``, the receiver sets
``redelivered`` on each message: whether the broker delivered it before, to a
consumer that stopped without acknowledging it.

A request never outlives its caller: an rpc or request goes out with its
timeout as the AMQP ``expiration`` (the broker discards it once it has waited
that long in a queue) and its deadline as the ``expiry`` header. A receiver
drops, unanswered (logged, rate-limited), a message whose ``expiry`` has
passed, or one that waited out its ``expiration`` in the receiver's FIFO
behind the message in hand: its caller has given up.

Requests are dispatched to ``op_<name>``; what an op returns is the reply's
content unless it replied itself. An op declared ``(self, content, headers,
msg)`` gets those (``headers`` and ``msg`` are the request); any other op gets
what it names: ``content``, ``msg``, and otherwise the content's fields by
name, with the op's defaults (``def op_add(self, by: int = 1)``); a missing
field without a default, or one the op does not take, is a 400. An exception that
escapes an op becomes an error reply (500, or the code of an
:class:`~ion.core.exceptions.ApplicationError`) and the process stays ACTIVE.

Routing rules that keep a process from waiting for itself:

- answers to the process's own conversations are taken only from the
  backend queue; the main and service queues carry requests, so a request
  the process sends to itself is never mistaken for its own answer;
- an op handling a message from the service queue that calls its own
  service name is served by this instance's pid queue (the service queue is
  busy with that very op); an op handling a message from the pid queue that
  calls its own pid fails at once (508) instead of waiting for the timeout.

Terminate is graceful, in phases: first the pre-drain hook
:meth:`Process.slc_drain`, while every queue still consumes (a service
refuses new work, waits a bounded time for its own work in flight and
cancels the rest, see :meth:`ion.core.service.ServiceProcess.slc_drain`);
then request queues stop, in-flight ops get up to
``ion.core.process: terminate_timeout`` seconds while the backend keeps
delivering the replies they may wait for; requests still unanswered then
get a 503; children terminate in reverse start order
(:func:`~ion.core.lifecycle.stop_in_reverse`), then ``slc_terminate``, and
the process's own open conversations fail with
:class:`~ion.core.exceptions.ConversationError`. ``slc_drain`` and
``slc_terminate`` run only if ``slc_init`` completed: a process terminated
before it was initialized has nothing of theirs to settle.
"""

from __future__ import annotations

import contextvars
import importlib
import inspect
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any, ClassVar

import msgpack
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.core import trace
from ion.core.conversation import (
    REPLY_PERFORMATIVES,
    Conversation,
    ConversationTable,
    ResponderConversation,
    RpcResult,
)
from ion.core.exceptions import (
    NOT_SENT,
    ApplicationError,
    ConfigurationError,
    IllegalStateError,
    MessageError,
    MessageRefusedError,
    MessageTooLargeError,
)
from ion.core.lifecycle import LifecycleObject, State, stop_in_reverse
from ion.core.log import LogLimiter
from ion.core.messaging import message as wire
from ion.core.messaging.message import ANONYMOUS, Performative, Protocol
from ion.core.messaging.transport import Delivery, Properties
from ion.core.security import Narrow, UnauthorizedError, audit_action, authorize, control, control_action
from ion.core.settings import ProcessSettings
from ion.core.trace import current_message, current_span

if TYPE_CHECKING:
    from ion.core.container import Container

__all__ = ["Process", "Receiver", "ProcessDesc", "ProcessClient", "current_message", "load_process_class",
           "shorten"]

#: (:data:`ion.core.trace.current_message`: the request being handled by the op running now, which
#: follows ``async def`` and ``inlineCallbacks`` ops across their awaits; ``user-id`` delegation and
#: the trace context of what the op sends.)

#: The receiver whose message the running op is handling (self-deadlock avoidance).
_current_receiver: contextvars.ContextVar[Receiver | None] = contextvars.ContextVar(
    "ion_current_receiver", default=None)

#: Characters of an error text kept in a log line or a cut error reply.
LOG_TEXT_LIMIT = 2000
#: A request the broker refused (``basic.nack``: its quorum service queue has no leader while one is
#: elected) is sent again after this many seconds, doubled each time up to REFUSED_RESEND_MAX, for
#: REFUSED_RESEND_FOR seconds at most (never past the call's timeout); then the call fails (503).
REFUSED_RESEND_FIRST = 0.1
REFUSED_RESEND_MAX = 1.0
REFUSED_RESEND_FOR = 60.0


def shorten(text: str, limit: int = LOG_TEXT_LIMIT) -> str:
    """``text``, cut to ``limit`` characters with a note of how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters cut)"


#: conv-seq of the request, and of the ops' replies, in an rpc or request.
_REQUEST_PROTOCOLS = frozenset({Protocol.RPC, Protocol.REQUEST})

_expirations: dict[float, str] = {}

#: Types of an op's result that are plainly its answer (no Deferred, coroutine or Failure).
#: The ops of answers (results, errors, agrees): counted by name on receipt like an op of the process.
_ANSWER_OPS = frozenset({"result", "agree", "end"})

_PLAIN_RESULTS = frozenset({dict, list, tuple, str, bytes, int, float, bool, type(None)})

#: States of a responder conversation whose request still waits for its answer.
_UNANSWERED = ("RECEIVED", "AGREED")


def _expiration(timeout: float) -> str:
    """The AMQP ``expiration`` of a request whose caller waits ``timeout`` seconds: whole
    milliseconds, rounded down (the broker drops it no later than the caller gives up)."""
    text = _expirations.get(timeout)
    if text is None:
        text = str(max(0, int(timeout * 1000)))
        if len(_expirations) < 256:  # a few distinct timeouts in practice
            _expirations[timeout] = text
    return text


def _waited_out(delivery: Delivery, now: float) -> bool:
    """True if ``delivery`` waited in its receiver's FIFO for as long as its ``expiration``:
    whoever sent it has given up by now, whatever the hosts' clocks say."""
    ttl = delivery.properties.expiration
    received = delivery.received_at
    if ttl is None or received is None or not ttl.isdigit():
        return False
    return now - received >= int(ttl) / 1000.0

Handler = Callable[[dict[str, Any], "Receiver"], "defer.Deferred[Any] | None"]

_ACTIVE = State.ACTIVE

#: Deliveries the broker may hand a receiver before it acknowledges the first
#: (``ion.core.process: prefetch``); they wait in the receiver's FIFO.
DEFAULT_PREFETCH = ProcessSettings.prefetch


class Receiver(LifecycleObject):
    """One queue consumed on behalf of a process.

    Messages are handled ``max_concurrent`` at a time (DESIGN §5: one), in
    the order the broker delivered them. On a shared queue each is
    acknowledged once handled: the broker may deliver up to ``prefetch``
    messages before the first is acknowledged; those not started yet wait in
    a FIFO here, and are given back to the queue (rejected with requeue) when
    the receiver stops consuming, so another consumer of the queue takes them.

    A queue of the process's own (not ``shared``) has no other consumer to
    give a message to, and is deleted with the process: it is consumed with
    ``auto_ack``, which saves an ack frame per message each way. Its FIFO is
    kept while the receiver is deactivated, and dropped (logged) on terminate,
    as the queue's content is.

    :param name: the queue name, also the routing key it is bound with.
    :param shared: the queue outlives this receiver (a service queue
        consumed by every instance); otherwise it is deleted on terminate.
    :param prefetch: the broker's window of unacknowledged deliveries
        (default: the process's ``prefetch`` setting, see
        :meth:`Process.receiver_prefetch`); never less than ``max_concurrent``.
    :param max_concurrent: messages handled at once (default 1).
    :param exchange: the exchange the queue is bound to (default: the system exchange).
    :param bindings: routing keys or patterns to bind (default: ``[name]``).
    """

    _log = Logger()

    def __init__(self, process: Process, name: str, handler: Handler, *, shared: bool = False,
                 prefetch: int | None = None, max_concurrent: int = 1,
                 queue_arguments: dict[str, Any] | None = None,
                 exchange: str | None = None, bindings: list[str] | None = None) -> None:
        super().__init__()
        if max_concurrent < 1:
            raise ConfigurationError(f"receiver {name}: max_concurrent must be at least 1, not {max_concurrent}")
        self.process = process
        self.name = name
        self.exchange = exchange
        self.bindings = list(bindings) if bindings is not None else [name]
        self.handler = handler
        self.shared = shared
        #: Answers to the requests of this queue ask for a publisher confirm, and a request is
        #: acknowledged only once its answer is confirmed: set for a quorum service queue (a
        #: cluster), where an instance whose node dies between its answer and the broker taking it
        #: must leave the request unacknowledged, so that another instance runs it again (redelivered)
        #: rather than the caller waiting for its timeout.
        self.confirm_replies = False
        #: The delivery whose message the handler is being called with now (read by the process's dispatch).
        self.delivery_now: Delivery | None = None
        self.prefetch = prefetch if prefetch is not None else process.receiver_prefetch()
        self.max_concurrent = max_concurrent
        self.queue_arguments = queue_arguments
        self.consumer_tag: str | None = None
        self._consuming = False
        #: Deliveries received but not started yet, oldest first.
        self.buffered: deque[Delivery] = deque()
        #: Deliveries being handled now (at most ``max_concurrent``).
        self._in_hand: list[Delivery] = []
        self._pumping = False
        self._listening = False
        self.inflight = 0
        self._drained: list[defer.Deferred[None]] = []
        self.handled = 0

    def __repr__(self) -> str:
        return f"<Receiver {self.name} {self.state.value}>"

    @property
    def transport(self) -> Any:
        return self.process.container.transport

    @defer.inlineCallbacks
    def on_initialize(self) -> Any:
        exchange = self.exchange or self.process.container.exchange_name
        if self.shared:
            self.confirm_replies = self.process.container.service_queue_type == "quorum"
            durable, arguments = self.process.container.shared_queue_options(self.queue_arguments)
            yield self.transport.declare_queue(self.name, durable=durable, arguments=arguments)
        else:
            yield self.transport.declare_queue(self.name, arguments=self.queue_arguments)
        for key in self.bindings:
            yield self.transport.bind(self.name, exchange, key)

    @property
    def window(self) -> int:
        """The prefetch asked of the broker: ``prefetch``, but at least ``max_concurrent``."""
        return max(int(self.prefetch), self.max_concurrent)

    @defer.inlineCallbacks
    def on_activate(self) -> Any:
        if not self._listening:
            self.transport.add_connection_listener(self._connection_changed)
            self._listening = True
        self._consuming = True
        self.consumer_tag = yield self.transport.consume(self.name, self._on_delivery, prefetch=self.window,
                                                         auto_ack=not self.shared)
        self._pump()  # what an own queue delivered while deactivated

    def on_deactivate(self) -> Any:
        return self._stop_consuming()

    @defer.inlineCallbacks
    def on_terminate(self, timeout: float | None = None) -> Any:
        yield self._stop_consuming()
        if self.buffered:
            self._log.info("{queue}: {n} message(s) not handled before the process ended", queue=self.name,
                           n=len(self.buffered))
            self.buffered.clear()
        yield self.drain(timeout)
        self._stop_listening()
        # Ops that outlived the drain: their process answered them (503) already, so they are
        # settled here rather than redelivered to another consumer and run a second time.
        for delivery in list(self._in_hand):
            self._log.info("{queue}: acknowledged a message whose handling outlived the stop",
                           queue=self.name)
            self._settle(delivery)
        if not self.shared:
            try:
                yield self.transport.delete_queue(self.name)
            except Exception as exc:
                self._log.warn("could not delete queue {queue}: {exc}", queue=self.name, exc=exc)

    def on_error(self, cause: Failure) -> Any:
        self._stop_listening()
        return self._stop_consuming()

    def _stop_listening(self) -> None:
        if self._listening:
            self._listening = False
            self.transport.remove_connection_listener(self._connection_changed)

    def _connection_changed(self, event: str, reason: str | None) -> None:
        # Deliveries of a lost connection can no longer be acknowledged, and the broker gives
        # them to a consumer again: handling them here as well would handle them twice.
        if event == "lost" and self.buffered and not self.buffered[0].settled:
            # (The deliveries of an own queue are settled already: they stay, for nobody
            # else will deliver them.)
            self._log.info("{queue}: connection lost; {n} waiting message(s) left to the broker to "
                           "deliver again", queue=self.name, n=len(self.buffered))
            self.buffered.clear()

    def _stop_consuming(self) -> defer.Deferred[None]:
        # From now on deliveries still in flight (AMQP sends some after basic.cancel)
        # go back to the queue instead of being handled during shutdown.
        self._consuming = False
        tag, self.consumer_tag = self.consumer_tag, None
        if tag is None:
            self._give_back()
            return defer.succeed(None)
        d = self.transport.cancel(tag)
        # After the cancel (the broker takes them in that order): what waits in the FIFO
        # goes to the other consumers of the queue, not back to this one.
        self._give_back()
        d.addErrback(lambda f: self._log.warn("cancel of {queue} failed: {e}", queue=self.name,
                                              e=f.getErrorMessage()))
        return d

    def drain(self, timeout: float | None = None) -> defer.Deferred[None]:
        """Fire when no message is being handled, or after ``timeout`` seconds
        (``None``: no limit; ``0`` or less: do not wait at all)."""
        if not self.inflight or (timeout is not None and timeout <= 0):
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        if timeout is not None:
            d.addTimeout(timeout, self.process.clock, onTimeoutCancel=lambda r, t: None)
        return d

    # -- delivery ------------------------------------------------------------------
    def _on_delivery(self, delivery: Delivery) -> None:
        if self.state is not _ACTIVE or not self._consuming:
            # Arrived after we stopped consuming: let another consumer have it (an own
            # queue's delivery has nowhere else to go: it waits in the FIFO).
            if delivery.settled:
                self.buffered.append(delivery)
            else:
                delivery.reject(requeue=True)
            return
        if self.inflight < self.max_concurrent:
            if not self.buffered and not self._pumping:
                # The common case: nothing waits, start it now (what _pump would do, less its loop).
                self._pumping = True
                try:
                    self._start(delivery)
                finally:
                    self._pumping = False
                if self.buffered:
                    self._pump()
                return
        elif delivery.properties.expiration is not None:
            # It waits behind the message in hand: note since when (its TTL runs on here).
            delivery.received_at = self.process.clock.seconds()
        self.buffered.append(delivery)
        self._pump()

    def _give_back(self) -> None:
        """Reject (requeue) every delivery not started yet: another consumer will take it.
        (An own queue's deliveries are settled and stay in the FIFO.)"""
        while self.buffered and not self.buffered[0].settled:
            delivery = self.buffered.popleft()
            try:
                delivery.reject(requeue=True)
            except Exception as exc:
                # The connection went away: the broker requeues it anyway.
                self._log.info("{queue}: could not give back a delivery: {exc}", queue=self.name, exc=exc)

    def _pump(self) -> None:
        """Start buffered messages, oldest first, while fewer than ``max_concurrent`` are in hand.

        A loop, not recursion: handlers that end at once let the next one start in the same loop.
        """
        if self._pumping or not self._consuming:
            return
        self._pumping = True
        try:
            while self.buffered and self.inflight < self.max_concurrent:
                self._start(self.buffered.popleft())
        finally:
            self._pumping = False

    def _start(self, delivery: Delivery) -> None:
        proc = self.process
        try:
            msg = wire.decode(delivery.body, proc.container.max_message_size)
        except MessageError as exc:
            self._bad_message(delivery, exc)
            return
        # Set here from the delivery, never taken from the body: who really published it, and
        # whether the broker delivered it before (to a consumer that stopped before acking it).
        msg["broker-user"] = delivery.properties.user_id
        msg["redelivered"] = delivery.redelivered
        expiry = msg.get("expiry")
        if expiry and (time.time() > expiry or (
                delivery.received_at is not None and _waited_out(delivery, proc.clock.seconds()))):
            proc.log_limiter.warn(
                self._log, ("expired-message", self.name),
                "{pid}: dropped expired message op={op!r} from {sender} (expiry {expiry})",
                pid=proc.id, op=msg["op"], sender=msg["sender"], expiry=msg["expiry"])
            self._settle(delivery)
            return
        self.inflight += 1
        self._in_hand.append(delivery)
        self.delivery_now = delivery
        try:
            result = self.handler(msg, self)
        except Exception:
            self._log.failure("{pid}: handler raised on {op!r}", pid=proc.id, op=msg.get("op"))
            result = None
        finally:
            self.delivery_now = None
        if result is None:
            # The common case, handled at once (a reply taken, a synchronous op answered).
            self._handled(None, delivery)
        # (An isinstance check of Deferred, an ABC, costs more than the rest of this: not for None.)
        elif isinstance(result, defer.Deferred) and not result.called:
            result.addBoth(self._handled, delivery)
        else:
            if isinstance(result, defer.Deferred):
                result.addErrback(lambda f: None)
            self._handled(None, delivery)

    def _handled(self, result: Any, delivery: Delivery) -> None:
        """A message is handled (its handler's Deferred fired): settle it, start the next one."""
        self.inflight -= 1
        self.handled += 1
        in_hand = self._in_hand
        if in_hand and in_hand[-1] is delivery:
            in_hand.pop()
        elif delivery in in_hand:
            in_hand.remove(delivery)
        if not delivery.settled:
            self._settle(delivery)
        if self._drained and not self.inflight:
            self._wake_drained()
        if self.buffered and not self._pumping:
            self._pump()

    def _wake_drained(self) -> None:
        """Fire what :meth:`drain` returned: nothing is being handled any more."""
        waiters, self._drained = self._drained, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    def _settle(self, delivery: Delivery) -> None:
        if delivery.settled:
            return
        after = delivery.ack_after
        if after is not None and not after.called:
            # Acknowledged once its answer is confirmed (a quorum service queue, see confirm_replies);
            # the receiver goes on with the next message meanwhile.
            delivery.ack_after = None
            after.addBoth(lambda _: self._settle(delivery))
            return
        try:
            delivery.ack()
        except Exception as exc:
            # The connection went away: the broker requeues it for another consumer.
            self._log.warn("{queue}: could not ack: {exc}", queue=self.name, exc=exc)

    def _bad_message(self, delivery: Delivery, exc: Exception) -> None:
        props = delivery.properties
        sender = None if isinstance(exc, MessageTooLargeError) else _claimed_sender(delivery.body)
        self.process.log_limiter.warn(
            self._log, ("bad-message", self.name),
            "{queue}: dropped bad message from {sender} (reply-to {reply_to}, user {user}, "
            "message-id {mid}): {exc}",
            queue=self.name, sender=sender or props.reply_to or "?", reply_to=props.reply_to,
            user=props.user_id, mid=props.message_id, exc=exc)
        self._settle(delivery)
        if props.reply_to and props.correlation_id:
            code = 413 if isinstance(exc, MessageTooLargeError) else 400
            self.process._reply_by_properties(props, code, exc)


def _claimed_sender(body: bytes) -> str | None:
    """The ``sender`` a malformed body claims, if it is a dict that has one (for the log)."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:
        return None
    sender = obj.get("sender") if isinstance(obj, dict) else None
    return sender if isinstance(sender, str) else None


# -- how an op is called ---------------------------------------------------------------------------
#: The classic op signature: ``op_x(self, content, headers, msg)`` (headers and msg are the same dict).
_CLASSIC = ("content", "headers", "msg")

OpCall = Callable[[Callable[..., Any], dict[str, Any]], Any]


def _classic(method: Callable[..., Any], msg: dict[str, Any]) -> Any:
    return method(msg.get("content"), msg, msg)


def _op_call(cls: type, op: str) -> OpCall:
    """How ``op_<op>`` of ``cls`` is called with a request (worked out once per class and op).

    An op declared ``(self, content, headers, msg)`` gets those, as always. Any other op gets
    what it names (nameko-like): ``content`` the whole content, ``msg`` (or ``headers``) the
    request, and every other parameter the content's field of that name, its default if the
    field is missing (a missing field without one is a 400, so is a field the op does not
    take unless it has ``**fields``). An op with one such field parameter may also be sent
    that value bare (``rpc_send("hello", "hello", "you")`` for ``op_hello(self, text)``).
    """
    cache: dict[str, OpCall] = cls.__dict__.get("_ion_op_calls") or {}
    if "_ion_op_calls" not in cls.__dict__:
        type.__setattr__(cls, "_ion_op_calls", cache)
    call = cache.get(op)
    if call is None:
        call = cache[op] = _make_op_call(op, getattr(cls, "op_" + op))
    return call


#: (control action, how it is called, audited action, the method's name ``op_<op>``: one string
#: object per class and op, so that looking the method up hits the type's attribute cache, which a
#: name made anew per message never does).
OpEntry = tuple["str | None", OpCall, "str | None", str]


def _op_entries(cls: type) -> dict[str, OpEntry]:
    """The table of :func:`_op_entry` of ``cls`` (its own, not a base class's)."""
    entries: dict[str, OpEntry] | None = cls.__dict__.get("_ion_op_entries")
    if entries is None:
        entries = {}
        type.__setattr__(cls, "_ion_op_entries", entries)
    return entries


def _op_entry(cls: type, op: str) -> OpEntry:
    """The control action (:func:`~ion.core.security.control_action`), the :func:`_op_call` and
    the audited action (:func:`~ion.core.security.audit_action`) of ``op_<op>`` of ``cls``: one
    lookup per request, worked out once per class and op."""
    entries = _op_entries(cls)
    entry = entries.get(op)
    if entry is None:
        entry = entries[op] = (control_action(cls, op), _op_call(cls, op), audit_action(cls, op), "op_" + op)
    return entry


def _make_op_call(op: str, func: Callable[..., Any]) -> OpCall:
    params = list(inspect.signature(func).parameters.values())[1:]  # less self
    if tuple(p.name for p in params[:3]) == _CLASSIC and all(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params[:3]):
        return _classic
    fields = [p for p in params if p.name not in ("content", "msg", "headers")
              and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    wants = {p.name for p in params} & {"content", "msg", "headers"}
    open_fields = any(p.kind is p.VAR_KEYWORD for p in params)
    names = {p.name for p in fields}

    def call(method: Callable[..., Any], msg: dict[str, Any]) -> Any:
        content = msg.get("content")
        kwargs: dict[str, Any] = {}
        if fields or open_fields:
            if isinstance(content, Mapping):
                given = dict(content)
            elif content is None:
                given = {}
            elif len(fields) == 1:
                given = {fields[0].name: content}
            else:
                raise ApplicationError(f"{op} takes a dict of fields ({', '.join(sorted(names))}), "
                                       f"not {type(content).__name__}", 400)
            extra = [k for k in given if k not in names]
            if extra and not open_fields:
                raise ApplicationError(f"{op} takes no field {extra[0]!r} (its fields: "
                                       f"{', '.join(sorted(names)) or 'none'})", 400)
            for p in fields:
                if p.name in given:
                    kwargs[p.name] = given.pop(p.name)
                elif p.default is p.empty:
                    raise ApplicationError(f"{op} needs the field {p.name!r}", 400)
            if open_fields:
                kwargs.update({k: v for k, v in given.items() if isinstance(k, str)})
        for name in wants:
            kwargs[name] = content if name == "content" else msg
        return method(**kwargs)

    return call


@dataclass
class ProcessDesc:
    """What to spawn: a process class (or ``module`` + ``procclass``), a name and spawnargs."""

    name: str | None = None
    module: str | None = None
    procclass: str | None = None
    spawnargs: dict[str, Any] = field(default_factory=dict)
    cls: type[Process] | None = None

    def process_class(self) -> type[Process]:
        """Import and return the class this description names."""
        if self.cls is not None:
            return self.cls
        if not self.module:
            raise ConfigurationError(f"process description {self.name!r} names no module")
        return load_process_class(self.module, self.procclass)


def load_process_class(module: str, procclass: str | None = None) -> type[Process]:
    """Import ``module`` and return ``procclass`` from it (or its one Process subclass).

    :raises ConfigurationError: if the module or class cannot be found.
    """
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import process module {module!r}: {exc}") from exc
    if procclass:
        cls = getattr(mod, procclass, None)
        if not (isinstance(cls, type) and issubclass(cls, Process)):
            raise ConfigurationError(f"module {module!r} has no Process class {procclass!r}")
        return cls
    factory = getattr(mod, "factory", None)
    if isinstance(factory, type) and issubclass(factory, Process):
        return factory
    found = [v for v in vars(mod).values()
             if isinstance(v, type) and issubclass(v, Process) and v.__module__ == mod.__name__]
    if len(found) != 1:
        raise ConfigurationError(
            f"module {module!r} defines {len(found)} Process classes; name one (procclass) or set 'factory'")
    return found[0]


class Process(LifecycleObject):
    """Base class of every ION process.

    Subclasses add ``op_<name>`` methods and may override the ``slc_*`` hooks
    (``slc_init``, ``slc_activate``, ``slc_deactivate``, ``slc_drain``,
    ``slc_terminate``), each of which may return a Deferred; they do not
    override the ``on_*`` transitions.

    :param container: the container that hosts the process.
    :param spawnargs: free-form arguments from the spawner or app file.
    :param name: the process label (``sender-name``); defaults to the class's ``name``.
    """

    #: Default label of processes of this class.
    name: ClassVar[str | None] = None
    _log = Logger()

    def __init__(self, container: Container, spawnargs: Mapping[str, Any] | None = None, *,
                 name: str | None = None, pid: str | None = None) -> None:
        super().__init__()
        self.container = container
        self.spawnargs: dict[str, Any] = dict(spawnargs or {})
        self.id: str = pid or container.new_pid()
        self.proc_name: str = (name or self.spawnargs.get("proc-name") or type(self).name
                               or getattr(type(self), "service_name", "") or type(self).__name__)
        self.clock = container.clock
        #: What peers make us log per message (garbage, unknown ops): one line per kind per 10 s.
        self.log_limiter = LogLimiter(self.clock)
        self.conversations = ConversationTable(self, self.clock)
        #: The container's metrics, and this process's labelled children of its messaging families
        #: (by op or target and op), so that counting a message is a dict lookup and an add.
        self._metrics = getattr(container, "metrics", None)
        self._m_received: dict[str, Any] = {}
        self._m_sent: dict[str, Any] = {}
        self._m_served: dict[str, Any] = {}
        #: bare service name -> routing key (:meth:`resolve`): one string per name, made once, whose hash the broker's
        #: routing and the call metrics then find cached instead of a new string per call.
        self._resolved: dict[str, str] = {}
        #: op -> how it is called (:func:`_op_entry`): the class's table, read without a call per request.
        self._op_entries = _op_entries(type(self))
        self.receivers: list[Receiver] = []
        self.children: list[Process] = []
        self.parent: Process | None = None
        self.user_id: str = str(self.spawnargs.get("user-id", ANONYMOUS))
        self.backend_name = self.id + "b"
        #: Whether slc_init completed: only then do slc_drain and slc_terminate run.
        self._slc_initialized = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.proc_name} {self.id} {self.state.value}>"

    # -- configuration -------------------------------------------------------------
    @property
    def sysname(self) -> str:
        return self.container.sysname

    @property
    def config(self) -> dict[str, Any]:
        """The effective config of this process's module (see :meth:`Config.for_module`)."""
        return self.container.config.for_module(type(self).__module__)

    def repeat(self, interval: float, work: Callable[[], Any], what: str) -> task.LoopingCall:
        """Run ``work`` every ``interval`` seconds on the process's clock, the first time one interval
        from now; a failure that stops it is logged (``<pid>: <what> stopped``). Stop it with ``stop()``."""
        loop = task.LoopingCall(work)
        loop.clock = self.clock
        loop.start(interval, now=False).addErrback(
            lambda f: self._log.failure("{pid}: {what} stopped", f, pid=self.id, what=what))
        return loop

    def get_config(self, key: str, default: Any = None) -> Any:
        """A config value: spawnargs first, then the module's config section."""
        if key in self.spawnargs:
            return self.spawnargs[key]
        return self.config.get(key, default)

    def bounded_config(self, key: str, narrow: Narrow, default: Any = None) -> Any:
        """A security bound (allowed roots, limits): the container's own setting of ``key``
        (else ``default``), narrowed, never widened, by started apps' ``config`` and the
        spawnargs (see :mod:`ion.core.security`). ``None`` from an app or the spawnargs
        means "not set".

        :raises ConfigurationError: naming the setting and where it came from if an app or
            the spawnargs would widen it.
        """
        module = type(self).__module__
        config = self.container.config
        value = config.container_get(module, key, None)
        if value is None:
            value = default
        overlays = [(f"the config of app {app!r}", v) for app, v in config.app_values(module, key)]
        if key in self.spawnargs:
            overlays.append((f"the spawnargs of {self.proc_name}", self.spawnargs[key]))
        for source, requested in overlays:
            if requested is not None:
                value = narrow(value, requested, f"{module}: {key} from {source}")
        if value is not None:
            # The container's own value passes the same checks (a string where a list of
            # roots is meant would otherwise be read letter by letter).
            value = narrow(value, value, f"{module}: {key}")
        return value

    def receiver_prefetch(self) -> int:
        """The broker prefetch window of this process's receivers.

        ``prefetch`` from the spawnargs, else from the process module's config
        section, else ``ion.core.process: prefetch``, else 16. Messages are
        still handled one at a time; ``1`` makes a busy instance of a shared
        service queue take nothing more (strictly fair dispatch, one broker
        round trip per message).

        :raises ConfigurationError: if the value is not an integer >= 1.
        """
        value = self.get_config("prefetch", self.container.config.settings(ProcessSettings).prefetch)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{self.proc_name}: prefetch must be an integer >= 1, not {value!r}")
        return value

    @property
    def rpc_timeout(self) -> float:
        return self.container.config.settings(ProcessSettings).rpc_timeout

    def resolve(self, name: str) -> str:
        """The routing key for a name: a bare service name is scoped to the system."""
        if "." in name:  # (a pid or a scoped name: itself)
            return name
        target = self._resolved.get(name)
        if target is None:
            target = f"{self.sysname}.{name}"
            if len(self._resolved) < 1000:  # (a caller may name anything: bounded)
                self._resolved[name] = target
        return target

    # -- lifecycle -------------------------------------------------------------------
    def receivers_to_create(self) -> list[Receiver]:
        """The receivers this process consumes; subclasses add theirs."""
        return [
            Receiver(self, self.id, self._receive),
            Receiver(self, self.backend_name, self._receive),
        ]

    @defer.inlineCallbacks
    def on_initialize(self) -> Any:
        self.receivers = self.receivers_to_create()
        for receiver in self.receivers:
            yield receiver.initialize()
        yield defer.maybeDeferred(self.slc_init)
        self._slc_initialized = True

    @defer.inlineCallbacks
    def on_activate(self) -> Any:
        yield defer.maybeDeferred(self.slc_activate)
        for receiver in self.receivers:
            yield receiver.activate()

    @defer.inlineCallbacks
    def on_deactivate(self) -> Any:
        for receiver in self.receivers:
            if receiver.state is State.ACTIVE:
                yield receiver.deactivate()
        yield defer.maybeDeferred(self.slc_deactivate)

    @defer.inlineCallbacks
    def on_terminate(self) -> Any:
        # 0. The subclass settles its own work while every queue still consumes (slc_drain).
        if self._slc_initialized:
            yield defer.maybeDeferred(self.slc_drain)
        timeout = self.container.config.settings(ProcessSettings).terminate_timeout
        deadline = self.clock.seconds() + timeout
        # 1. No new requests; 2. let the ones in progress finish (bounded). The
        # backend keeps consuming meanwhile: those ops may be waiting for replies.
        requests = [r for r in self.receivers if r.name != self.backend_name]
        backend = [r for r in self.receivers if r.name == self.backend_name]
        for receiver in requests:
            if receiver.state is State.ACTIVE:
                yield receiver.deactivate()
        yield defer.DeferredList([r.drain(timeout) for r in requests])
        for receiver in backend:
            if receiver.state is State.ACTIVE:
                yield receiver.deactivate()
        yield defer.DeferredList([r.drain(max(0.0, deadline - self.clock.seconds())) for r in backend])
        # Requests still unanswered (their op outlived terminate_timeout) are told so.
        self._answer_unanswered(f"process {self.id} ({self.proc_name}) terminated before answering")
        # 3. Children in reverse start order, then our own hook.
        yield stop_in_reverse(self.children, self._terminate_child, lambda child, exc: self._log.warn(
            "{pid}: child {child} did not terminate cleanly: {exc}", pid=self.id, child=child.id, exc=exc))
        if self._slc_initialized:
            yield defer.maybeDeferred(self.slc_terminate)
        # 4. Whatever is still waiting for a reply ends now.
        self.conversations.fail_all(f"process {self.id} ({self.proc_name}) terminated")
        self._answer_unanswered(f"process {self.id} ({self.proc_name}) terminated before answering")
        for receiver in self.receivers:
            if not receiver.is_final:
                # Already drained (or given up on) above: do not wait again.
                yield receiver.terminate(0)
        self.log_limiter.flush()  # what was counted and not yet said

    def _terminate_child(self, child: Process) -> defer.Deferred[None] | None:
        return None if child.is_final else self.container.proc_manager.terminate_process(child.id)

    def _answer_unanswered(self, reason: str) -> None:
        """Fail every request this process has not answered yet (503), so no caller waits for a timeout."""
        for conv in list(self.conversations.responding.values()):
            if conv.state in ("RECEIVED", "AGREED"):
                try:
                    self._unless_sent(self.reply_err(conv.request, {"error": "ProcessTerminated",
                                                                   "message": reason}, response_code=503),
                                      conv.request)
                except Exception as exc:
                    self._log.warn("{pid}: could not answer {conv_id}: {exc}", pid=self.id,
                                   conv_id=conv.conv_id, exc=exc)
        for msg in [conv.request for conv in self.conversations.responding.values()]:
            self._responded(msg, 503, "ProcessTerminated")

    def on_error(self, cause: Failure) -> Any:
        reason = f"process {self.id} ({self.proc_name}) failed: {cause.getErrorMessage()}"
        self.conversations.fail_all(reason)
        self._answer_unanswered(reason)
        ds = [r.terminate(0) for r in self.receivers if not r.is_final]
        return defer.DeferredList(ds, consumeErrors=True)

    def slc_init(self) -> Any:
        """User hook: set up state; receivers exist but take no messages yet."""

    def slc_activate(self) -> Any:
        """User hook: called just before the process starts taking messages."""

    def slc_deactivate(self) -> Any:
        """User hook: the process stopped taking messages."""

    def slc_drain(self) -> Any:
        """User hook, the first phase of terminate: settle the process's own work in flight (refuse
        new work, wait for it a bounded time, cancel the rest) while every queue still consumes, so
        refusals and status requests are still answered; the process's own drain of its ops follows."""

    def slc_terminate(self) -> Any:
        """User hook: release what the process holds (after its ops drained and its children ended)."""

    # -- receiving ---------------------------------------------------------------------
    def receive(self, msg: dict[str, Any], receiver: Receiver) -> defer.Deferred[Any] | None:
        """Handle a message as this process's own queues do: a reply to one of its conversations,
        else an op dispatched to ``op_<op>``. The handler for a :class:`Receiver` a subclass adds
        in :meth:`receivers_to_create`."""
        return self._receive(msg, receiver)

    def _receive(self, msg: dict[str, Any], receiver: Receiver) -> defer.Deferred[Any] | None:
        op = msg["op"]
        child = self._m_received.get(op)
        if child is None:
            child = self._received_child(op)
        if child is not None:
            child.value += 1  # (Tally.inc: a counter's add, without a call per message)
        # Answers to our conversations arrive on the backend queue; requests
        # (including ones this process sent to itself) on the others.
        if receiver.name == self.backend_name:
            if self.conversations.handle(msg):
                return None
        elif msg["performative"] in REPLY_PERFORMATIVES and self.conversations.stray_reply(msg):
            return None
        return self._dispatch(msg, receiver)

    def _received_child(self, op: str) -> Any:
        """The ``ion_messages_received`` child of ``op``: an op of ours, a reply's, else ``other``
        (kept only for the bounded set of known ops: a caller may send any op name)."""
        if self._metrics is None:
            return None
        known = op in _ANSWER_OPS or (op.isidentifier() and hasattr(type(self), "op_" + op))
        child = self._metrics.received.labels(self.proc_name, op if known else "other")
        if known:
            self._m_received[op] = child
        return child

    def _observe_served(self, metrics: Any, op: str, started: float) -> None:
        """``ion_rpc_server_seconds`` of ``op``, whose request arrived at ``started`` (``perf_counter``)."""
        child = self._m_served.get(op)
        if child is None:
            child = self._m_served[op] = metrics.rpc_server.labels(self.proc_name, op)
        child.observe(perf_counter() - started)

    def _dispatch(self, msg: dict[str, Any], receiver: Receiver | None = None) -> defer.Deferred[Any] | None:
        op = msg["op"]
        protocol = msg["protocol"]
        trace.ensure(msg)  # (a missing or malformed traceparent: a new trace)
        span = None
        if protocol in _REQUEST_PROTOCOLS:
            responder = self.conversations.responding[msg["conv-id"]] = ResponderConversation(msg)
            if receiver is not None and receiver.confirm_replies:
                responder.delivery = receiver.delivery_now
            if trace.state.tracer is not None:
                span = responder.span = trace.start_server_span(getattr(self.container, "messaging_system", "ion"), msg)
        entry = self._op_entries.get(op)  # (an op dispatched before: its name, looked up in the type's cache)
        if entry is not None:
            method = getattr(self, entry[3], None)
        else:
            method = getattr(self, "op_" + op, None) if op.isidentifier() else None
        if method is None:
            if protocol == Protocol.GENERIC and msg["performative"] in REPLY_PERFORMATIVES:
                # The peer ended a generic conversation and we have no op_<op> to be told.
                self._log.debug("{pid}: {sender} ended generic conversation {conv_id} ({op!r})",
                                pid=self.id, sender=msg["sender"], conv_id=msg["conv-id"], op=op)
                return None
            self.log_limiter.warn(self._log, ("unknown-op", self.id), "{pid}: unknown op {op!r} from {sender}",
                                  pid=self.id, op=op, sender=msg["sender"])
            if protocol != Protocol.NONE and msg["performative"] not in REPLY_PERFORMATIVES:
                try:
                    self._unless_sent(self.reply_err(msg, {"error": "UnknownOperation",
                                                           "message": f"{self.proc_name} has no operation {op!r}"},
                                                     response_code=404), msg)
                except Exception:
                    self._log.failure("{pid}: could not answer the unknown op {op!r}", pid=self.id, op=op)
            self._responded(msg, 404)
            return None
        token = current_message.set(msg)
        receiver_token = _current_receiver.set(receiver)
        span_token = current_span.set(span) if span is not None else None
        audit_as: str | None = None
        try:
            try:
                if entry is None:
                    entry = _op_entry(type(self), op)
                action, call, audit_as, _name = entry
                if action is not None:
                    authorize(self.container, msg, action, f"{self.proc_name} ({self.id})",
                              limiter=self.log_limiter)
                result = call(method, msg)
            except Exception:
                result = Failure()
            if audit_as is not None:  # recorded once its outcome is known (refusals too)
                if inspect.iscoroutine(result):
                    result = defer.Deferred.fromCoroutine(result)
                result = self.container.audit.watch(result, msg, audit_as, f"{self.proc_name} ({self.id})")
            if type(result) in _PLAIN_RESULTS:
                # The common case, a synchronous op: answer now, without a Deferred (and
                # without isinstance checks of ABCs); as _op_answer, inline.
                try:
                    self._op_done(result, msg)
                except Exception:
                    self._log.failure("{pid}: answering {op!r} failed", pid=self.id, op=op)
                return None
            if not isinstance(result, (defer.Deferred, Failure)):
                if inspect.iscoroutine(result):
                    result = defer.Deferred.fromCoroutine(result)
                else:
                    self._op_answer(result, msg)
                    return None
        finally:
            if span_token is not None:
                current_span.reset(span_token)
            _current_receiver.reset(receiver_token)
            current_message.reset(token)
        d = result if isinstance(result, defer.Deferred) else defer.fail(result)
        d.addCallbacks(self._op_done, self._op_failed, callbackArgs=(msg,), errbackArgs=(msg,))
        d.addErrback(lambda f: self._log.failure("{pid}: answering {op!r} failed", f, pid=self.id, op=op))
        # A synchronous op has been answered already: the receiver may ack at once.
        return None if d.called else d

    def _op_answer(self, result: Any, msg: dict[str, Any]) -> None:
        try:
            self._op_done(result, msg)
        except Exception:
            self._log.failure("{pid}: answering {op!r} failed", pid=self.id, op=msg["op"])

    def _answered(self, msg: dict[str, Any]) -> bool:
        conv = self.conversations.responding.get(msg["conv-id"])
        return conv is None or conv.state not in ("RECEIVED", "AGREED")

    def _op_done(self, result: Any, msg: dict[str, Any]) -> None:
        """Answer the request of an op that ended with ``result`` (for a request of a quorum service
        queue, its acknowledgement then waits for the answer's confirm: ``Delivery.ack_after``)."""
        conversations = self.conversations
        responding = conversations.responding
        conv_id = msg["conv-id"]
        conv = responding.get(conv_id)
        if conv is None:
            return  # (answered and forgotten already, or a one-way message: nothing to do)
        metrics = self._metrics
        if metrics is not None:
            self._observe_served(metrics, msg["op"], conv.started)
        d = None
        if conv.state in _UNANSWERED and msg["protocol"] in _REQUEST_PROTOCOLS:
            # (reply_ok, less the Deferred when the broker took the answer at once)
            d = self._reply(msg, "result", result, None, Performative.INFORM_RESULT, "OK", 200)
            if d is not None:
                self._unless_sent(d, msg)
        # (_responded(msg, 200), inline)
        responding.pop(conv_id, None)
        if conv.span is not None:
            trace.end_span(conv.span, 200)
        recent = conversations.recent
        if recent is not None:
            recent.append((conv.conv_id, msg.get("traceparent"), "responder", self.id, msg["sender"], msg["op"],
                           conv.protocol, conv.state, conv.started))
        if conv.delivery is not None and d is not None and not d.called:
            conv.delivery.ack_after = d

    def _op_failed(self, failure: Failure, msg: dict[str, Any]) -> None:
        served = self.conversations.responding.get(msg["conv-id"])
        if served is not None and self._metrics is not None:
            self._observe_served(self._metrics, msg["op"], served.started)
        exc = failure.value
        content: dict[str, Any] | None = None
        if isinstance(exc, defer.CancelledError):
            # Its work was cancelled (by the caller, see ion.core.service, or by a stop): no traceback.
            code = 409
            self._log.info("{pid}: op {op!r} from {sender} was cancelled", pid=self.id, op=msg["op"],
                           sender=msg["sender"])
        elif isinstance(exc, ApplicationError):
            code, content = exc.code, exc.reply_content()  # {error, message} and the error's details
            if not isinstance(exc, UnauthorizedError):  # (logged once already, by authorize())
                self._log.warn("{pid}: op {op!r} from {sender} {verdict} ({code} {error}): {message}", pid=self.id,
                               op=msg["op"], sender=msg["sender"], verdict="refused" if code < 500 else "failed",
                               code=code, error=content["error"], message=shorten(str(content["message"])))
        else:
            code = 500
            if len(str(exc)) > LOG_TEXT_LIMIT:
                # A traceback would carry the whole text (a huge input quoted back): log its start.
                self._log.error("{pid}: op {op!r} from {sender} failed: {error}: {message}", pid=self.id,
                                op=msg["op"], sender=msg["sender"], error=type(exc).__name__,
                                message=shorten(str(exc)))
            else:
                self._log.failure("{pid}: op {op!r} from {sender} failed", failure, pid=self.id,
                                  op=msg["op"], sender=msg["sender"])
        sent = None
        conv = self.conversations.responding.get(msg["conv-id"])
        if msg["protocol"] != Protocol.NONE and not self._answered(msg):
            try:
                if content is None:
                    content = {"error": type(exc).__name__, "message": str(exc) or f"{msg['op']} was cancelled"}
                sent = self.reply_err(msg, content, response_code=code)
                self._unless_sent(sent, msg)
            except Exception:
                self._log.failure("{pid}: could not send the error reply", pid=self.id)
        self._responded(msg, code, type(exc).__name__ if code >= 500 else None)
        if conv is not None and conv.delivery is not None and sent is not None and not sent.called:
            conv.delivery.ack_after = sent  # (as in _op_done)

    def _responded(self, msg: Mapping[str, Any], code: int, error: str | None = None) -> None:
        """The op of a request has ended: forget its responder conversation (remembered among the
        container's recent ones, with its trace id) and end its SERVER span, if one was made."""
        conv = self.conversations.responding.pop(msg["conv-id"], None)
        if conv is None:
            return
        if conv.span is not None:
            trace.end_span(conv.span, code, error)
        recent = self.conversations.recent
        if recent is not None:
            recent.append((conv.conv_id, msg.get("traceparent"), "responder", self.id, msg["sender"], msg["op"],
                           conv.protocol, conv.state, conv.started))

    def _unless_sent(self, d: defer.Deferred[None], msg: Mapping[str, Any]) -> None:
        """Log (rather than leave unhandled) a reply the transport could not send, e.g. when the
        connection to the broker went away under it: its caller hears of the loss anyway."""
        if d.called and d.result is None:
            return  # sent already (the embedded broker): nothing can fail any more
        d.addErrback(lambda f: self._log.warn("{pid}: answer to {op!r} from {sender} not sent: {e}", pid=self.id,
                                              op=msg.get("op"), sender=msg.get("sender"), e=f.getErrorMessage()))

    # -- sending ------------------------------------------------------------------------
    def _delegated_user(self, current: Mapping[str, Any] | None) -> str:
        """Who a message sent now is on behalf of: the user of ``current``, the request the running op
        handles (:data:`current_message`), else this process's own."""
        return self.user_id if current is None else str(current.get("user-id") or ANONYMOUS)

    def _publish(self, msg: dict[str, Any], mandatory: bool = False,
                 confirm: bool | None = None, expiration: str | None = None) -> defer.Deferred[None]:
        """Encode and publish ``msg`` to its receiver (see :meth:`_publish_now`)."""
        d = self._publish_now(msg, mandatory, confirm, expiration)
        return defer.succeed(None) if d is None else d

    def _publish_now(self, msg: dict[str, Any], mandatory: bool = False, confirm: bool | None = None,
                     expiration: str | None = None) -> defer.Deferred[None] | None:
        """Encode and publish ``msg``; None if the broker took it at once (no Deferred made).

        ``confirm``: ask the broker for a publisher confirm (None: the transport's default,
        ``publisher_confirms``); requests and replies of rpc/request conversations say False,
        their reply or timeout being the confirmation. ``expiration``: the AMQP per-message TTL.

        :raises MessageError: if it cannot be encoded or is too large.
        """
        container = self.container
        body = wire.encode(msg, container.max_message_size)
        op = msg["op"]
        child = self._m_sent.get(op)
        if child is None and self._metrics is not None:
            child = self._metrics.sent.labels(self.proc_name, op)
            if len(self._m_sent) < 1000:
                self._m_sent[op] = child
        if child is not None:
            child.value += 1  # (Tally.inc: a counter's add, without a call per message)
        props = Properties("application/msgpack", msg["conv-id"], msg["reply-to"], None, None, {}, expiration)
        return container.transport.publish_now(container.exchange_name, msg["receiver"], body, props,
                                               mandatory=mandatory, confirm=confirm)

    def _route_around_self(self, target: str) -> tuple[str, str | None]:
        """Where to send a request so that it cannot wait behind the op making it.

        A receiver handles one message at a time, so a request to the very
        queue whose message the running op is handling could only be taken
        after that op ends. A call to our own service name goes to our pid
        instead (we are an instance of that service); a call to our own pid
        from an op it is handling can never be answered: returns the reason.
        """
        busy = _current_receiver.get()
        if busy is None or busy.process is not self or busy.name != target:
            return target, None
        if busy.shared:
            return self.id, None
        return target, (f"{self.id} called itself on {target!r} while handling a message from that "
                        f"queue: it would wait for itself until the timeout")

    def _start(self, protocol: str, receiver: str, op: str, content: Any,
               headers: Mapping[str, Any] | None, timeout: float | None, *,
               on_agree: Callable[[Any, dict[str, Any]], Any] | None = None,
               handler: Callable[[Conversation, Any, dict[str, Any]], Any] | None = None,
               trusted: bool = False) -> Conversation:
        # on_agree, handler, trusted: see ConversationTable.start
        container = self.container
        target = self.resolve(receiver)
        deadlock = None
        if _current_receiver.get() is not None:  # called from an op: it may be calling itself
            target, deadlock = self._route_around_self(target)
        conv = self.conversations.start(protocol, target, op, self.rpc_timeout if timeout is None else timeout,
                                        on_agree=on_agree, handler=handler, trusted=trusted)
        if deadlock is not None:
            conv.event("error", reason=deadlock, code=508)
            return conv
        expiry: float = 0
        expiration: str | None = None
        timeout = conv.timeout
        if timeout is not None and timeout > 0 and protocol != Protocol.GENERIC:
            # A request never outlives its caller (DESIGN §4, expiry): the broker discards it once it
            # has waited the call's timeout (AMQP per-message TTL, whole ms, never past the deadline:
            # it is sent now, so its remaining time is the whole timeout), and an instance that gets
            # it later anyway (a broker that ignores TTL, its own prefetch FIFO) drops it by expiry.
            expiry = time.time() + timeout
            expiration = _expirations.get(timeout) or _expiration(timeout)
        traceparent = None
        if trace.state.tracer is not None and protocol in _REQUEST_PROTOCOLS:
            # A CLIENT span, whose context is the request's traceparent (a caller's own traceparent
            # header: its parent).
            given = headers.get("traceparent") if headers else None
            span = conv.span = trace.start_client_span(getattr(self.container, "messaging_system", "ion"), target, op,
                                                       conv.conv_id, given if trace.is_valid(given) else None)
            traceparent = trace.span_traceparent(span)
            if given is not None:
                headers = {k: v for k, v in headers.items() if k != "traceparent"}  # type: ignore[union-attr]
        elif headers and "traceparent" in headers and not trace.is_valid(headers["traceparent"]):
            # A caller's own traceparent goes out only if it is one (else build's: a new trace, with
            # no tracestate of the one that was not).
            headers = {k: v for k, v in headers.items() if k not in ("traceparent", "tracestate")}
        current = current_message.get()  # (whose user it goes for, and the trace it continues)
        msg = wire.make(self.backend_name, self.proc_name, target, None, op, conv.conv_id, 1, protocol,
                        Performative.REQUEST, "OK", 200,
                        self._delegated_user(current), expiry, traceparent, current, headers, content)
        conv.traceparent = msg["traceparent"]
        # No confirm for an rpc/request: the reply, or the timeout, confirms it; an unroutable one
        # comes back (404) and one the broker refuses is reported (ExchangeManager) at once. Except to
        # a quorum service queue: without a leader (an election after a node loss) RabbitMQ drops an
        # unconfirmed message unseen, and the caller would wait out its whole timeout; confirmed, a
        # refused request is sent again until a leader takes it (_refused).
        confirm = None
        if protocol in _REQUEST_PROTOCOLS:
            confirm = container.confirms_service_requests and target.startswith(container.sysname + ".")
        try:
            d = self._publish_now(msg, True, confirm, expiration)
        except MessageError as exc:
            conv.event("error", reason=str(exc), code=413 if isinstance(exc, MessageTooLargeError) else 400)
            return conv
        if d is not None and not (d.called and d.result is None):  # (None: the embedded broker took it)
            if confirm:
                d.addErrback(self._refused, conv, msg, expiration, self.clock.seconds(), REFUSED_RESEND_FIRST)
            else:
                d.addErrback(lambda f: conv.event("error", reason=f"{NOT_SENT}: {f.getErrorMessage()}"))
        return conv

    def _refused(self, f: Failure, conv: Conversation, msg: dict[str, Any], expiration: str | None,
                 first: float, delay: float) -> None:
        """A request to a quorum service queue failed to send: refused by the broker (its queue has no
        leader yet), it is sent again in ``delay`` seconds while its call waits (REFUSED_RESEND_FOR s
        at most since it was ``first`` sent); anything else fails the call (503, not sent)."""
        now = self.clock.seconds()
        deadline = conv.deadline if conv.deadline is not None else math.inf
        if conv.final:
            return None  # (timed out, cancelled or failed meanwhile)
        if not f.check(MessageRefusedError) or now - first + delay > REFUSED_RESEND_FOR or now + delay >= deadline:
            conv.event("error", reason=f"{NOT_SENT}: {f.getErrorMessage()}")
            return None
        if delay == REFUSED_RESEND_FIRST:
            self._log.info("{pid}: {op!r} to {receiver} refused by the broker ({e}); sending it again until "
                           "its queue takes it", pid=self.id, op=conv.op, receiver=conv.receiver,
                           e=f.getErrorMessage())

        def again() -> None:
            if conv.final:
                return
            try:
                d = self._publish_now(msg, True, True, expiration)
            except MessageError as exc:  # (it was sent once: cannot happen; fail it all the same)
                conv.event("error", reason=str(exc), code=400)
                return
            if d is not None:
                d.addErrback(self._refused, conv, msg, expiration, first, min(delay * 2, REFUSED_RESEND_MAX))

        self.clock.callLater(delay, again)
        return None

    def rpc_send(self, receiver: str, op: str, content: Any = None, headers: Mapping[str, Any] | None = None,
                 timeout: float | None = None, *, trusted: bool = False) -> defer.Deferred[RpcResult]:
        """Call ``op`` at ``receiver`` (a pid or a service name); fires with ``(content, headers)``.

        Fails with :class:`~ion.core.exceptions.ReceivedApplicationError` (4xx),
        :class:`~ion.core.exceptions.ReceivedContainerError` (5xx),
        :class:`~ion.core.exceptions.ConversationTimeout` after ``timeout``
        seconds (default: config ``ion.core.process.rpc_timeout``, 15), or
        :class:`~ion.core.exceptions.ConversationError`: 404 when no queue
        is bound to ``receiver``, 413 when the request is over
        ``ion.core.messaging.max_message_size``, 400 when it cannot be
        encoded, 503 when this process terminates first, 508 when an op
        calls its own pid (it would wait for itself).

        ``trusted``: the answer must come from one of the system's operators (its
        ``broker-user``); any other is dropped (logged), as a call to a system
        service must not take the word of another login that consumes its queue.
        """
        return self._start(Protocol.RPC, receiver, op, content, headers, timeout, trusted=trusted).deferred

    def request(self, receiver: str, op: str, content: Any = None, headers: Mapping[str, Any] | None = None,
                timeout: float | None = None,
                on_agree: Callable[[Any, dict[str, Any]], Any] | None = None, *,
                trusted: bool = False) -> defer.Deferred[RpcResult]:
        """Like :meth:`rpc_send` with the ``request`` protocol: the responder may
        first ``agree`` (reported to ``on_agree(content, headers)``) or
        ``refuse`` (the Deferred fails with a 4xx ``ReceivedApplicationError``)."""
        return self._start(Protocol.REQUEST, receiver, op, content, headers, timeout,
                           on_agree=on_agree, trusted=trusted).deferred

    def converse(self, receiver: str, op: str, content: Any = None, *,
                 handler: Callable[[Conversation, Any, dict[str, Any]], Any] | None = None,
                 idle_timeout: float | None = None, headers: Mapping[str, Any] | None = None) -> Conversation:
        """Open a ``generic`` conversation; every message the peer sends in it goes to
        ``handler(conv, content, headers)``; it ends by :meth:`Conversation.end`, by a final
        message from the peer, or after ``idle_timeout`` seconds without a message."""
        return self._start(Protocol.GENERIC, receiver, op, content, headers, idle_timeout, handler=handler)

    def send_in_conversation(self, conv: Conversation, op: str, content: Any, performative: str,
                             headers: Mapping[str, Any] | None) -> defer.Deferred[None]:
        """Send the next message of ``conv`` (a ``generic`` conversation this process started) to its
        peer: what :meth:`Conversation.send <ion.core.conversation.Conversation.send>` and ``end`` use."""
        # Outside an op (a handler of the conversation, a timer), the conversation's own trace goes on.
        trace_from = None if current_message.get() is not None else {"traceparent": conv.traceparent}
        msg = wire.build(
            sender=self.backend_name, sender_name=self.proc_name, receiver=conv.receiver, op=op,
            content=content, conv_id=conv.conv_id, conv_seq=conv.seq, protocol=conv.protocol,
            performative=performative, user_id=self._delegated_user(current_message.get()), extra=headers, trace_from=trace_from)
        return self._publish(msg)

    def send(self, receiver: str, op: str, content: Any = None,
             headers: Mapping[str, Any] | None = None, *, confirm: bool | None = None) -> defer.Deferred[None]:
        """A one-off message (protocol ``none``): no reply, no conversation kept.

        ``confirm=True``: the Deferred fires only once the broker took the message (and fails
        with its reason if it refused it); False: once it is on its way; None (default): as
        ``ion.core.messaging: publisher_confirms`` says.
        """
        msg = wire.build(
            sender=self.backend_name, sender_name=self.proc_name, receiver=self.resolve(receiver), op=op,
            content=content, conv_id=self.conversations.new_id(), protocol=Protocol.NONE,
            performative=Performative.INFORM, user_id=self._delegated_user(current_message.get()), extra=headers)
        try:
            return self._publish(msg, confirm=confirm)
        except MessageError:
            return defer.fail()

    # -- replying -------------------------------------------------------------------------
    def reply(self, msg: Mapping[str, Any], op: str = "result", content: Any = None,
              headers: Mapping[str, Any] | None = None, *, performative: str = Performative.INFORM_RESULT,
              status: str = "OK", response_code: int = 200) -> defer.Deferred[None]:
        """Answer ``msg`` in its conversation (to its ``reply-to``).

        :raises IllegalStateError: if the conversation was already answered.
        """
        d = self._reply(msg, op, content, headers, performative, status, response_code)
        return defer.succeed(None) if d is None else d

    def _reply(self, msg: Mapping[str, Any], op: str, content: Any, headers: Mapping[str, Any] | None,
               performative: str, status: str, response_code: int) -> defer.Deferred[None] | None:
        """:meth:`reply`; None when the broker took the answer at once (no Deferred made)."""
        conv = self.conversations.responding.get(msg["conv-id"])
        if conv is not None:
            before = (conv.state, conv.seq)
            conv.answer(performative)
            seq = conv.next_seq()
        elif msg.get("protocol") in _REQUEST_PROTOCOLS and msg.get("performative") == Performative.REQUEST:
            # Its op has ended (and so it was answered), or the process terminated.
            raise IllegalStateError(
                f"conversation {msg['conv-id']} was already answered; cannot send {performative}")
        else:
            seq = int(msg.get("conv-seq") or 1) + 1
        reply = wire.make(
            self.id, self.proc_name, msg.get("reply-to") or msg["sender"], None, op, msg["conv-id"], seq,
            msg["protocol"], performative, status, response_code,
            self._delegated_user(current_message.get()),
            0, None if conv is None or conv.span is None else trace.span_traceparent(conv.span), msg, headers, content)
        # Requests' answers go without a confirm (the caller's reply or timeout is the confirmation),
        # except from a quorum service queue (see Receiver.confirm_replies).
        confirm = True if conv is not None and conv.delivery is not None else (
            False if msg.get("protocol") in _REQUEST_PROTOCOLS else None)
        try:
            return self._publish_now(reply, False, confirm)
        except MessageError as exc:
            if performative == Performative.FAILURE:
                if isinstance(content, Mapping) and content.get("cut"):
                    raise  # even the short form cannot travel
                # An error that cannot travel whole (e.g. a message quoting a huge input): its
                # class and the start of its message can, and the caller is not left to time out.
                self._log.warn("{pid}: error reply to {op!r} cut: {exc}", pid=self.id, op=msg["op"], exc=exc)
                error = content.get("error") if isinstance(content, Mapping) else None
                text = content.get("message") if isinstance(content, Mapping) else content
                short = {"error": error if isinstance(error, str) else "Error",
                         "message": shorten(text if isinstance(text, str) else repr(text)), "cut": True}
                if conv is not None:
                    conv.state, conv.seq = before
                return self.reply(msg, op, short, performative=performative, status=status,
                                  response_code=response_code)
            # The result itself cannot travel (too large, not encodable): say so instead.
            self._log.warn("{pid}: reply to {op!r} could not be sent: {exc}", pid=self.id, op=msg["op"], exc=exc)
            if conv is not None:
                conv.state, conv.seq = before
            return self.reply_err(msg, {"error": type(exc).__name__, "message": str(exc)}, response_code=500)

    def reply_ok(self, msg: Mapping[str, Any], content: Any = None,
                 headers: Mapping[str, Any] | None = None) -> defer.Deferred[None]:
        """Answer with ``inform_result``, status OK, 200."""
        return self.reply(msg, "result", content, headers)

    def reply_err(self, msg: Mapping[str, Any], content: Any = None, headers: Mapping[str, Any] | None = None,
                  exception: BaseException | None = None, response_code: int = 500) -> defer.Deferred[None]:
        """Answer with ``failure``, status ERROR and ``response_code``.

        ``content`` defaults to ``{"error": <class>, "message": <text>}`` of ``exception``.
        """
        if exception is not None and content is None:
            content = {"error": type(exception).__name__, "message": str(exception)}
        elif isinstance(content, str):
            content = {"error": "Error", "message": content}
        return self.reply(msg, "result", content, headers, performative=Performative.FAILURE,
                          status="ERROR", response_code=response_code)

    def agree(self, msg: Mapping[str, Any], content: Any = None) -> defer.Deferred[None]:
        """First answer of a ``request``: it will be done; the result follows."""
        return self.reply(msg, "agree", content, performative=Performative.AGREE)

    def refuse(self, msg: Mapping[str, Any], reason: str, response_code: int = 403) -> defer.Deferred[None]:
        """First answer of a ``request``: it will not be done."""
        return self.reply(msg, "refuse", {"error": "Refused", "message": reason},
                          performative=Performative.REFUSE, status="ERROR", response_code=response_code)

    def _reply_by_properties(self, props: Properties, code: int, exc: Exception) -> None:
        """Answer a message we could not decode, from its AMQP properties alone."""
        assert props.reply_to and props.correlation_id
        reply = wire.build(
            sender=self.id, sender_name=self.proc_name, receiver=props.reply_to, op="result",
            content={"error": type(exc).__name__, "message": str(exc)}, conv_id=props.correlation_id,
            conv_seq=2, protocol=Protocol.RPC, performative=Performative.FAILURE, status="ERROR",
            response_code=code, user_id=self.user_id)
        self._publish(reply, confirm=False).addErrback(lambda f: None)

    # -- processes -------------------------------------------------------------------------
    @defer.inlineCallbacks
    def spawn_child(self, desc: ProcessDesc | type[Process] | str,
                    spawnargs: Mapping[str, Any] | None = None, name: str | None = None) -> Any:
        """Spawn a process that is terminated with this one; fires with its pid."""
        pid = yield self.container.spawn(desc, spawnargs, name=name, parent=self)
        return pid

    # -- built-in ops -------------------------------------------------------------------------
    def metric_families(self) -> Iterable[Any]:
        """Prometheus metric families of this process's state, read at each scrape on the reactor
        thread (:mod:`ion.core.metrics`); families of one name from several processes are added
        up, so label by what a process *is* (states, kinds), never by its pid. None by default."""
        return ()

    def op_ping(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Answer that the process is alive."""
        return {"pong": content, "pid": self.id, "name": self.proc_name, "state": self.state.value}

    @control("process.terminate")
    def op_terminate(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        """Terminate after answering this request (operators only)."""
        if self.is_final:
            raise IllegalStateError(f"{self.id} is already {self.state.value}")
        self._log.info("{pid}: terminating on request of broker user {user!r} ({sender})", pid=self.id,
                       user=msg.get("broker-user"), sender=msg.get("sender"))
        self._unless_sent(self.reply_ok(msg, {"terminating": self.id}), msg)
        self.clock.callLater(0, self._terminate_self)
        return None

    def _terminate_self(self) -> None:
        d = self.container.proc_manager.terminate_process(self.id)
        d.addErrback(lambda f: self._log.failure("{pid}: terminate on request failed", f, pid=self.id))


class ProcessClient:
    """Base for the client side of a process: calls a target through ``proc``.

    :param proc: the process whose conversations carry the calls.
    :param target: pid or service name to call.
    """

    #: The target is a system service: take its answers from the system's operators only
    #: (see :meth:`Process.rpc_send`).
    trusted: ClassVar[bool] = False

    def __init__(self, proc: Process, target: str) -> None:
        self.proc = proc
        self.target = target

    def rpc_send(self, op: str, content: Any = None, headers: Mapping[str, Any] | None = None,
                 timeout: float | None = None) -> defer.Deferred[RpcResult]:
        return self.proc.rpc_send(self.target, op, content, headers, timeout, trusted=self.trusted)

    def request(self, op: str, content: Any = None, headers: Mapping[str, Any] | None = None,
                timeout: float | None = None, on_agree: Callable[[Any, dict[str, Any]], Any] | None = None,
                ) -> defer.Deferred[RpcResult]:
        return self.proc.request(self.target, op, content, headers, timeout, on_agree, trusted=self.trusted)

    def send(self, op: str, content: Any = None, *, confirm: bool | None = None) -> defer.Deferred[None]:
        """A one-off message to the target (see :meth:`Process.send`, ``confirm`` included)."""
        return self.proc.send(self.target, op, content, confirm=confirm)

    @defer.inlineCallbacks
    def ping(self, timeout: float | None = None) -> Any:
        content, _ = yield self.rpc_send("ping", None, timeout=timeout)
        return content
