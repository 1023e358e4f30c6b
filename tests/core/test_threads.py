"""The blocking pool runs calls off the reactor thread and refuses work once stopped."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import pytest_twisted

from ion.core.exceptions import IonError
from ion.core.threads import BlockingPool


@pytest_twisted.ensureDeferred
async def test_runs_off_the_reactor_thread():
    """A call runs in a pool thread and its result comes back on the reactor."""
    pool = BlockingPool(maxthreads=2)
    try:
        name = await pool.run(lambda: threading.current_thread().name)
        assert name != threading.current_thread().name
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0)
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_stopped_pool_refuses_work():
    """After stop, run() fails with a clear error instead of quietly restarting threads."""
    pool = BlockingPool(maxthreads=1)
    await pool.run(lambda: None)
    pool.stop()
    with pytest.raises(IonError, match="pool is stopped"):
        await pool.run(lambda: None)


@pytest_twisted.ensureDeferred
async def test_stop_does_not_block_the_reactor():
    """stop() joins the threads off the reactor thread: the reactor runs while a call finishes."""
    from twisted.internet import reactor, task

    pool = BlockingPool(maxthreads=1)
    release = threading.Event()
    running = pool.run(lambda: release.wait(10) and "done")
    stopped = pool.stop()  # returns at once although the call is still running
    await task.deferLater(reactor, 0, lambda: None)  # the reactor still turns
    assert not stopped.called
    release.set()
    assert await running == "done"
    await stopped
    assert not pool.started


@pytest_twisted.ensureDeferred
async def test_short_calls_of_one_turn_share_jobs_on_a_thread_of_their_own(monkeypatch):
    """run_short: the calls of one reactor turn run off the reactor thread in jobs of at most
    SHORT_BATCH calls, all on one thread beside the pool's; each Deferred gets its own call's
    result or error."""
    from twisted.internet import defer

    from ion.core import threads as threads_module
    from ion.core.threads import SHORT_BATCH

    jobs: list[int] = []
    call_each = threads_module._call_each

    def counting(calls):
        jobs.append(len(calls))
        return call_each(calls)

    monkeypatch.setattr(threads_module, "_call_each", counting)
    pool = BlockingPool(maxthreads=4, name="test-short")
    try:
        n = 2 * SHORT_BATCH + 3
        calls = [pool.run_short(lambda i=i: (i, threading.current_thread().name) if i % 7 else 1 / 0)
                 for i in range(n)]
        outcomes = await defer.DeferredList(calls, consumeErrors=True)
        assert jobs == [SHORT_BATCH, SHORT_BATCH, 3]
        for i, (ok, value) in enumerate(outcomes):
            if i % 7:
                assert ok and value[0] == i
            else:
                assert not ok and value.check(ZeroDivisionError)
        assert {value[1] for ok, value in outcomes if ok} == {"PoolThread-test-short-short-0"}
        # A call made from a callback goes into the next turn's job.
        second = await pool.run_short(lambda: "next").addCallback(lambda v: pool.run_short(lambda: v + " turn"))
        assert second == "next turn" and jobs[-2:] == [1, 1]
    finally:
        await pool.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("PoolThread-test-short-")]


@pytest_twisted.ensureDeferred
async def test_short_calls_do_not_wait_behind_the_pools_long_calls():
    """The pool's threads all busy with long calls: a short call still runs (on its own thread),
    and stop() waits for both kinds."""
    pool = BlockingPool(maxthreads=1, name="test-lane")
    release = threading.Event()
    try:
        long = pool.run(lambda: release.wait(10) and "long")
        assert await pool.run_short(lambda: "short") == "short"
        assert not long.called
        release.set()
        assert await long == "long"
    finally:
        release.set()
        stopped = pool.stop()
    await stopped
    assert not [t for t in threading.enumerate() if t.name.startswith("PoolThread-test-lane-")]


@pytest_twisted.ensureDeferred
async def test_short_calls_share_the_pools_threads_when_their_own_cannot_start(monkeypatch):
    """No thread can be started for short calls (too many threads): they run on the pool's."""
    start = threading.Thread.start

    def refusing(self: threading.Thread) -> None:
        if self.name.startswith("PoolThread-test-noshort-short-"):
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", refusing)
    pool = BlockingPool(maxthreads=2, name="test-noshort")
    try:
        assert await pool.run_short(lambda: threading.current_thread().name) == "PoolThread-test-noshort-0"
        assert await pool.run_short(lambda: "again") == "again"
    finally:
        await pool.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("PoolThread-test-noshort-")]


