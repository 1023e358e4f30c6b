"""A request never outlives its caller (issue #14, decision 2), on the embedded broker and a task.Clock.

An rpc or request carries its caller's deadline twice: the ``expiry`` header
(epoch seconds) and the AMQP ``expiration`` (per-message TTL, ms). The broker
discards a request that waited out its TTL in a queue; an instance drops one
whose caller's time ran out while it waited behind another op, or whose
``expiry`` has passed. The bug as a user met it: a call to a service whose only
container had stopped timed out after 15 s, and the request was then executed
by the next instance that started, long after its caller had given up.

Nothing here sleeps: time moves only when the test advances the clock.
"""

from __future__ import annotations

import time
from typing import Any

from ion.core.exceptions import ConversationTimeout
from ion.core.messaging import memory
from ion.core.messaging import message as wire
from ion.core.process import Process
from ion.testing import ClockedCluster, ClockedSystem

from .support import EchoService, failure_of, logged, no_result, success_of


def _cluster() -> tuple[ClockedCluster, Process]:
    """A cluster whose first container ran the only echo instance and has stopped; a caller in another."""
    cluster = ClockedCluster()
    first = cluster.start_container("first")
    cluster.spawn_in(first, EchoService)
    cluster.result(first.terminate())
    caller = cluster.spawn_in(cluster.start_container("caller"), Process, name="caller")
    return cluster, caller


def test_a_request_whose_caller_gave_up_is_never_run_by_the_next_instance() -> None:
    """The call times out while no instance runs; the instance started after that never runs it."""
    cluster, caller = _cluster()
    d = caller.rpc_send("echo", "echo", "late", timeout=15)
    cluster.pump()
    waiting = cluster.broker.queues["sys.echo"].messages
    assert len(waiting) == 1  # nobody consumes the service queue
    assert waiting[0][memory._PROPERTIES].expiration == "15000"  # (a queued message is a list, see memory._Message)
    request = wire.decode(waiting[0][memory._BODY])
    assert time.time() < request["expiry"] <= time.time() + 15
    cluster.advance(15)
    failure_of(d, ConversationTimeout)
    cluster.advance(5)
    svc = cluster.spawn_in(cluster.start_container("second"), EchoService)
    cluster.pump()
    assert svc.calls == []
    assert cluster.broker.expired == 1 and not cluster.broker.queues["sys.echo"].messages
    # The new instance serves the calls made now.
    content, _ = cluster.result(caller.rpc_send("echo", "echo", "fresh", timeout=15))
    assert content == "fresh" and svc.calls == [("echo", "fresh")]
    assert caller.conversations.late_messages == 0


def test_an_instance_started_before_the_deadline_still_answers() -> None:
    """The same request, taken up by an instance that starts before the caller gives up, is answered."""
    cluster, caller = _cluster()
    d = caller.rpc_send("echo", "echo", "in time", timeout=15)
    cluster.advance(14.9)
    no_result(d)
    svc = cluster.spawn_in(cluster.start_container("second"), EchoService)
    cluster.pump()
    assert success_of(d)[0] == "in time"
    assert svc.calls == [("echo", "in time")] and cluster.broker.expired == 0


def test_request_protocol_carries_the_deadline_too() -> None:
    """The ``request`` protocol (agree, then the result) expires as an rpc does."""
    cluster, caller = _cluster()
    d = caller.request("echo", "agreeable", 1, timeout=2)
    cluster.pump()
    assert cluster.broker.queues["sys.echo"].messages[0][memory._PROPERTIES].expiration == "2000"
    cluster.advance(2)
    failure_of(d, ConversationTimeout)
    svc = cluster.spawn_in(cluster.start_container("second"), EchoService)
    cluster.pump()
    assert svc.calls == [] and cluster.broker.expired == 1


def test_a_request_that_waits_out_its_caller_behind_a_slow_op_is_dropped(
        log_events: list[dict[str, Any]]) -> None:
    """Delivered, but waiting in the instance's prefetch FIFO behind a slow op past its caller's
    timeout: dropped when its turn comes (logged once, rate-limited), never run, no reply."""
    system = ClockedSystem()
    svc = system.spawn(EchoService)
    assert isinstance(svc, EchoService)
    caller = system.spawn(Process, name="caller")
    slow = caller.rpc_send("echo", "slow", 20, timeout=30)
    system.pump()
    waiting = [caller.rpc_send("echo", "echo", n, timeout=15) for n in range(3)]
    system.pump()
    system.advance(15)
    for d in waiting:
        failure_of(d, ConversationTimeout)
    system.advance(5)
    assert success_of(slow)[0] == "slow done"
    assert svc.calls == [("slow", 20)]
    assert len(logged(log_events, "dropped expired message op='echo'")) == 1  # one line per 10 s
    assert svc.log_limiter.suppressed_total == 2
    assert caller.conversations.late_messages == 0  # no reply was sent for them
    # Within its time, the same kind of request is run.
    d = caller.rpc_send("echo", "echo", "now", timeout=15)
    system.pump()
    assert success_of(d)[0] == "now" and svc.calls[-1] == ("echo", "now")


def test_one_timer_per_process_for_its_calls_in_flight() -> None:
    """100 calls in flight arm one timer of the process (not one each); once they end it fires once for
    nothing (it is left armed rather than cancelled and armed again per call) and none is left."""
    system = ClockedSystem()
    system.spawn(EchoService)
    caller = system.spawn(Process, name="caller")
    before = set(system.clock.getDelayedCalls())
    ds = [caller.rpc_send("echo", "echo", n, timeout=15 if n % 2 else 30) for n in range(100)]
    mine = [c for c in system.clock.getDelayedCalls() if c not in before and c.getTime() > 0]
    assert len(mine) == 1 and mine[0].getTime() == system.clock.seconds() + 15
    system.pump()
    assert [success_of(d)[0] for d in ds] == list(range(100))
    system.clock.advance(15)
    assert [c for c in system.clock.getDelayedCalls() if getattr(c.func, "__self__", None) is caller.conversations] == []


def test_timeouts_of_different_lengths_fire_in_deadline_order() -> None:
    """Calls with different timeouts each time out at their own deadline (one timer, re-armed)."""
    system = ClockedSystem()
    caller = system.spawn(Process, name="caller")
    svc = system.spawn(EchoService)
    assert isinstance(svc, EchoService)
    long = caller.rpc_send(svc.id, "never", None, timeout=30)
    short = caller.rpc_send(svc.id, "never", None, timeout=5)
    system.advance(4.9)
    no_result(short)
    system.advance(0.1)
    failure_of(short, ConversationTimeout)
    no_result(long)
    system.advance(24.9)
    no_result(long)
    system.advance(0.1)
    failure_of(long, ConversationTimeout)
    assert len(caller.conversations) == 0
