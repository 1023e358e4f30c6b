"""The blocking pool runs calls off the reactor thread and refuses work once stopped."""

from __future__ import annotations

import threading

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
async def test_short_calls_of_one_turn_share_pool_jobs():
    """run_short: the calls of one reactor turn run off the reactor thread in jobs of at most
    SHORT_BATCH calls; each Deferred gets its own call's result or error."""
    from twisted.internet import defer

    from ion.core.threads import SHORT_BATCH

    pool = BlockingPool(maxthreads=4)
    jobs: list[int] = []
    run = pool.run

    def counting_run(fn, *args, **kwargs):
        jobs.append(len(args[0]))
        return run(fn, *args, **kwargs)

    pool.run = counting_run  # type: ignore[method-assign]
    here = threading.current_thread().name
    try:
        n = 2 * SHORT_BATCH + 3
        calls = [pool.run_short(lambda i=i: (i, threading.current_thread().name) if i % 7 else 1 / 0)
                 for i in range(n)]
        outcomes = await defer.DeferredList(calls, consumeErrors=True)
        assert jobs == [SHORT_BATCH, SHORT_BATCH, 3]
        for i, (ok, value) in enumerate(outcomes):
            if i % 7:
                assert ok and value[0] == i and value[1] != here
            else:
                assert not ok and value.check(ZeroDivisionError)
        # A call made from a callback goes into the next turn's job.
        second = await pool.run_short(lambda: "next").addCallback(lambda v: pool.run_short(lambda: v + " turn"))
        assert second == "next turn" and jobs[-2:] == [1, 1]
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_short_calls_on_a_stopped_pool_fail():
    pool = BlockingPool(maxthreads=1)
    pending = pool.run_short(lambda: "late")
    pool.stop()  # before the turn ends: the waiting call is refused, not lost
    with pytest.raises(IonError, match="pool is stopped"):
        await pending
    with pytest.raises(IonError, match="pool is stopped"):
        await pool.run_short(lambda: None)