@pytest_twisted.ensureDeferred
async def test_stop_twice_and_a_cancelled_stop_with_a_thread_for_short_calls():
    """stop() waits for the short calls' thread too; a second stop() waits for the same; cancelling
    a stop only stops the waiting (CancelledError, nothing left unhandled)."""
    from twisted.internet import defer, reactor, task

    pool = BlockingPool(maxthreads=1, name="test-stop2")
    started, release = threading.Event(), threading.Event()
    running = pool.run_short(lambda: started.set() or (release.wait(10) and "done"))
    await task.deferLater(reactor, 0, lambda: None)  # (short calls are handed out a turn later)
    assert started.wait(10)
    first, second, cancelled = pool.stop(), pool.stop(), pool.stop()
    cancelled.cancel()
    with pytest.raises(defer.CancelledError):
        await cancelled
    assert not first.called and not second.called
    release.set()
    assert await running == "done"
    await first
    await second
    assert not [t for t in threading.enumerate() if t.name.startswith("PoolThread-test-stop2-")]


@pytest_twisted.ensureDeferred
async def test_reactor_shutdown_joins_the_thread_for_short_calls():
    """At reactor shutdown the short calls' thread is joined with the pool's."""
    pool = BlockingPool(maxthreads=1, name="test-shutdown-short")
    assert await pool.run_short(lambda: "short") == "short"
    assert await pool.run(lambda: "long") == "long"
    pool._remove_trigger()  # (by hand, as the shutdown test above: not left on the session's reactor)
    pool._shutdown()  # what the "during shutdown" trigger calls
    assert not [t for t in threading.enumerate() if t.name.startswith("PoolThread-test-shutdown-short-")]


@pytest_twisted.ensureDeferred
async def test_short_calls_on_a_stopped_pool_fail():
    pool = BlockingPool(maxthreads=1)
    pending = pool.run_short(lambda: "late")
    pool.stop()  # before the turn ends: the waiting call is refused, not lost
    with pytest.raises(IonError, match="pool is stopped"):
        await pending
    with pytest.raises(IonError, match="pool is stopped"):
        await pool.run_short(lambda: None)


@pytest_twisted.ensureDeferred
async def test_calls_beyond_maxthreads_wait_their_turn_and_each_gets_its_own_outcome():
    """More calls than threads: at most ``maxthreads`` threads ever run them; every Deferred fires
    with its own call's result, or its error as a Failure of the original exception."""
    from twisted.internet import defer

    pool = BlockingPool(maxthreads=2, name="test-turns")
    release = threading.Event()
    names: set[str] = set()

    def call(i: int) -> int:
        names.add(threading.current_thread().name)
        release.wait(10)
        if i % 5 == 0:
            raise KeyError(i)
        return i * i

    try:
        calls = [pool.run(call, i) for i in range(12)]
        release.set()
        outcomes = await defer.DeferredList(calls, consumeErrors=True)
        for i, (ok, value) in enumerate(outcomes):
            if i % 5 == 0:
                assert not ok and value.check(KeyError) and value.value.args == (i,)
            else:
                assert ok and value == i * i
        assert 1 <= len(names) <= 2 and all(n.startswith("PoolThread-test-turns-") for n in names)
    finally:
        await pool.stop()


