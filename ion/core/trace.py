# -*- test-case-name: tests.core.test_trace -*-
"""Trace context of ION messages: W3C ``traceparent``/``tracestate``, and the OpenTelemetry bridge.

Every ION message carries a ``traceparent`` header
(``00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>``) and, when one is
set, a ``tracestate``. A message sent while an op handles another message
(:data:`current_message`, which follows the op across its awaits) continues
that message's trace: same trace id and, while an SDK records spans, the parent id of
this hop's span (with no SDK, the parent's ``traceparent`` unchanged, as OpenTelemetry's no-op
propagation does); a message sent outside any handled message starts a new trace. A reply
carries its request's trace id.
An incoming ``traceparent`` is checked strictly when a process dispatches the
message (:func:`ensure`): a missing or malformed one is replaced by a new
trace, never an error; a ``tracestate`` is kept only if well formed and at
most 512 characters.

**OpenTelemetry.** Spans go through the ``opentelemetry-api``. Whether they
are made at all is decided once per container start (:func:`refresh`): with
the API's default provider (no SDK configured) :data:`state.tracer` is None
and the message path makes no span and no OpenTelemetry call: its span hooks are a few
attribute tests (~0.02 µs of CPU per message, below what ``bench/rpc.py`` can tell from
noise); the headers cost about 1-2 µs per message. With an SDK provider (``ion.core.trace``:
``otlp_endpoint`` set and ``opentelemetry-sdk`` with the OTLP exporter
installed, the ``[otel]`` extra; or a provider set by the application), each
rpc/request gets a CLIENT span and each handled request a SERVER span, named
``<op> <destination>``, with the messaging semantic conventions' attributes;
the message's ``traceparent`` is then the span's context.

**Recent conversations.** Each container keeps a bounded ring
(:class:`RecentConversations`) of the conversations that ended in it, with
their trace ids, for the shell's ``trace()``.
"""

from __future__ import annotations

import contextvars
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final

from ion.core.settings import TraceSettings

if TYPE_CHECKING:
    from ion.core.container import Container

__all__ = [
    "current_message", "current_span", "TraceSettings", "TraceState", "state", "parse", "is_valid",
    "valid_tracestate", "new_trace_id", "new_span_id", "new_traceparent", "continue_trace", "ensure",
    "trace_id_of", "current_trace_id", "span_traceparent", "refresh", "use_tracer_provider", "configure",
    "start_client_span", "start_server_span", "end_span", "RecentConversations", "EndedConversation", "in_flight",
    "RECENT_CONVERSATIONS",
]

#: The request being handled by the op running now (follows ``async def`` and
#: ``inlineCallbacks`` ops across their awaits): ``user-id`` delegation, the trace context of
#: what the op sends, the trace id of the log lines it writes.
current_message: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "ion_current_message", default=None)

#: The SERVER span of the request being handled (set only while an SDK records spans).
current_span: contextvars.ContextVar[Any] = contextvars.ContextVar("ion_current_span", default=None)

#: Conversations a container remembers after their end (:class:`RecentConversations`).
RECENT_CONVERSATIONS: Final = 256
#: Longest ``tracestate`` kept (W3C: at least 512 must be propagated; longer ones may be dropped).
MAX_TRACESTATE: Final = 512


# -- ids ----------------------------------------------------------------------------------------------
#: Random hex drawn ahead (one ``os.urandom`` per 1024 span ids), handed out in slices of 16 or 48
#: characters: a new id is a string slice, not a system call (every message takes one or two).
#: Drawn on the reactor thread only (the message path), without a lock; a forked child draws anew.
_POOL_CHARS: Final = 16384
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


