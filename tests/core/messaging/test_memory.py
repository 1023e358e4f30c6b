"""The embedded broker: the transport contract, plus what only the memory transport promises."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from ion.core.exceptions import TransportError
from ion.core.messaging.memory import _BODY, MemoryBroker, MemoryTransport  # (a queued message is a list)
from ion.core.messaging.transport import Delivery, Properties, Transport

from .contract import Collector, TransportContract, TransportFactory


@pytest_twisted.async_yield_fixture
async def transport_factory(broker: MemoryBroker) -> AsyncIterator[TransportFactory]:
    """Connections to one embedded broker (new per test); all closed at teardown."""
    made: list[Transport] = []

    async def factory(user: str | None = None) -> Transport:
        t = broker.connect(user=user) if user is not None else broker.connect()
        await t.connect()
        made.append(t)
        return t

    yield factory
    for t in made:
        await t.close()


class TestMemoryTransport(TransportContract):
    """The transport contract on the embedded broker."""


class TurnByTurnReactor:
    """Just enough IReactorTime for the broker's pump: each ``turn()`` runs what was due at its start."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def callLater(self, delay: float, fn: Any, *args: Any) -> None:
        assert delay == 0
        self.calls.append((fn, args))

    def turn(self) -> None:
        calls, self.calls = self.calls, []
        for fn, args in calls:
            fn(*args)


