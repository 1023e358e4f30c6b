"""The transport contract: broker behaviour every :class:`~ion.core.messaging.transport.Transport` keeps.

Written once, run against every transport (STYLE lesson 2): a test module
subclasses :class:`TransportContract` and provides two fixtures,

- ``transport_factory``: ``await transport_factory(user=None)`` returns a new,
  connected Transport; every transport it returns talks to the same broker,
  and the fixture closes them all at teardown. ``user`` names the broker login
  (``None``: the default one); the suite only ever passes
  :attr:`TransportContract.other_user`.
- ``unique``: a fresh name prefix per test (``tests/core/messaging/conftest.py``),
  so tests never see each other's exchanges, queues or messages.

No test sleeps. Deliveries are awaited through Deferreds that the consumer
callback fires, each with a timeout so that a broken transport fails the
test instead of hanging it. "Nothing more arrived" is checked after a
:meth:`~TransportContract.round_trip` through the broker: a probe message
published after the event and consumed on the same connection.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.python.failure import Failure

from ion.core.exceptions import TransportError
from ion.core.messaging.transport import Delivery, Properties, Transport

__all__ = ["TransportContract", "Collector", "TransportFactory"]

TransportFactory = Callable[..., Awaitable[Transport]]

#: Seconds to wait for a delivery before the test fails.
DELIVERY_TIMEOUT = 5.0


class Collector:
    """A consumer callback that records deliveries and fires waiters.

    :param auto_ack: ack every delivery on arrival (else the test settles them).
    :param also: another Collector that records every delivery too.
    """

    def __init__(self, name: str = "consumer", *, auto_ack: bool = True, also: Collector | None = None,
                 timeout: float = DELIVERY_TIMEOUT) -> None:
        self.name = name
        self.auto_ack = auto_ack
        self.also = also
        self.timeout = timeout
        self.deliveries: list[Delivery] = []
        self._waiters: list[tuple[int, defer.Deferred[list[Delivery]]]] = []

    def __call__(self, delivery: Delivery) -> None:
        if self.auto_ack and not delivery.settled:
            delivery.ack()
        self.record(delivery)
        if self.also is not None:
            self.also.record(delivery)

    def record(self, delivery: Delivery) -> None:
        """Note a delivery (without settling it) and fire the waiters it satisfies."""
        self.deliveries.append(delivery)
        self._check()

    def _check(self) -> None:
        for n, d in list(self._waiters):
            if len(self.deliveries) >= n:
                self._waiters.remove((n, d))
                if not d.called:
                    d.callback(self.deliveries[:n])

    def wait_for(self, n: int) -> defer.Deferred[list[Delivery]]:
        """Fire with the first ``n`` deliveries once there are that many (fail after the timeout)."""
        d: defer.Deferred[list[Delivery]] = defer.Deferred()
        self._waiters.append((n, d))
        self._check()
        if not d.called:
            def timed_out(result: Any, timeout: float) -> Failure:
                return Failure(AssertionError(
                    f"{self.name}: {len(self.deliveries)} deliveries after {timeout:g} s, expected {n}:"
                    f" {self.bodies[:20]!r}"))

            d.addTimeout(self.timeout, reactor, onTimeoutCancel=timed_out)
        return d

    @property
    def bodies(self) -> list[bytes]:
        return [d.body for d in self.deliveries]

    @property
    def keys(self) -> list[str]:
        return [d.routing_key for d in self.deliveries]


class Returns:
    """A return callback that records ``(exchange, routing_key, properties)`` and fires waiters."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Properties]] = []
        self.collector = Collector("return callback")

    def __call__(self, exchange: str, routing_key: str, properties: Properties) -> None:
        self.calls.append((exchange, routing_key, properties))
        self.collector.record(None)  # type: ignore[arg-type]

    def wait_for(self, n: int) -> defer.Deferred[Any]:
        return self.collector.wait_for(n)


