"""A bounded thread pool for blocking work (hashing, extraction, boto3), owned by a container.

The reactor thread never blocks: blocking calls go through :meth:`BlockingPool.run`,
which returns a Deferred. The pool is started and stopped with its owner, as
``twisted.enterprise.adbapi`` does with its ``ThreadPool``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

__all__ = ["BlockingPool", "SynchronousPool"]

T = TypeVar("T")


class BlockingPool:
    """A ``ThreadPool(minthreads, maxthreads)`` with a Deferred-returning ``run``.

    :param reactor: the reactor results are delivered on.
    :param maxthreads: the most blocking calls running at once; more wait their turn.
    """

    def __init__(self, reactor: Any = None, *, minthreads: int = 0, maxthreads: int = 8,
                 name: str = "ion-blocking") -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.pool = ThreadPool(minthreads, maxthreads, name=name)
        self._shutdown_trigger: Any = None
        self._stopped = False

    @property
    def started(self) -> bool:
        return bool(self.pool.started)

    def start(self) -> None:
        """Start the threads; stopped again at reactor shutdown if nobody stops it first."""
        if self.pool.started:
            return
        self.pool.start()
        self._shutdown_trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self._shutdown)

    def stop(self) -> defer.Deferred[None]:
        """Refuse new calls, let running ones finish, and join the threads.

        The join happens off the reactor thread (it may wait for a long extraction),
        so the reactor keeps serving while the pool drains; the Deferred fires when
        every thread is gone.
        """
        self._stopped = True
        self._remove_trigger()
        if not self.pool.started:
            return defer.succeed(None)
        return threads.deferToThread(self.pool.stop)

    def _shutdown(self) -> None:
        # The reactor is going away: nothing is left to keep responsive.
        self._stopped = True
        self._shutdown_trigger = None
        if self.pool.started:
            self.pool.stop()

    def _remove_trigger(self) -> None:
        if self._shutdown_trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            except (ValueError, KeyError):
                pass
            self._shutdown_trigger = None

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Call ``fn(*args, **kwargs)`` in a pool thread; fires with its result on the reactor."""
        if self._stopped:
            from ion.core.exceptions import IonError

            return defer.fail(IonError(f"{self.pool.name}: the pool is stopped (its owner terminated)"))
        if not self.pool.started:
            self.start()
        return threads.deferToThreadPool(self.reactor, self.pool, fn, *args, **kwargs)


class SynchronousPool:
    """A stand-in for :class:`BlockingPool` that runs calls at once on the calling thread.

    For tests on a ``task.Clock``, where there is no reactor to deliver a thread's result.
    Never use it on a live reactor: the calls block it.
    """

    started = True

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> defer.Deferred[None]:
        """Nothing to stop."""
        return defer.succeed(None)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Call ``fn`` now; the Deferred has already fired."""
        return defer.maybeDeferred(fn, *args, **kwargs)
