"""Conversations: the protocols by which processes talk (DESIGN §6).

Each conversation is a small state machine keyed by ``conv-id`` in its
process's :class:`ConversationTable`. Incoming messages and the timeout are
*events* of the machine; every conversation reaches a final state, fires or
fails its Deferred once, and is then collected. A message that arrives for a
collected conversation is logged and dropped.

============  ==============================  ================================
protocol      initiator's machine              final states
============  ==============================  ================================
``rpc``       REQUESTED → DONE | FAILED        DONE, FAILED, TIMEOUT, ERROR
``request``   REQUESTED → AGREED → DONE ...    DONE, FAILED, REFUSED, TIMEOUT, ERROR
``generic``   OPEN → OPEN ... → ENDED          ENDED, FAILED, TIMEOUT, ERROR
============  ==============================  ================================

Timeouts: a conversation's deadline is kept in its table, and one timer per
table (process), armed for the earliest deadline, ends those that pass; a
conversation that ends before its deadline costs a dict entry, not a reactor
timer (with many calls in flight a ``callLater`` each filled the reactor's
timer heap with cancelled calls). The timer is not cancelled when the last
call ends: it fires once for nothing, at most a timeout later, and is not
armed again (cancelling and arming one per call cost ~2.5 µs of CPU per
sequential call); a process that ends cancels it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ion.core.exceptions import (
    ConversationError,
    ConversationTimeout,
    IllegalStateError,
    received_error_for,
)
from ion.core.log import LogLimiter
from ion.core.messaging.message import Performative, Protocol
from ion.core.security import is_operator

__all__ = ["Conversation", "ConversationTable", "ResponderConversation", "RpcResult", "REPLY_PERFORMATIVES"]

_log = Logger()

#: What an rpc or request conversation's Deferred fires with: (content, headers).
RpcResult = tuple[Any, dict[str, Any]]

# Initiator transition tables: (state, event) -> next state. Events are the
# performative of an incoming message, or "timeout", "error", "end".
_RPC = {
    ("REQUESTED", Performative.INFORM_RESULT): "DONE",
    ("REQUESTED", Performative.FAILURE): "FAILED",
    ("REQUESTED", "timeout"): "TIMEOUT",
    ("REQUESTED", "error"): "ERROR",
}
_REQUEST = {
    ("REQUESTED", Performative.AGREE): "AGREED",
    ("REQUESTED", Performative.REFUSE): "REFUSED",
    ("REQUESTED", Performative.INFORM_RESULT): "DONE",
    ("REQUESTED", Performative.FAILURE): "FAILED",
    ("REQUESTED", "timeout"): "TIMEOUT",
    ("REQUESTED", "error"): "ERROR",
    ("AGREED", Performative.INFORM_RESULT): "DONE",
    ("AGREED", Performative.FAILURE): "FAILED",
    ("AGREED", "timeout"): "TIMEOUT",
    ("AGREED", "error"): "ERROR",
}
_GENERIC = {
    ("OPEN", Performative.REQUEST): "OPEN",
    ("OPEN", Performative.INFORM): "OPEN",
    ("OPEN", Performative.AGREE): "OPEN",
    ("OPEN", Performative.INFORM_RESULT): "ENDED",
    ("OPEN", Performative.FAILURE): "FAILED",
    ("OPEN", Performative.REFUSE): "FAILED",
    ("OPEN", "end"): "ENDED",
    ("OPEN", "timeout"): "TIMEOUT",
    ("OPEN", "error"): "ERROR",
}
TABLES: dict[str, dict[tuple[str, str], str]] = {
    Protocol.RPC: _RPC,
    Protocol.REQUEST: _REQUEST,
    Protocol.GENERIC: _GENERIC,
}
#: Performatives that answer a request rather than start or continue one.
REPLY_PERFORMATIVES = frozenset({Performative.INFORM_RESULT, Performative.FAILURE,
                                 Performative.AGREE, Performative.REFUSE})
INITIAL = {Protocol.RPC: "REQUESTED", Protocol.REQUEST: "REQUESTED", Protocol.GENERIC: "OPEN"}
FINAL = frozenset({"DONE", "FAILED", "REFUSED", "TIMEOUT", "ERROR", "ENDED"})
#: Final states of a call that got its answer (the others ended without one).
_ANSWERED = frozenset({"DONE", "FAILED", "REFUSED"})

GenericHandler = Callable[["Conversation", Any, dict[str, Any]], Any]

#: Emptied per-timeout dicts a table keeps for the next call (a few distinct timeouts in practice; a
#: caller with a new timeout per call makes and drops one per call, as before, past these).
_KEEP_EMPTY = 8


class Conversation:
    """The initiator's side of one conversation.

    :ivar deferred: fires with ``(content, headers)`` of the final reply, or
        fails with a :class:`~ion.core.exceptions.ReceivedError` subclass.
    """

    __slots__ = (
        "table", "conv_id", "protocol", "receiver", "op", "state", "deferred", "timeout",
        "deadline", "on_agree", "handler", "seq", "_transitions", "trusted", "started", "traceparent", "span",
    )

    def __init__(self, table: ConversationTable, conv_id: str, protocol: str, receiver: str,
                 op: str, timeout: float | None, on_agree: Callable[[Any, dict[str, Any]], Any] | None,
                 handler: GenericHandler | None) -> None:
        self.table = table
        self.conv_id = conv_id
        self.protocol = protocol
        self.receiver = receiver
        self.op = op
        self.state = INITIAL[protocol]
        self._transitions = TABLES[protocol]
        self.deferred: defer.Deferred[RpcResult] = defer.Deferred(self._cancelled)
        self.timeout = timeout
        #: When (the table's clock) it times out, while it waits with a timeout.
        self.deadline: float | None = None
        self.on_agree = on_agree
        self.handler = handler
        #: Only answers published by one of the system's operators (broker-user) are taken
        #: (a call to a system service: another login could consume its queue and answer).
        self.trusted = False
        self.seq = 1
        #: When it started (``perf_counter``: the call's latency, ``ion_rpc_client_seconds``).
        self.started = perf_counter()
        #: The ``traceparent`` of its first message (set by the process that sends it).
        self.traceparent: str | None = None
        #: Its OpenTelemetry CLIENT span, while an SDK records spans (:mod:`ion.core.trace`).
        self.span: Any = None
        if timeout is not None and timeout > 0:  # (_arm, inline)
            table._add_deadline(self, timeout)

    def __repr__(self) -> str:
        return f"<Conversation {self.conv_id} {self.protocol} {self.op!r} -> {self.receiver} {self.state}>"

    @property
    def final(self) -> bool:
        return self.state in FINAL

    # -- timer -----------------------------------------------------------------
    def _arm(self) -> None:
        timeout = self.timeout
        if timeout is not None and timeout > 0:
            self.table._add_deadline(self, timeout)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.table._drop_deadline(self)

    # -- the machine -------------------------------------------------------------
    def event(self, name: str, msg: dict[str, Any] | None = None, reason: str = "",
              code: int = 503) -> None:
        """Feed an event (a reply's performative, ``timeout``, ``error``, ``end``)."""
        state = self.state
        if state in FINAL:
            _log.debug("{conv}: {event} after the end, dropped", conv=self, event=name)
            return
        new = self._transitions.get((state, name))
        table = self.table
        if new is None:
            table.log_limiter.warn(
                _log, ("unexpected-event", table.process.id),
                "{conv}: unexpected {event!r} from {sender}, dropped",
                conv=self, event=name, sender=(msg or {}).get("sender"),
            )
            return
        self.state = new
        if new not in FINAL:
            self._progress(name, msg)
            return
        # The end: no deadline any more, out of the table, and the call's Deferred fires or fails.
        conv_id = self.conv_id
        if self.deadline is not None:
            table._drop_deadline(self)
        table.initiated.pop(conv_id, None)
        d = self.deferred
        if d.called:
            return
        if table._metrics is not None:
            table.observe(self)
        recent = table.recent
        if recent is not None:
            recent.append((conv_id, self.traceparent, "initiator", table.process.id, self.receiver,
                           self.op, self.protocol, new, self.started))
        if self.span is not None:
            from ion.core.trace import end_span

            end_span(self.span, int((msg or {}).get("response-code") or 0) or None,
                     None if new in ("DONE", "ENDED", "FAILED", "REFUSED") else reason or new)
        if new == "DONE" or new == "ENDED":
            if msg is None:
                d.callback((None, {}))
                return
            if self.protocol == Protocol.GENERIC:
                self._call_handler(msg)
            d.callback((msg.get("content"), msg))
        elif new in ("FAILED", "REFUSED"):
            assert msg is not None
            if self.protocol == Protocol.GENERIC:
                self._call_handler(msg)
            headers = dict(msg)
            if new == "REFUSED" and not 400 <= int(headers.get("response-code") or 0) < 500:
                headers["response-code"] = 403
            d.errback(received_error_for(headers, msg.get("content")))
        elif new == "TIMEOUT":
            d.errback(ConversationTimeout(self.receiver, self.op, self.timeout or 0, conv_id))
        else:
            d.errback(ConversationError(self.receiver, conv_id, reason or "conversation failed", code))

    def _progress(self, name: str, msg: dict[str, Any] | None) -> None:
        assert msg is not None
        if self.protocol == Protocol.GENERIC:
            # An idle timeout: each message restarts it; later messages go to
            # the very process that answered, not back to a shared service queue.
            self.receiver = msg.get("sender") or self.receiver
            self._seen(msg)
            self._disarm()
            self._arm()
            self._call_handler(msg)
        elif name == Performative.AGREE and self.on_agree is not None:
            try:
                self.on_agree(msg.get("content"), msg)
            except Exception:
                _log.failure("{conv}: on_agree callback failed", conv=self)

    def _seen(self, msg: dict[str, Any]) -> None:
        # conv-seq counts the messages of the whole conversation, both ways.
        seq = msg.get("conv-seq")
        if isinstance(seq, int) and seq > self.seq:
            self.seq = seq

    def _call_handler(self, msg: dict[str, Any]) -> None:
        if self.handler is not None:
            try:
                defer.maybeDeferred(self.handler, self, msg.get("content"), msg).addErrback(
                    lambda f: _log.failure("{conv}: handler failed", f, conv=self))
            except Exception:  # pragma: no cover
                _log.failure("{conv}: handler failed", conv=self)

    def _cancelled(self, d: defer.Deferred[Any]) -> None:
        # The caller gave up (d.cancel()): end the machine, keep the CancelledError.
        if not self.final:
            self.state = "ERROR"
            self._disarm()
            self.table._collect(self)

    # -- generic conversations -------------------------------------------------------
    def send(self, op: str, content: Any, headers: dict[str, Any] | None = None) -> defer.Deferred[None]:
        """Send the next message of a ``generic`` conversation."""
        if self.protocol != Protocol.GENERIC:
            raise IllegalStateError(f"{self}: only generic conversations send more messages")
        if self.final:
            raise IllegalStateError(f"{self}: conversation already ended")
        self._disarm()
        self._arm()
        self.seq += 1
        return self.table.process.send_in_conversation(
            self, op, content, Performative.INFORM, headers)

    def end(self, content: Any = None) -> defer.Deferred[None]:
        """End a ``generic`` conversation, telling the peer with a final message."""
        if self.final:
            return defer.succeed(None)
        self.seq += 1
        d = self.table.process.send_in_conversation(
            self, "end", content, Performative.INFORM_RESULT, None)
        self.event("end", reason="ended")
        return d


class ResponderConversation:
    """The responder's side: which answers it has given (agree, then a result)."""

    __slots__ = ("conv_id", "protocol", "state", "request", "seq", "started", "span", "delivery")

    def __init__(self, request: dict[str, Any]) -> None:
        #: When it arrived (``perf_counter``: the op's latency, ``ion_rpc_server_seconds``).
        self.started = perf_counter()
        self.conv_id: str = request["conv-id"]
        self.protocol: str = request["protocol"]
        self.state = "RECEIVED"
        self.request = request
        seq = request.get("conv-seq")
        self.seq: int = seq if isinstance(seq, int) else 1
        #: Its OpenTelemetry SERVER span, while an SDK records spans (:mod:`ion.core.trace`).
        self.span: Any = None
        #: The delivery of a request from a quorum service queue (``Receiver.confirm_replies``): its
        #: answers ask for a publisher confirm, and the delivery is acknowledged only once the result's
        #: is in (``Delivery.ack_after``). None: answers go without a confirm.
        self.delivery: Any = None

    def next_seq(self) -> int:
        """The conv-seq of our next answer (an agree is 2, the result after it 3)."""
        self.seq += 1
        return self.seq

    def answer(self, performative: str) -> None:
        """Record an answer; raise if the protocol does not allow it now."""
        if self.state in FINAL:
            raise IllegalStateError(
                f"conversation {self.conv_id} was already answered ({self.state}); cannot send {performative}")
        if performative == Performative.AGREE:
            if self.protocol != Protocol.REQUEST or self.state != "RECEIVED":
                raise IllegalStateError(f"conversation {self.conv_id}: agree is only the first answer of a request")
            self.state = "AGREED"
        elif performative == Performative.REFUSE:
            if self.state != "RECEIVED":
                raise IllegalStateError(f"conversation {self.conv_id}: refuse must be the first answer")
            self.state = "REFUSED"
        elif performative in (Performative.INFORM_RESULT, Performative.FAILURE):
            self.state = "DONE" if performative == Performative.INFORM_RESULT else "FAILED"


class ConversationTable:
    """All conversations of one process, keyed by ``conv-id``."""

    def __init__(self, process: Any, clock: IReactorTime) -> None:
        self.process = process
        self.clock = clock
        #: The process's limiter of per-message log lines (late replies, unexpected events), or one of our own.
        self.log_limiter: LogLimiter = getattr(process, "log_limiter", None) or LogLimiter(clock)
        self.initiated: dict[str, Conversation] = {}
        self.responding: dict[str, ResponderConversation] = {}
        self._ids: Iterator[int] = itertools.count(1)
        self._id_prefix = f"{process.id}#"
        self.late_messages = 0
        #: timeout -> {conv-id: conversation} of those waiting with that timeout, oldest first: in
        #: deadline order, as the clock only moves on (an idle timeout re-arms at the end). A timeout's
        #: dict is kept when it empties, for the next call with it (up to _KEEP_EMPTY of them), and
        #: dropped by the timer if still empty when it fires (after ``fail_all`` cancels the timer, the
        #: few empty ones stay until the next call's timer fires).
        self._waiting: dict[float, dict[str, Conversation]] = {}
        #: The one timer of the table, armed for ``_timer_at`` (no earlier deadline waits); left armed
        #: when the last call ends (it then fires once for nothing, at most a timeout later), cancelled
        #: by :meth:`fail_all` (the process ends).
        self._timer: IDelayedCall | None = None
        self._timer_at = 0.0
        #: The container's metrics (:mod:`ion.core.metrics`), and the labelled children of its
        #: call families by (target, op); receivers by their bounded target label (not pids).
        self._metrics = getattr(getattr(process, "container", None), "metrics", None)
        self._m_calls: dict[tuple[str, str], Any] = {}
        self._targets: dict[str, str] = {}
        #: The container's ring of ended conversations (:class:`ion.core.trace.RecentConversations`).
        self.recent: Any = getattr(getattr(process, "container", None), "recent_conversations", None)

    def __len__(self) -> int:
        return len(self.initiated) + len(self.responding)

    def new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def start(self, protocol: str, receiver: str, op: str, timeout: float | None, *,
              on_agree: Callable[[Any, dict[str, Any]], Any] | None = None,
              handler: GenericHandler | None = None, conv_id: str | None = None,
              trusted: bool = False) -> Conversation:
        """Open an initiator conversation (its first message is the caller's to send);
        ``trusted``: take answers from the system's operators only."""
        conv = Conversation(self, conv_id or self.new_id(), protocol, receiver, op, timeout, on_agree, handler)
        conv.trusted = trusted
        self.initiated[conv.conv_id] = conv
        return conv

    def _collect(self, conv: Conversation) -> None:
        self.initiated.pop(conv.conv_id, None)

    def observe(self, conv: Conversation) -> None:
        """Count a call that ended: its latency when an answer came (``ion_rpc_client_seconds``),
        else why it ended without one (``ion_rpc_client_failures_total``: timeout or error)."""
        metrics = self._metrics
        if metrics is None or conv.protocol == Protocol.GENERIC:
            return
        target = self._targets.get(conv.receiver)
        if target is None:
            from ion.core.metrics import target_label

            target = target_label(conv.receiver, self.process.sysname)
            if target != "pid" and len(self._targets) < 1000:  # (pids come and go: not kept)
                self._targets[conv.receiver] = target
        state = conv.state
        answered = state in _ANSWERED
        key = (target, conv.op if answered else f"{conv.op}\0{state}")
        child = self._m_calls.get(key)
        if child is None:
            if answered:
                child = metrics.rpc_client.labels(target, conv.op)
            else:
                child = metrics.rpc_failures.labels(target, conv.op, "timeout" if state == "TIMEOUT" else "error")
            if len(self._m_calls) < 1000:
                self._m_calls[key] = child
        if answered:
            child.observe(perf_counter() - conv.started)
        else:
            child.inc()

    # -- deadlines: one timer for the table -------------------------------------------------------------
    def _add_deadline(self, conv: Conversation, timeout: float) -> None:
        deadline = conv.deadline = self.clock.seconds() + timeout
        waiting = self._waiting.get(timeout)
        if waiting is None:
            waiting = self._waiting[timeout] = {}
        waiting[conv.conv_id] = conv
        timer = self._timer
        if timer is None:
            self._timer_at = deadline
            self._timer = self.clock.callLater(timeout, self._deadlines_due)
        elif deadline < self._timer_at:
            self._timer_at = deadline
            timer.reset(timeout)

    def _drop_deadline(self, conv: Conversation) -> None:
        conv.deadline = None
        timeout = conv.timeout
        if timeout is None:
            return
        waiting = self._waiting.get(timeout)
        if waiting is not None:
            waiting.pop(conv.conv_id, None)
            if not waiting and len(self._waiting) > _KEEP_EMPTY:
                del self._waiting[timeout]
            # Nothing waiting leaves the timer armed: it fires once, finds nothing due and is not
            # armed again. Cancelling it here and arming a new one for the next call cost ~2.5 µs
            # of CPU per call made one after the other (bench/rpc.py, sequential); making and
            # dropping the timeout's dict per call, ~1,400 instructions (callgrind).

    def _deadlines_due(self) -> None:
        """The timer: time out every conversation whose deadline has come, re-arm for the next."""
        self._timer = None
        now = self.clock.seconds()
        due: list[Conversation] = []
        for waiting in self._waiting.values():
            for conv in waiting.values():
                if conv.deadline is None or conv.deadline > now:  # (None: never, kept for mypy)
                    break
                due.append(conv)
        for conv in due:
            conv.event("timeout")
        for timeout in [t for t, w in self._waiting.items() if not w]:
            del self._waiting[timeout]  # (emptied and not used again since: see _drop_deadline)
        if self._waiting:
            # (A conversation started by a timed-out one's callbacks may have armed the timer already.)
            first = min(next(iter(w.values())).deadline or now for w in self._waiting.values())
            if self._timer is None:
                self._timer_at = first
                self._timer = self.clock.callLater(max(0.0, first - now), self._deadlines_due)
            elif first < self._timer_at:
                self._timer_at = first
                self._timer.reset(max(0.0, first - now))

    def handle(self, msg: dict[str, Any]) -> bool:
        """Route a message that arrived on the process's *backend* (reply) queue.

        Replies to this process's conversations come there, and only there
        (they go to the request's ``reply-to``, the backend queue), so a
        request the process sent to itself is never mistaken for the answer
        to it. Returns False if the message is not an answer and should be
        dispatched to an op.
        """
        conv_id = msg["conv-id"]
        conv = self.initiated.get(conv_id)
        if conv is not None:
            if conv.trusted and not is_operator(self.process.container, msg.get("broker-user")):
                # Not the system's answer (a forged reply, or a consumer of the service's queue
                # under another login): dropped; the real answer, or the timeout, ends the call.
                self.log_limiter.warn(
                    _log, ("untrusted-reply", self.process.id),
                    "{pid}: dropped a {performative} for {conv_id} from broker user {user!r} ({sender}): "
                    "the call takes answers from the system's operators only", pid=self.process.id,
                    performative=msg["performative"], conv_id=conv_id, user=msg.get("broker-user"),
                    sender=msg.get("sender"))
                return True
            conv.event(msg["performative"], msg)
            return True
        if conv_id.startswith(f"{self.process.id}#") or msg["performative"] in REPLY_PERFORMATIVES:
            # One of our conversations that has ended (timed out), or a reply to none.
            self._late(msg)
            return True
        return False

    def stray_reply(self, msg: dict[str, Any]) -> bool:
        """True (and logged) if a message on a *request* queue answers an rpc or request.

        Such a reply cannot belong to a live conversation of this process:
        those are answered on the backend queue. Generic conversations
        continue on the responder's own queue, so their messages are not strays.
        """
        if msg["protocol"] != Protocol.GENERIC and msg["performative"] in REPLY_PERFORMATIVES:
            self._late(msg)
            return True
        return False

    def _late(self, msg: dict[str, Any]) -> None:
        self.late_messages += 1
        self.log_limiter.info(
            _log, ("late-reply", self.process.id),
            "{pid}: late {performative} from {sender} for unknown conversation {conv_id} (op {op!r}), dropped",
            pid=self.process.id, performative=msg["performative"], sender=msg.get("sender"),
            conv_id=msg["conv-id"], op=msg.get("op"),
        )

    def fail_all(self, reason: str) -> None:
        """End every open initiator conversation with ERROR (process ends, connection lost)."""
        for conv in list(self.initiated.values()):
            conv.event("error", reason=reason)
        if not any(self._waiting.values()) and self._timer is not None:
            timer, self._timer = self._timer, None
            if timer.active():
                timer.cancel()

    def fail_matching(self, conv_id: str, reason: str, code: int = 503) -> None:
        """End one conversation with ERROR (e.g. its request could not be routed: 404)."""
        conv = self.initiated.get(conv_id)
        if conv is not None:
            conv.event("error", reason=reason, code=code)