def _fresh_pool() -> str:
    """Random hex of which no 16-character chunk (a span id, half a trace id) is all zeros: ids are
    handed out at multiples of 16, so none is ever zero (W3C forbids zero ids)."""
    while True:
        pool = os.urandom(_POOL_CHARS // 2).hex()
        if _ZERO_SPAN not in pool:  # (any 16 zeros, aligned or not: drawn again, about never)
            return pool


_pool = _fresh_pool()
_pool_at = 0

#: Length of a version-00 ``traceparent``.
_TRACEPARENT_LEN: Final = 55


#: Random bytes -> hex characters (a byte's low four bits), for :func:`_fresh_traceparents`.
_HEX_OF_BYTE: Final = bytes(b"0123456789abcdef"[b & 15] for b in range(256))
#: ``traceparent`` s made ahead at a time.
_TRACEPARENTS_AHEAD: Final = 512


def _fresh_traceparents() -> str:
    """The ``traceparent`` s of new traces (flags 00) made ahead, back to back: a new trace on the
    message path (:func:`continue_trace`) is then one slice, not two slices and a formatted string
    (~1,000 instead of ~2,900 instructions). Made in C: random bytes turned into hex characters, then
    the fixed characters (``00-``, the dashes, ``-00``) written in by strided slices; drawn again if an
    id is all zeros (about never)."""
    n = _TRACEPARENTS_AHEAD
    while True:
        buf = bytearray(os.urandom(_TRACEPARENT_LEN * n).translate(_HEX_OF_BYTE))
        for at, char in ((0, b"0"), (1, b"0"), (2, b"-"), (35, b"-"), (52, b"-"), (53, b"0"), (54, b"0")):
            buf[at::_TRACEPARENT_LEN] = char * n
        text = buf.decode("ascii")
        if f"-{_ZERO_TRACE}-" not in text and f"-{_ZERO_SPAN}-" not in text:
            return text


_traceparents = _fresh_traceparents()
_traceparents_at = 0

#: The traceparents of the new traces this process started lately (valid by construction): when one
#: comes back in a message to a process of this container, :func:`ensure` finds it here (one hash and
#: a probe) instead of running its regular expression (~4,400 instructions). Bounded (emptied when
#: full); one not found here is checked in full, with the same outcome.
_started: set[str] = set()
_STARTED_MAX: Final = 4096


def _fresh_pool_in_child() -> None:
    """After ``fork``: the child draws ids of its own (else its next trace and span ids would be
    the parent's next ones, one trace id for two processes' unrelated calls)."""
    global _pool, _pool_at, _traceparents, _traceparents_at
    _pool, _pool_at = _fresh_pool(), 0
    _traceparents, _traceparents_at = _fresh_traceparents(), 0


os.register_at_fork(after_in_child=_fresh_pool_in_child)


def _random_hex(n: int) -> str:
    """``n`` random hex characters, ``n`` a multiple of 16 up to 48, never all zeros."""
    global _pool, _pool_at
    at = _pool_at
    if at + n > _POOL_CHARS:
        _pool = _fresh_pool()
        at = 0
    _pool_at = at + n
    return _pool[at:at + n]


def new_trace_id() -> str:
    """A new random trace id: 32 lowercase hex characters."""
    return _random_hex(32)


def new_span_id() -> str:
    """A new random span (parent) id: 16 lowercase hex characters."""
    return _random_hex(16)


def new_traceparent(flags: str = "00") -> str:
    """The ``traceparent`` of a new trace (a root: nothing before it)."""
    ids = _random_hex(48)
    return f"00-{ids[:32]}-{ids[32:]}-{flags}"


# -- parsing ------------------------------------------------------------------------------------------
#: version 00: exactly 55 characters; a later version (never ff) may add ``-...`` fields.
_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?").fullmatch
#: The common case, checked first: version 00 as this container writes it.
_TRACEPARENT_00: Final = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}\Z").match
#: A tracestate list member: ``key=value`` (W3C trace-context §3.3.1).
_TS_MEMBER: Final = re.compile(
    r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]").fullmatch


def parse(value: Any) -> tuple[str, str, str] | None:
    """``(trace id, parent id, flags)`` of a valid ``traceparent``, else None.

    Strict: lowercase hex, version ``00`` exactly 55 characters (a later version may carry
    more fields after a ``-``; ``ff`` is invalid), neither id all zeros.
    """
    if type(value) is not str:
        return None
    m = _TRACEPARENT(value)
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, flags


def is_valid(value: Any) -> bool:
    """Whether ``value`` is a ``traceparent`` :func:`parse` accepts."""
    return parse(value) is not None