@pytest_twisted.ensureDeferred
async def test_stop_runs_the_calls_already_queued_then_ends_the_threads():
    """Calls handed out before stop() still run and deliver their results; then every thread ends."""
    pool = BlockingPool(maxthreads=1, name="test-drain")
    release = threading.Event()
    ran: list[int] = []

    def call(i: int) -> int:
        release.wait(10)
        ran.append(i)
        return i

    queued = [pool.run(call, i) for i in range(4)]  # one runs, three wait behind it
    stopped = pool.stop()
    release.set()
    assert [await d for d in queued] == [0, 1, 2, 3]
    await stopped
    assert ran == [0, 1, 2, 3] and not pool.started
    assert not [t for t in threading.enumerate() if t.name.startswith("PoolThread-test-drain-")]


def test_reactor_shutdown_runs_the_queued_calls_and_joins_the_threads():
    """At reactor shutdown the pool's threads finish what was queued and are joined before the
    shutdown goes on; calls made afterwards are refused."""
    from twisted.internet import reactor

    pool = BlockingPool(reactor, maxthreads=1, name="test-shutdown")
    release = threading.Event()
    ran: list[int] = []
    queued = [pool.run(lambda i=i: release.wait(10) and ran.append(i)) for i in range(3)]
    release.set()
    pool._remove_trigger()  # (called by hand below: not left registered on the test session's reactor)
    pool._shutdown()  # what the "during shutdown" trigger calls
    assert ran == [0, 1, 2] and not pool.started
    assert not [t for t in threading.enumerate() if t.name.startswith("PoolThread-test-shutdown-")]
    for d in queued:
        d.addErrback(lambda f: None)  # delivered by the reactor later; nothing to wait for here
    refused = pool.run(lambda: None)
    with pytest.raises(IonError, match="pool is stopped"):
        refused.result.raiseException()
    refused.addErrback(lambda f: None)


def _until(ready: Any) -> None:
    """Wait (at most 10 s) until a pool thread has done what ``ready()`` checks."""
    for _ in range(1000):
        if ready():
            return
        threading.Event().wait(0.01)
    raise AssertionError("a pool thread did not get there in 10 s")


def test_one_delivery_fires_only_the_outcomes_ready_when_it_began():
    """A callback that starts the next call cannot keep the delivery (and the reactor) going: the
    outcome of that call, in before the delivery ends, waits for a delivery of its own."""
    asked: list[Any] = []

    class Reactor:
        """Keeps what pool threads hand to the reactor; nothing runs until the test runs it."""

        def callFromThread(self, fn: Any, *args: Any) -> None:  # noqa: N802 - Twisted's interface
            asked.append(fn)

        def addSystemEventTrigger(self, *args: Any) -> Any:  # noqa: N802
            return None

    pool = BlockingPool(Reactor(), maxthreads=1, name="test-bounded")
    fired: list[str] = []

    def then(_: Any) -> None:
        fired.append("first")
        pool.run(lambda: None).addCallback(lambda _: fired.append("second"))
        _until(lambda: pool._results)  # the second outcome is in while this delivery still runs

    try:
        pool.run(lambda: "one").addCallback(then)
        _until(lambda: asked)
        asked.pop(0)()  # the first delivery
        assert fired == ["first"]
        assert asked  # the second outcome asked for a delivery of its own
        while asked:
            asked.pop(0)()
        assert fired == ["first", "second"]
    finally:
        pool._stopped = True
        pool._end_threads()


@pytest_twisted.ensureDeferred
async def test_a_second_stop_waits_for_the_same_threads():
    """stop() twice: both Deferreds fire only once the threads are gone (the second one used to fire
    at once, the pool's threads still running)."""
    pool = BlockingPool(maxthreads=1, name="test-twice")
    release = threading.Event()
    running = pool.run(release.wait, 10)
    first, second = pool.stop(), pool.stop()
    try:
        assert not first.called and not second.called and pool.started
    finally:
        release.set()
    await running
    await first
    await second
    assert not pool.started
    assert not [t for t in threading.enumerate() if t.name.startswith("PoolThread-test-twice-")]
