"""The AMQP transport on a real RabbitMQ (started by the test session, a fresh vhost per test).

The transport contract suite (``contract.py``) runs here unchanged against
RabbitMQ; the tests below cover what only a real broker shows: login errors,
broker-validated identity, channel errors, containers talking through the
broker, and a broker restart in the middle of calls.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import msgpack
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task, threads

from ion.core.exceptions import ConnectionLostError, ConversationError, ConversationTimeout, TransportError
from ion.core.messaging.amqp import AmqpTransport
from ion.core.messaging.transport import Delivery, Properties
from ion.core.service import ServiceProcess
from ion.services.hello import HelloClient, HelloService
from ion.testing import ContainerFactory, client_process
from ion.testing.pytest_plugin import require_managed_broker
from tests.core.messaging.contract import TransportContract

pytestmark = pytest.mark.amqp


def _vhost(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/")) or "/"


def _name(prefix: str = "q") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


class _Inbox:
    """Collects deliveries; ``next()`` fires with the next one (no sleeping)."""

    def __init__(self, ack: bool = True) -> None:
        self.ack = ack
        self.items: list[Delivery] = []
        self._waiters: list[defer.Deferred[Delivery]] = []
        self._seen = 0

    def __call__(self, delivery: Delivery) -> None:
        if self.ack:
            delivery.ack()
        self.items.append(delivery)
        if self._waiters:
            self._seen += 1
            self._waiters.pop(0).callback(delivery)

    def next(self, timeout: float = 10) -> defer.Deferred[Delivery]:
        if self._seen < len(self.items):
            self._seen += 1
            return defer.succeed(self.items[self._seen - 1])
        d: defer.Deferred[Delivery] = defer.Deferred()
        self._waiters.append(d)
        d.addTimeout(timeout, reactor)
        return d


def _events(transport: Any) -> tuple[list[tuple[str, Any]], Callable[[str], defer.Deferred[Any]]]:
    """Record a transport's connection events; ``wait(event)`` fires when it next happens."""
    seen: list[tuple[str, Any]] = []
    waiters: dict[str, list[defer.Deferred[Any]]] = {}

    def listener(event: str, reason: Any) -> None:
        seen.append((event, reason))
        for d in waiters.pop(event, []):
            d.callback(reason)

    def wait(event: str, timeout: float = 60) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        waiters.setdefault(event, []).append(d)
        d.addTimeout(timeout, reactor)
        return d

    transport.add_connection_listener(listener)
    return seen, wait


@pytest_twisted.async_yield_fixture
async def transport_factory(amqp_url: str, rabbitmq: Any) -> AsyncIterator[Callable[..., Awaitable[AmqpTransport]]]:
    """``await transport_factory(user=None)``: a connected AmqpTransport on the test's vhost.

    With ``user``, the transport logs in as that broker user (created here with rights on
    the vhost). Every transport made is closed at teardown.
    """
    made: list[AmqpTransport] = []
    vhost = _vhost(amqp_url)

    async def factory(user: str | None = None, **kwargs: Any) -> AmqpTransport:
        url = amqp_url
        if user is not None:
            password = f"pw-{user}"
            rabbitmq.add_user(user, password, vhost=vhost)
            url = rabbitmq.url(vhost, user, password)
        transport = AmqpTransport(url, **kwargs)
        made.append(transport)
        await transport.connect()
        return transport

    yield factory
    for transport in reversed(made):
        await transport.close()


@pytest_twisted.async_yield_fixture
async def amqp_containers(amqp_url: str) -> AsyncIterator[ContainerFactory]:
    """Containers on the test's vhost (all of one system unless told otherwise)."""
    factory = ContainerFactory(broker_url=amqp_url)
    yield factory
    await factory.teardown()


class TestAmqpTransport(TransportContract):
    """The transport contract (``contract.py``), unchanged, on RabbitMQ."""


# -- settings ----------------------------------------------------------------------------------------
def test_container_takes_transport_settings_from_config() -> None:
    """ion.core.messaging: publisher_confirms, reconnect_initial/max and heartbeat reach the transport;
    unusable values are refused naming the setting."""
    from ion.core.container import Container
    from ion.core.exceptions import ConfigurationError
    from ion.testing import test_config

    url = "amqp://u:p@127.0.0.1:5999/v"
    default = Container(config=test_config(), broker_url=url).transport
    assert isinstance(default, AmqpTransport)
    assert (default.confirm, default.reconnect_initial, default.reconnect_max, default.heartbeat) == (
        True, 0.5, 10.0, 5)  # 5 s: a silent host's broker locks of the cache are freed within seconds
    assert default.reconnect_jitter == 0.5
    tuned = Container(config=test_config({"ion.core.messaging": {
        "publisher_confirms": False, "reconnect_initial": 0.2, "reconnect_max": 1, "heartbeat": 30,
        "reconnect_jitter": 0.25}}), broker_url=url).transport
    assert (tuned.confirm, tuned.reconnect_initial, tuned.reconnect_max, tuned.heartbeat) == (False, 0.2, 1.0, 30)
    assert tuned.reconnect_jitter == 0.25
    for key, value, match in (("publisher_confirms", "no", "true or false"),
                              ("reconnect_max", 0, "reconnect_max must be a number of seconds > 0"),
                              ("reconnect_jitter", 1.5, "reconnect_jitter must be a number from 0 to 1"),
                              ("reconnect_jitter", -0.1, "reconnect_jitter must be a number >= 0"),
                              ("heartbeat", "x", "heartbeat must be")):
        with pytest.raises(ConfigurationError, match=match):
            AmqpTransport.from_config(url, {key: value})


