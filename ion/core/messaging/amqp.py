# -*- test-case-name: tests.core.messaging.test_amqp -*-
"""The AMQP 0-9-1 transport: RabbitMQ through pika's Twisted adapter (DESIGN §4-§5).

One :class:`AmqpTransport` is one connection. Its channels are kept and
reused, never opened per send:

- a **control** channel for declares, binds and deletes. These run one at a
  time, so a broker error (404, 405, 406 ...), which closes the channel in
  AMQP, fails only the operation that caused it; the next operation opens a
  fresh channel;
- a **publish** channel without confirms, for requests and replies of
  conversations (their reply, or the timeout, is the confirmation) and any
  ``publish(confirm=False)``: ``publish`` fires once the message is written.
  If the broker closes that channel with an error (a refused ``user_id``,
  ``ACCESS_REFUSED`` ...) the messages published on it that it may have
  dropped — those since it opened, less those a later ``basic.qos``
  round trip on it showed the broker had taken (one every
  :data:`FENCE_EVERY` messages) — go to the refused callbacks with the
  broker's reason, so a container fails those calls at once;
- a **confirm** channel in confirm mode, for ``publish(confirm=True)`` (and
  ``confirm=None`` when :attr:`AmqpTransport.confirm`, the
  ``publisher_confirms`` setting, is on): ``publish`` fires when the broker
  has taken the message, and fails with the broker's text if it did not.
  On both, a ``mandatory`` message no queue takes comes back as
  ``basic.return`` and is handed to the return callbacks. Exchanges are
  checked (passively, once per connection) before the first publish to them,
  so a publish to a missing exchange fails alone instead of closing the
  channel under other publishes;
- **one channel per consumer**, with its own ``basic.qos`` prefetch, so each
  receiver's window and acks are its own and a consumer error (exclusive
  queue, access refused) cannot cancel another consumer. Deliveries are
  acked or rejected on the channel that delivered them. Those acked while
  pika handles one read from the socket (a burst within the prefetch
  window) are acked after that read, the run below every delivery still in
  hand as one ``multiple`` ack. RabbitMQ allows 2047 channels per
  connection by default, hence about as many consumers.

When the connection drops, in-flight operations fail with
:class:`~ion.core.exceptions.ConnectionLostError`, connection listeners hear
``("lost", reason)``, and the transport reconnects with exponential backoff
and random jitter (0.5 s doubling up to 10 s, each wait shortened by a random
share of up to ``reconnect_jitter``, on an injectable clock and random
generator), so that many containers do not reconnect in the same instant.
Given several broker addresses (the nodes of a cluster), it connects to the
first that answers, and after a loss tries the next one, and so on in turn.
Once connected it
re-declares the exchanges, queues and bindings it made, re-creates its
consumers under their old tags, and listeners hear ``("restored", None)``.
Publishing is open again from the moment the consumers start coming back: a
request that waited in a queue is handed over at once, and its answer goes out
then (not refused as "not connected", its request acknowledged regardless).
Deliveries received before the loss cannot be settled any more: their
``ack``/``reject`` are logged and dropped (the broker has requeued them).

A container makes its transport with :meth:`AmqpTransport.from_config`, from
the ``ion.core.messaging`` config section: ``publisher_confirms``,
``reconnect_initial``, ``reconnect_max``, ``reconnect_jitter``, ``heartbeat``.
"""

from __future__ import annotations

import itertools
import logging
import random
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import pika
from pika import exceptions as pika_exc
from pika.adapters.twisted_connection import ClosableDeferredQueue, TwistedChannel, TwistedProtocolConnection
from pika.data import decode_table, encode_table
from twisted.internet import defer, protocol, tcp
from twisted.internet import error as tx_error
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.core.exceptions import ConfigurationError, ConnectionLostError, MessageRefusedError, TransportError
from ion.core.messaging.transport import (
    BrokerURL,
    ConsumeCallback,
    Delivery,
    Properties,
    Transport,
    parse_broker_url,
)
from ion.core.settings import MessagingSettings

__all__ = ["AmqpTransport", "DEFAULT_RECONNECT_INITIAL", "DEFAULT_RECONNECT_MAX", "DEFAULT_RECONNECT_JITTER",
           "FENCE_EVERY", "reconnect_delay"]

#: Seconds before the first reconnection attempt; doubled after each failure.
DEFAULT_RECONNECT_INITIAL = MessagingSettings.reconnect_initial
#: Longest wait between two reconnection attempts, in seconds.
DEFAULT_RECONNECT_MAX = MessagingSettings.reconnect_max
#: The share of each reconnection wait drawn at random (0: the exact doubling).
DEFAULT_RECONNECT_JITTER = MessagingSettings.reconnect_jitter
#: Seconds to wait for the TCP connection to the broker.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Unconfirmed publishes on the publish channel between two checks (a ``basic.qos`` round trip)
#: that the broker took them; only those since the last check are reported refused if it closes.
FENCE_EVERY = 256
#: Seconds a confirm channel the broker refused a message on is kept open (for its other messages'
#: confirms) after publishing moved to a new one (see ``_ChannelSlot.retire``).
RETIRED_CHANNEL_CLOSE = 30.0
#: What the connection hands pika at a time of a bigger read from the broker: runs of whole
#: frames of about this many bytes (see ``_Connection._feed_in_runs``).
FEED_BYTES = 4096
_FRAME_SIZE = struct.Struct(">I")


def reconnect_delay(attempt: int, initial: float, maximum: float, jitter: float = DEFAULT_RECONNECT_JITTER,
                    rng: random.Random | None = None) -> float:
    """Seconds to wait before reconnection attempt ``attempt`` (0 for the first).

    ``initial`` doubled per attempt, at most ``maximum`` (the "cap"), less a random share of up
    to ``jitter`` of it: a wait is in ``[(1 - jitter) * cap, cap]``, so containers that lost
    the same broker at the same moment spread their attempts instead of all reconnecting in
    the same instant (the idea of ``twisted.application.internet.backoffPolicy``, with the
    jitter in proportion to the wait). ``rng``: the random generator (a seeded
    ``random.Random`` in tests); default the ``random`` module's.
    """
    cap = min(initial * 2.0 ** min(attempt, 64), maximum)
    if jitter <= 0:
        return cap
    return cap * (1.0 - jitter * (rng or random).random())

_EXCHANGE_KINDS = ("topic", "direct", "fanout", "headers")

# What pika or Twisted raise when the connection (not just one channel) went away.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pika_exc.AMQPConnectionError,
    tx_error.ConnectionDone,
    tx_error.ConnectionLost,
)