# -- memory-only behaviour, on a task.Clock ------------------------------------------------------
class ClockedBrokerTests(SynchronousTestCase):
    """The embedded broker driven by a task.Clock: deliveries happen only when the clock runs."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.broker = MemoryBroker(self.clock)
        self.conn = self.broker.connect(user="tester")
        self.successResultOf(self.conn.declare_exchange("x"))
        self.successResultOf(self.conn.declare_queue("q"))
        self.successResultOf(self.conn.bind("q", "x", "k"))

    def test_delivery_never_inside_publish(self) -> None:
        """publish() only queues the delivery: the consumer is called when the reactor turns (advance(0))."""
        got = Collector()
        self.successResultOf(self.conn.consume("q", got, prefetch=10))
        self.successResultOf(self.conn.publish("x", "k", b"m", Properties()))
        self.assertEqual(got.bodies, [])
        self.assertFalse(self.broker.idle())
        self.clock.advance(0)
        self.assertEqual(got.bodies, [b"m"])
        self.assertTrue(self.broker.idle())

    def test_delivery_never_inside_consume(self) -> None:
        """consume() on a queue with messages delivers them on the next reactor turn, not inside the call."""
        self.successResultOf(self.conn.publish("x", "k", b"waiting", Properties()))
        self.clock.advance(0)
        got = Collector()
        self.successResultOf(self.conn.consume("q", got))
        self.assertEqual(got.bodies, [])
        self.clock.advance(0)
        self.assertEqual(got.bodies, [b"waiting"])

    def test_return_never_inside_publish(self) -> None:
        """A mandatory return is also delivered on the next reactor turn."""
        calls: list[str] = []
        self.conn.add_return_callback(lambda ex, key, props: calls.append(key))
        self.successResultOf(self.conn.publish("x", "nowhere", b"m", Properties(), mandatory=True))
        self.assertEqual(calls, [])
        self.clock.advance(0)
        self.assertEqual(calls, ["nowhere"])

    def test_requeue_never_inside_settle(self) -> None:
        """A rejected message is redelivered on a later reactor turn, not inside reject()."""
        got = Collector(auto_ack=False)
        self.successResultOf(self.conn.consume("q", got))
        self.successResultOf(self.conn.publish("x", "k", b"m", Properties()))
        self.clock.advance(0)
        got.deliveries[0].reject(requeue=True)
        self.assertEqual(len(got.deliveries), 1)
        self.clock.advance(0)
        self.assertEqual([d.redelivered for d in got.deliveries], [False, True])

    def test_replies_published_by_handlers_go_in_the_same_turn(self) -> None:
        """Messages published by a consumer while the pump runs are delivered in the same reactor turn."""
        self.successResultOf(self.conn.declare_queue("replies"))
        self.successResultOf(self.conn.bind("replies", "x", "reply"))
        replies = Collector()

        def responder(delivery: Delivery) -> None:
            delivery.ack()
            self.conn.publish("x", "reply", delivery.body + b"!", Properties())

        self.successResultOf(self.conn.consume("q", responder))
        self.successResultOf(self.conn.consume("replies", replies))
        self.successResultOf(self.conn.publish("x", "k", b"ping", Properties()))
        self.clock.advance(0)
        self.assertEqual(replies.bodies, [b"ping!"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_expiration_runs_on_the_brokers_clock(self) -> None:
        """A message waits its ``expiration`` (ms) and no longer: at its TTL it is discarded, even
        from a queue nobody consumes (at the head, as the next publish finds it); not a moment before."""
        self.successResultOf(self.conn.publish("x", "k", b"short", Properties(expiration="1000")))
        self.successResultOf(self.conn.publish("x", "k", b"long", Properties(expiration="5000")))
        self.clock.advance(0.999)
        self.assertEqual(len(self.broker.queues["q"].messages), 2)
        self.clock.advance(0.001)
        self.successResultOf(self.conn.publish("x", "k", b"plain", Properties()))
        self.assertEqual([m[_BODY] for m in self.broker.queues["q"].messages], [b"long", b"plain"])
        self.assertEqual(self.broker.expired, 1)
        got = Collector()
        self.successResultOf(self.conn.consume("q", got, prefetch=10))
        self.clock.advance(0)
        self.assertEqual(got.bodies, [b"long", b"plain"])
        self.assertEqual(got.deliveries[0].properties.expiration, "5000")

    def test_a_requeued_message_keeps_its_expiry(self) -> None:
        """A message given back after its TTL passed (its consumer stopped) is not delivered again."""
        got = Collector(auto_ack=False)
        self.successResultOf(self.conn.consume("q", got, prefetch=10))
        self.successResultOf(self.conn.publish("x", "k", b"m", Properties(expiration="2000")))
        self.clock.advance(0)
        self.assertEqual(got.bodies, [b"m"])
        self.clock.advance(2)
        got.deliveries[0].reject(requeue=True)
        self.clock.advance(0)
        self.assertEqual(len(got.deliveries), 1)
        self.assertEqual((self.broker.expired, len(self.broker.queues["q"].messages)), (1, 0))

    def test_expiration_zero_is_now_or_never(self) -> None:
        """``expiration: "0"``: delivered if a consumer has room at once, else discarded."""
        self.successResultOf(self.conn.publish("x", "k", b"nobody", Properties(expiration="0")))
        self.assertEqual((self.broker.expired, len(self.broker.queues["q"].messages)), (1, 0))
        got = Collector()
        self.successResultOf(self.conn.consume("q", got, prefetch=1))
        self.successResultOf(self.conn.publish("x", "k", b"taken", Properties(expiration="0")))
        self.successResultOf(self.conn.publish("x", "k", b"no room", Properties(expiration="0")))
        self.clock.advance(0)
        self.assertEqual(got.bodies, [b"taken"])
        self.assertEqual(self.broker.expired, 2)

    def test_a_malformed_expiration_is_refused(self) -> None:
        """As RabbitMQ: an expiration that is not milliseconds as a string of digits fails the publish."""
        for bad in ("soon", "-1", "1.5", ""):
            failure = self.failureResultOf(self.conn.publish("x", "k", b"m", Properties(expiration=bad)))
            self.assertIn("PRECONDITION_FAILED - invalid expiration", str(failure.value))
        self.assertEqual(len(self.broker.queues["q"].messages), 0)

    def test_pump_yields_after_budget(self) -> None:
        """The pump hands over at most ``budget`` deliveries per reactor turn, then reschedules itself."""
        reactor = TurnByTurnReactor()
        broker = MemoryBroker(reactor, budget=3)  # type: ignore[arg-type]
        conn = broker.connect()
        self.successResultOf(conn.declare_exchange("x"))
        self.successResultOf(conn.declare_queue("q"))
        self.successResultOf(conn.bind("q", "x", "k"))
        got = Collector()
        self.successResultOf(conn.consume("q", got, prefetch=0))
        for i in range(8):
            self.successResultOf(conn.publish("x", "k", b"%d" % i, Properties()))
        self.assertEqual(len(reactor.calls), 1)  # one pump scheduled, however many messages
        counts = []
        while reactor.calls:
            reactor.turn()
            counts.append(len(got.deliveries))
        self.assertEqual(counts, [3, 6, 8])
        self.assertEqual(got.bodies, [b"%d" % i for i in range(8)])
        self.assertEqual(broker.delivered, 8)
        self.assertTrue(broker.idle())

    def test_pump_survives_a_raising_consumer(self) -> None:
        """A consumer callback that raises is logged; the other deliveries of the turn still happen."""
        def bad(delivery: Delivery) -> None:
            raise ZeroDivisionError("consumer bug")

        self.successResultOf(self.conn.declare_queue("q2"))
        self.successResultOf(self.conn.bind("q2", "x", "k"))
        good = Collector()
        self.successResultOf(self.conn.consume("q", bad))
        self.successResultOf(self.conn.consume("q2", good))
        self.successResultOf(self.conn.publish("x", "k", b"m", Properties()))
        self.clock.advance(0)
        self.assertEqual(good.bodies, [b"m"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_cancel_takes_back_undelivered(self) -> None:
        """Messages dispatched to a consumer but not yet handed over go back to the queue when it cancels."""
        got = Collector("cancelled")
        tag = self.successResultOf(self.conn.consume("q", got, prefetch=10))
        for body in (b"1", b"2"):
            self.successResultOf(self.conn.publish("x", "k", body, Properties()))
        self.successResultOf(self.conn.cancel(tag))
        self.clock.advance(0)
        self.assertEqual(got.bodies, [])
        later = Collector("later")
        self.successResultOf(self.conn.consume("q", later, prefetch=10))
        self.clock.advance(0)
        self.assertEqual([(d.body, d.redelivered) for d in later.deliveries], [(b"1", False), (b"2", False)])

    def test_close_takes_back_undelivered_in_order(self) -> None:
        """On close, messages of several consumers of one queue go back in their original order."""
        other = self.broker.connect()
        a, b = Collector("a", auto_ack=False), Collector("b", auto_ack=False)
        self.successResultOf(self.conn.consume("q", a, prefetch=10))
        self.successResultOf(self.conn.consume("q", b, prefetch=10))
        for i in range(4):
            self.successResultOf(self.conn.publish("x", "k", b"%d" % i, Properties()))
        self.clock.advance(0)
        self.assertEqual((a.bodies, b.bodies), ([b"0", b"2"], [b"1", b"3"]))
        self.successResultOf(self.conn.close())
        later = Collector("later")
        self.successResultOf(other.consume("q", later, prefetch=10))
        self.clock.advance(0)
        self.assertEqual(later.bodies, [b"0", b"1", b"2", b"3"])
        self.assertTrue(all(d.redelivered for d in later.deliveries))

    def test_settle_after_close_fails(self) -> None:
        """Acking a delivery after its connection closed fails: the message was already requeued."""
        got = Collector(auto_ack=False)
        self.successResultOf(self.conn.consume("q", got))
        self.successResultOf(self.conn.publish("x", "k", b"m", Properties()))
        self.clock.advance(0)
        self.successResultOf(self.conn.close())
        self.assertRaises(TransportError, got.deliveries[0].ack)

    def test_publisher_properties_untouched(self) -> None:
        """publish() does not change the caller's Properties; each delivery has its own copy."""
        self.successResultOf(self.conn.declare_queue("q2"))
        self.successResultOf(self.conn.bind("q2", "x", "k"))
        a, b = Collector(), Collector()
        self.successResultOf(self.conn.consume("q", a))
        self.successResultOf(self.conn.consume("q2", b))
        props = Properties(correlation_id="c", headers={"h": 1})
        self.successResultOf(self.conn.publish("x", "k", b"m", props))
        self.assertEqual(props, Properties(correlation_id="c", headers={"h": 1}))
        self.clock.advance(0)
        a.deliveries[0].properties.headers["h"] = 2
        self.assertEqual(b.deliveries[0].properties.headers, {"h": 1})
        self.assertEqual(b.deliveries[0].properties.user_id, "tester")

    def test_requeue_into_deleted_queue_is_dropped(self) -> None:
        """A message rejected after its queue was deleted and re-declared does not land in the new queue."""
        got = Collector(auto_ack=False)
        self.successResultOf(self.conn.consume("q", got))
        self.successResultOf(self.conn.publish("x", "k", b"old", Properties()))
        self.clock.advance(0)
        self.successResultOf(self.conn.delete_queue("q"))
        self.successResultOf(self.conn.declare_queue("q"))
        got.deliveries[0].reject(requeue=True)
        later = Collector()
        self.successResultOf(self.conn.consume("q", later))
        self.clock.advance(0)
        self.assertEqual(later.bodies, [])

    def test_auto_delete_queue_goes_with_last_consumer(self) -> None:
        """An auto-delete queue is deleted when its last consumer cancels (not before it had one)."""
        self.successResultOf(self.conn.declare_queue("auto", auto_delete=True))
        self.assertIn("auto", self.broker.queues)
        tag1 = self.successResultOf(self.conn.consume("auto", Collector()))
        tag2 = self.successResultOf(self.conn.consume("auto", Collector()))
        self.successResultOf(self.conn.cancel(tag1))
        self.assertIn("auto", self.broker.queues)
        self.successResultOf(self.conn.cancel(tag2))
        self.assertNotIn("auto", self.broker.queues)

    def test_exclusive_queue_bind_and_delete_refused_to_others(self) -> None:
        """Another connection may not bind, unbind or delete an exclusive queue."""
        self.successResultOf(self.conn.declare_queue("mine", exclusive=True))
        other = self.broker.connect()
        self.failureResultOf(other.bind("mine", "x", "k"), TransportError)
        self.failureResultOf(other.unbind("mine", "x", "k"), TransportError)
        self.failureResultOf(other.delete_queue("mine"), TransportError)
        self.assertIn("mine", self.broker.queues)

    def test_fanout_and_direct_exchanges(self) -> None:
        """A fanout exchange ignores keys; a direct exchange matches keys exactly (no wildcards)."""
        self.successResultOf(self.conn.declare_exchange("fan", "fanout"))
        self.successResultOf(self.conn.declare_exchange("dir", "direct"))
        self.successResultOf(self.conn.declare_queue("f"))
        self.successResultOf(self.conn.declare_queue("d"))
        self.successResultOf(self.conn.bind("f", "fan", "whatever"))
        self.successResultOf(self.conn.bind("d", "dir", "a.*"))
        f, d = Collector(), Collector()
        self.successResultOf(self.conn.consume("f", f))
        self.successResultOf(self.conn.consume("d", d))
        self.successResultOf(self.conn.publish("fan", "other", b"fan", Properties()))
        self.successResultOf(self.conn.publish("dir", "a.b", b"no", Properties()))
        self.successResultOf(self.conn.publish("dir", "a.*", b"yes", Properties()))
        self.clock.advance(0)
        self.assertEqual((f.bodies, d.bodies), ([b"fan"], [b"yes"]))
        self.failureResultOf(self.conn.declare_exchange("bad", "headers"), TransportError)

    def test_default_exchange_routes_by_queue_name(self) -> None:
        """Publishing to the default exchange '' delivers to the queue named by the routing key."""
        got = Collector()
        self.successResultOf(self.conn.consume("q", got))
        self.successResultOf(self.conn.publish("", "q", b"direct", Properties()))
        self.clock.advance(0)
        self.assertEqual(got.bodies, [b"direct"])