def test_reconnect_delay_policy_is_jittered_and_bounded() -> None:
    """reconnect_delay: the doubling from reconnect_initial up to reconnect_max, less a random share
    of up to the jitter; seeded generators (one per container) give different waits, replayable;
    jitter 0 is the exact doubling; no wait is ever above the maximum, however many attempts."""
    import random

    from ion.core.messaging.amqp import reconnect_delay

    caps = [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert [reconnect_delay(n, 0.5, 10.0, 0) for n in range(7)] == caps
    containers = [random.Random(seed) for seed in range(50)]
    firsts = [reconnect_delay(0, 0.5, 10.0, 0.5, rng) for rng in containers]
    assert len(set(firsts)) == 50 and all(0.25 <= d <= 0.5 for d in firsts)
    assert max(firsts) - min(firsts) > 0.15  # spread over the window, not bunched
    rng, replay = random.Random(7), random.Random(7)
    waits = [reconnect_delay(n, 0.5, 10.0, 0.5, rng) for n in range(7)]
    assert waits == [reconnect_delay(n, 0.5, 10.0, 0.5, replay) for n in range(7)]
    assert all(cap * 0.5 <= w <= cap for w, cap in zip(waits, caps, strict=True))
    assert reconnect_delay(5000, 0.5, 10.0, 0.1, rng) <= 10.0
    assert reconnect_delay(3, 0.5, 10.0, 1.0, random.Random(1)) <= 4.0


def test_reads_are_fed_to_pika_in_runs_of_whole_frames() -> None:
    """A big read from the broker reaches pika in runs of whole frames (its per-frame trim copies
    the rest of what it was given); whatever the reads' sizes and cuts, pika decodes the same
    frames in the same order, and a frame cut across reads is put together."""
    import random

    import pika
    from pika import frame as pika_frame
    from pika.adapters.twisted_connection import TwistedProtocolConnection

    from ion.core.messaging import amqp

    props = pika.BasicProperties(content_type="application/msgpack", correlation_id="c", message_id="m")
    frames = []
    for i in range(400):
        body = bytes(random.Random(i).randrange(256) for _ in range(i * 37 % 3000))
        frames += [pika_frame.Method(1, pika.spec.Basic.Deliver("t", i + 1, False, "x", "k")),
                   pika_frame.Header(1, len(body), props), pika_frame.Body(1, body), pika_frame.Heartbeat()]
    stream = b"".join(f.marshal() for f in frames)
    want = [f.marshal() for f in frames]

    class Impl:
        """pika's frame loop (its own _on_data_available), recording the frames it decodes."""
        _frame_buffer = b""
        bytes_received = 0
        fed: list[int] = []
        _read_frame = pika.connection.Connection._read_frame
        _trim_frame_buffer = pika.connection.Connection._trim_frame_buffer
        _on_data_available = pika.connection.Connection._on_data_available

        def __init__(self) -> None:
            self.got: list[bytes] = []
            self.fed = []

        def data_received(self, data: bytes) -> None:
            self.fed.append(len(data))
            self._on_data_available(data)

        def _process_frame(self, value: Any) -> None:
            self.got.append(value.marshal())

    for seed in range(6):
        conn = amqp._Connection.__new__(amqp._Connection)
        conn._impl = impl = Impl()
        conn.takers = {}
        assert isinstance(conn, TwistedProtocolConnection)
        rng = random.Random(seed)
        pos = 0
        while pos < len(stream):
            cut = min(len(stream), pos + rng.choice([1, 7, 100, 4000, 20000, 65536]))
            conn.dataReceived(stream[pos:cut])
            pos = cut
        assert impl.got == want
        assert impl._frame_buffer == b"" and impl.bytes_received == len(stream)
        assert max(impl.fed) <= 65536 + 3100  # (a read, plus the partial frame held before it)
    assert sum(1 for n in impl.fed if n <= amqp.FEED_BYTES + 3100) > len(impl.fed) // 2


def test_deliveries_decoded_by_the_connection_are_those_pika_decodes() -> None:
    """The connection decodes the deliveries of its consumers itself (``_Connection._read``) and hands
    every other frame to pika, in order: over random streams (deliveries to consumers of ours, to a
    cancelled one and to a consumer it does not know, returns, acks and heartbeats, bodies cut in
    several frames, content of different channels interleaved, reads cut anywhere), what reaches the
    consumers and pika is, in order, what pika alone makes of the stream, and pika's byte and frame
    counts are as if it had read it all. A stream with a byte or two changed ends as it ends with
    pika alone: the same deliveries, then the same error, if any (the reviewer's fuzzing found a
    content header announcing more body than came: pika's assembler then holds part of a message,
    and the connection leaves that channel's deliveries to pika)."""
    import random

    import pika
    from pika import frame as pika_frame
    from pika.channel import ContentFrameAssembler

    from ion.core.messaging import amqp

    record: list[tuple[Any, ...]] = []

    def as_record(number: int, method: Any, props: Properties, body: bytes) -> tuple[Any, ...]:
        return (number, type(method).__name__, getattr(method, "consumer_tag", None),
                getattr(method, "delivery_tag", None), bool(getattr(method, "redelivered", False)),
                method.exchange, method.routing_key, props, body)

    class Channel:
        def __init__(self, number: int, tags: set[str], cancelled: set[str]) -> None:
            self.channel_number, self._consumers, self._cancelled = number, tags, cancelled
            self.is_open = True
            self._content_assembler = ContentFrameAssembler()

    class Impl:
        """pika's frame loop (its own _on_data_available); content put together by pika's assembler,
        a delivery to a cancelled consumer dropped (as pika's channel rejects it)."""
        _read_frame = pika.connection.Connection._read_frame
        _trim_frame_buffer = pika.connection.Connection._trim_frame_buffer
        _on_data_available = pika.connection.Connection._on_data_available

        def __init__(self, channels: dict[int, Channel]) -> None:
            self._channels = channels
            self._frame_buffer = b""
            self.bytes_received = self.frames_received = 0

        def data_received(self, data: bytes) -> None:
            self._on_data_available(data)

        def _process_frame(self, value: Any) -> None:
            self.frames_received += 1
            if isinstance(value, pika_frame.Heartbeat) or (
                    isinstance(value, pika_frame.Method) and not pika.spec.has_content(value.method.INDEX)):
                record.append(("frame", value.marshal()))
                return
            channel = self._channels[value.channel_number]
            done = channel._content_assembler.process(value)
            if done:
                method, header, body = done
                if getattr(method.method, "consumer_tag", None) not in channel._cancelled:
                    record.append(as_record(value.channel_number, method.method,
                                            amqp._from_pika(header.properties), body))

    def channels() -> dict[int, Channel]:
        return {1: Channel(1, {"ours-1", "gone"}, {"gone"}), 2: Channel(2, {"ours-2"}, set()),
                3: Channel(3, {"theirs"}, set())}

    def stream_of(rng: random.Random, interleaved: bool) -> tuple[list[Any], list[tuple[Any, ...]]]:
        """Frames, and what pika makes of them (with content of different channels interleaved)."""
        frames: list[Any] = []
        want: list[tuple[Any, ...]] = []
        open_content: list[list[Any]] = []  # (content frames of a message still to go out)
        for i in range(150):
            shape = rng.random()
            if interleaved and open_content and rng.random() < 0.5:
                frames.append(open_content[0].pop(0))
                if not open_content[0]:
                    open_content.pop(0)
                continue
            if shape < 0.1:
                frames.append(pika_frame.Heartbeat())
                want.append(("frame", frames[-1].marshal()))
                continue
            if shape < 0.2:
                frames.append(pika_frame.Method(rng.choice([1, 2]), pika.spec.Basic.Ack(i, False)))
                want.append(("frame", frames[-1].marshal()))
                continue
            busy = {content[0].channel_number for content in open_content}
            number, tag = rng.choice([(n, t) for n, t in [(1, "ours-1"), (2, "ours-2"), (3, "theirs"), (1, "gone")]
                                      if n not in busy] or [(4, "none")])
            if number == 4:
                continue
            body = rng.randbytes(rng.choice([0, 1, 50, 400, 3000]))
            headers = {"h": i, "s": "é"} if rng.random() < 0.2 else None
            props = pika.BasicProperties(content_type=rng.choice(["application/msgpack", None]),
                                         correlation_id=f"c{i}" if rng.random() < 0.9 else b"\xff not UTF-8",
                                         reply_to=rng.choice(["r.q", None]),
                                         message_id=f"m{i}", user_id="ion", headers=headers,
                                         expiration=rng.choice(["1500", None]), delivery_mode=rng.choice([2, None]),
                                         timestamp=rng.choice([1700000000, None]), app_id=rng.choice(["a", None]))
            if shape < 0.3:
                method: Any = pika.spec.Basic.Return(312, "NO_ROUTE", "ex", f"k{i}")
            else:
                method = pika.spec.Basic.Deliver(tag, i + 1, rng.random() < 0.3, "ex", f"k{i}")
            content = [pika_frame.Method(number, method), pika_frame.Header(number, len(body), props)]
            content += [pika_frame.Body(number, body[j:j + 1000]) for j in range(0, len(body), 1000)]
            if tag != "gone" or shape < 0.3:
                want.append(as_record(number, method, amqp._from_pika(props), body))
            if interleaved:
                frames.append(content.pop(0))
                open_content.append(content)
            else:
                frames += content
        for content in open_content:
            frames += content
        if interleaved:  # (the order pika completes them in)
            want = []
        return frames, want

    def read(stream: bytes, cuts: list[int], ours: bool) -> tuple[list[tuple[Any, ...]], str | None, Any, list[int]]:
        """Feed ``stream`` in reads ending at ``cuts`` to pika alone, or through the connection's own
        decoding (``ours``); what was made of it, the error that stopped it, pika's state, and the
        delivery tags the connection took itself."""
        record.clear()
        chans = channels()
        conn = amqp._Connection.__new__(amqp._Connection)
        conn._impl = impl = Impl(chans)
        took: list[int] = []

        def taker(number: int, consumer_tag: str) -> Any:
            def take(delivery_tag: int, redelivered: bool, exchange: str, routing_key: str,
                     properties: Properties, content: bytes) -> None:
                took.append(delivery_tag)
                method = pika.spec.Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key)
                record.append(as_record(number, method, properties, content))
            return take

        conn.takers = {(1, "ours-1"): (chans[1], taker(1, "ours-1")), (2, "ours-2"): (chans[2], taker(2, "ours-2")),
                       (1, "gone"): (chans[1], taker(1, "gone"))} if ours else {}
        error = None
        pos = 0
        try:
            for cut in cuts:
                conn.dataReceived(stream[pos:cut])
                pos = cut
        except Exception as exc:
            error = type(exc).__name__
        return list(record), error, (impl._frame_buffer, impl.bytes_received, impl.frames_received), took

    for seed in range(60):
        rng = random.Random(seed)
        interleaved = seed % 3 == 2
        frames, want = stream_of(rng, interleaved)
        stream = b"".join(f.marshal() for f in frames)
        cuts = []
        while not cuts or cuts[-1] < len(stream):
            cuts.append(min(len(stream), (cuts[-1] if cuts else 0) + rng.choice([1, 7, 100, 4000, 20000, 65536])))
        got, error, state, took = read(stream, cuts, ours=True)
        assert (got, error, state) == read(stream, cuts, ours=False)[:3]
        assert error is None and state == (b"", len(stream), len(frames))
        assert took or interleaved  # (the connection's own decoding was used: only for contiguous frames)
        assert not any(r[0] != "frame" and r[2] == "gone" for r in got)  # (never for a cancelled consumer)
        if want:
            assert got == want
        broken = bytearray(stream)
        for _ in range(rng.choice([1, 2])):
            broken[rng.randrange(len(broken))] = rng.randrange(256)
        mine, theirs = read(bytes(broken), cuts, ours=True), read(bytes(broken), cuts, ours=False)
        assert mine[:2] == theirs[:2]
        if mine[1] is None:  # (after an error the connection is dropped: what pika held no longer counts)
            assert mine[2] == theirs[2]