class _ReturnsReportedElsewhere(logging.Filter):
    """Drops pika's warning for each returned (unroutable) message.

    pika's Twisted adapter logs one, with the body, for every ``basic.return``
    in confirm mode; the transport hands returns to its return callbacks (the
    caller gets a 404), so on stderr it is only noise, and can be a lot of it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Published message was returned")


_pika_adapter_log = logging.getLogger("pika.adapters.twisted_connection")
if not any(isinstance(f, _ReturnsReportedElsewhere) for f in _pika_adapter_log.filters):
    _pika_adapter_log.addFilter(_ReturnsReportedElsewhere())


class _Connection(TwistedProtocolConnection):  # type: ignore[misc]
    """pika's protocol, keeping the reason why opening the connection failed.

    pika's adapter errbacks ``ready`` with a bare ``AMQPConnectionError`` and
    drops the cause (wrong password, vhost refused); we need it for one clear
    error at start-up.
    """

    open_error: BaseException | None = None
    #: The broker's Connection.Close (code and text), if it sent one. pika's Twisted adapter
    #: replaces it by Twisted's ConnectionDone when the socket closes right after.
    close_reason: pika_exc.ConnectionClosedByBroker | None = None

    #: True while pika handles a chunk of data from the broker (its deliveries among it).
    reading = False
    #: Called after each such chunk: the transport sends the acknowledgements it gathered.
    after_read: Callable[[], None] | None = None

    #: While pika handles a read: the frames it writes, sent together as the read ends (None: not reading).
    _out: list[bytes] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._impl.callbacks.add(0, pika.spec.Connection.Close, self._on_close_frame)
        self._impl._adapter_emit_data = self._emit
        #: The consumers whose deliveries this connection decodes itself (see :meth:`_read`): by
        #: (channel number, consumer tag), pika's channel and what takes a delivery.
        self.takers: dict[tuple[int, str], tuple[Any, DeliveryTaker]] = {}

    def _emit(self, data: bytes) -> None:
        """pika's output: gathered while a read is handled, else to the transport as pika's adapter does."""
        if self._out is not None:
            self._out.append(data)
        else:
            self._impl._transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.reading = True
        self._out = []
        try:
            held = getattr(self._impl, "_frame_buffer", None)
            if held is None:
                super().dataReceived(data)
            elif self.takers:
                if held:
                    data = held + data
                    self._impl._frame_buffer = b""
                self._read(data)
            else:
                self._feed(data, held)
        finally:
            self.reading = False
            try:
                if self.after_read is not None:
                    self.after_read()
            finally:
                out, self._out = self._out, None
                if out:
                    self._send_now(b"".join(out))

    def _send_now(self, data: bytes) -> None:
        """Send what handling a read wrote (replies, the next requests, the acks gathered) in one
        ``send``, as the read ends, rather than through the transport's buffer on the reactor's
        next turn, once ``epoll`` reports the socket writable: a request-reply round trip saves a
        reactor turn on each side (bench/README.md, "Where a sequential call's time goes"). Only
        when nothing older waits in the transport, so the bytes keep their order; what the socket
        does not take, and a failure, go through the transport's buffer as before (the reactor
        sends the rest, or finds the connection lost). Over TLS (a transport that is no plain TCP
        connection) the gathered bytes go through the transport in one write."""
        transport = self.transport
        if transport is None:
            return
        if (isinstance(transport, tcp.Connection) and transport.connected and not transport.disconnecting
                and not transport._tempDataLen and len(transport.dataBuffer) == transport.offset):
            sent = transport.writeSomeData(data)
            if isinstance(sent, int) and sent >= 0:
                if sent == len(data):
                    return
                data = data[sent:]
        transport.write(data)

    def _read(self, data: bytes) -> None:
        """Handle a read from the broker: each whole delivery (``basic.deliver``, its content header and
        body frames) to a consumer in :attr:`takers` is decoded here and handed to its taker, every
        other frame goes to pika, in the order they came (a delivery cut across two reads too: pika
        puts it together, as it does for a consumer that is not one of ours). pika makes a frame object
        and a method or properties object of each of its frames (~10 µs of CPU per message for that
        alone), then runs each through its callback manager and content assembler; here a delivery
        is decoded in ~3 µs (bench/README.md). A test feeds both paths the same streams."""
        impl = self._impl
        n = len(data)
        pos = start = 0  # start: where the bytes not yet handed to pika (or taken here) begin
        head = _FRAME_HEAD.unpack_from
        while pos + 7 <= n:
            kind, number, size = head(data, pos)
            end = pos + size + 8
            if end > n:
                break
            if kind == 1 and data[pos + 7:pos + 11] == _DELIVER:
                delivery = _parse_delivery(data, pos, end, number, n)
                if delivery is not None:
                    if start < pos:
                        self._feed(data[start:pos], b"")
                    after, tag = delivery[0], delivery[1]
                    found = self.takers.get((number, tag))
                    channel = impl._channels.get(number) if found is not None else None
                    if (found is None or channel is not found[0] or not channel.is_open
                            or tag not in channel._consumers or tag in channel._cancelled
                            or channel._content_assembler._method_frame is not None):
                        # pika's way: it knows what to do with it (and, with part of a message in hand on
                        # that channel, which only a broken stream leaves, it says what is wrong).
                        self._feed(data[pos:after], b"")
                    else:
                        impl.frames_received += delivery[8]
                        impl.bytes_received += after - pos
                        found[1](*delivery[2:8])
                    pos = start = after
                    continue
            pos = end
        if start < n:
            self._feed(data[start:] if start else data, b"")

    def _feed(self, data: bytes, held: bytes) -> None:
        """Hand pika ``data`` (after the partial frame ``held`` before it), in runs if it is big."""
        if len(data) <= FEED_BYTES:
            super().dataReceived(data)
        else:
            self._feed_in_runs(data, held)

    def _feed_in_runs(self, data: bytes, held: bytes) -> None:
        """Hand pika ``data`` (after the partial frame it ``held``) a run of whole frames of about
        :data:`FEED_BYTES` at a time.

        pika cuts each frame it reads off the front of its buffer with a copy of the rest
        (``_frame_buffer = _frame_buffer[n:]``): fed a whole read at once (up to 64 KiB, a
        hundred deliveries and more with many calls in flight) it copies the rest of the read
        three times per message (~1-3 µs CPU per message of ~400 bytes). In runs, the copies
        stay within one run. A frame is 7 header bytes (its payload size at offset 3), the payload and an
        end byte; what does not parse as frames (or a partial frame at the end) goes to pika
        as it is, in the last run, which decodes, keeps or refuses it as before.
        """
        impl = self._impl
        if held:
            data = held + data
            impl._frame_buffer = b""
        feed = super().dataReceived
        n = len(data)
        start = end = 0
        unpack = _FRAME_SIZE.unpack_from
        while end + 7 <= n:
            size = unpack(data, end + 3)[0] + 8
            if end + size > n:
                break
            end += size
            if end - start >= FEED_BYTES:
                feed(data[start:end])
                start = end
        if start < n:
            feed(data[start:] if start else data)

    def _on_close_frame(self, method_frame: Any) -> None:
        method = method_frame.method
        self.close_reason = pika_exc.ConnectionClosedByBroker(method.reply_code, method.reply_text)

    def _on_connection_failed(self, _connection: Any, _error_message: Any = None) -> None:
        self.open_error = _error_message
        super()._on_connection_failed(_connection, _error_message)


class _ChannelSlot:
    """One long-lived channel, reopened on the next use after the broker closed it."""

    def __init__(self, transport: AmqpTransport, name: str,
                 setup: Callable[[TwistedChannel], Any] | None = None) -> None:
        self.transport = transport
        self.name = name
        self.setup = setup
        self.channel: TwistedChannel | None = None
        self._waiters: list[defer.Deferred[TwistedChannel]] | None = None

    def current(self) -> TwistedChannel | None:
        """The open channel, if there is one right now."""
        ch = self.channel
        if ch is not None and ch.is_open:
            return ch
        return None

    def get(self) -> defer.Deferred[TwistedChannel]:
        """The open channel, opening a new one if needed."""
        ch = self.current()
        if ch is not None:
            return defer.succeed(ch)
        self.channel = None
        d: defer.Deferred[TwistedChannel] = defer.Deferred()
        if self._waiters is not None:
            self._waiters.append(d)
            return d
        conn = self.transport._conn
        if conn is None:
            return defer.fail(self.transport._lost_error())
        self._waiters = [d]
        opening = defer.maybeDeferred(conn.channel)
        if self.setup is not None:
            setup = self.setup
            opening.addCallback(lambda ch: defer.maybeDeferred(setup, ch).addCallback(lambda _: ch))
        opening.addBoth(self._opened, conn)
        return d

    def _opened(self, result: Any, conn: Any) -> None:
        waiters, self._waiters = self._waiters or [], None
        if not isinstance(result, Failure) and conn is self.transport._conn:
            self.channel = result
            self.transport._log.debug("opened {slot} channel {n}", slot=self.name, n=result.channel_number)
        elif not isinstance(result, Failure):
            AmqpTransport._close_channel(result)  # opened on a connection that has gone since
            result = Failure(self.transport._lost_error())
        for w in waiters:
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(result)

    def reset(self) -> None:
        """Forget the channel (the connection it belonged to is gone)."""
        self.channel = None

    def retire(self, ch: TwistedChannel, after: float) -> None:
        """Publish on a new channel from now on; ``ch`` is closed ``after`` seconds (its pending
        confirms arrive meanwhile). For a channel the broker nacked a message on: RabbitMQ (3.10)
        keeps, per channel and quorum queue, the leader it first saw; a channel whose first publish
        to a queue came while that queue's leader node was down is refused (basic.nack) for good,
        or, without a confirm, its messages are dropped unseen. A new channel sees the new leader."""
        number = ch.channel_number
        if self.channel is not ch:
            return  # retired already (another of its messages was refused)
        self.channel = None
        self.transport._log.info("the broker refused a message on {slot} channel {n}: publishing on a new channel",
                                 slot=self.name, n=number)
        self.transport.clock.callLater(after, AmqpTransport._close_channel, ch)


class _SentLog:
    """What went out without a confirm on one publish channel, and may be lost if it closes.

    Entries are forgotten once a ``basic.qos`` round trip sent after them comes back: the
    broker handles a channel's frames in order, so it took (routed or returned) every
    publish before the ``qos-ok``, and none of them can be what closes the channel.
    """

    __slots__ = ("sent", "fencing")

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Properties]] = []
        self.fencing = False

    def fenced(self, n: int) -> None:
        del self.sent[:n]
        self.fencing = False


class _Consumer:
    """One consumer: what it consumes (kept across reconnections) and its current channel."""

    __slots__ = ("tag", "queue", "callback", "prefetch", "exclusive", "auto_ack", "channel", "unacked",
                 "cancelled", "cancelling", "outstanding", "acks")

    def __init__(self, tag: str, queue: str, callback: ConsumeCallback, prefetch: int,
                 exclusive: bool, auto_ack: bool = False) -> None:
        self.tag = tag
        self.queue = queue
        self.callback = callback
        self.prefetch = prefetch
        self.exclusive = exclusive
        self.auto_ack = auto_ack
        self.channel: TwistedChannel | None = None
        self.unacked = 0
        #: Delivery tags handed to the callback and not settled yet, in delivery (= tag) order.
        self.outstanding: dict[int, None] = {}
        #: Tags settled with an ack while a read was being handled, sent after it (on ``channel``).
        self.acks: list[int] = []
        self.cancelled = False
        #: basic.cancel sent, cancel-ok not yet received: the channel must stay open until then.
        self.cancelling = False

    def __repr__(self) -> str:
        return f"<consumer {self.tag} of {self.queue}>"

    def use(self, channel: TwistedChannel | None) -> None:
        """Consume on ``channel`` from now on (None: none); what the old one delivered is the broker's again."""
        self.channel = channel
        self.unacked = 0
        self.outstanding.clear()
        self.acks.clear()