def valid_tracestate(value: Any) -> bool:
    """Whether ``value`` is a well-formed ``tracestate`` of at most 512 characters and 32 members."""
    if type(value) is not str or not value or len(value) > MAX_TRACESTATE:
        return False
    members = [m.strip(" \t") for m in value.split(",")]
    members = [m for m in members if m]
    if not members or len(members) > 32:
        return False
    keys = set()
    for member in members:
        if _TS_MEMBER(member) is None:
            return False
        key = member.split("=", 1)[0]
        if key in keys:
            return False
        keys.add(key)
    return True


# -- continuing traces ------------------------------------------------------------------------------
def continue_trace(parent: Mapping[str, Any] | None) -> str:
    """The ``traceparent`` of a message sent on behalf of ``parent`` (a handled message, already
    checked by :func:`ensure`, or one this container built); None (or a parent without a usable
    one): a new trace.

    With no SDK recording spans, the parent's ``traceparent`` goes on unchanged, as the
    OpenTelemetry API's no-op propagation does: no span of ours exists for a new parent id to
    name, so a downstream span's parent stays the last span really recorded (a made-up id would
    leave every collector a "missing parent" gap). While an SDK records spans, the parent id is
    the SERVER span's of the request being handled (:data:`current_span`). (Flat on purpose:
    every message built takes this path.)"""
    global _traceparents, _traceparents_at
    if parent is not None:
        tp = parent.get("traceparent")
        if type(tp) is str and len(tp) == 55:
            if state.tracer is not None:
                span = current_span.get()
                if span is not None:
                    return span_traceparent(span)
            return tp
    at = _traceparents_at
    end = at + 55  # (_TRACEPARENT_LEN)
    if end > len(_traceparents):
        _traceparents = _fresh_traceparents()
        at, end = 0, 55
    _traceparents_at = end
    tp = _traceparents[at:end]
    if len(_started) >= _STARTED_MAX:
        _started.clear()
    _started.add(tp)
    return tp


def ensure(msg: dict[str, Any]) -> None:
    """Check a received message's trace headers in place (the receiving process, before its op):
    a missing or malformed ``traceparent`` becomes a new trace (never an error); a malformed or
    oversized ``tracestate`` is dropped; a later version's ``traceparent`` is kept as version 00. (One
    of the new traces this process started is known to be well formed: see ``_started``.)"""
    tp = msg.get("traceparent")
    if type(tp) is str and (tp in _started or _TRACEPARENT_00(tp) is not None):
        if "tracestate" in msg and not valid_tracestate(msg["tracestate"]):
            del msg["tracestate"]
        return
    parsed = parse(tp)
    if parsed is None:
        msg["traceparent"] = new_traceparent()
        msg.pop("tracestate", None)  # (a tracestate belongs to the traceparent it came with)
        return
    msg["traceparent"] = f"00-{parsed[0]}-{parsed[1]}-{parsed[2]}"
    if "tracestate" in msg and not valid_tracestate(msg["tracestate"]):
        del msg["tracestate"]


def trace_id_of(msg: Mapping[str, Any] | None) -> str | None:
    """The trace id of a message (None: it has no valid ``traceparent``)."""
    if msg is None:
        return None
    tp = msg.get("traceparent")
    if type(tp) is str and len(tp) >= 55:
        return tp[3:35]
    return None


def current_trace_id() -> str | None:
    """The trace id of the message the running op handles, if any (log lines)."""
    msg = current_message.get()
    if msg is None:
        return None
    tp = msg.get("traceparent")
    return tp[3:35] if type(tp) is str and len(tp) >= 55 else None


# -- OpenTelemetry --------------------------------------------------------------------------------------
class TraceState:
    """Whether spans are made: :attr:`tracer` is None unless an SDK provider is in use.

    Checked once per container start (:func:`refresh`), never per message.
    """

    def __init__(self) -> None:
        self.tracer: Any = None
        #: A provider set by :func:`use_tracer_provider` (tests, an embedding application).
        self.provider_override: Any = None
        #: The provider :func:`configure` made from ``ion.core.trace`` (one per OS process).
        self.configured: Any = None