def test_brokers_do_not_share_state() -> None:
    """Two MemoryBrokers are independent: exchanges, queues and messages of one are unknown to the other."""
    clock = task.Clock()
    one, two = MemoryBroker(clock), MemoryBroker(clock)
    sync = SynchronousTestCase()
    c1, c2 = one.connect(), two.connect()
    sync.successResultOf(c1.declare_exchange("x"))
    sync.successResultOf(c1.declare_queue("q"))
    sync.successResultOf(c1.bind("q", "x", "k"))
    got = Collector()
    sync.successResultOf(c1.consume("q", got))
    sync.failureResultOf(c2.publish("x", "k", b"m", Properties()), TransportError)
    sync.failureResultOf(c2.consume("q", Collector()), TransportError)
    assert (set(one.exchanges), set(one.queues)) == ({"x"}, {"q"})
    assert (two.exchanges, two.queues) == ({}, {})
    # Same names on the second broker are separate objects with separate messages.
    sync.successResultOf(c2.declare_exchange("x"))
    sync.successResultOf(c2.declare_queue("q"))
    sync.successResultOf(c2.bind("q", "x", "k"))
    sync.successResultOf(c2.publish("x", "k", b"only on two", Properties()))
    clock.advance(0)
    assert got.bodies == []
    assert [m[_BODY] for m in two.queues["q"].messages] == [b"only on two"]


def test_transport_is_a_memory_transport(broker: MemoryBroker) -> None:
    """broker.connect() returns a MemoryTransport for that broker, with the given login."""
    t = broker.connect(user="alice")
    assert isinstance(t, MemoryTransport)
    assert (t.broker, t.user) == (broker, "alice")
    assert "alice" in repr(t)


@pytest.mark.parametrize("user", [None, "someone"])
def test_default_user(broker: MemoryBroker, user: str | None) -> None:
    """A connection publishes as 'ion' unless given another login."""
    t = broker.connect() if user is None else broker.connect(user=user)
    assert t.user == (user or "ion")