def _to_pika(props: Properties, user_id: str, message_id: str) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=props.content_type,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        message_id=message_id,
        user_id=user_id,
        headers=dict(props.headers) if props.headers else None,
        expiration=props.expiration,
    )


#: The frames of a ``basic.publish`` (AMQP 0-9-1 §4.2.3): a frame is type, channel, payload size, the
#: payload and an end octet; the method's payload starts with Basic (60) Publish (40) and the reserved
#: short, the content header's with Basic, weight 0 and the body size; each body frame carries up to
#: frame-max less 8 octets of the body.
_FRAME_HEAD = struct.Struct(">BHI")
_FRAME_END = b"\xce"
_PUBLISH_HEAD = struct.pack(">HHH", 60, 40, 0)
_CONTENT_HEAD = struct.Struct(">HHQH")
_MANDATORY = (b"\x00", b"\x01")
#: Property flags (AMQP 0-9-1, basic class properties; what pika's ``BasicProperties.FLAG_*`` say).
_FLAG_CONTENT_TYPE, _FLAG_HEADERS = 1 << 15, 1 << 13
_FLAG_CORRELATION_ID, _FLAG_REPLY_TO, _FLAG_EXPIRATION, _FLAG_MESSAGE_ID = 1 << 10, 1 << 9, 1 << 8, 1 << 7
_FLAG_USER_ID = 1 << 4


#: Short strings that repeat from message to message (content type, reply-to queues, expirations, the
#: login), encoded once; at most :data:`_REPEATED_MAX` kept (a caller may name any number of queues).
_repeated: dict[str, bytes] = {}
_REPEATED_MAX = 4096


def _repeated_string(value: str) -> bytes:
    """:func:`_short_string` of a value that repeats, kept for the next message."""
    data = _short_string(value)
    if len(_repeated) >= _REPEATED_MAX:
        _repeated.clear()
    _repeated[value] = data
    return data


def _short_string(value: str | bytes) -> bytes:
    """An AMQP short string: its length in one octet, then its UTF-8 (pika's ``ShortStringTooLong``
    over 255 octets, as its own encoder raises; a TypeError for a value that is no text)."""
    if isinstance(value, str):
        data = value.encode()
    elif isinstance(value, bytes):
        data = value
    else:
        raise TypeError(f"an AMQP short string must be text, not {type(value).__name__}")
    if len(data) > 255:
        raise pika_exc.ShortStringTooLong(data)
    return bytes((len(data),)) + data


def publish_frames(channel_number: int, exchange: str, routing_key: str, mandatory: bool,
                   props: Properties, body: bytes, body_max: int, method: bytes | None = None) -> bytes:
    """The frames of one ``basic.publish`` of ``body`` with ``props`` on channel ``channel_number``,
    byte for byte what pika's ``Channel.basic_publish`` writes for ``_to_pika(props, ...)`` (a test
    checks), as one string: the publish path's hot spot, made without pika's frame and property objects
    (~7-8 µs of CPU per message there, ~2 here). ``body_max``: the most body octets a frame carries
    (the connection's frame-max less 8). ``method``: the method frame, if made already (it depends only
    on the channel, exchange, routing key and ``mandatory``: see :func:`publish_method_frame`)."""
    if method is None:
        method = publish_method_frame(channel_number, exchange, routing_key, mandatory)
    # The properties in wire order, one block each (a loop over a table of them cost ~1 µs more a message).
    flags = 0
    pieces = [b""]
    value: Any = props.content_type
    if value is not None:
        flags = _FLAG_CONTENT_TYPE
        pieces.append(_repeated.get(value) or _repeated_string(value))
    value = props.headers
    if value:
        flags |= _FLAG_HEADERS
        encode_table(pieces, dict(value))
    value = props.correlation_id
    if value is not None:
        flags |= _FLAG_CORRELATION_ID
        pieces.append(_short_string(value))
    value = props.reply_to
    if value is not None:
        flags |= _FLAG_REPLY_TO
        pieces.append(_repeated.get(value) or _repeated_string(value))
    value = props.expiration
    if value is not None:
        flags |= _FLAG_EXPIRATION
        pieces.append(_repeated.get(value) or _repeated_string(value))
    value = props.message_id
    if value is not None:
        flags |= _FLAG_MESSAGE_ID
        pieces.append(_short_string(value))
    value = props.user_id
    if value is not None:
        flags |= _FLAG_USER_ID
        pieces.append(_repeated.get(value) or _repeated_string(value))
    size = len(body)
    pieces[0] = _CONTENT_HEAD.pack(60, 0, size, flags)
    header = b"".join(pieces)
    frames: list[bytes | memoryview] = [method, _FRAME_HEAD.pack(2, channel_number, len(header)), header, _FRAME_END]
    if size <= body_max:
        if size:
            frames += (_FRAME_HEAD.pack(3, channel_number, size), body, _FRAME_END)
    else:
        view = memoryview(body)
        for start in range(0, size, body_max):
            chunk = view[start:start + body_max]
            frames += (_FRAME_HEAD.pack(3, channel_number, len(chunk)), chunk, _FRAME_END)
    return b"".join(frames)