state = TraceState()


def _is_noop(provider: Any) -> bool:
    from opentelemetry import trace as otel

    return isinstance(provider, (otel.ProxyTracerProvider, otel.NoOpTracerProvider))


def refresh() -> Any:
    """Look at the tracer provider once: spans are made only with an SDK (a provider that is
    neither the API's proxy nor its no-op). Returns the tracer, or None."""
    provider = state.provider_override
    if provider is None:
        try:
            from opentelemetry import trace as otel
        except ImportError:  # pragma: no cover - a dependency; an install without it traces headers only
            state.tracer = None
            return None
        provider = otel.get_tracer_provider()
    state.tracer = None if _is_noop(provider) else provider.get_tracer("ion.core", "0.1.0")
    return state.tracer


def use_tracer_provider(provider: Any) -> Any:
    """Make spans with ``provider`` (an SDK ``TracerProvider``) rather than the global one;
    None: back to the global provider. Returns the tracer in use (None: no spans)."""
    state.provider_override = provider
    return refresh()


def configure(settings: TraceSettings, sysname: str, log: Any = None) -> Any:
    """Set up export from ``ion.core.trace`` (a container start): with ``otlp_endpoint`` set, a
    global SDK ``TracerProvider`` with a ``BatchSpanProcessor`` to the OTLP/HTTP exporter (once
    per OS process, and only if no other provider was set); then :func:`refresh`.

    Without ``opentelemetry-sdk`` and ``opentelemetry-exporter-otlp-proto-http`` (the ``otel``
    extra) the endpoint is logged as ignored and only the headers are carried."""
    if settings.otlp_endpoint and state.configured is None and state.provider_override is None:
        try:
            from opentelemetry import trace as otel
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            if log is not None:
                log.warn("ion.core.trace: otlp_endpoint {endpoint} ignored: {error} (pip install 'ioncore[otel]')",
                         endpoint=settings.otlp_endpoint, error=exc)
        else:
            if _is_noop(otel.get_tracer_provider()):
                provider = TracerProvider(resource=Resource.create(
                    {"service.name": settings.service_name or f"ion-{sysname}"}))
                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
                otel.set_tracer_provider(provider)
                state.configured = provider
                if log is not None:
                    log.info("ion.core.trace: exporting spans to {endpoint}", endpoint=settings.otlp_endpoint)
    return refresh()


def _remote_context(traceparent: str) -> Any:
    """An OpenTelemetry context whose current span is the remote parent ``traceparent`` names."""
    from opentelemetry import trace as otel

    parsed = parse(traceparent)
    if parsed is None:
        return None
    trace_id, span_id, _flags = parsed
    # The caller's sampled flag is a claim (and ION writes 00 where no SDK runs): it decides
    # nothing here. The parent counts as sampled, so this container's own sampler decides.
    ctx = otel.SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                           trace_flags=otel.TraceFlags(otel.TraceFlags.SAMPLED))
    return otel.set_span_in_context(otel.NonRecordingSpan(ctx))