_short_text = st.text(max_size=60)


@settings(max_examples=300, deadline=None)
@given(channel=st.integers(1, 2047), exchange=_short_text, routing_key=_short_text, mandatory=st.booleans(),
       props=st.builds(Properties, content_type=st.none() | _short_text, correlation_id=st.none() | _short_text,
                       reply_to=st.none() | _short_text, message_id=st.none() | _short_text,
                       user_id=st.none() | _short_text,
                       headers=st.dictionaries(st.text(max_size=8), st.integers(-2**31, 2**31 - 1) | _short_text,
                                               max_size=3),
                       expiration=st.none() | st.integers(0, 2**31).map(str)),
       body=st.binary(max_size=300), body_max=st.sampled_from([1, 7, 100, 131064]))
def test_publish_frames_are_what_pika_writes(channel: int, exchange: str, routing_key: str, mandatory: bool,
                                             props: Properties, body: bytes, body_max: int) -> None:
    """The fast publish path's frames (:func:`~ion.core.messaging.amqp.publish_frames`) are byte for
    byte those pika's ``Channel.basic_publish`` writes for the same message: method, content header
    with every property the container sets, and the body cut at the connection's frame size."""
    import pika
    from pika import frame as pika_frame

    from ion.core.messaging.amqp import _to_pika, publish_frames

    pika_props = _to_pika(props, props.user_id, props.message_id)  # type: ignore[arg-type]
    want = [pika_frame.Method(channel, pika.spec.Basic.Publish(exchange=exchange, routing_key=routing_key,
                                                                mandatory=mandatory)).marshal(),
            pika_frame.Header(channel, len(body), pika_props).marshal()]
    want += [pika_frame.Body(channel, body[i:i + body_max]).marshal() for i in range(0, len(body), body_max)]
    assert publish_frames(channel, exchange, routing_key, mandatory, props, body, body_max) == b"".join(want)


def test_publish_frames_refuse_a_short_string_over_255_octets() -> None:
    """As pika's encoder does: a routing key or property over 255 octets of UTF-8 cannot be sent, nor
    a property that is not text."""
    from pika import exceptions as pika_exc

    from ion.core.messaging.amqp import publish_frames

    props = Properties(correlation_id="é" * 128)
    with pytest.raises(pika_exc.ShortStringTooLong):
        publish_frames(1, "x", "k", False, props, b"body", 100)
    with pytest.raises(pika_exc.ShortStringTooLong):
        publish_frames(1, "x", "k" * 256, False, Properties(), b"body", 100)
    with pytest.raises(TypeError):  # (not sent as whatever bytes(60) makes)
        publish_frames(1, "x", "k", False, Properties(expiration=60), b"body", 100)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_what_a_read_wrote_is_sent_before_the_reactor_turns() -> None:
    """What pika writes while it handles a read (replies, requests, acks) is gathered and goes into
    the socket as the read ends, in one send, on a real TCP connection: nothing waits in the
    transport for the reactor's next turn. Not while older bytes wait there (their order first),
    nor on a connection being closed: those go through the transport's buffer as before."""
    from twisted.internet.protocol import ClientFactory, Factory, Protocol

    from ion.core.messaging import amqp

    got: defer.Deferred[bytes] = defer.Deferred()

    class Sink(Protocol):
        def dataReceived(self, data: bytes) -> None:
            if not got.called:
                got.callback(data)

    class Client(Protocol):
        def connectionMade(self) -> None:
            connected.callback(self.transport)

    class Impl:
        """pika's side: a read that writes two frames (a reply and an ack)."""

        def data_received(self, data: bytes) -> None:
            conn._impl._adapter_emit_data(b"frames of a reply")
            conn._impl._adapter_emit_data(b" and an ack")

    connected: defer.Deferred[Any] = defer.Deferred()
    port = reactor.listenTCP(0, Factory.forProtocol(Sink), interface="127.0.0.1")
    client = reactor.connectTCP("127.0.0.1", port.getHost().port, ClientFactory.forProtocol(Client))
    try:
        transport = await connected
        conn = amqp._Connection.__new__(amqp._Connection)
        conn._impl = Impl()
        conn._impl._adapter_emit_data = conn._emit
        conn._impl._transport = conn.transport = transport
        conn.dataReceived(b"a delivery")
        assert transport._tempDataLen == 0 and transport.dataBuffer == b""  # in the socket already
        assert transport not in reactor.getWriters()  # (the reactor was never asked to write)
        assert await got == b"frames of a reply and an ack"
        # Older bytes still waiting (the socket did not take them): behind them, in order.
        transport.dataBuffer, transport.offset = b"older", 0
        conn.dataReceived(b"another delivery")
        assert transport._tempDataLen == len(b"frames of a reply and an ack") and transport.dataBuffer == b"older"
        transport.dataBuffer, transport._tempDataBuffer, transport._tempDataLen = b"", [], 0
        transport.loseConnection()
        conn.dataReceived(b"a last delivery")  # closing: the transport writes what is left, then closes
        assert transport._tempDataLen == len(b"frames of a reply and an ack")
        conn._emit(b"outside a read")  # (pika writing outside a read: through the transport, as pika does)
        assert transport._tempDataLen == len(b"frames of a reply and an ack") + len(b"outside a read")
    finally:
        client.disconnect()
        await port.stopListening()
    # Over TLS (a transport that is no plain TCP connection): the gathered bytes, in one write.
    from twisted.internet.testing import StringTransport

    conn._impl._transport = conn.transport = tls = StringTransport()
    conn.dataReceived(b"a delivery")
    assert tls.value() == b"frames of a reply and an ack"


# -- connecting ---------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_wrong_password_is_one_clear_error(amqp_url: str, rabbitmq: Any) -> None:
    """A refused login fails connect() once, naming broker and user; nothing retries it."""
    vhost = _vhost(amqp_url)
    rabbitmq.add_user("alice", "right", vhost=vhost)
    clock = task.Clock()
    transport = AmqpTransport(rabbitmq.url(vhost, "alice", "wrong"), clock=clock)
    with pytest.raises(TransportError) as info:
        await transport.connect()
    assert str(info.value) == (f"broker at 127.0.0.1:{rabbitmq.port} refused login for user 'alice' "
                               "(wrong user name or password?)")
    assert "wrong" not in str(info.value).replace("(wrong user", "")  # no password in the message
    assert clock.getDelayedCalls() == []  # no reconnection loop
    assert transport.state == "new"