def publish_method_frame(channel_number: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    """The method frame of a ``basic.publish`` (see :func:`publish_frames`)."""
    payload = b"".join((_PUBLISH_HEAD, _short_string(exchange), _short_string(routing_key), _MANDATORY[mandatory]))
    return b"".join((_FRAME_HEAD.pack(1, channel_number, len(payload)), payload, _FRAME_END))


#: What takes a delivery the connection decoded itself: (delivery tag, redelivered, exchange, routing
#: key, properties, body).
DeliveryTaker = Callable[[int, bool, str, str, Properties, bytes], None]
#: A ``basic.deliver`` method payload starts with Basic (60) Deliver (60).
_DELIVER = struct.pack(">HH", 60, 60)
_DELIVERY_TAG = struct.Struct(">QB")
#: The basic class's properties in wire order (AMQP 0-9-1): flag, kind (``s`` short string, ``t``
#: table, ``1``/``8`` an octet/a long long to skip), and the index of the :class:`Properties` argument
#: it fills (None: a property the container does not keep, as :func:`_from_pika`).
_PROPERTY_LAYOUT: tuple[tuple[int, str, int | None], ...] = (
    (1 << 15, "s", 0), (1 << 14, "s", None), (1 << 13, "t", 5), (1 << 12, "1", None), (1 << 11, "1", None),
    (1 << 10, "s", 1), (1 << 9, "s", 2), (1 << 8, "s", 6), (1 << 7, "s", 3), (1 << 6, "8", None),
    (1 << 5, "s", None), (1 << 4, "s", 4), (1 << 3, "s", None), (1 << 2, "s", None))
#: By property flags: the (kind, index) of each property present, in wire order.
_property_plans: dict[int, tuple[tuple[str, int | None], ...]] = {}


def _property_plan(flags: int) -> tuple[tuple[str, int | None], ...]:
    """The plan of ``flags`` (kept: a broker sends a handful of combinations; at most
    :data:`_REPEATED_MAX` are kept, whatever it sends)."""
    if len(_property_plans) >= _REPEATED_MAX:
        _property_plans.clear()
    plan = _property_plans[flags] = tuple((kind, index) for flag, kind, index in _PROPERTY_LAYOUT if flags & flag)
    return plan


def _parse_delivery(data: bytes, pos: int, end: int, number: int, n: int) -> tuple[Any, ...] | None:
    """The delivery whose ``basic.deliver`` frame on channel ``number`` is ``data[pos:end]``, if its
    content header and body frames follow whole in ``data`` (``n`` bytes): (end of its last frame,
    consumer tag, delivery tag, redelivered, exchange, routing key, :class:`Properties`, body, frames).
    None when anything is not what a delivery is made of, or a short string is not UTF-8 (pika then
    reads it: it says what is wrong, or gives such a string as bytes)."""
    try:
        if data[end - 1] != 0xCE:
            return None
        p = pos + 11
        length = data[p]
        consumer_tag = data[p + 1:p + 1 + length].decode()
        p += 1 + length
        delivery_tag, bits = _DELIVERY_TAG.unpack_from(data, p)
        p += 9
        length = data[p]
        exchange = data[p + 1:p + 1 + length].decode()
        p += 1 + length
        length = data[p]
        routing_key = data[p + 1:p + 1 + length].decode()
        if p + 1 + length != end - 1 or end + 7 > n:
            return None
        kind, channel, size = _FRAME_HEAD.unpack_from(data, end)
        header_end = end + size + 8
        if kind != 2 or channel != number or header_end > n or data[header_end - 1] != 0xCE:
            return None
        class_id, _weight, body_size, flags = _CONTENT_HEAD.unpack_from(data, end + 7)
        if class_id != 60 or flags & 1:
            return None  # (a second word of flags: no such property in AMQP 0-9-1)
        values: list[Any] = [None] * 7
        p = end + 21
        for kind_of, index in _property_plans.get(flags) or _property_plan(flags):
            if kind_of == "s":
                length = data[p]
                value: Any = data[p + 1:p + 1 + length].decode()
                p += 1 + length
            elif kind_of == "t":
                value, p = decode_table(data, p)
            else:
                p += 1 if kind_of == "1" else 8
                continue
            if index is not None:
                values[index] = value
        if p != header_end - 1:
            return None
        p = header_end
        chunks = []
        left = body_size
        while left > 0:
            if p + 7 > n:
                return None
            kind, channel, size = _FRAME_HEAD.unpack_from(data, p)
            frame_end = p + size + 8
            if kind != 3 or channel != number or frame_end > n or size > left or data[frame_end - 1] != 0xCE:
                return None
            chunks.append(data[p + 7:frame_end - 1])
            left -= size
            p = frame_end
    except Exception:  # (whatever the bytes are, pika reads them then, and says what is wrong)
        return None
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    frames = 2 + len(chunks)
    headers = values[5]
    props = Properties(values[0] or "", values[1], values[2], values[3], values[4],
                       headers if headers else {}, values[6])
    return (p, consumer_tag, delivery_tag, bool(bits & 1), exchange, routing_key, props, body, frames)


def _from_pika(props: pika.BasicProperties) -> Properties:
    headers = props.headers
    # (content_type, correlation_id, reply_to, message_id, user_id, headers, expiration): by position,
    # once per message received.
    return Properties(props.content_type or "", props.correlation_id, props.reply_to, props.message_id,
                      props.user_id, dict(headers) if headers else {}, props.expiration)


class AmqpTransport(Transport):
    """One connection to RabbitMQ (or any AMQP 0-9-1 broker).

    :param url: ``amqp://user:pass@host:port/vhost`` (a string or a parsed
        :class:`~ion.core.messaging.transport.BrokerURL`), or a list of them: the nodes of one
        cluster, tried in turn (see the module doc).
    :param reactor: the reactor for the TCP connection and pika's timers.
    :param clock: schedules reconnection attempts (default: ``reactor``); a
        ``task.Clock`` in tests.
    :param reconnect_initial: seconds before the first reconnection attempt.
    :param reconnect_max: the longest wait between two attempts.
    :param reconnect_jitter: the share of each wait drawn at random (see :func:`reconnect_delay`).
    :param rng: the random generator of the jitter (default: the ``random`` module's).
    :param reconnect: reconnect after a loss (else stay disconnected).
    :param heartbeat: AMQP heartbeat in seconds (``None``: the broker's choice).
    :param connect_timeout: seconds to wait for the TCP connection.
    :param confirm: what ``publish(confirm=None)`` does: ask for a publisher confirm, so that
        it fires once the broker took the message and fails with its reason otherwise (off:
        fires once written). Requests and replies of conversations say ``confirm=False``.
    """

    _log = Logger()

    def __init__(self, url: BrokerURL | str | Sequence[BrokerURL | str], *, reactor: Any = None,
                 clock: IReactorTime | None = None,
                 reconnect_initial: float = DEFAULT_RECONNECT_INITIAL,
                 reconnect_max: float = DEFAULT_RECONNECT_MAX,
                 reconnect_jitter: float = DEFAULT_RECONNECT_JITTER, rng: random.Random | None = None,
                 reconnect: bool = True,
                 heartbeat: int | None = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 confirm: bool = True) -> None:
        super().__init__()
        given = [url] if isinstance(url, (str, BrokerURL)) else list(url)
        if not given:
            raise ConfigurationError("AmqpTransport needs at least one amqp:// URL")
        urls = [parse_broker_url(u) if isinstance(u, str) else u for u in given]
        for u in urls:
            if u.scheme not in ("amqp", "amqps"):
                raise ConfigurationError(f"AmqpTransport needs an amqp:// URL, not {u}")
        logins = sorted({u.username for u in urls})
        if len(logins) > 1:
            # The container's login is who it is (its operators, the user_id of its messages): a
            # failover must not make it someone else.
            raise ConfigurationError(f"the broker addresses log in as different users ({', '.join(logins)}); "
                                     f"give every address of one container the same login")
        if not 0 <= reconnect_jitter <= 1:
            raise ConfigurationError(f"reconnect_jitter must be from 0 to 1, not {reconnect_jitter!r}")
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        #: The broker addresses, tried in turn; ``url`` is the one in use (or last used).
        self.urls: list[BrokerURL] = urls
        self._url_index = 0
        self.user = urls[0].username
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.reconnect_jitter = reconnect_jitter
        self.rng = rng
        self.reconnect_enabled = reconnect
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.confirm = confirm
        #: ``new`` → ``connecting`` → ``connected`` ⇄ (``lost`` → ``restoring``) → ``closed``.
        self.state = "new"
        #: After a reconnection, once the exchanges, queues and bindings are declared again: the
        #: consumers are being restored, and what they hand over may be answered at once.
        self._topology_restored = False
        self._conn: _Connection | None = None
        self._control = _ChannelSlot(self, "control")
        #: Publishes that ask for a confirm (confirm mode).
        self._publisher = _ChannelSlot(self, "confirm", self._setup_publisher)
        #: Publishes without a confirm: requests and replies of conversations.
        self._fast = _ChannelSlot(self, "publish", self._setup_fast)
        self._unconfirmed: dict[TwistedChannel, _SentLog] = {}
        #: Method frames of the fast publish path, by (channel number, exchange, routing key, mandatory).
        self._method_frames: dict[tuple[int, str, str, bool], bytes] = {}
        self._control_lock = defer.DeferredLock()
        # Topology record, replayed after a reconnection (insertion-ordered).
        self._exchanges: dict[str, tuple[str, bool, bool]] = {}
        self._queues: dict[str, tuple[bool, bool, bool, dict[str, Any] | None]] = {}
        self._bindings: dict[tuple[str, str, str], None] = {}
        self._consumers: dict[str, _Consumer] = {}
        # Consumers holding acknowledgements gathered during the current read.
        self._acking: dict[_Consumer, None] = {}
        self._deleted_while_lost: dict[str, None] = {}
        # Exchanges known to exist on the current connection (checked before a first publish).
        self._known_exchanges: set[str] = set()
        self._exchange_checks: dict[str, list[defer.Deferred[None]]] = {}
        self._reconnect_call: Any = None  # IDelayedCall
        self._attempt = 0
        self._next_index = 0
        self._last_loss: str | None = None
        self._id_prefix = uuid.uuid4().hex[:12]
        self._message_ids = itertools.count(1)
        self._tags = itertools.count(1)
        self.reconnections = 0

    @classmethod
    def from_config(cls, url: BrokerURL | str | Sequence[BrokerURL | str],
                    config: MessagingSettings | Mapping[str, Any], *, reactor: Any = None) -> AmqpTransport:
        """A transport for ``url`` (one or several) with the settings of the ``ion.core.messaging``
        config section (:class:`~ion.core.settings.MessagingSettings`, or the section itself):
        ``publisher_confirms`` (bool, default true: what ``publish(confirm=None)`` does),
        ``reconnect_initial`` and ``reconnect_max`` (seconds), ``reconnect_jitter`` (0-1),
        ``heartbeat`` (seconds; 0 = none; None = the broker's choice).

        :raises ConfigurationError: naming the setting whose value is unusable.
        """
        s = config if isinstance(config, MessagingSettings) else MessagingSettings.from_config(config)
        return cls(url, reactor=reactor, confirm=s.publisher_confirms, reconnect_initial=s.reconnect_initial,
                   reconnect_max=max(s.reconnect_initial, s.reconnect_max), reconnect_jitter=s.reconnect_jitter,
                   heartbeat=None if s.heartbeat is None else int(s.heartbeat))

    @property
    def url(self) -> BrokerURL:
        """The broker address in use (or last used, or the next to try before the first connection)."""
        return self.urls[self._url_index]

    @url.setter
    def url(self, value: BrokerURL) -> None:
        self.urls[self._url_index] = value

    def __repr__(self) -> str:
        return f"<AmqpTransport {self.url} {self.state} consumers={len(self._consumers)}>"

    @property
    def where(self) -> str:
        """``host:port`` of the broker, for messages."""
        return self._where(self.url)

    @staticmethod
    def _where(url: BrokerURL) -> str:
        return f"{url.host}:{url.port}"

    @property
    def open_channels(self) -> int:
        """How many channels are open on the connection now (control, publish, one per consumer)."""
        conn = self._conn
        if conn is None:
            return 0
        channels = getattr(conn._impl, "_channels", {})
        return sum(1 for ch in channels.values() if ch.is_open)

    @property
    def connected(self) -> bool:
        """True while operations can be sent to the broker (publishes, too, while the consumers are
        restored after a reconnection: see the module doc)."""
        return self.state == "connected"

    @property
    def server_properties(self) -> dict[str, Any]:
        """What the broker told of itself when the connection opened (``product``, ``version``,
        ``cluster_name`` ...); empty while not connected."""
        conn = self._conn
        props = getattr(getattr(conn, "_impl", None), "server_properties", None) if conn is not None else None
        return dict(props) if isinstance(props, Mapping) else {}

    # -- connecting ---------------------------------------------------------------------
    def connect(self) -> defer.Deferred[None]:
        """Open the connection.

        Fails with :class:`TransportError` naming the broker and the reason
        (refused login, vhost refused, nothing listening, timeout); the first
        connection is not retried, so a wrong password gives one clear error.
        Given several addresses, it tries each in turn until one answers, and
        fails (naming each address and its reason) only if none does.
        """
        if self.state == "connected":
            return defer.succeed(None)
        if self.state != "new":
            return defer.fail(TransportError(f"cannot connect a transport that is {self.state}"))
        self.state = "connecting"
        d = defer.ensureDeferred(self._connect_any())

        def opened(conn: _Connection) -> None:
            if self.state == "closed":  # close() was called while connecting
                conn.close()
                raise TransportError(f"the connection to broker at {self.where} was closed while opening")
            self._use_connection(conn)
            self.state = "connected"
            self._log.info("connected to broker at {where} vhost {vhost!r} as {user}",
                           where=self.where, vhost=self.url.vhost, user=self.user)

        def failed(f: Failure) -> Failure:
            if self.state == "connecting":
                self.state = "new"
            return f

        return d.addCallbacks(opened, failed)

    async def _connect_any(self) -> _Connection:
        """Open a connection to the first address that answers, trying each once from the first."""
        errors: list[TransportError] = []
        for index, url in enumerate(self.urls):
            if self.state == "closed":
                break
            try:
                conn: _Connection = await self._open_connection(url)
            except TransportError as exc:
                errors.append(exc)
                if index + 1 < len(self.urls):
                    self._log.warn("{e}; trying the next broker address", e=exc)
                continue
            self._use_url(index)
            return conn
        if len(errors) == 1 and len(self.urls) == 1:
            raise errors[0]
        if not errors:
            raise TransportError(f"the connection to broker at {self.where} was closed while opening")
        raise TransportError(f"no broker of {len(self.urls)} could be reached: "
                             + "; ".join(str(e) for e in errors))

    def _use_url(self, index: int) -> None:
        """From now on the transport is connected to ``urls[index]`` (and publishes as its login)."""
        self._url_index = index
        self.user = self.urls[index].username

    def _params(self, url: BrokerURL) -> pika.ConnectionParameters:
        kwargs: dict[str, Any] = {}
        if self.heartbeat is not None:
            kwargs["heartbeat"] = self.heartbeat
        return pika.ConnectionParameters(
            host=url.host, port=url.port, virtual_host=url.vhost,
            credentials=pika.PlainCredentials(url.username, url.password),
            client_properties={"connection_name": f"ioncore {self._id_prefix}", "product": "ioncore"},
            **kwargs)

    def _endpoint(self, url: BrokerURL) -> Any:
        if url.scheme == "amqps":
            from twisted.internet import ssl

            options = ssl.optionsForClientTLS(url.host)
            return SSL4ClientEndpoint(self.reactor, url.host, url.port, options, timeout=self.connect_timeout)
        return TCP4ClientEndpoint(self.reactor, url.host, url.port, timeout=self.connect_timeout)

    def _open_connection(self, url: BrokerURL) -> defer.Deferred[_Connection]:
        conn = _Connection(self._params(url), custom_reactor=self.reactor)
        # As endpoints.connectProtocol, with a quiet factory: no "Starting/Stopping factory"
        # log lines at every (re)connection attempt.
        factory = protocol.Factory.forProtocol(lambda: conn)
        factory.noisy = False
        d = self._endpoint(url).connect(factory)
        d.addCallback(lambda _: conn.ready)
        d.addCallback(lambda _: conn)
        d.addErrback(self._connect_failed, conn, url)
        return d

    def _connect_failed(self, f: Failure, conn: _Connection, url: BrokerURL) -> Failure:
        cause = conn.close_reason or conn.open_error or f.value
        where, user, vhost = self._where(url), url.username, url.vhost
        refused_login = f"broker at {where} refused login for user {user!r} (wrong user name or password?)"
        refused_vhost = f"broker at {where} refused user {user!r} access to vhost {vhost!r}"
        if isinstance(cause, pika_exc.ConnectionClosedByBroker):
            if cause.reply_code == 403 and "login" in cause.reply_text.lower():
                msg = refused_login
            elif cause.reply_code in (403, 530) and "vhost" in cause.reply_text.lower():
                msg = f"{refused_vhost}: {cause.reply_text}"
            else:
                msg = f"broker at {where} closed the connection: {cause.reply_code} {cause.reply_text}"
        elif isinstance(cause, (pika_exc.ProbableAuthenticationError, pika_exc.AuthenticationError)):
            msg = refused_login
        elif isinstance(cause, pika_exc.ProbableAccessDeniedError):
            msg = refused_vhost
        elif isinstance(cause, tx_error.ConnectionRefusedError):
            msg = f"cannot connect to broker at {where}: connection refused (is RabbitMQ running?)"
        elif isinstance(cause, (tx_error.TimeoutError, defer.TimeoutError)):
            msg = f"cannot connect to broker at {where}: no answer within {self.connect_timeout:g} s"
        elif isinstance(cause, tx_error.DNSLookupError):
            msg = f"cannot connect to broker at {where}: unknown host"
        elif isinstance(cause, pika_exc.IncompatibleProtocolError):
            msg = f"{where} does not speak AMQP 0-9-1"
        else:
            msg = f"cannot connect to broker at {where}: {cause!r}"
        return Failure(TransportError(msg))

    def _use_connection(self, conn: _Connection) -> None:
        self._conn = conn
        self._attempt = 0
        # Small request/reply frames: do not let Nagle hold them back (pika's own adapters do the same).
        set_no_delay = getattr(conn.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        conn.after_read = self._send_gathered_acks
        assert conn.closed is not None
        conn.closed.addCallback(self._connection_closed, conn)

    # -- losing and restoring the connection ------------------------------------------------
    def _lost_error(self) -> ConnectionLostError:
        if self.state == "closed":
            return ConnectionLostError(f"the connection to broker at {self.where} is closed")
        reason = f" ({self._last_loss})" if self._last_loss else ""
        return ConnectionLostError(f"not connected to broker at {self.where}{reason}; reconnecting")

    def _connection_closed(self, reason: Any, conn: _Connection) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        self._control.reset()
        self._publisher.reset()
        self._fast.reset()
        self._unconfirmed.clear()
        self._known_exchanges.clear()
        self._acking.clear()
        for consumer in self._consumers.values():
            consumer.use(None)
        if self.state == "closed":
            return
        if conn.close_reason is not None:
            reason = conn.close_reason
        if isinstance(reason, pika_exc.ConnectionClosed):
            text = f"{reason.reply_code} {reason.reply_text}"
        else:
            text = str(reason) or type(reason).__name__
        self._last_loss = text
        self.state = "lost"
        self._log.warn("lost the connection to broker at {where}: {reason}", where=self.where, reason=text)
        # The next attempt goes to the next address (the same one when there is only one).
        self._next_index = (self._url_index + 1) % len(self.urls)
        self._notify("lost", text)
        if self.reconnect_enabled:
            self._schedule_reconnect()

    def _notify(self, event: str, reason: str | None) -> None:
        for listener in list(self._connection_listeners):
            try:
                listener(event, reason)
            except Exception:
                self._log.failure("connection listener failed on {event}", event=event)

    def _schedule_reconnect(self) -> None:
        delay = reconnect_delay(self._attempt, self.reconnect_initial, self.reconnect_max, self.reconnect_jitter,
                                self.rng)
        self._attempt += 1
        self._log.info("reconnecting to broker at {where} in {delay:.3g} s (attempt {attempt})",
                       where=self._where(self.urls[self._next_index]), delay=delay, attempt=self._attempt)
        self._reconnect_call = self.clock.callLater(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._reconnect_call = None
        if self.state != "lost":
            return
        self.state = "connecting"
        index = self._next_index
        d = self._open_connection(self.urls[index])
        d.addCallbacks(self._reconnected, self._reconnect_failed, callbackArgs=(index,), errbackArgs=(index,))

    def _reconnect_failed(self, f: Failure, index: int) -> None:
        if self.state == "closed":
            return
        self.state = "lost"
        self._log.warn("reconnection to broker at {where} failed: {e}", where=self._where(self.urls[index]),
                       e=f.getErrorMessage())
        self._next_index = (index + 1) % len(self.urls)
        self._schedule_reconnect()

    def _reconnected(self, conn: _Connection, index: int) -> None:
        if self.state == "closed":
            conn.close()
            return
        attempts = self._attempt
        self._use_url(index)
        self._use_connection(conn)
        self.state = "restoring"
        self._topology_restored = False
        d = self._restore()

        def restored(_: Any) -> None:
            if self._conn is not conn or self.state != "restoring":
                return  # lost again while restoring: the next reconnection restores
            self.state = "connected"
            self.reconnections += 1
            self._log.info("reconnected to broker at {where} after {n} attempt(s); {q} queues, "
                           "{c} consumers restored", where=self.where, n=attempts, q=len(self._queues),
                           c=len(self._consumers))
            self._notify("restored", None)

        d.addCallback(restored)
        d.addErrback(lambda f: self._log.failure("restoring the topology failed", f))

    @defer.inlineCallbacks
    def _restore(self) -> Any:
        """Re-declare what this transport made, then re-create its consumers."""
        conn = self._conn
        for name in list(self._deleted_while_lost):
            yield self._restore_step(f"delete queue {name}", "queue_delete", queue=name)
        self._deleted_while_lost.clear()
        for name, (kind, durable, auto_delete) in list(self._exchanges.items()):
            ok = yield self._restore_step(f"exchange {name}", "exchange_declare", exchange=name,
                                          exchange_type=kind, durable=durable, auto_delete=auto_delete)
            if ok:
                self._known_exchanges.add(name)
        for name, (durable, exclusive, auto_delete, arguments) in list(self._queues.items()):
            yield self._restore_step(f"queue {name}", "queue_declare", queue=name, durable=durable,
                                     exclusive=exclusive, auto_delete=auto_delete, arguments=arguments)
        for queue, exchange, key in list(self._bindings):
            yield self._restore_step(f"binding {queue} <- {exchange} [{key}]", "queue_bind", queue=queue,
                                     exchange=exchange, routing_key=key)
        # Publishing is open from here: a consumer restored below may be handed a request at once (one
        # waiting in its queue), and its answer must not be refused as "not connected" while the later
        # consumers are restored, then lost with the request acknowledged.
        if self._conn is not conn or conn is None:
            return  # lost again meanwhile: the next reconnection restores
        self._topology_restored = True
        for consumer in list(self._consumers.values()):
            if self._conn is None:
                return
            try:
                yield self._start_consumer(consumer)
            except Exception as exc:
                self._log.error("could not restore {consumer}: {exc}", consumer=consumer, exc=exc)

    @defer.inlineCallbacks
    def _restore_step(self, what: str, method: str, **kwargs: Any) -> Any:
        """Run ``channel.<method>(**kwargs)`` on the control channel; log (and go on) if it fails."""
        if self._conn is None:
            return False
        try:
            yield self._control_lock.run(self._on_control, lambda ch: getattr(ch, method)(**kwargs))
        except Exception as exc:
            self._log.error("could not restore {what}: {exc}", what=what, exc=exc)
            return False
        return True

    # -- running operations ------------------------------------------------------------------
    def _map_error(self, f: Failure) -> Failure:
        """Turn a pika/Twisted failure into TransportError / ConnectionLostError with the broker's text."""
        exc = f.value
        if isinstance(exc, TransportError):
            return f
        if isinstance(exc, pika_exc.ChannelClosedByBroker):
            err = TransportError(exc.reply_text)
            err.reply_code = exc.reply_code  # type: ignore[attr-defined]
            return Failure(err)
        if isinstance(exc, _CONNECTION_ERRORS) or self._conn is None or not self._conn.is_open:
            return Failure(self._lost_error())
        if isinstance(exc, (pika_exc.ChannelClosed, pika_exc.ChannelWrongStateError)):
            return Failure(TransportError(f"channel closed: {exc!r}"))
        return Failure(TransportError(f"{type(exc).__name__}: {exc}"))

    def _check_publish(self) -> None:
        """:meth:`_check`, also passing while the consumers are restored after a reconnection."""
        if self.state == "restoring" and self._topology_restored and self._conn is not None:
            return
        self._check()

    def _check(self) -> None:
        if self.state != "connected":
            if self.state == "new":
                raise TransportError(f"not connected to broker at {self.where}: call connect() first")
            raise self._lost_error()

    def _on_control(self, op: Callable[[TwistedChannel], Any]) -> defer.Deferred[Any]:
        d = self._control.get()
        d.addCallback(op)
        d.addErrback(self._map_error)
        return d

    def _control_op(self, op: Callable[[TwistedChannel], Any]) -> defer.Deferred[Any]:
        """Run ``op(channel)`` on the control channel, one at a time (see the module doc)."""
        try:
            self._check()
        except TransportError:
            return defer.fail()
        return self._control_lock.run(self._on_control, op)

    # -- topology ---------------------------------------------------------------------------------
    def declare_exchange(self, name: str, kind: str = "topic", *, durable: bool = False,
                         auto_delete: bool = False) -> defer.Deferred[None]:
        if kind not in _EXCHANGE_KINDS:
            return defer.fail(TransportError(f"exchange type {kind!r} is not supported"))

        def done(_: Any) -> None:
            self._exchanges[name] = (kind, durable, auto_delete)
            self._known_exchanges.add(name)

        d = self._control_op(lambda ch: ch.exchange_declare(
            exchange=name, exchange_type=kind, durable=durable, auto_delete=auto_delete))
        return d.addCallback(done)

    def declare_queue(self, name: str, *, durable: bool = False, exclusive: bool = False,
                      auto_delete: bool = False,
                      arguments: dict[str, Any] | None = None) -> defer.Deferred[str]:
        args = dict(arguments) if arguments else None

        def done(frame: Any) -> str:
            actual = frame.method.queue
            self._queues[actual] = (durable, exclusive, auto_delete, args)
            self._deleted_while_lost.pop(actual, None)
            return str(actual)

        d = self._control_op(lambda ch: ch.queue_declare(
            queue=name, durable=durable, exclusive=exclusive, auto_delete=auto_delete, arguments=args))
        return d.addCallback(done)

    def queue_depth(self, name: str) -> defer.Deferred[tuple[int, int] | None]:
        def counted(frame: Any) -> tuple[int, int]:
            return int(frame.method.message_count), int(frame.method.consumer_count)

        def missing(f: Failure) -> Any:
            if f.check(TransportError) and getattr(f.value, "reply_code", None) == 404:
                return None  # NOT_FOUND (the control channel is reopened for the next operation)
            return f

        d = self._control_op(lambda ch: ch.queue_declare(queue=name, passive=True))
        return d.addCallbacks(counted, missing)

    def _forget_queue(self, name: str) -> None:
        self._queues.pop(name, None)
        for key in [k for k in self._bindings if k[0] == name]:
            del self._bindings[key]
        for consumer in [c for c in self._consumers.values() if c.queue == name]:
            self._drop_consumer(consumer)

    def delete_queue(self, name: str) -> defer.Deferred[None]:
        if self.state in ("lost", "connecting", "restoring"):
            # Do it when the connection is back; never restore the queue meanwhile.
            self._forget_queue(name)
            self._deleted_while_lost[name] = None
            return defer.succeed(None)

        def done(_: Any) -> None:
            self._forget_queue(name)

        def not_found(f: Failure) -> Any:
            if getattr(f.value, "reply_code", None) == 404:
                self._forget_queue(name)
                return None
            return f

        d = self._control_op(lambda ch: ch.queue_delete(queue=name))
        return d.addCallbacks(done, not_found)

    def bind(self, queue: str, exchange: str, routing_key: str) -> defer.Deferred[None]:
        def done(_: Any) -> None:
            self._bindings[(queue, exchange, routing_key)] = None

        d = self._control_op(lambda ch: ch.queue_bind(queue=queue, exchange=exchange, routing_key=routing_key))
        return d.addCallback(done)

    def unbind(self, queue: str, exchange: str, routing_key: str) -> defer.Deferred[None]:
        self._bindings.pop((queue, exchange, routing_key), None)
        if self.state in ("lost", "connecting", "restoring"):
            return defer.succeed(None)

        def not_found(f: Failure) -> Any:
            # As on the embedded broker: unbinding what is not there is no error.
            return None if getattr(f.value, "reply_code", None) == 404 else f

        d = self._control_op(lambda ch: ch.queue_unbind(queue=queue, exchange=exchange, routing_key=routing_key))
        return d.addCallbacks(lambda _: None, not_found)

    # -- publishing ------------------------------------------------------------------------------
    def _setup_publisher(self, ch: TwistedChannel) -> defer.Deferred[Any]:
        ch.add_on_return_callback(self._returned)
        return ch.confirm_delivery()

    def _setup_fast(self, ch: TwistedChannel) -> None:
        ch.add_on_return_callback(self._returned)
        self._unconfirmed[ch] = _SentLog()
        ch.on_closed.addCallback(self._fast_closed, ch)

    def _fast_closed(self, reason: Any, ch: TwistedChannel) -> None:
        """The publish channel closed: if the broker closed it with an error, what it may have
        dropped goes to the refused callbacks, with the broker's reason."""
        log = self._unconfirmed.pop(ch, None)
        if log is None or not isinstance(reason, pika_exc.ChannelClosedByBroker):
            return  # closed by us, or with the connection (the connection listeners hear of that)
        error = TransportError(reason.reply_text)
        error.reply_code = reason.reply_code  # type: ignore[attr-defined]
        self._log.warn("broker at {where} closed the publish channel: {code} {text}; {n} message(s) "
                       "published on it without a confirm are taken as refused", where=self.where,
                       code=reason.reply_code, text=reason.reply_text, n=len(log.sent))
        for exchange, routing_key, props in log.sent:
            try:
                self._notify_refused(exchange, routing_key, props, error)
            except Exception:
                self._log.failure("a refused callback failed for {key}", key=routing_key)

    def _fence(self, ch: TwistedChannel, log: _SentLog) -> None:
        """Forget the messages sent so far once the broker answers a ``basic.qos`` sent after them."""
        log.fencing = True
        n = len(log.sent)
        try:
            d = ch.basic_qos(prefetch_count=0)
        except Exception:
            log.fencing = False
            return
        d.addCallbacks(lambda _: log.fenced(n), lambda _: None)

    def _returned(self, msg: Any) -> None:
        method = msg.method
        try:
            self._notify_return(method.exchange, method.routing_key, _from_pika(msg.properties))
        except Exception:
            self._log.failure("a return callback failed for {key}", key=method.routing_key)

    def _exchange_exists(self, exchange: str) -> defer.Deferred[None] | None:
        """None if ``exchange`` is known to exist, else a Deferred checking it (passive declare)."""
        if not exchange or exchange in self._known_exchanges or exchange.startswith("amq."):
            return None
        d: defer.Deferred[None] = defer.Deferred()
        waiters = self._exchange_checks.get(exchange)
        if waiters is not None:
            waiters.append(d)
            return d
        waiters = self._exchange_checks[exchange] = [d]

        def checked(result: Any) -> None:
            self._exchange_checks.pop(exchange, None)
            if not isinstance(result, Failure):
                self._known_exchanges.add(exchange)
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)

        self._control_lock.run(
            self._on_control, lambda ch: ch.exchange_declare(exchange=exchange, passive=True)).addBoth(checked)
        return d

    def publish(self, exchange: str, routing_key: str, body: bytes, properties: Properties,
                *, mandatory: bool = False, confirm: bool | None = None) -> defer.Deferred[None]:
        """Publish ``body``; with a confirm on the confirm channel, else on the publish channel
        (see :meth:`Transport.publish <ion.core.messaging.transport.Transport.publish>` and the
        module doc)."""
        try:
            self._check_publish()
        except TransportError:
            return defer.fail()
        # RabbitMQ checks user_id against the connection's login: this is who really sends.
        # The caller's Properties are left alone (they may be reused for the next publish).
        pika_props = _to_pika(properties, self.user,
                              properties.message_id or f"{self._id_prefix}.{next(self._message_ids)}")
        slot = self._publisher if (self.confirm if confirm is None else confirm) else self._fast
        check = self._exchange_exists(exchange)
        ch = slot.current()
        send = self._send if slot is self._fast else self._send_confirmed
        if check is None and ch is not None:
            d = send(ch, exchange, routing_key, body, pika_props, mandatory)
        else:
            d = check if check is not None else defer.succeed(None)
            d.addCallback(lambda _: slot.get())
            d.addCallback(send, exchange, routing_key, body, pika_props, mandatory)
        return d.addCallbacks(lambda _: None, self._publish_failed)

    def _send_confirmed(self, ch: TwistedChannel, exchange: str, routing_key: str, body: bytes,
                        props: pika.BasicProperties, mandatory: bool) -> defer.Deferred[Any]:
        """:meth:`_send` on the confirm channel ``ch``, retired if the broker refuses the message."""
        def refused(f: Failure) -> Failure:
            if f.check(pika_exc.NackError):
                self._publisher.retire(ch, RETIRED_CHANNEL_CLOSE)
            return f

        return self._send(ch, exchange, routing_key, body, props, mandatory).addErrback(refused)

    def publish_now(self, exchange: str, routing_key: str, body: bytes, properties: Properties,
                    *, mandatory: bool = False, confirm: bool | None = None) -> defer.Deferred[None] | None:
        """:meth:`publish`, returning None once a message without a confirm is written on the open
        publish channel to an exchange known to exist (requests and replies): no Deferred made.
        Anything else (a confirm, an exchange to check, no channel yet, not connected) goes
        through :meth:`publish`; a publish pika refuses here answers a failed Deferred."""
        if (self.confirm if confirm is None else confirm) or self.state != "connected" or (
                exchange and exchange not in self._known_exchanges and not exchange.startswith("amq.")):
            return self.publish(exchange, routing_key, body, properties, mandatory=mandatory, confirm=confirm)
        ch = self._fast.channel
        # pika's own channel under the adapter's wrapper: its basic_publish writes the frames
        # (the wrapper's adds an already fired Deferred). Without it, the wrapper's way.
        impl = getattr(ch, "_channel", None)
        if ch is None or impl is None or not impl.is_open or ch._closed is not None:
            return self.publish(exchange, routing_key, body, properties, mandatory=mandatory, confirm=confirm)
        # The caller gave ``properties`` up: stamped with who really sends (RabbitMQ checks user_id
        # against the connection's login) and kept in the publish channel's log.
        properties.user_id = self.user
        if not properties.message_id:
            properties.message_id = f"{self._id_prefix}.{next(self._message_ids)}"
        try:
            self._send_now(ch, impl, exchange, routing_key, body, properties, mandatory)
        except Exception:
            return defer.fail().addCallbacks(lambda _: None, self._publish_failed)
        return None

    def _send_now(self, ch: TwistedChannel, impl: Any, exchange: str, routing_key: str, body: bytes,
                  props: Properties, mandatory: bool) -> None:
        """:meth:`_send` on the publish channel ``ch`` through its pika channel ``impl``, no Deferred: its
        frames made by :func:`publish_frames` (pika's ``basic_publish`` makes the same bytes, at several
        times the cost) and written through pika's output, counted as pika counts its own."""
        number = impl.channel_number
        key = (number, exchange, routing_key, mandatory)
        method = self._method_frames.get(key)
        if method is None:
            if len(self._method_frames) >= _REPEATED_MAX:
                self._method_frames.clear()
            method = self._method_frames[key] = publish_method_frame(number, exchange, routing_key, mandatory)
        conn = impl.connection
        if type(body) is not bytes:
            body = bytes(body)
        data = publish_frames(number, exchange, routing_key, mandatory, props, body, conn._body_max_length, method)
        conn.bytes_sent += len(data)
        conn.frames_sent += 2 + (len(body) + conn._body_max_length - 1) // conn._body_max_length
        conn._adapter_emit_data(data)
        log = self._unconfirmed.get(ch)
        if log is not None:
            log.sent.append((exchange, routing_key, props))
            if len(log.sent) >= FENCE_EVERY and not log.fencing:
                self._fence(ch, log)

    def _send(self, ch: TwistedChannel, exchange: str, routing_key: str, body: bytes,
              props: pika.BasicProperties, mandatory: bool) -> defer.Deferred[Any]:
        d = ch.basic_publish(exchange=exchange, routing_key=routing_key, body=body, properties=props,
                             mandatory=mandatory)
        log = self._unconfirmed.get(ch)
        if log is not None and ch.is_open:
            log.sent.append((exchange, routing_key, _from_pika(props)))
            if len(log.sent) >= FENCE_EVERY and not log.fencing:
                self._fence(ch, log)
        return d

    def _publish_failed(self, f: Failure) -> Any:
        if f.check(pika_exc.UnroutableError):
            return None  # a mandatory message nobody took: reported through the return callbacks
        if f.check(pika_exc.NackError):
            return Failure(MessageRefusedError("the broker refused the message (basic.nack)"))
        return self._map_error(f)

    # -- consuming --------------------------------------------------------------------------------
    def consume(self, queue: str, callback: ConsumeCallback, *, prefetch: int = 1,
                exclusive: bool = False, auto_ack: bool = False) -> defer.Deferred[str]:
        try:
            self._check()
        except TransportError:
            return defer.fail()
        tag = f"ion.{self._id_prefix}.{next(self._tags)}"
        consumer = _Consumer(tag, queue, callback, prefetch, exclusive, auto_ack)
        d = self._start_consumer(consumer)

        def started(_: Any) -> str:
            self._consumers[tag] = consumer
            return tag

        return d.addCallback(started)

    def _start_consumer(self, consumer: _Consumer) -> defer.Deferred[None]:
        """Open the consumer's own channel, set its prefetch, and start consuming."""
        conn = self._conn
        if conn is None or not conn.is_open:
            return defer.fail(self._lost_error())
        channel: list[TwistedChannel] = []

        def opened(ch: TwistedChannel) -> Any:
            channel.append(ch)
            if consumer.prefetch > 0 and not consumer.auto_ack:
                return ch.basic_qos(prefetch_count=consumer.prefetch)
            return None

        def consume(_: Any) -> Any:
            return channel[0].basic_consume(queue=consumer.queue, auto_ack=consumer.auto_ack, exclusive=consumer.exclusive,
                                            consumer_tag=consumer.tag)

        def consuming(result: tuple[ClosableDeferredQueue, str]) -> None:
            queue_obj, _tag = result
            ch = channel[0]
            if conn is not self._conn or consumer.cancelled:
                self._close_channel(ch)
                return
            consumer.use(ch)
            self._attach(consumer, ch, queue_obj)

        def failed(f: Failure) -> Failure:
            if channel:
                self._close_channel(channel[0])
            return self._map_error(f)

        d = defer.maybeDeferred(conn.channel)
        d.addCallback(opened)
        d.addCallback(consume)
        d.addCallbacks(consuming, failed)
        return d

    def _attach(self, consumer: _Consumer, ch: TwistedChannel, queue_obj: ClosableDeferredQueue) -> None:
        """Hand ``consumer`` each delivery of ``ch`` as pika reads it, with no Deferred in between.

        pika's Twisted adapter puts every delivery into the consumer's ``ClosableDeferredQueue``
        and closes that queue when the consumer or its channel ends; a ``get()`` per delivery
        makes a Deferred and runs its callbacks and the queue's own (with the publish's
        Deferreds, ~7 µs CPU per message a side on RabbitMQ, measured A/B). This
        queue object's ``put`` and ``close`` are replaced, on this instance only, by the
        delivery and the stop of the consumer: what a ``get()`` loop would do, minus the
        Deferreds. What arrived before (none, in practice: the deliveries follow consume-ok)
        is delivered first.
        """
        deliver = self._deliver
        log = self._log

        def take(tag: int, redelivered: bool, exchange: str, routing_key: str, props: Properties,
                 body: bytes) -> None:
            if consumer.channel is not ch:
                # The consumer moved on: the broker has this channel's unacknowledged deliveries back
                # (an auto-acked one is lost with the channel, as the broker counted it delivered).
                log.debug("{queue}: a delivery on a channel its consumer left was dropped", queue=consumer.queue)
                return
            try:
                deliver(consumer, ch, tag, redelivered, exchange, routing_key, props, body)
            except Exception:
                log.failure("delivery to {consumer} failed", consumer=consumer)

        def put(msg: Any) -> None:
            method = msg.method
            take(method.delivery_tag, bool(method.redelivered), method.exchange, method.routing_key,
                 _from_pika(msg.properties), msg.body)

        impl = getattr(ch, "_channel", None)
        conn = self._conn
        if impl is not None and conn is not None:
            # Its deliveries decoded by the connection as they are read (see _Connection._read).
            conn.takers[(impl.channel_number, consumer.tag)] = (impl, take)

        def close(reason: Any) -> None:
            queue_obj.closed = reason if reason is not None else pika_exc.ChannelClosed(0, "closed")
            queue_obj.pending = []
            if impl is not None and conn is not None:
                conn.takers.pop((impl.channel_number, consumer.tag), None)
            if consumer.channel is ch:
                error = queue_obj.closed
                self._consumer_stopped(Failure(error if isinstance(error, BaseException) else
                                               pika_exc.ChannelClosed(0, str(error))), consumer, ch)

        waiting, queue_obj.pending = list(queue_obj.pending), []
        queue_obj.put = put
        queue_obj.close = close
        for msg in waiting:
            put(msg)
        if queue_obj.closed is not None:
            close(queue_obj.closed)

    def _deliver(self, consumer: _Consumer, ch: TwistedChannel, tag: int, redelivered: bool, exchange: str,
                 routing_key: str, props: Properties, body: bytes) -> None:
        if consumer.cancelled:
            # Arrived between basic.cancel and cancel-ok: give it back for another consumer
            # (with auto_ack the broker has counted it acknowledged already: it is dropped).
            if consumer.auto_ack:
                self._log.info("{queue}: dropped a delivery that arrived after its consumer was cancelled",
                               queue=consumer.queue)
            else:
                self._settle_on(ch, tag, ack=False, requeue=True, queue=consumer.queue)
            return
        settle: Callable[[bool, bool], None] | None = None
        if not consumer.auto_ack:
            consumer.unacked += 1
            consumer.outstanding[tag] = None
            settle = partial(self._settle, consumer, ch, tag)  # (ack, requeue): no Python frame of its own

        delivery = Delivery(body, props, exchange, routing_key, redelivered, settle)
        try:
            consumer.callback(delivery)
        except Exception:
            self._log.failure("consumer callback for {queue} raised", queue=consumer.queue)

    def _settle(self, consumer: _Consumer, ch: TwistedChannel, tag: int, ack: bool, requeue: bool) -> None:
        if consumer.channel is not ch or ch is None or not ch.is_open:
            # The channel that delivered it is gone (connection lost, consumer restarted):
            # the broker has requeued the message already. Never raise into the caller.
            self._log.info("cannot {what} delivery {tag} from {queue}: its channel is gone; the broker "
                           "redelivers it", what="ack" if ack else "reject", tag=tag, queue=consumer.queue)
            return
        consumer.unacked -= 1
        consumer.outstanding.pop(tag, None)
        conn = self._conn
        if ack and conn is not None and conn.reading:
            # Handled while pika reads what the broker sent (a prefetch window's worth at
            # times): acknowledged after that read, the run of lowest tags by one multiple ack.
            consumer.acks.append(tag)
            self._acking[consumer] = None
        else:
            self._settle_on(ch, tag, ack=ack, requeue=requeue, queue=consumer.queue)
        if consumer.cancelled and consumer.unacked <= 0 and not consumer.cancelling:
            self._close_consumer_channel(consumer, ch)

    def _send_gathered_acks(self) -> None:
        if not self._acking:
            return
        acking, self._acking = self._acking, {}
        for consumer in acking:
            if consumer.channel is not None:
                self._send_acks(consumer, consumer.channel)

    def _send_acks(self, consumer: _Consumer, ch: TwistedChannel) -> None:
        """Send ``consumer``'s gathered acks: one ``multiple`` ack for those below every unsettled
        delivery (nothing else below them is left unsettled), one each for the rest."""
        tags, consumer.acks = consumer.acks, []
        if not tags:
            return
        lowest = next(iter(consumer.outstanding), None)
        below = [t for t in tags if lowest is None or t < lowest]
        try:
            if below:
                ch.basic_ack(delivery_tag=max(below), multiple=len(below) > 1)
            for t in tags:
                if lowest is not None and t > lowest:
                    ch.basic_ack(delivery_tag=t)
        except Exception as exc:
            self._log.info("could not acknowledge deliveries {tags} from {queue}: {exc}", tags=tags,
                           queue=consumer.queue, exc=exc)

    def _close_consumer_channel(self, consumer: _Consumer, ch: TwistedChannel) -> None:
        """Close the channel of a cancelled consumer, after sending the acks gathered for it."""
        if ch.is_open:
            self._send_acks(consumer, ch)
        consumer.use(None)
        self._close_channel(ch)

    def _settle_on(self, ch: TwistedChannel, tag: int, *, ack: bool, requeue: bool, queue: str) -> None:
        try:
            if ack:
                ch.basic_ack(delivery_tag=tag)
            else:
                ch.basic_reject(delivery_tag=tag, requeue=requeue)
        except Exception as exc:
            self._log.info("could not settle delivery {tag} from {queue}: {exc}", tag=tag, queue=queue, exc=exc)

    def _consumer_stopped(self, f: Failure, consumer: _Consumer, ch: TwistedChannel) -> None:
        if consumer.channel is not ch or consumer.cancelled:
            return  # cancelled by us: the channel stays until its deliveries are settled
        consumer.use(None)  # the broker has the deliveries of the dead channel back
        conn = self._conn
        if conn is None or not conn.is_open or self.state == "closed" or f.check(*_CONNECTION_ERRORS):
            return  # the connection is gone: the consumer is restored on reconnection
        if f.check(pika_exc.ConsumerCancelled):
            # The broker cancelled it: its queue was deleted. As on the embedded broker, it just ends.
            self._log.info("broker cancelled {consumer} (queue deleted?)", consumer=consumer)
            self._consumers.pop(consumer.tag, None)
            self._close_channel(ch)
            return
        # The channel died under the consumer (a channel error): consume again on a new one.
        self._log.warn("{consumer} lost its channel ({e}); consuming again", consumer=consumer,
                       e=f.getErrorMessage())
        self._start_consumer(consumer).addErrback(
            lambda err: self._log.error("could not restart {consumer}: {e}", consumer=consumer,
                                        e=err.getErrorMessage()))

    def _drop_consumer(self, consumer: _Consumer) -> None:
        """Forget a consumer whose queue is gone; its channel closes once nothing is left to settle."""
        consumer.cancelled = True
        self._consumers.pop(consumer.tag, None)
        ch = consumer.channel
        if ch is not None and consumer.unacked <= 0:
            self._close_consumer_channel(consumer, ch)

    @staticmethod
    def _close_channel(ch: TwistedChannel) -> None:
        if ch.is_open:
            try:
                ch.close()
            except Exception:
                pass

    def cancel(self, consumer_tag: str) -> defer.Deferred[None]:
        consumer = self._consumers.pop(consumer_tag, None)
        if consumer is None:
            return defer.succeed(None)
        consumer.cancelled = True
        ch = consumer.channel
        if ch is None or not ch.is_open:
            consumer.use(None)
            return defer.succeed(None)
        consumer.cancelling = True
        d = ch.basic_cancel(consumer_tag=consumer_tag)

        def cancelled(_: Any) -> None:
            consumer.cancelling = False
            # Unacknowledged deliveries may still be settled: keep the channel until they are.
            if consumer.unacked <= 0 and consumer.channel is ch:
                self._close_consumer_channel(consumer, ch)

        def failed(f: Failure) -> Any:
            consumer.cancelling = False
            mapped = self._map_error(f)
            if mapped.check(ConnectionLostError):
                return None  # nothing left to cancel on the broker
            return mapped

        return d.addCallbacks(cancelled, failed)

    # -- closing ------------------------------------------------------------------------------------
    def close(self) -> defer.Deferred[None]:
        """Close the connection; unacknowledged deliveries go back to their queues."""
        if self.state == "closed":
            return defer.succeed(None)
        self.state = "closed"
        call, self._reconnect_call = self._reconnect_call, None
        if call is not None and call.active():
            call.cancel()
        self._send_gathered_acks()  # what was handled stays handled
        for consumer in self._consumers.values():
            consumer.cancelled = True
        self._consumers.clear()
        conn = self._conn
        if conn is None:
            return defer.succeed(None)
        closed = conn.close()
        if closed is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        closed.addBoth(lambda _: d.callback(None))
        return d
