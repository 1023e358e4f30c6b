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