def span_traceparent(span: Any) -> str:
    """The ``traceparent`` of a span's context."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _attributes(system: str, operation: str, destination: str, conv_id: str, op: str) -> dict[str, Any]:
    return {"messaging.system": system, "messaging.operation": operation,
            "messaging.destination.name": destination, "messaging.message.conversation_id": conv_id,
            "rpc.method": op, "rpc.system": "ion"}


def start_client_span(system: str, destination: str, op: str, conv_id: str, parent_traceparent: str | None) -> Any:
    """A CLIENT span for an rpc/request about to be sent (only while :data:`state.tracer` is set);
    its parent: ``parent_traceparent`` (a caller's header), else the SERVER span of the request
    being handled, else that request's traceparent, else none (a new trace)."""
    from opentelemetry import trace as otel

    tracer = state.tracer
    ctx = None
    if parent_traceparent is not None:
        ctx = _remote_context(parent_traceparent)
    else:
        server = current_span.get()
        if server is not None:
            ctx = otel.set_span_in_context(server)
        else:
            msg = current_message.get()
            if msg is not None and type(msg.get("traceparent")) is str:
                ctx = _remote_context(msg["traceparent"])
    if ctx is None:
        from opentelemetry.context import Context

        ctx = Context()  # a root: never the ambient OpenTelemetry context of the reactor thread
    return tracer.start_span(f"{op} {destination}", context=ctx, kind=otel.SpanKind.CLIENT,
                             attributes=_attributes(system, "publish", destination, conv_id, op))


def start_server_span(system: str, msg: Mapping[str, Any]) -> Any:
    """A SERVER span for a request being handled, child of its (checked) ``traceparent``."""
    from opentelemetry import trace as otel

    op = msg["op"]
    destination = msg["receiver"]
    return state.tracer.start_span(
        f"{op} {destination}", context=_remote_context(msg["traceparent"]), kind=otel.SpanKind.SERVER,
        attributes=_attributes(system, "process", destination, msg["conv-id"], op))


def end_span(span: Any, code: int | None = None, error: str | None = None) -> None:
    """End a span; a response code of 500 and over (or an ``error``) marks it as an error."""
    try:
        from opentelemetry.trace import Status, StatusCode

        if code is not None:
            span.set_attribute("ion.response_code", code)
        if error is not None or (code is not None and code >= 500):
            span.set_status(Status(StatusCode.ERROR, error or str(code)))
        span.end()
    except Exception:  # pragma: no cover - an exporter's trouble never reaches the message path
        pass


# -- what a container knows of traces ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EndedConversation:
    """A conversation that ended in this container (initiator or responder side); ``started``: when it
    started (epoch seconds)."""

    conv: str
    trace: str | None
    role: str
    pid: str
    peer: str
    op: str
    protocol: str
    state: str
    started: float


class RecentConversations:
    """The last :data:`RECENT_CONVERSATIONS` conversations that ended in one container.

    On the per-message path: :attr:`append` (the deque's own method) of a tuple
    ``(conv, traceparent, role, pid, peer, op, protocol, state, started)``, ``started`` by
    ``perf_counter``; the rows are made on reading.
    """

    def __init__(self, size: int = RECENT_CONVERSATIONS) -> None:
        self._ring: deque[tuple[Any, ...]] = deque(maxlen=size)
        self.append = self._ring.append

    def add(self, conv: str, traceparent: Any, role: str, pid: str, peer: str, op: str, protocol: str,
            state: str, started: float) -> None:
        """Record one ended conversation; ``started``: its ``perf_counter`` start."""
        self._ring.append((conv, traceparent, role, pid, peer, op, protocol, state, started))

    def __len__(self) -> int:
        return len(self._ring)

    def __iter__(self) -> Iterator[EndedConversation]:
        wall = time.time() - perf_counter()  # perf_counter -> epoch seconds
        for conv, tp, role, pid, peer, op, protocol, st, started in list(self._ring):
            yield EndedConversation(conv, tp[3:35] if type(tp) is str and len(tp) >= 55 else None, role, pid,
                                    peer, op, protocol, st, wall + started)


def in_flight(container: Container) -> Iterable[dict[str, Any]]:
    """The conversations in flight of ``container``'s processes, as rows (initiator and responder
    sides): conv, role, initiator, peer, op, protocol, state, age (seconds), trace."""
    now = perf_counter()
    for p in list(container.proc_manager.processes.values()):
        table = p.conversations
        for conv in list(table.initiated.values()):
            yield {"conv": conv.conv_id, "role": "initiator", "initiator": f"{p.proc_name} ({p.id})",
                   "peer": conv.receiver, "op": conv.op, "protocol": conv.protocol, "state": conv.state,
                   "age": max(now - conv.started, 0.0), "trace": trace_id_of({"traceparent": conv.traceparent})}
        for resp in list(table.responding.values()):
            request = resp.request
            yield {"conv": resp.conv_id, "role": "responder",
                   "initiator": f"{request.get('sender-name') or '?'} ({request.get('sender')})",
                   "peer": f"{p.proc_name} ({p.id})", "op": request.get("op"), "protocol": resp.protocol,
                   "state": resp.state, "age": max(now - resp.started, 0.0), "trace": trace_id_of(request)}