@pytest_twisted.ensureDeferred
async def test_container_with_wrong_password_fails_to_start_with_that_error(amqp_url: str, rabbitmq: Any) -> None:
    """A container on a refused login does not start, and says why in one line."""
    vhost = _vhost(amqp_url)
    rabbitmq.add_user("carol", "right", vhost=vhost)
    factory = ContainerFactory(broker_url=rabbitmq.url(vhost, "carol", "nope"))
    try:
        with pytest.raises(TransportError, match="refused login for user 'carol'"):
            await factory()
    finally:
        await factory.teardown()


@pytest_twisted.ensureDeferred
async def test_unknown_vhost_and_closed_port_are_clear_errors(rabbitmq: Any) -> None:
    """A vhost the user may not use, or nothing listening, each give a plain message."""
    with pytest.raises(TransportError, match="refused user 'guest' access to vhost 'no-such-vhost'"):
        await AmqpTransport(rabbitmq.url("no-such-vhost")).connect()
    from ion.testing.rabbitmq import free_port

    port = free_port(30000, 40000)
    with pytest.raises(TransportError, match=f"cannot connect to broker at 127.0.0.1:{port}: connection refused"):
        await AmqpTransport(f"amqp://guest:guest@127.0.0.1:{port}/").connect()


# -- messages -----------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_properties_round_trip_and_user_id_is_the_login(transport_factory: Any) -> None:
    """ION properties map to AMQP ones and back; user_id is the broker login, message_id unique."""
    t = await transport_factory(user="dave")
    q = await t.declare_queue(_name())
    await t.declare_exchange("ion.props", "topic")
    await t.bind(q, "ion.props", "a.*")
    inbox = _Inbox()
    await t.consume(q, inbox)
    props = Properties(correlation_id="c#1", reply_to="back", headers={"k": "v"}, user_id="mallory")
    await t.publish("ion.props", "a.b", b"\x81\xa1x\x01", props)
    await t.publish("ion.props", "a.c", b"2", Properties())
    first, second = await inbox.next(), await inbox.next()
    assert first.body == b"\x81\xa1x\x01"
    assert (first.exchange, first.routing_key, first.redelivered) == ("ion.props", "a.b", False)
    p = first.properties
    assert (p.content_type, p.correlation_id, p.reply_to, p.user_id, p.headers) == (
        "application/msgpack", "c#1", "back", "dave", {"k": "v"})
    assert p.message_id and second.properties.message_id and p.message_id != second.properties.message_id
    assert props.user_id == "mallory" and props.message_id is None  # the caller's object is left alone


@pytest_twisted.ensureDeferred
async def test_channels_are_reused_not_opened_per_send(transport_factory: Any) -> None:
    """Hundreds of publishes and declares run on the same few channels."""
    t = await transport_factory()
    q = await t.declare_queue(_name())
    inbox = _Inbox()
    await t.consume(q, inbox)
    await t.publish("", q, b"x", Properties())
    before = t.open_channels
    await defer.DeferredList([t.publish("", q, b"x", Properties()) for _ in range(299)])
    for _ in range(20):
        await t.declare_queue(_name())
    while len(inbox.items) < 300:
        await inbox.next()
    assert t.open_channels == before == 3  # control, publish, one consumer


@pytest_twisted.ensureDeferred
async def test_confirmed_publishes_are_pipelined(transport_factory: Any) -> None:
    """Confirms do not serialise publishes: 50 are handed to the channel in one reactor turn, all
    unconfirmed at once, and each fires when the broker confirms it."""
    t = await transport_factory()
    q = await t.declare_queue(_name())
    await t.publish("", q, b"opens the publish channel", Properties())
    ch = t._publisher.current()
    sent_before = ch._delivery_message_id
    ds = [t.publish("", q, b"%d" % i, Properties()) for i in range(50)]
    assert ch._delivery_message_id == sent_before + 50  # all on the wire ...
    assert not any(d.called for d in ds) and len(ch._deliveries) == 50  # ... none confirmed yet
    await defer.gatherResults(ds)
    assert not ch._deliveries


@pytest_twisted.ensureDeferred
async def test_without_publisher_confirms(transport_factory: Any) -> None:
    """confirm=False: publish fires once written; a missing exchange is still refused (checked first)."""
    t = await transport_factory(confirm=False)
    q = await t.declare_queue(_name())
    inbox = _Inbox()
    await t.consume(q, inbox)
    await t.publish("", q, b"unconfirmed", Properties())
    assert (await inbox.next()).body == b"unconfirmed"
    with pytest.raises(TransportError, match="NOT_FOUND"):
        await t.publish("ion.nowhere", "k", b"x", Properties())
    await t.publish("", q, b"still", Properties())
    assert (await inbox.next()).body == b"still"


@pytest_twisted.ensureDeferred
async def test_mandatory_message_nobody_takes_comes_back(transport_factory: Any) -> None:
    """basic.return reaches the return callbacks with exchange, routing key and properties."""
    t = await transport_factory()
    await t.declare_exchange("ion.ret", "topic")
    returned: defer.Deferred[Any] = defer.Deferred()
    t.add_return_callback(lambda ex, key, props: returned.callback((ex, key, props)))
    await t.publish("ion.ret", "nobody.here", b"x", Properties(correlation_id="p#7"), mandatory=True)
    ex, key, props = await returned.addTimeout(10, reactor)
    assert (ex, key, props.correlation_id) == ("ion.ret", "nobody.here", "p#7")


# -- broker errors ------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_broker_errors_carry_its_text_and_the_next_operation_works(transport_factory: Any) -> None:
    """404/406 close the channel in AMQP; the transport reports the broker's text and reopens."""
    t = await transport_factory()
    with pytest.raises(TransportError, match="NOT_FOUND - no exchange 'ion.missing'") as info:
        await t.publish("ion.missing", "k", b"x", Properties())
    assert getattr(info.value, "reply_code", None) == 404
    with pytest.raises(TransportError, match="NOT_FOUND - no exchange 'ion.missing'"):
        await t.bind(await t.declare_queue(_name()), "ion.missing", "k")
    await t.declare_exchange("ion.kind", "topic")
    with pytest.raises(TransportError, match="PRECONDITION_FAILED - inequivalent arg 'type'"):
        await t.declare_exchange("ion.kind", "fanout")
    # Everything still works on fresh channels.
    q = await t.declare_queue(_name())
    await t.bind(q, "ion.kind", "k")
    inbox = _Inbox()
    await t.consume(q, inbox)
    await t.publish("ion.kind", "k", b"after", Properties())
    assert (await inbox.next()).body == b"after"


@pytest_twisted.ensureDeferred
async def test_exclusive_queue_of_another_connection_is_resource_locked(transport_factory: Any) -> None:
    """405 RESOURCE_LOCKED for the other connection; the owner keeps working."""
    owner, other = await transport_factory(), await transport_factory()
    q = await owner.declare_queue(_name(), exclusive=True)
    with pytest.raises(TransportError, match="RESOURCE_LOCKED") as info:
        await other.declare_queue(q, exclusive=True)
    assert getattr(info.value, "reply_code", None) == 405
    with pytest.raises(TransportError, match="RESOURCE_LOCKED"):
        await other.consume(q, _Inbox())
    inbox = _Inbox()
    await owner.consume(q, inbox)
    await other.publish("", q, b"hi", Properties())
    assert (await inbox.next()).body == b"hi"
    await other.declare_queue(_name())  # the other connection's channels were reopened too


@pytest_twisted.ensureDeferred
async def test_exclusive_consumer_refuses_a_second_one(transport_factory: Any) -> None:
    """403 ACCESS_REFUSED for a second consumer of an exclusively consumed queue."""
    t = await transport_factory()
    q = await t.declare_queue(_name())
    await t.consume(q, _Inbox(), exclusive=True)
    with pytest.raises(TransportError, match="ACCESS_REFUSED"):
        await t.consume(q, _Inbox())