class TransportContract:
    """Behaviour every transport must have; subclass it once per transport (no ``Test`` prefix here).

    Subclasses may override :attr:`other_user` (a second broker login the
    ``transport_factory`` fixture accepts) and :attr:`many` (messages in the
    ordering test).
    """

    #: A login other than the factory's default, for the identity test.
    other_user: str = "ion-other"
    #: How many messages the in-order test sends.
    many: int = 1000

    _probes = itertools.count(1)

    # -- helpers -------------------------------------------------------------------
    @staticmethod
    async def queue(t: Transport, exchange: str, name: str, *keys: str, **kwargs: Any) -> str:
        """Declare ``exchange`` (topic) and queue ``name``, bound by each of ``keys``."""
        await t.declare_exchange(exchange, "topic")
        declared = await t.declare_queue(name, **kwargs)
        for key in keys:
            await t.bind(name, exchange, key)
        return declared

    @staticmethod
    async def publish_all(t: Transport, exchange: str, key: str, bodies: list[bytes]) -> None:
        """Publish ``bodies`` in order (waiting for each, so the order is the publish order)."""
        for body in bodies:
            await t.publish(exchange, key, body, Properties())

    async def round_trip(self, t: Transport, unique: str) -> None:
        """Send a probe through the broker on ``t`` and wait for it to come back.

        Anything the broker was going to deliver on ``t`` because of earlier
        actions has been delivered by then (the broker keeps order on a
        connection), so a test can check that nothing more arrived.
        """
        n = next(self._probes)
        exchange, queue = f"{unique}.probe", f"{unique}.probe{n}"
        await self.queue(t, exchange, queue, queue)
        probe = Collector(f"probe {queue}")
        tag = await t.consume(queue, probe, prefetch=1)
        await t.publish(exchange, queue, b"probe", Properties())
        await probe.wait_for(1)
        await t.cancel(tag)
        await t.delete_queue(queue)

    # -- declare, publish, consume ----------------------------------------------------
    @pytest_twisted.ensureDeferred
    async def test_roundtrip_with_properties(self, transport_factory: TransportFactory, unique: str) -> None:
        """A published message reaches a bound queue's consumer with its body, properties and routing info."""
        consumer_conn = await transport_factory()
        publisher = await transport_factory()
        ex, q = f"{unique}.x", f"{unique}.q"
        assert await self.queue(consumer_conn, ex, q, "svc.hello") == q
        got = Collector()
        tag = await consumer_conn.consume(q, got, prefetch=10)
        assert isinstance(tag, str) and tag
        body = b"\x00\x01binary body\xff"
        await publisher.publish(ex, "svc.hello", body, Properties(
            correlation_id="c1.7#42", reply_to="c1.7b", content_type="application/msgpack",
            headers={"x-note": "kept"}))
        await publisher.publish(ex, "svc.hello", b"second", Properties(message_id="mine-1"))
        first, second = await got.wait_for(2)
        assert first.body == body
        assert (first.exchange, first.routing_key, first.redelivered) == (ex, "svc.hello", False)
        props = first.properties
        assert (props.correlation_id, props.reply_to) == ("c1.7#42", "c1.7b")
        assert props.content_type == "application/msgpack"
        assert props.headers.get("x-note") == "kept"
        assert props.user_id == publisher.user
        assert isinstance(props.message_id, str) and props.message_id
        assert second.body == b"second"
        assert second.properties.message_id == "mine-1"

    @pytest_twisted.ensureDeferred
    async def test_publish_now_carries_any_body_and_properties(self, transport_factory: TransportFactory,
                                                                unique: str) -> None:
        """What the container's sends use (``publish_now``): bodies of any size (over AMQP's frame size
        too, and empty) and every property, non-ASCII text and header tables included, arrive as sent."""
        import random

        consumer_conn = await transport_factory()
        publisher = await transport_factory()
        ex, q = f"{unique}.x", f"{unique}.q"
        await self.queue(consumer_conn, ex, q, "k")
        got = Collector()
        await consumer_conn.consume(q, got, prefetch=10)
        await publisher.publish(ex, "k", b"first", Properties())  # (the exchange is known from then on)
        bodies = [random.Random(7).randbytes(300_000), b"", b"small \xff"]
        for n, body in enumerate(bodies):
            d = publisher.publish_now(ex, "k", body, Properties(
                "application/msgpack", f"ré-{n}#1", "reply.ü", None, None, {"x-n": n, "x-s": "ß"}, "60000"),
                mandatory=True, confirm=False)
            if d is not None:
                await d
        deliveries = await got.wait_for(4)
        assert [d.body for d in deliveries] == [b"first", *bodies]
        for n, delivery in enumerate(deliveries[1:]):
            props = delivery.properties
            assert (props.content_type, props.correlation_id, props.reply_to, props.expiration) == (
                "application/msgpack", f"ré-{n}#1", "reply.ü", "60000")
            assert props.headers == {"x-n": n, "x-s": "ß"}
            assert props.user_id == publisher.user and props.message_id
            assert (delivery.exchange, delivery.routing_key, delivery.redelivered) == (ex, "k", False)

    @pytest_twisted.ensureDeferred
    async def test_expiration(self, transport_factory: TransportFactory, unique: str) -> None:
        """A message whose ``expiration`` (TTL, ms) passes while it waits in a queue is never delivered;
        one still within it is, with its expiration unchanged; one without none never expires."""
        t = await transport_factory()
        ex, q = f"{unique}.x", f"{unique}.q"
        await self.queue(t, ex, q, "k")
        await t.publish(ex, "k", b"short", Properties(correlation_id="c1", expiration="20"))
        await t.publish(ex, "k", b"long", Properties(correlation_id="c2", expiration="60000"))
        await t.publish(ex, "k", b"forever", Properties(correlation_id="c3"))
        await t.publish(ex, "k", b"short again", Properties(expiration="20"))
        # Nobody consumes meanwhile: the short ones wait out their TTL in the queue (a real wait,
        # this suite runs on the reactor; the embedded broker's clock is the reactor's).
        await task.deferLater(reactor, 0.2, lambda: None)
        got = Collector()
        await t.consume(q, got, prefetch=10)
        await t.publish(ex, "k", b"after", Properties(expiration="60000"))
        deliveries = await got.wait_for(3)
        await self.round_trip(t, unique)
        assert got.bodies == [b"long", b"forever", b"after"]
        assert [d.properties.expiration for d in deliveries] == ["60000", None, "60000"]
        assert deliveries[0].properties.correlation_id == "c2"

    @pytest_twisted.ensureDeferred
    async def test_message_ids_are_unique(self, transport_factory: TransportFactory, unique: str) -> None:
        """Messages published without a message_id get distinct ones, even when the Properties object is reused."""
        t = await transport_factory()
        ex, q = f"{unique}.x", f"{unique}.q"
        await self.queue(t, ex, q, "k")
        got = Collector()
        await t.consume(q, got, prefetch=10)
        props = Properties(correlation_id="c")
        for _ in range(3):
            await t.publish(ex, "k", b"m", props)
        await (await transport_factory()).publish(ex, "k", b"m", Properties())
        deliveries = await got.wait_for(4)
        ids = [d.properties.message_id for d in deliveries]
        assert all(ids) and len(set(ids)) == 4, ids

    @pytest_twisted.ensureDeferred
    async def test_user_id_is_the_publishers_login(self, transport_factory: TransportFactory, unique: str) -> None:
        """user_id on a delivery is the publishing connection's login, whatever the publisher put there."""
        default = await transport_factory()
        other = await transport_factory(user=self.other_user)
        assert other.user == self.other_user
        assert default.user != other.user
        ex, q = f"{unique}.x", f"{unique}.q"
        await self.queue(default, ex, q, "k")
        got = Collector()
        await default.consume(q, got, prefetch=10)
        await other.publish(ex, "k", b"from other", Properties())
        await default.publish(ex, "k", b"from default", Properties())
        await other.publish(ex, "k", b"forged", Properties(user_id="mallory"))
        deliveries = await got.wait_for(3)
        assert [(d.body, d.properties.user_id) for d in deliveries] == [
            (b"from other", other.user), (b"from default", default.user), (b"forged", other.user)]

    @pytest_twisted.ensureDeferred
    async def test_declare_is_idempotent(self, transport_factory: TransportFactory, unique: str) -> None:
        """Declaring an existing exchange or queue again (from any connection) succeeds and keeps its messages."""
        a, b = await transport_factory(), await transport_factory()
        ex, q = f"{unique}.x", f"{unique}.q"
        await self.queue(a, ex, q, "k")
        await a.publish(ex, "k", b"kept", Properties())
        await self.queue(b, ex, q, "k")
        assert await b.declare_queue(q) == q
        got = Collector()
        await b.consume(q, got)
        assert [d.body for d in await got.wait_for(1)] == [b"kept"]

    @pytest_twisted.ensureDeferred
    async def test_exchange_type_mismatch_fails(self, transport_factory: TransportFactory, unique: str) -> None:
        """Re-declaring an exchange with another type fails with TransportError."""
        t = await transport_factory()
        await t.declare_exchange(f"{unique}.x", "topic")
        with pytest.raises(TransportError):
            await (await transport_factory()).declare_exchange(f"{unique}.x", "fanout")

    # -- routing ------------------------------------------------------------------------
    @pytest_twisted.ensureDeferred
    async def test_topic_routing_to_several_queues(self, transport_factory: TransportFactory, unique: str) -> None:
        """A topic exchange copies each message to every queue with a matching binding, and to no other."""
        t = await transport_factory()
        ex = f"{unique}.x"
        patterns = {"star": ["a.*", "end"], "hash": ["a.#", "end"], "tail": ["#.z", "end"], "exact": ["a.z", "end"]}
        collectors = {}
        for name, keys in patterns.items():
            q = await self.queue(t, ex, f"{unique}.{name}", *keys)
            collectors[name] = Collector(name)
            await t.consume(q, collectors[name], prefetch=100)
        sent = ["a.b", "a.b.c", "a", "x.z", "a.z", "nomatch", "b.a", "end"]
        for key in sent:
            await t.publish(ex, key, key.encode(), Properties())
        expected = {
            "star": ["a.b", "a.z", "end"],
            "hash": ["a.b", "a.b.c", "a", "a.z", "end"],
            "tail": ["x.z", "a.z", "end"],
            "exact": ["a.z", "end"],
        }
        for name, keys in expected.items():
            deliveries = await collectors[name].wait_for(len(keys))
            assert [d.routing_key for d in deliveries] == keys, name
            assert [d.body for d in deliveries] == [k.encode() for k in keys], name
        await self.round_trip(t, unique)
        for name, keys in expected.items():
            assert collectors[name].keys == keys, name  # nothing after "end"

    @pytest_twisted.ensureDeferred
    async def test_one_copy_per_queue_with_overlapping_bindings(self, transport_factory: TransportFactory,
                                                                unique: str) -> None:
        """A queue bound by several matching patterns gets a message once."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "a.b", "a.*", "#", "a.#")
        got = Collector()
        await t.consume(q, got, prefetch=10)
        await t.publish(ex, "a.b", b"once", Properties())
        await t.publish(ex, "zzz", b"end", Properties())
        assert [d.body for d in await got.wait_for(2)] == [b"once", b"end"]

    @pytest_twisted.ensureDeferred
    async def test_unbind(self, transport_factory: TransportFactory, unique: str) -> None:
        """After unbind, messages with that key no longer reach the queue; its other bindings still work."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k.*", "end")
        got = Collector()
        await t.consume(q, got, prefetch=10)
        await t.publish(ex, "k.1", b"before", Properties())
        await got.wait_for(1)
        await t.unbind(q, ex, "k.*")
        await t.publish(ex, "k.2", b"after", Properties())
        await t.publish(ex, "end", b"end", Properties())
        await got.wait_for(2)
        await self.round_trip(t, unique)
        assert got.bodies == [b"before", b"end"]

    # -- prefetch, round-robin -------------------------------------------------------------
    @pytest_twisted.ensureDeferred
    async def test_prefetch_one(self, transport_factory: TransportFactory, unique: str) -> None:
        """With prefetch=1 the second message is delivered only after the first is acked."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        got = Collector(auto_ack=False)
        await t.consume(q, got, prefetch=1)
        await self.publish_all(t, ex, "k", [b"1", b"2"])
        await got.wait_for(1)
        await self.round_trip(t, unique)
        assert got.bodies == [b"1"]
        got.deliveries[0].ack()
        second = await got.wait_for(2)
        assert [d.body for d in second] == [b"1", b"2"]

    @pytest_twisted.ensureDeferred
    async def test_prefetch_window(self, transport_factory: TransportFactory, unique: str) -> None:
        """With prefetch=3 at most three messages are unacknowledged; each ack lets one more through."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        got = Collector(auto_ack=False)
        await t.consume(q, got, prefetch=3)
        await self.publish_all(t, ex, "k", [b"%d" % i for i in range(6)])
        await got.wait_for(3)
        await self.round_trip(t, unique)
        assert got.bodies == [b"0", b"1", b"2"]
        got.deliveries[1].ack()
        await got.wait_for(4)
        await self.round_trip(t, unique)
        assert got.bodies == [b"0", b"1", b"2", b"3"]
        for d in got.deliveries:
            if not d.settled:
                d.ack()
        assert [d.body for d in await got.wait_for(6)] == [b"%d" % i for i in range(6)]

    @pytest_twisted.ensureDeferred
    async def test_round_robin_between_connections(self, transport_factory: TransportFactory, unique: str) -> None:
        """Two consumers of one queue on two connections share its messages round-robin, each message once."""
        a, b = await transport_factory(), await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(a, ex, f"{unique}.q", "k")
        both = Collector("both")
        got_a, got_b = Collector("a", also=both), Collector("b", also=both)
        await a.consume(q, got_a, prefetch=20)
        await b.consume(q, got_b, prefetch=20)
        bodies = [b"%d" % i for i in range(10)]
        await self.publish_all(a, ex, "k", bodies)
        await both.wait_for(10)
        assert sorted(both.bodies, key=int) == bodies
        assert got_a.bodies and got_b.bodies
        assert abs(len(got_a.bodies) - len(got_b.bodies)) <= 1, (got_a.bodies, got_b.bodies)
        # each consumer sees its share in publish order
        assert got_a.bodies == sorted(got_a.bodies, key=int)
        assert got_b.bodies == sorted(got_b.bodies, key=int)

    @pytest_twisted.ensureDeferred
    async def test_auto_ack_deliveries_arrive_settled_without_a_window(self, transport_factory: TransportFactory,
                                                                       unique: str) -> None:
        """With auto_ack every message is delivered at once, already settled (prefetch does not apply),
        and settling it again raises TransportError."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        got = Collector(auto_ack=False)
        await t.consume(q, got, prefetch=1, auto_ack=True)
        await self.publish_all(t, ex, "k", [b"1", b"2", b"3"])
        deliveries = await got.wait_for(3)
        assert [d.body for d in deliveries] == [b"1", b"2", b"3"]
        assert all(d.settled for d in deliveries)
        with pytest.raises(TransportError):
            deliveries[0].ack()
        with pytest.raises(TransportError):
            deliveries[1].reject()

    @pytest_twisted.ensureDeferred
    async def test_auto_ack_messages_are_not_requeued(self, transport_factory: TransportFactory,
                                                      unique: str) -> None:
        """What an auto_ack consumer was sent is gone from the queue: closing its connection gives
        nothing back."""
        a = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(a, ex, f"{unique}.q", "k")
        got = Collector(auto_ack=False)
        await a.consume(q, got, auto_ack=True)
        await self.publish_all(a, ex, "k", [b"one", b"two"])
        await got.wait_for(2)
        await a.close()
        b = await transport_factory()
        later = Collector("later")
        await b.consume(q, later)
        await b.publish(ex, "k", b"marker", Properties())
        assert [d.body for d in await later.wait_for(1)] == [b"marker"]
        await self.round_trip(b, unique)
        assert later.bodies == [b"marker"]

    # -- ack / reject ----------------------------------------------------------------------
    @pytest_twisted.ensureDeferred
    async def test_ack_removes_the_message(self, transport_factory: TransportFactory, unique: str) -> None:
        """An acked message is gone: a later consumer does not get it again, even after the connection closes."""
        a = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(a, ex, f"{unique}.q", "k")
        got = Collector(auto_ack=False)
        await a.consume(q, got)
        await a.publish(ex, "k", b"once", Properties())
        (delivery,) = await got.wait_for(1)
        delivery.ack()
        assert delivery.settled
        await self.round_trip(a, unique)  # the ack has reached the broker
        await a.close()
        b = await transport_factory()
        later = Collector("later")
        await b.consume(q, later)
        await b.publish(ex, "k", b"marker", Properties())
        assert [d.body for d in await later.wait_for(1)] == [b"marker"]

    @pytest_twisted.ensureDeferred
    async def test_settle_only_once(self, transport_factory: TransportFactory, unique: str) -> None:
        """A delivery can be acked or rejected only once; a second settle raises TransportError."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        got = Collector(auto_ack=False)
        await t.consume(q, got)
        await t.publish(ex, "k", b"m", Properties())
        (delivery,) = await got.wait_for(1)
        delivery.ack()
        with pytest.raises(TransportError):
            delivery.ack()
        with pytest.raises(TransportError):
            delivery.reject()

    @pytest_twisted.ensureDeferred
    async def test_reject_requeue_redelivers(self, transport_factory: TransportFactory, unique: str) -> None:
        """reject(requeue=True) puts the message back; it comes again with redelivered=True and the same id."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        got = Collector(auto_ack=False)
        await t.consume(q, got, prefetch=1)
        await t.publish(ex, "k", b"again", Properties(correlation_id="c#1"))
        (first,) = await got.wait_for(1)
        assert first.redelivered is False
        first.reject(requeue=True)
        _, second = await got.wait_for(2)
        assert second.body == b"again"
        assert second.redelivered is True
        assert second.properties.message_id == first.properties.message_id
        assert second.properties.correlation_id == "c#1"
        second.ack()

    @pytest_twisted.ensureDeferred
    async def test_reject_requeue_keeps_the_message_first(self, transport_factory: TransportFactory,
                                                          unique: str) -> None:
        """A requeued message is delivered again before the messages queued behind it."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        got = Collector(auto_ack=False)
        await t.consume(q, got, prefetch=1)
        await self.publish_all(t, ex, "k", [b"1", b"2"])
        (first,) = await got.wait_for(1)
        first.reject(requeue=True)
        second = (await got.wait_for(2))[1]
        assert (second.body, second.redelivered) == (b"1", True)
        second.ack()
        assert (await got.wait_for(3))[2].body == b"2"
        got.deliveries[2].ack()

    @pytest_twisted.ensureDeferred
    async def test_reject_without_requeue_drops(self, transport_factory: TransportFactory, unique: str) -> None:
        """reject(requeue=False) drops the message: the next delivery is the one published after it."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        got = Collector(auto_ack=False)
        await t.consume(q, got, prefetch=1)
        await t.publish(ex, "k", b"dropped", Properties())
        (first,) = await got.wait_for(1)
        first.reject(requeue=False)
        await t.publish(ex, "k", b"next", Properties())
        _, second = await got.wait_for(2)
        assert (second.body, second.redelivered) == (b"next", False)
        second.ack()
        await self.round_trip(t, unique)
        assert got.bodies == [b"dropped", b"next"]

    # -- cancel and close ----------------------------------------------------------------------
    @pytest_twisted.ensureDeferred
    async def test_cancel_stops_delivery(self, transport_factory: TransportFactory, unique: str) -> None:
        """After cancel, the consumer gets nothing more; the messages wait in the queue for the next consumer."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        got = Collector("cancelled")
        tag = await t.consume(q, got, prefetch=10)
        await t.publish(ex, "k", b"before", Properties())
        await got.wait_for(1)
        await t.cancel(tag)
        await self.publish_all(t, ex, "k", [b"after1", b"after2"])
        await self.round_trip(t, unique)
        assert got.bodies == [b"before"]
        later = Collector("later")
        await (await transport_factory()).consume(q, later, prefetch=10)
        assert [d.body for d in await later.wait_for(2)] == [b"after1", b"after2"]
        assert got.bodies == [b"before"]

    @pytest_twisted.ensureDeferred
    async def test_settle_after_cancel(self, transport_factory: TransportFactory, unique: str) -> None:
        """A delivery received before cancel can still be acked after it, and is then gone."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        got = Collector(auto_ack=False)
        tag = await t.consume(q, got, prefetch=1)
        await t.publish(ex, "k", b"in flight", Properties())
        (delivery,) = await got.wait_for(1)
        await t.cancel(tag)
        delivery.ack()
        await self.round_trip(t, unique)
        await t.close()
        later = Collector("later")
        other = await transport_factory()
        await other.consume(q, later)
        await other.publish(ex, "k", b"marker", Properties())
        assert [d.body for d in await later.wait_for(1)] == [b"marker"]

    @pytest_twisted.ensureDeferred
    async def test_close_requeues_unacked(self, transport_factory: TransportFactory, unique: str) -> None:
        """Closing a connection gives its unacked messages, in order and marked redelivered, to another consumer."""
        a, b = await transport_factory(), await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(a, ex, f"{unique}.q", "k")
        got_a = Collector("a", auto_ack=False)
        await a.consume(q, got_a, prefetch=2)
        await self.publish_all(b, ex, "k", [b"1", b"2"])
        await got_a.wait_for(2)
        got_b = Collector("b")
        await b.consume(q, got_b, prefetch=10)
        await self.round_trip(b, unique)
        assert got_b.bodies == []
        await a.close()
        deliveries = await got_b.wait_for(2)
        assert [(d.body, d.redelivered) for d in deliveries] == [(b"1", True), (b"2", True)]

    @pytest_twisted.ensureDeferred
    async def test_close_after_cancel_requeues_unacked(self, transport_factory: TransportFactory,
                                                       unique: str) -> None:
        """Messages still unacked when their consumer was cancelled go back to the queue when the connection closes."""
        a, b = await transport_factory(), await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(a, ex, f"{unique}.q", "k")
        got_a = Collector("a", auto_ack=False)
        tag = await a.consume(q, got_a, prefetch=1)
        await b.publish(ex, "k", b"unacked", Properties())
        await got_a.wait_for(1)
        await a.cancel(tag)
        got_b = Collector("b")
        await b.consume(q, got_b)
        await a.close()
        (delivery,) = await got_b.wait_for(1)
        assert (delivery.body, delivery.redelivered) == (b"unacked", True)

    @pytest_twisted.ensureDeferred
    async def test_closed_transport_refuses_operations(self, transport_factory: TransportFactory,
                                                       unique: str) -> None:
        """After close, declare, publish and consume fail with TransportError; closing again is harmless."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        await t.close()
        with pytest.raises(TransportError):
            await t.publish(ex, "k", b"x", Properties())
        with pytest.raises(TransportError):
            await t.declare_queue(f"{unique}.other")
        with pytest.raises(TransportError):
            await t.consume(q, Collector())
        await t.close()

    # -- returns and failures -------------------------------------------------------------------
    @pytest_twisted.ensureDeferred
    async def test_mandatory_without_route_is_returned(self, transport_factory: TransportFactory,
                                                       unique: str) -> None:
        """A mandatory message no queue takes goes to the return callbacks with its exchange, key and properties."""
        t = await transport_factory()
        ex = f"{unique}.x"
        await self.queue(t, ex, f"{unique}.q", "bound")
        returns = Returns()
        t.add_return_callback(returns)
        await t.publish(ex, "nobody.home", b"lost", Properties(correlation_id="c9#1"), mandatory=False)
        await t.publish(ex, "nobody.here", b"returned", Properties(correlation_id="c9#2", reply_to="c9b"),
                        mandatory=True)
        await returns.wait_for(1)
        exchange, key, props = returns.calls[0]
        assert (exchange, key) == (ex, "nobody.here")
        assert (props.correlation_id, props.reply_to) == ("c9#2", "c9b")
        await self.round_trip(t, unique)
        assert len(returns.calls) == 1  # not the non-mandatory one

    @pytest_twisted.ensureDeferred
    async def test_mandatory_with_route_is_not_returned(self, transport_factory: TransportFactory,
                                                        unique: str) -> None:
        """A mandatory message that a queue takes is delivered and not returned; removed callbacks are not called."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "bound")
        returns, removed = Returns(), Returns()
        t.add_return_callback(returns)
        t.add_return_callback(removed)
        t.remove_return_callback(removed)
        got = Collector()
        await t.consume(q, got)
        await t.publish(ex, "bound", b"taken", Properties(), mandatory=True)
        await t.publish(ex, "unbound", b"returned", Properties(), mandatory=True)
        await got.wait_for(1)
        await returns.wait_for(1)
        await self.round_trip(t, unique)
        assert [key for _, key, _ in returns.calls] == ["unbound"]
        assert removed.calls == []
        assert got.bodies == [b"taken"]

    # -- publisher confirms ----------------------------------------------------------------------------
    @pytest_twisted.ensureDeferred
    async def test_confirmed_publish_fires_once_the_broker_took_it(self, transport_factory: TransportFactory,
                                                                   unique: str) -> None:
        """``confirm=True``: the Deferred does not fire within publish() but once the broker took the
        message: it is in its queue then, even if the publisher's connection goes right after."""
        publisher, reader = await transport_factory(), await transport_factory()
        ex, q = f"{unique}.x", f"{unique}.q"
        await self.queue(reader, ex, q, "k")
        await publisher.declare_exchange(ex, "topic")
        d = publisher.publish(ex, "k", b"taken", Properties(correlation_id="c1#1"), confirm=True)
        fired: list[Any] = []
        d.addBoth(lambda result: fired.append(result) or result)
        assert fired == []
        assert await d is None
        await publisher.close()
        got = Collector()
        await reader.consume(q, got)
        assert [x.body for x in await got.wait_for(1)] == [b"taken"]

    @pytest_twisted.ensureDeferred
    async def test_unconfirmed_publish_is_delivered(self, transport_factory: TransportFactory, unique: str) -> None:
        """``confirm=False`` (how requests and replies go): delivered as any other, in order with
        confirmed ones from the same connection."""
        t = await transport_factory()
        ex, q = f"{unique}.x", f"{unique}.q"
        await self.queue(t, ex, q, "k")
        got = Collector()
        await t.consume(q, got, prefetch=10)
        await t.publish(ex, "k", b"one", Properties(), confirm=False)
        await t.publish(ex, "k", b"two", Properties(), confirm=False)
        assert [x.body for x in await got.wait_for(2)] == [b"one", b"two"]

    @pytest_twisted.ensureDeferred
    async def test_mandatory_without_route_is_returned_with_or_without_confirm(
            self, transport_factory: TransportFactory, unique: str) -> None:
        """An unroutable mandatory message comes back to the return callbacks whether or not it asked
        for a confirm; a confirmed one is returned before its Deferred fires, which then succeeds."""
        t = await transport_factory()
        ex = f"{unique}.x"
        await self.queue(t, ex, f"{unique}.q", "bound")
        returns = Returns()
        t.add_return_callback(returns)
        await t.publish(ex, "nobody.a", b"a", Properties(correlation_id="r#1"), mandatory=True, confirm=False)
        await returns.wait_for(1)
        returned_when_fired: list[int] = []
        d = t.publish(ex, "nobody.b", b"b", Properties(correlation_id="r#2"), mandatory=True, confirm=True)
        d.addCallback(lambda result: returned_when_fired.append(len(returns.calls)) or result)
        assert await d is None
        assert returned_when_fired == [2]
        assert [(key, props.correlation_id) for _, key, props in returns.calls] == [
            ("nobody.a", "r#1"), ("nobody.b", "r#2")]

    @pytest_twisted.ensureDeferred
    async def test_publish_to_missing_exchange_fails_with_or_without_confirm(
            self, transport_factory: TransportFactory, unique: str) -> None:
        """A missing exchange fails the publish itself, confirmed or not; the connection still works."""
        t = await transport_factory()
        for confirm in (False, True):
            with pytest.raises(TransportError):
                await t.publish(f"{unique}.missing", "k", b"x", Properties(), confirm=confirm)
        await self.round_trip(t, unique)

    @pytest_twisted.ensureDeferred
    async def test_publish_to_missing_exchange_fails(self, transport_factory: TransportFactory,
                                                     unique: str) -> None:
        """Publishing to an exchange that does not exist fails with TransportError; the connection still works."""
        t = await transport_factory()
        with pytest.raises(TransportError):
            await t.publish(f"{unique}.missing", "k", b"x", Properties())
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        got = Collector()
        await t.consume(q, got)
        await t.publish(ex, "k", b"still works", Properties())
        assert [d.body for d in await got.wait_for(1)] == [b"still works"]

    @pytest_twisted.ensureDeferred
    async def test_consume_missing_queue_fails(self, transport_factory: TransportFactory, unique: str) -> None:
        """Consuming a queue that does not exist fails with TransportError; the connection still works."""
        t = await transport_factory()
        with pytest.raises(TransportError):
            await t.consume(f"{unique}.missing", Collector())
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        got = Collector()
        await t.consume(q, got)
        await t.publish(ex, "k", b"still works", Properties())
        assert [d.body for d in await got.wait_for(1)] == [b"still works"]

    @pytest_twisted.ensureDeferred
    async def test_bind_missing_queue_or_exchange_fails(self, transport_factory: TransportFactory,
                                                        unique: str) -> None:
        """Binding a missing queue, or to a missing exchange, fails with TransportError."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q")
        with pytest.raises(TransportError):
            await t.bind(f"{unique}.missing", ex, "k")
        with pytest.raises(TransportError):
            await t.bind(q, f"{unique}.missing", "k")

    @pytest_twisted.ensureDeferred
    async def test_queue_depth(self, transport_factory: TransportFactory, unique: str) -> None:
        """queue_depth counts the messages ready and the consumers; a missing queue is None, and the
        connection still works after asking for one."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        assert await t.queue_depth(q) == (0, 0)
        for i in range(3):
            await t.publish(ex, "k", b"%d" % i, Properties(), confirm=True)
        assert await t.queue_depth(q) == (3, 0)
        assert await t.queue_depth(f"{unique}.missing") is None
        got = Collector()
        await t.consume(q, got)
        assert len(await got.wait_for(3)) == 3
        for _ in range(100):  # the broker counts the consumer and the deliveries settled: bounded wait
            if await t.queue_depth(q) == (0, 1):
                break
        assert await t.queue_depth(q) == (0, 1)

    # -- queue kinds ---------------------------------------------------------------------------
    @pytest_twisted.ensureDeferred
    async def test_delete_queue(self, transport_factory: TransportFactory, unique: str) -> None:
        """delete_queue removes the queue, its messages and bindings; deleting a missing queue is no error."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        await t.publish(ex, "k", b"deleted with the queue", Properties())
        await t.delete_queue(q)
        with pytest.raises(TransportError):
            await t.consume(q, Collector())
        returns = Returns()
        t.add_return_callback(returns)
        await t.publish(ex, "k", b"no binding left", Properties(), mandatory=True)
        await returns.wait_for(1)
        assert returns.calls[0][1] == "k"
        # A new queue of the same name starts empty.
        await t.declare_queue(q)
        await t.bind(q, ex, "k")
        got = Collector()
        await t.consume(q, got)
        await t.publish(ex, "k", b"new", Properties())
        assert [d.body for d in await got.wait_for(1)] == [b"new"]
        await t.delete_queue(f"{unique}.never-declared")

    @pytest_twisted.ensureDeferred
    async def test_delete_queue_stops_its_consumers(self, transport_factory: TransportFactory,
                                                    unique: str) -> None:
        """A consumer of a deleted queue gets nothing from a new queue of the same name."""
        t = await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(t, ex, f"{unique}.q", "k")
        old = Collector("old")
        await t.consume(q, old)
        await t.delete_queue(q)
        await self.queue(t, ex, q, "k")
        new = Collector("new")
        await t.consume(q, new)
        await t.publish(ex, "k", b"for the new consumer", Properties())
        await new.wait_for(1)
        await self.round_trip(t, unique)
        assert old.bodies == []

    @pytest_twisted.ensureDeferred
    async def test_exclusive_queue_refused_to_other_connection(self, transport_factory: TransportFactory,
                                                               unique: str) -> None:
        """An exclusive queue is usable by its connection only, and goes away when that connection closes."""
        owner, other = await transport_factory(), await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(owner, ex, f"{unique}.q", "k", exclusive=True)
        with pytest.raises(TransportError):
            await other.declare_queue(q)
        with pytest.raises(TransportError):
            await other.consume(q, Collector())
        got = Collector()
        await owner.consume(q, got)
        await other.publish(ex, "k", b"anyone may publish", Properties())
        assert [d.body for d in await got.wait_for(1)] == [b"anyone may publish"]
        await owner.close()
        third = await transport_factory()
        with pytest.raises(TransportError):
            await third.consume(q, Collector())  # gone with its owner
        assert await third.declare_queue(q) == q  # and free to declare again

    @pytest_twisted.ensureDeferred
    async def test_exclusive_consumer(self, transport_factory: TransportFactory, unique: str) -> None:
        """consume(exclusive=True) is refused on a queue with consumers, and refuses any consumer after it."""
        a, b = await transport_factory(), await transport_factory()
        ex = f"{unique}.x"
        busy = await self.queue(a, ex, f"{unique}.busy", "busy")
        await a.consume(busy, Collector())
        with pytest.raises(TransportError):
            await b.consume(busy, Collector(), exclusive=True)
        q = await self.queue(a, ex, f"{unique}.q", "k")
        got = Collector()
        await a.consume(q, got, exclusive=True)
        with pytest.raises(TransportError):
            await b.consume(q, Collector())
        await a.publish(ex, "k", b"only a", Properties())
        assert [d.body for d in await got.wait_for(1)] == [b"only a"]

    async def _single_active(self, transport_factory: TransportFactory, unique: str, how: str) -> None:
        first, second = await transport_factory(), await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(first, ex, f"{unique}.q", "k", arguments={"x-single-active-consumer": True})
        got_1 = Collector("first", auto_ack=False)
        got_2 = Collector("second")
        tag = await first.consume(q, got_1, prefetch=10)
        await second.consume(q, got_2, prefetch=10)
        await self.publish_all(second, ex, "k", [b"1", b"2", b"3"])
        deliveries = await got_1.wait_for(3)
        for d in deliveries[:2]:
            d.ack()
        await self.round_trip(second, unique)
        assert got_2.bodies == []
        if how == "cancel":
            await first.cancel(tag)
        else:
            await first.close()
        await self.publish_all(second, ex, "k", [b"4", b"5"])
        if how == "cancel":
            deliveries[2].ack()  # still settleable after cancel
            expected = [(b"4", False), (b"5", False)]
        else:
            expected = [(b"3", True), (b"4", False), (b"5", False)]  # the unacked one is requeued
        got = await got_2.wait_for(len(expected))
        assert [(d.body, d.redelivered) for d in got] == expected
        assert got_1.bodies == [b"1", b"2", b"3"]

    @pytest_twisted.ensureDeferred
    async def test_single_active_consumer_cancel(self, transport_factory: TransportFactory, unique: str) -> None:
        """On a single-active-consumer queue only the first consumer gets messages, the second after it cancels."""
        await self._single_active(transport_factory, unique, "cancel")

    @pytest_twisted.ensureDeferred
    async def test_single_active_consumer_close(self, transport_factory: TransportFactory, unique: str) -> None:
        """On a single-active-consumer queue the second consumer takes over (unacked ones first) when the first closes."""
        await self._single_active(transport_factory, unique, "close")

    # -- volume ---------------------------------------------------------------------------------
    @pytest_twisted.ensureDeferred
    async def test_many_messages_in_order(self, transport_factory: TransportFactory, unique: str) -> None:
        """Many messages published on one connection all reach one consumer, in publish order."""
        publisher, consumer = await transport_factory(), await transport_factory()
        ex = f"{unique}.x"
        q = await self.queue(consumer, ex, f"{unique}.q", "k")
        got = Collector(auto_ack=True)
        await consumer.consume(q, got, prefetch=50)
        bodies = [b"%06d" % i for i in range(self.many)]
        await defer.gatherResults([publisher.publish(ex, "k", body, Properties()) for body in bodies])
        deliveries = await got.wait_for(self.many)
        assert [d.body for d in deliveries] == bodies
        await self.round_trip(consumer, unique)
        assert len(got.deliveries) == self.many
