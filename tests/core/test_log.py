"""Rate-limited warnings (issue 12): :class:`~ion.core.log.LogLimiter`, and the per-message lines of
processes that go through it (bad and expired messages, unknown ops, late replies).

Time is a ``task.Clock``; log events are captured with twisted.logger observers.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import task
from twisted.logger import Logger, LogLevel, formatEvent

from ion.core.log import LogLimiter
from ion.core.messaging import message as wire
from ion.core.messaging.message import Performative
from ion.testing import ClockedSystem

from .support import EchoService, Probe, logged, request_body


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


@pytest.fixture
def events() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def log(events: list[dict[str, Any]]) -> Logger:
    return Logger(namespace="ion.test.limited", observer=events.append)


def texts(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events]


# -- the limiter ------------------------------------------------------------------------------------------
def test_first_is_logged_at_once_the_rest_counted_and_reported_when_the_interval_ends(clock, events, log):
    """10,000 of one kind in one interval: the first line at once, then one line when the interval
    ends, saying 9,999 were not logged (with the last as the example); then nothing is pending."""
    limiter = LogLimiter(clock)
    for n in range(10_000):
        limiter.warn(log, ("bad-message", "q"), "q: dropped message {n}", n=n)
    assert texts(events) == ["q: dropped message 0"]
    assert limiter.pending() == 9_999
    clock.advance(9.9)
    assert len(events) == 1
    clock.advance(0.1)
    assert texts(events)[1] == ("9,999 more like this in the last 10 s, not logged; the last: "
                                "q: dropped message 9999")
    assert events[1]["log_level"] is LogLevel.warn and events[1]["log_namespace"] == "ion.test.limited"
    assert events[1]["ion_suppressed"] == 9_999
    assert limiter.pending() == 0 and clock.getDelayedCalls() == []


def test_a_kind_seen_again_after_the_interval_is_logged_at_once(clock, events, log):
    """After a quiet interval the next one of the kind is logged at once, and counting starts again."""
    limiter = LogLimiter(clock, interval=10)
    assert limiter.warn(log, "k", "one")
    assert not limiter.warn(log, "k", "two")
    clock.advance(10)  # the summary of "two" is this window's line
    clock.advance(10)
    assert limiter.warn(log, "k", "three")
    assert not limiter.warn(log, "k", "four")
    assert texts(events) == ["one", "1 more like this in the last 10 s, not logged; the last: two", "three"]
    clock.advance(10)
    assert texts(events)[3] == "1 more like this in the last 10 s, not logged; the last: four"


def test_a_late_count_is_said_by_the_next_line_of_its_kind(clock, events, log):
    """A line whose window has ended while its count is still pending (the timer has not run yet in
    this reactor turn) carries the count itself."""
    limiter = LogLimiter(clock, interval=10)
    limiter.warn(log, "k", "one")
    limiter.warn(log, "k", "two")
    limiter.warn(log, "k", "three")
    clock.rightNow += 12  # time passed, the timer not run yet
    assert limiter.warn(log, "k", "four")
    assert texts(events) == ["one", "four (and 2 more like it in the last 12 s, not logged)"]
    assert limiter.pending() == 0
    clock.advance(0)  # the timer finds nothing left to say
    assert len(events) == 2


def test_kinds_do_not_suppress_each_other(clock, events, log):
    """Each kind has its own window: a flood of one never hides the first of another."""
    limiter = LogLimiter(clock)
    for _ in range(100):
        limiter.warn(log, ("bad-message", "a"), "a bad")
    limiter.warn(log, ("bad-message", "b"), "b bad")
    limiter.info(log, ("unknown-op", "p"), "p unknown")
    assert texts(events) == ["a bad", "b bad", "p unknown"]
    assert events[2]["log_level"] is LogLevel.info
    clock.advance(10)
    assert texts(events)[3:] == ["99 more like this in the last 10 s, not logged; the last: a bad"]


def test_flush_says_every_pending_count_now_and_stops_the_timer(clock, events, log):
    """flush() (a process ending) logs what is counted at once; no timer is left behind; a timer is
    armed only while something is counted."""
    limiter = LogLimiter(clock)
    limiter.warn(log, "a", "a {n}", n=1)
    assert clock.getDelayedCalls() == []
    limiter.warn(log, "a", "a {n}", n=2)
    limiter.warn(log, "b", "b")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(3)
    assert limiter.flush() == 1
    assert texts(events)[-1] == "1 more like this in the last 3 s, not logged; the last: a 2"
    assert clock.getDelayedCalls() == [] and limiter.pending() == 0
    assert limiter.flush() == 0


def test_kinds_beyond_the_limit_share_one_window(clock, events, log):
    """Past max_kinds (kinds chosen badly, from what peers send), new kinds share one window, so
    the lines stay bounded; kinds whose window ended are forgotten first."""
    limiter = LogLimiter(clock, max_kinds=3)
    for n in range(50):
        limiter.warn(log, ("op", n), "op {n}", n=n)
    assert texts(events) == ["op 0", "op 1", "op 2", "op 3"]  # the fourth opens the shared window
    clock.advance(10)
    assert texts(events)[4] == "46 more like this in the last 10 s, not logged; the last: op 49"
    clock.advance(10)
    limiter.warn(log, ("op", 99), "op 99")  # closed windows are forgotten: a kind of its own again
    assert texts(events)[5] == "op 99"


# -- in processes, on the embedded broker -------------------------------------------------------------------
def test_ten_thousand_bad_messages_give_one_warning_and_one_summary(log_events: list[dict[str, Any]]) -> None:
    """10,000 malformed bodies to a process: one warning, and when the interval ends one line with the
    count; each was still answered 400. Another kind (an unknown op) is logged meanwhile; after the
    interval a bad message is logged at once again."""
    system = ClockedSystem()
    svc = system.spawn(EchoService)
    probe = Probe(system.container)
    for n in range(10_000):
        probe.publish(svc.id, b"\xc1 garbage", correlation_id=f"probe#{n}")
    system.pump()
    assert len(probe.received) == 10_000 and {r["response-code"] for r in probe.received} == {400}
    assert len(logged(log_events, "dropped bad message")) == 1
    probe.publish(svc.id, request_body(svc.id, "nope"))
    system.pump()
    assert len(logged(log_events, "unknown op 'nope'")) == 1
    system.clock.advance(10)
    bad = logged(log_events, "dropped bad message")
    assert len(bad) == 2 and bad[1].startswith("9,999 more like this in the last 10 s, not logged")
    system.clock.advance(10)
    probe.publish(svc.id, b"\xc1 more garbage", reply=False)
    system.pump()
    assert len(logged(log_events, "dropped bad message")) == 3
    assert len(logged(log_events, "more like this")) == 1


def test_expired_messages_and_unknown_ops_are_limited_and_flushed_on_terminate(
        log_events: list[dict[str, Any]]) -> None:
    """Expired requests and unknown ops, each a kind of its own: one line each at once; what was
    counted is said when the process terminates, before the interval ends."""
    system = ClockedSystem()
    svc = system.spawn(EchoService)
    probe = Probe(system.container)
    for n in range(500):
        probe.publish(svc.id, request_body(svc.id, "echo", n, expiry=1.0), reply=False)
        probe.publish(svc.id, request_body(svc.id, f"nope{n}"), reply=False)
    system.pump()
    assert len(logged(log_events, "dropped expired message")) == 1
    assert len(logged(log_events, "unknown op 'nope0'")) == 1 and not logged(log_events, "nope1'")
    system.result(system.container.proc_manager.terminate_process(svc.id))
    assert logged(log_events, "499 more like this", "dropped expired message")
    assert logged(log_events, "499 more like this", "unknown op 'nope499'")
    assert svc.log_limiter.pending() == 0
    assert not [c for c in system.clock.getDelayedCalls() if getattr(c.func, "__self__", None) is svc.log_limiter]


def test_late_replies_are_limited(log_events: list[dict[str, Any]]) -> None:
    """Replies to no conversation (a peer answering after our timeout, or a stray): one line per interval."""
    system = ClockedSystem()
    svc = system.spawn(EchoService)
    probe = Probe(system.container)
    for n in range(1_000):
        probe.publish(svc.backend_name, wire.encode(wire.build(
            sender="stranger.9", receiver=svc.backend_name, op="result", content=n, conv_id=f"stranger.9#{n}",
            conv_seq=2, performative=Performative.INFORM_RESULT)))
    system.pump()
    assert svc.conversations.late_messages == 1_000
    assert len(logged(log_events, "late inform_result")) == 1
    system.clock.advance(10)
    assert logged(log_events, "999 more like this", "late inform_result", "stranger.9#999")