@pytest_twisted.ensureDeferred
async def test_prefetch_is_per_consumer(transport_factory: Any) -> None:
    """A consumer with prefetch 1 gets one message until it acks; another consumer is not held up."""
    t = await transport_factory()
    slow_q, fast_q = await t.declare_queue(_name()), await t.declare_queue(_name())
    slow, fast = _Inbox(ack=False), _Inbox()
    await t.consume(slow_q, slow, prefetch=1)
    await t.consume(fast_q, fast, prefetch=5)
    for i in range(3):
        await t.publish("", slow_q, b"s%d" % i, Properties())
        await t.publish("", fast_q, b"f%d" % i, Properties())
    first = await slow.next()
    for _ in range(3):
        await fast.next()
    assert [d.body for d in slow.items] == [b"s0"]
    first.ack()
    second = await slow.next()
    assert second.body == b"s1"
    second.reject(requeue=False)
    assert (await slow.next()).body == b"s2"


@pytest_twisted.ensureDeferred
async def test_single_active_consumer_argument(transport_factory: Any) -> None:
    """x-single-active-consumer: only the first consumer gets messages while it lives."""
    a, b = await transport_factory(), await transport_factory()
    q = await a.declare_queue(_name(), arguments={"x-single-active-consumer": True})
    await b.declare_queue(q, arguments={"x-single-active-consumer": True})
    first, second = _Inbox(), _Inbox()
    await a.consume(q, first, prefetch=10)
    await b.consume(q, second, prefetch=10)
    for i in range(5):
        await a.publish("", q, b"%d" % i, Properties())
    for _ in range(5):
        await first.next()
    assert second.items == []


@pytest_twisted.ensureDeferred
async def test_cancel_keeps_unacked_deliveries_settleable(transport_factory: Any) -> None:
    """After cancel, a delivery in hand can still be acked; nothing more is delivered."""
    t = await transport_factory()
    q = await t.declare_queue(_name())
    inbox = _Inbox(ack=False)
    tag = await t.consume(q, inbox, prefetch=1)
    await t.publish("", q, b"1", Properties())
    await t.publish("", q, b"2", Properties())
    held = await inbox.next()
    await t.cancel(tag)
    held.ack()
    other = _Inbox()
    await t.consume(q, other)
    assert (await other.next()).body == b"2"
    assert [d.body for d in inbox.items] == [b"1"]


@pytest_twisted.ensureDeferred
async def test_acks_gathered_in_a_read_never_cover_a_delivery_still_in_hand(transport_factory: Any,
                                                                            monkeypatch: Any) -> None:
    """Acks made while pika reads a burst of deliveries go out after the read, the run below
    every unsettled delivery as one ``multiple`` ack: a delivery still in hand stays the
    broker's (redelivered if its consumer goes), and each acked one is gone for good."""
    t, other = await transport_factory(), await transport_factory()
    q = await t.declare_queue(_name())
    for i in range(8):
        await t.publish("", q, b"%d" % i, Properties())
    held: list[Delivery] = []
    got: list[bytes] = []
    done: defer.Deferred[None] = defer.Deferred()

    def handle(delivery: Delivery) -> None:
        got.append(delivery.body)
        if delivery.body in (b"2", b"5"):
            held.append(delivery)
        else:
            delivery.ack()
        if len(got) == 8:
            done.callback(None)

    from pika.adapters.twisted_connection import TwistedChannel

    calls: list[tuple[Any, int, bool]] = []
    real_ack = TwistedChannel.basic_ack

    def basic_ack(self: Any, delivery_tag: int = 0, multiple: bool = False) -> Any:
        calls.append((self, delivery_tag, multiple))
        return real_ack(self, delivery_tag=delivery_tag, multiple=multiple)

    monkeypatch.setattr(TwistedChannel, "basic_ack", basic_ack)
    tag = await t.consume(q, handle, prefetch=20)
    channel = t._consumers[tag].channel
    await done.addTimeout(10, reactor)  # fires inside the read that brought the last delivery
    await task.deferLater(reactor, 0, lambda: None)  # the read has ended: its acks are sent
    sent = [(delivery_tag, multiple) for ch, delivery_tag, multiple in calls if ch is channel]
    acked = set()
    for delivery_tag, multiple in sent:
        acked |= set(range(1, delivery_tag + 1)) if multiple else {delivery_tag}
    assert acked == {1, 2, 4, 5, 7, 8}, sent  # tags 3 and 6 (bodies 2 and 5) are in hand
    held[0].ack()  # settled outside a read: acknowledged at once
    assert calls[-1][1:] == (3, False)
    await t.close()  # body 5 goes back to the queue
    inbox = _Inbox()
    await other.consume(q, inbox)
    again = await inbox.next()
    assert (again.body, again.redelivered) == (b"5", True)
    await other.publish("", q, b"end", Properties())
    assert (await inbox.next()).body == b"end"
    assert [d.body for d in inbox.items] == [b"5", b"end"]


# -- containers over RabbitMQ ----------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_hello_rpc_between_two_containers(amqp_containers: ContainerFactory) -> None:
    """A client in one container calls the hello service in another, through RabbitMQ."""
    server = await amqp_containers(sysname="mysys")
    client = await amqp_containers(sysname="mysys")
    await server.spawn(HelloService)
    proc = await client_process(client)
    assert await HelloClient(proc).hello("x") == "Hello there, x"
    content, headers = await proc.rpc_send("hello", "whoami", None)
    assert content == {"user-id": "ANONYMOUS", "broker-user": "guest"}
    assert headers["sender"].startswith(server.id)


@pytest_twisted.ensureDeferred
async def test_a_request_whose_caller_gave_up_is_never_run_by_the_next_instance(
        amqp_containers: ContainerFactory) -> None:
    """#14: a call to a service whose only container has stopped times out; the request, left in
    the service's queue, is discarded by RabbitMQ (its ``expiration``) and never run by the
    instance that starts afterwards, which serves the calls made from then on."""
    from tests.core.support import EchoService

    first = await amqp_containers(sysname="lifetime")
    await first.spawn(EchoService)
    await first.terminate()  # the only instance's container stops; the service queue stays
    caller = await amqp_containers(sysname="lifetime")
    proc = await client_process(caller)
    with pytest.raises(ConversationTimeout):
        await proc.rpc_send("echo", "echo", "late", timeout=1)
    second = await amqp_containers(sysname="lifetime")
    svc = second.proc_manager.get(await second.spawn(EchoService))
    assert isinstance(svc, EchoService)
    # The late request was ahead of this one in the queue: had it been delivered, it would have run first.
    content, _ = await proc.rpc_send("echo", "echo", "fresh", timeout=10)
    assert content == "fresh"
    assert svc.calls == [("echo", "fresh")]
    assert proc.conversations.late_messages == 0


@pytest_twisted.ensureDeferred
async def test_service_sees_the_broker_validated_user(amqp_url: str, rabbitmq: Any) -> None:
    """broker-user is the caller's broker login, whatever user-id it claims."""
    vhost = _vhost(amqp_url)
    rabbitmq.add_user("erin", "pw-erin", vhost=vhost)
    services = ContainerFactory(broker_url=amqp_url)
    callers = ContainerFactory(broker_url=rabbitmq.url(vhost, "erin", "pw-erin"))
    try:
        server = await services(sysname="ident")
        await server.spawn(HelloService)
        client = await callers(sysname="ident")
        proc = await client_process(client)
        content, _ = await proc.rpc_send("hello", "whoami", None, headers={"user-id": "root"})
        assert content == {"user-id": "root", "broker-user": "erin"}
    finally:
        await callers.teardown()
        await services.teardown()


def _plain_pika_call(url: str, sysname: str, user_id: str | None, claimed: str) -> Any:
    """A plain pika client (no ioncore): publish an ION rpc to ``<sysname>.hello``, read the reply."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        reply_q = ch.queue_declare("", exclusive=True).method.queue
        # Replies are published to the system's exchange with reply-to as routing key.
        ch.queue_bind(reply_q, f"ion.{sysname}", reply_q)
        body = msgpack.packb({
            "sender": reply_q, "receiver": f"{sysname}.hello", "reply-to": reply_q, "op": "whoami",
            "conv-id": "plain#1", "conv-seq": 1, "protocol": "rpc", "performative": "request",
            "user-id": claimed, "broker-user": "forged", "content": None,
        })
        props = pika.BasicProperties(content_type="application/msgpack", correlation_id="plain#1",
                                     reply_to=reply_q, user_id=user_id)
        ch.basic_publish(f"ion.{sysname}", f"{sysname}.hello", body, props)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            method, _props, reply = ch.basic_get(reply_q, auto_ack=True)
            if method is not None:
                return msgpack.unpackb(reply)
            conn.process_data_events(time_limit=0.1)
        raise AssertionError("no reply")
    finally:
        if conn.is_open:
            conn.close()


@pytest_twisted.ensureDeferred
async def test_plain_pika_client_identity(amqp_url: str, amqp_containers: ContainerFactory, rabbitmq: Any) -> None:
    """A plain AMQP client gets an answer; a false user-id header still shows its true broker-user,
    and claiming another user in the user_id property is refused by the broker."""
    import pika.exceptions

    vhost = _vhost(amqp_url)
    rabbitmq.add_user("frank", "pw-frank", vhost=vhost)
    frank_url = rabbitmq.url(vhost, "frank", "pw-frank")
    server = await amqp_containers(sysname="plain")
    await server.spawn(HelloService)
    reply = await threads.deferToThread(_plain_pika_call, frank_url, "plain", "frank", "root")
    assert reply["status"] == "OK" and reply["conv-id"] == "plain#1"
    assert reply["content"] == {"user-id": "root", "broker-user": "frank"}
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="PRECONDITION_FAILED"):
        await threads.deferToThread(_plain_pika_call, frank_url, "plain", "guest", "guest")


# -- broker restart ---------------------------------------------------------------------------------------
class HangService(ServiceProcess):
    """Never answers ``hang`` (until the test releases it): a call that is surely in flight."""

    service_name = "hang"

    def slc_init(self) -> None:
        self.pending: list[defer.Deferred[Any]] = []

    def op_hang(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> Any:
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(d)
        return d

    def slc_terminate(self) -> None:
        for d in self.pending:
            if not d.called:
                d.callback(None)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_broker_restart_during_calls(amqp_url: str, rabbitmq: Any) -> None:
    """stop_app/start_app while calls run: in-flight calls fail at once with ConversationError,
    listeners hear lost then restored, queues and consumers come back, later calls succeed."""
    require_managed_broker(rabbitmq, "restart")
    transports = [AmqpTransport(amqp_url, reconnect_initial=0.2, reconnect_max=1.0) for _ in range(2)]
    factory = ContainerFactory(broker_url=amqp_url)
    config = {"ion.core.process": {"rpc_timeout": 60, "terminate_timeout": 1}}
    broker_down = False
    stop = [False]
    hang: Any = None
    try:
        server = await factory(sysname="restart", transport=transports[0], config=config)
        client = await factory(sysname="restart", transport=transports[1], config=config)
        hang_pid = await server.spawn(HangService)
        hang = server.proc_manager.get(hang_pid)
        await server.spawn(HelloService)
        proc = await client_process(client)
        hello = HelloClient(proc)
        assert await hello.hello("before") == "Hello there, before"
        recorders = [_events(t) for t in transports]

        in_flight = proc.rpc_send("hang", "hang", None)
        outcomes: list[Any] = []
        stream_done: defer.Deferred[None] = defer.Deferred()
        recovered: defer.Deferred[None] = defer.Deferred()
        restored_at: list[int] = []

        def ended(result: Any) -> None:
            outcomes.append(result)
            if restored_at and isinstance(result, str) and not recovered.called:
                recovered.callback(None)
            reactor.callLater(0.02, stream)

        def stream() -> None:
            # A steady stream of calls, each started shortly after the previous one ended.
            if stop[0]:
                stream_done.callback(None)
                return
            hello.hello(f"n{len(outcomes)}").addBoth(ended)

        stream()
        lost = [wait("lost") for _, wait in recorders]
        restored = [wait("restored") for _, wait in recorders]
        broker_down = True
        stopping = threads.deferToThread(rabbitmq.stop_app)
        await defer.gatherResults(lost)
        # The call in flight failed as the loss was noticed, not after its 60 s timeout.
        assert in_flight.called
        with pytest.raises(ConversationError, match="connection to the broker lost") as info:
            await in_flight
        assert not isinstance(info.value, ConversationTimeout)
        await stopping
        await threads.deferToThread(rabbitmq.start_app)
        await defer.gatherResults(restored)
        broker_down = False
        restored_at.append(len(outcomes))
        # After reconnection calls succeed again: queues, bindings and consumers are back,
        # for the shared service queue and for each process's own queue alike.
        assert await hello.hello("after") == "Hello there, after"
        content, _ = await proc.rpc_send(hang_pid, "ping", None, timeout=10)
        assert content["pid"] == hang_pid
        await recovered.addTimeout(30, reactor)  # the stream goes on after the restart
        stop[0] = True
        await stream_done
        failures = [r.value for r in outcomes if not isinstance(r, str)]
        assert failures, "some calls of the stream met the outage"
        for exc in failures:
            assert isinstance(exc, ConversationError) and not isinstance(exc, ConversationTimeout), exc
        for seen, _ in recorders:
            assert [e for e, _ in seen] == ["lost", "restored"]
            assert "CONNECTION_FORCED" in seen[0][1]
    finally:
        stop[0] = True
        if broker_down:
            await threads.deferToThread(rabbitmq.start_app)
        if hang is not None:
            for d in hang.pending:
                if not d.called:
                    d.callback(None)
        await factory.teardown()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_operations_while_disconnected_fail_fast_and_stale_acks_do_not_raise(
        amqp_url: str, rabbitmq: Any) -> None:
    """While the broker is away operations fail with ConnectionLostError at once, and acking a
    delivery from before the loss is logged, not raised; after the restore the consumer is back."""
    require_managed_broker(rabbitmq, "restart")
    t = AmqpTransport(amqp_url, reconnect_initial=0.2, reconnect_max=1.0)
    await t.connect()
    seen, wait = _events(t)
    stopped = False
    try:
        q = await t.declare_queue(_name(), durable=True)
        inbox = _Inbox(ack=False)
        await t.consume(q, inbox)
        await t.publish("", q, b"keep", Properties())
        held = await inbox.next()
        lost = wait("lost")
        await threads.deferToThread(rabbitmq.stop_app)
        stopped = True
        await lost
        with pytest.raises(ConnectionLostError, match="not connected to broker"):
            await t.publish("", q, b"x", Properties())
        with pytest.raises(ConnectionLostError):
            await t.declare_queue(_name())
        held.ack()  # no exception: the broker will redeliver it
        restored = wait("restored")
        await threads.deferToThread(rabbitmq.start_app)
        stopped = False
        await restored
        # The durable queue survived the restart (its transient message did not): the
        # re-created consumer takes new messages.
        await t.publish("", q, b"new", Properties())
        bodies = set()
        while b"new" not in bodies:
            bodies.add((await inbox.next()).body)
        assert [e for e, _ in seen] == ["lost", "restored"]
    finally:
        if stopped:
            await threads.deferToThread(rabbitmq.start_app)
        await t.close()


@pytest_twisted.ensureDeferred
async def test_a_request_handed_over_while_the_consumers_are_restored_is_answered(amqp_url: str) -> None:
    """After a reconnection the consumers come back one after the other; a request that waited in the
    first one's queue is handed over before the last is back, and its answer goes out then (it was
    refused as "not connected", its request acknowledged: the caller waited for its timeout)."""
    t = AmqpTransport(amqp_url, reconnect_initial=0.2, reconnect_max=1.0)
    caller = AmqpTransport(amqp_url)
    await t.connect()
    await caller.connect()
    seen, wait = _events(t)
    try:
        requests = await t.declare_queue(_name("requests"), durable=True)
        later = await t.declare_queue(_name("later"), durable=True)
        answers = await caller.declare_queue(_name("answers"), durable=True)
        states: list[str] = []
        sent: list[defer.Deferred[None]] = []

        def answer(delivery: Delivery) -> None:
            states.append(t.state)
            sent.append(t.publish("", answers, b"answer to " + delivery.body, Properties()))
            sent[-1].addCallback(lambda _: delivery.ack())

        await t.consume(requests, answer)
        await t.consume(later, _Inbox())  # restored after the first: its basic.consume is a round trip
        lost, restored = wait("lost"), wait("restored")
        t._conn.transport.abortConnection()
        await lost
        await caller.publish("", requests, b"a request", Properties())  # waits in the queue meanwhile
        await restored
        inbox = _Inbox()
        await caller.consume(answers, inbox)
        assert (await inbox.next()).body == b"answer to a request"
        assert states == ["restoring"], states  # (handed over before the restore ended)
        await sent[0]
    finally:
        await t.close()
        await caller.close()


class _WatchedClock(task.Clock):
    """A Clock that tells when something is scheduled on it."""

    def __init__(self) -> None:
        super().__init__()
        self._watchers: list[defer.Deferred[Any]] = []

    def callLater(self, delay: float, f: Any, *args: Any, **kw: Any) -> Any:  # noqa: N802 - Twisted's name
        call = super().callLater(delay, f, *args, **kw)
        watchers, self._watchers = self._watchers, []
        for d in watchers:  # after the caller has kept the call, not in the middle of callLater
            reactor.callLater(0, d.callback, delay)
        return call

    def next_call(self) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self._watchers.append(d)
        return d.addTimeout(20, reactor)


@pytest_twisted.ensureDeferred
async def test_reconnection_backoff_on_the_injected_clock(amqp_url: str) -> None:
    """Reconnection attempts wait 0.5 s, 1 s, 2 s ... up to 10 s, on the transport's clock
    (without jitter: the doubling the jittered waits are drawn below)."""
    import dataclasses

    from ion.testing.rabbitmq import free_port

    clock = _WatchedClock()
    t = AmqpTransport(amqp_url, clock=clock, reconnect_jitter=0)
    await t.connect()
    seen, wait = _events(t)
    try:
        scheduled = clock.next_call()
        t._conn.transport.abortConnection()  # the TCP connection drops under us
        delays = [await scheduled]
        assert seen[0][0] == "lost"
        # From now on nothing listens where the transport connects: every attempt fails.
        t.url = dataclasses.replace(t.url, port=free_port(30000, 40000))
        for _ in range(6):
            scheduled = clock.next_call()
            clock.advance(delays[-1])
            delays.append(await scheduled)
        assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
        assert t.state == "lost" and [e for e, _ in seen] == ["lost"]
    finally:
        await t.close()
        assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_reconnection_waits_are_jittered_and_differ_between_transports(amqp_url: str) -> None:
    """Two transports that lose the broker at the same moment draw different waits (seeded
    generators here), each a random share of at most ``reconnect_jitter`` below the doubling,
    never above ``reconnect_max``: they do not all come back in the same instant."""
    import dataclasses
    import random

    from ion.core.messaging.amqp import reconnect_delay
    from ion.testing.rabbitmq import free_port

    closed = free_port(30000, 40000)
    runs: list[list[float]] = []
    for seed in (1, 2):
        clock = _WatchedClock()
        t = AmqpTransport(amqp_url, clock=clock, rng=random.Random(seed))
        await t.connect()
        try:
            scheduled = clock.next_call()
            t._conn.transport.abortConnection()
            delays = [await scheduled]
            t.url = dataclasses.replace(t.url, port=closed)
            for _ in range(6):
                scheduled = clock.next_call()
                clock.advance(delays[-1])
                delays.append(await scheduled)
            runs.append(delays)
        finally:
            await t.close()
        replay = random.Random(seed)
        assert delays == [reconnect_delay(n, 0.5, 10.0, 0.5, replay) for n in range(7)]
        for n, (delay, cap) in enumerate(zip(delays, [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0], strict=True)):
            assert cap / 2 <= delay <= cap, (n, delay)
    assert runs[0] != runs[1]
    assert all(a != b for a, b in zip(*runs, strict=True))


@pytest_twisted.ensureDeferred
async def test_broker_addresses_are_tried_in_turn(amqp_url: str) -> None:
    """With a list of addresses, connect() skips one that is down (a closed loopback port) for
    the next; after a loss the transport moves on to the next address, round the list, until
    one answers; and the first address alone still fails with its own error."""
    import dataclasses

    from ion.core.messaging.transport import parse_broker_url
    from ion.testing.rabbitmq import free_port

    real = parse_broker_url(amqp_url)
    down = dataclasses.replace(real, port=free_port(30000, 40000))
    clock = _WatchedClock()
    t = AmqpTransport([down, real], clock=clock, reconnect_jitter=0)
    tried: list[int] = []
    real_open = t._open_connection

    def open_connection(url: Any) -> Any:
        tried.append(url.port)
        return real_open(url)

    t._open_connection = open_connection  # type: ignore[method-assign]
    await t.connect()
    seen, wait = _events(t)
    try:
        assert tried == [down.port, real.port] and t.url == real and t.where == f"127.0.0.1:{real.port}"
        q = await t.declare_queue(_name())
        inbox = _Inbox()
        await t.consume(q, inbox)
        # The connection drops: the first attempt goes to the next address (down), the second
        # to the one after it (round the list: the broker), which restores the consumer.
        scheduled = clock.next_call()
        restored = wait("restored")
        t._conn.transport.abortConnection()
        clock.advance(await scheduled)
        scheduled = clock.next_call()
        clock.advance(await scheduled)
        await restored
        assert tried == [down.port, real.port, down.port, real.port]
        assert [e for e, _ in seen] == ["lost", "restored"] and t.url == real
        await t.publish("", q, b"after", Properties())
        assert (await inbox.next()).body == b"after"
    finally:
        await t.close()
    with pytest.raises(TransportError, match=f"no broker of 2 could be reached: cannot connect to broker at "
                                             f"127.0.0.1:{down.port}: connection refused .*; cannot connect"):
        await AmqpTransport([down, down]).connect()
    with pytest.raises(TransportError, match=f"^cannot connect to broker at 127.0.0.1:{down.port}: connection "
                                             "refused"):
        await AmqpTransport([down]).connect()


@pytest_twisted.ensureDeferred
async def test_container_on_a_list_of_brokers_from_options_or_config(amqp_url: str) -> None:
    """A container given several broker URLs (``--broker`` twice, or ``brokers`` of
    ion.core.messaging) starts on the first that answers and calls go through it."""
    import dataclasses

    from ion.core.container import Container
    from ion.core.messaging.transport import parse_broker_url
    from ion.testing import test_config
    from ion.testing.rabbitmq import free_port

    real = parse_broker_url(amqp_url)
    down = str(dataclasses.replace(real, port=free_port(30000, 40000))).replace(
        f"{real.username}@", f"{real.username}:{real.password}@")
    made = [
        Container(config=test_config(), broker_url=[down, amqp_url], sysname="listed"),
        Container(config=test_config({"ion.core.messaging": {"brokers": [down, amqp_url]}}), sysname="listed"),
    ]
    try:
        for container in made:
            await container.start()
            assert isinstance(container.transport, AmqpTransport)
            assert container.transport.url == real and len(container.transport.urls) == 2
        await made[0].spawn(HelloService)
        proc = await client_process(made[1])
        assert await HelloClient(proc).hello("listed") == "Hello there, listed"
    finally:
        for container in made:
            if container.state.value in ("READY", "ACTIVE"):
                await container.terminate()


# -- requests without publisher confirms ----------------------------------------------------------
def _spy_publishes(monkeypatch: Any) -> list[tuple[str, bool]]:
    """Record (routing key, confirm mode of the channel) of every message the transport sends."""
    sent: list[tuple[str, bool]] = []
    real_send = AmqpTransport._send

    def send(self: AmqpTransport, ch: Any, exchange: str, routing_key: str, *args: Any) -> Any:
        sent.append((routing_key, bool(ch._delivery_confirmation)))
        return real_send(self, ch, exchange, routing_key, *args)

    real_send_now = AmqpTransport._send_now

    def send_now(self: AmqpTransport, ch: Any, impl: Any, exchange: str, routing_key: str, *args: Any) -> Any:
        sent.append((routing_key, bool(ch._delivery_confirmation)))
        return real_send_now(self, ch, impl, exchange, routing_key, *args)

    monkeypatch.setattr(AmqpTransport, "_send", send)
    monkeypatch.setattr(AmqpTransport, "_send_now", send_now)  # (publish_now, without a Deferred)
    return sent


@pytest_twisted.ensureDeferred
async def test_requests_and_replies_go_without_confirms_and_unroutable_fails_at_once(
        amqp_containers: ContainerFactory, monkeypatch: Any) -> None:
    """An rpc and its reply are published without a confirm; a request no queue is bound to
    still fails at once with 404 (mandatory: basic.return), not after its timeout."""
    server = await amqp_containers(sysname="noconf")
    client = await amqp_containers(sysname="noconf")
    await server.spawn(HelloService)
    proc = await client_process(client)
    sent = _spy_publishes(monkeypatch)
    assert await HelloClient(proc).hello("x") == "Hello there, x"
    request = [c for key, c in sent if key == "noconf.hello"]
    reply = [c for key, c in sent if key == proc.backend_name]
    assert request == [False] and reply == [False], sent
    # (A 60 s timeout: a 404 rather than a ConversationTimeout shows it failed at once.)
    with pytest.raises(ConversationError) as info:
        await proc.rpc_send("nobody.home", "x", None, timeout=60)
    assert info.value.response_code == 404 and not isinstance(info.value, ConversationTimeout)
    assert "no process or service is bound to 'nobody.home' in system noconf" in str(info.value)
    assert [c for key, c in sent if key == "nobody.home"] == [False]


@pytest_twisted.ensureDeferred
async def test_refused_request_fails_at_once_with_the_brokers_reason(
        amqp_containers: ContainerFactory, monkeypatch: Any) -> None:
    """A request the broker refuses (a user_id that is not the connection's login) closes the
    unconfirmed publish channel: the call fails at once with the broker's code and text, so does
    every other call published on that channel meanwhile, and later calls work on a new one."""
    server = await amqp_containers(sysname="refuse")
    client = await amqp_containers(sysname="refuse")
    hang_pid = await server.spawn(HangService)
    hang = server.proc_manager.get(hang_pid)
    await server.spawn(HelloService)
    proc = await client_process(client)
    sent = _spy_publishes(monkeypatch)
    transport = client.transport
    assert isinstance(transport, AmqpTransport)
    in_flight = proc.rpc_send("hang", "hang", None, timeout=60)  # on the channel, unanswered
    await HelloClient(proc).hello("first")  # the hang request has surely reached the broker
    transport.user = "mallory"  # what a broker refuses: a user_id that is not the login
    refused = proc.rpc_send("hello", "hello", "x", timeout=60)
    with pytest.raises(ConversationError) as info:
        await refused
    assert not isinstance(info.value, ConversationTimeout)  # (60 s timeout: it failed at once)
    assert info.value.response_code == 406
    assert "PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user was 'guest'" in str(
        info.value)
    # The call published earlier on the same channel is failed too (its reply could not come
    # back there: the broker may have dropped anything after the refused message).
    with pytest.raises(ConversationError, match="PRECONDITION_FAILED"):
        await in_flight
    assert [c for key, c in sent if key == "refuse.hello"] == [False, False]
    transport.user = "guest"
    assert await HelloClient(proc).hello("again") == "Hello there, again"
    for d in hang.pending:
        d.callback(None)


@pytest_twisted.ensureDeferred
async def test_send_with_confirm_fires_once_the_broker_took_it(amqp_containers: ContainerFactory,
                                                               monkeypatch: Any) -> None:
    """send(confirm=True) goes out on the confirm channel and fires on the broker's confirm; one the
    broker refuses fails with its reason. Without it a send follows publisher_confirms."""
    container = await amqp_containers(sysname="confsend")
    await container.spawn(HelloService)
    proc = await client_process(container)
    sent = _spy_publishes(monkeypatch)
    transport = container.transport
    assert isinstance(transport, AmqpTransport)
    ch_before = transport._publisher.current()
    d = proc.send("hello", "hello", "one-way", confirm=True)
    fired: list[Any] = []
    d.addBoth(lambda result: fired.append(result) or result)
    assert fired == []  # it waits for the broker's basic.ack
    await d
    confirm_channel = transport._publisher.current()
    assert confirm_channel is not None and (ch_before is None or confirm_channel is ch_before)
    await proc.send("hello", "hello", "default")  # publisher_confirms (on) decides
    await proc.send("hello", "hello", "unconfirmed", confirm=False)
    assert [c for key, c in sent if key == "confsend.hello"] == [True, True, False]
    transport.user = "mallory"
    with pytest.raises(TransportError, match="PRECONDITION_FAILED - user_id property set to 'mallory'"):
        await proc.send("hello", "hello", "refused", confirm=True)
    transport.user = "guest"


@pytest_twisted.ensureDeferred
async def test_refused_unconfirmed_messages_are_those_since_the_broker_last_showed_it_took_them(
        transport_factory: Any, monkeypatch: Any) -> None:
    """Every FENCE_EVERY unconfirmed publishes a basic.qos round trip shows the broker took them, so
    they are forgotten; when the broker then closes the channel (a refused user_id), the refused
    callbacks hear of each message published on it since, with the broker's code and text, and the
    next publish goes out on a new channel."""
    import ion.core.messaging.amqp as amqp

    monkeypatch.setattr(amqp, "FENCE_EVERY", 4)
    t = await transport_factory()
    q = await t.declare_queue(_name())
    inbox = _Inbox()
    await t.consume(q, inbox)
    refused: list[tuple[str, str | None, Exception]] = []
    heard: defer.Deferred[None] = defer.Deferred()

    def on_refused(exchange: str, key: str, props: Properties, error: Exception) -> None:
        refused.append((key, props.correlation_id, error))
        if len(refused) == 2:
            heard.callback(None)

    t.add_refused_callback(on_refused)
    for i in range(4):
        await t.publish("", q, b"a", Properties(correlation_id=f"a#{i}"), confirm=False)
    channel = t._fast.current()
    assert channel is not None and t._unconfirmed[channel].fencing
    t.user = "mallory"
    t.publish("", q, b"b", Properties(correlation_id="b#1"), confirm=False)
    t.user = "guest"
    t.publish("", q, b"c", Properties(correlation_id="b#2"), confirm=False)  # after it: dropped too
    await heard.addTimeout(10, reactor)
    assert [(key, cid) for key, cid, _ in refused] == [(q, "b#1"), (q, "b#2")]
    error = refused[0][2]
    assert isinstance(error, TransportError) and getattr(error, "reply_code", None) == 406
    assert "PRECONDITION_FAILED - user_id property set to 'mallory'" in str(error)
    while len(inbox.items) < 4:
        await inbox.next()
    await t.publish("", q, b"after", Properties(), confirm=False)
    assert (await inbox.next()).body == b"after"
    assert t._fast.current() is not channel
    assert [d.body for d in inbox.items] == [b"a"] * 4 + [b"after"]


def test_broker_addresses_of_one_container_share_one_login() -> None:
    """A failover must not make the container someone else (its operators, its messages' user_id): a
    list whose addresses log in as different users is refused at once, naming them."""
    from ion.core.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"log in as different users \(alice, bob\)"):
        AmqpTransport(["amqp://alice:x@127.0.0.1:1/", "amqp://bob:y@127.0.0.1:2/"])
    AmqpTransport(["amqp://alice:x@127.0.0.1:1/", "amqp://alice:x@127.0.0.1:2/"])  # one login: fine
