"""A bounded thread pool for blocking work (hashing, extraction, boto3), owned by a container.

The reactor thread never blocks: blocking calls go through :meth:`BlockingPool.run`,
which returns a Deferred. The pool is started and stopped with its owner, as
``twisted.enterprise.adbapi`` does with its ``ThreadPool``. Calls that take well
under a millisecond (a stat, a small file read) go through
:meth:`BlockingPool.run_short`, which runs those of one reactor turn together.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ion.core.settings import ContainerSettings

__all__ = ["BlockingPool", "SynchronousPool", "housekeeping_pool", "run_short"]

T = TypeVar("T")


class BlockingPool:
    """A ``ThreadPool(minthreads, maxthreads)`` with a Deferred-returning ``run``.

    :param reactor: the reactor results are delivered on.
    :param maxthreads: the most blocking calls running at once; more wait their turn.
    """

    def __init__(self, reactor: Any = None, *, minthreads: int = 0, maxthreads: int = ContainerSettings.max_threads,
                 name: str = "ion-blocking") -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.pool = ThreadPool(minthreads, maxthreads, name=name)
        self._shutdown_trigger: Any = None
        self._stopped = False
        self._short: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], defer.Deferred[Any]]] = []

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

    def run_short(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Like :meth:`run`, for a call that takes well under a millisecond.

        The short calls made during one reactor turn run together, one after the other,
        in pool jobs of at most :data:`SHORT_BATCH` calls. A warm deploy of 200 items makes
        400 such calls (cache lookups, placement checks); a thread hand-off each cost more
        than the calls, and their threads fought for the GIL. A call that turns out long
        delays the others of its job, never the reactor.
        """
        if self._stopped:
            return self.run(fn, *args, **kwargs)  # fails, naming the stopped pool
        d: defer.Deferred[T] = defer.Deferred()
        self._short.append((fn, args, kwargs, d))
        if len(self._short) == 1:
            self.reactor.callLater(0, self._run_short_calls)
        return d

    def _run_short_calls(self) -> None:
        calls, self._short = self._short, []
        for i in range(0, len(calls), SHORT_BATCH):
            chunk = calls[i:i + SHORT_BATCH]
            self.run(_call_each, [(fn, args, kwargs) for fn, args, kwargs, _ in chunk]).addBoth(
                _hand_out, [d for *_, d in chunk])


#: The most short calls (:meth:`BlockingPool.run_short`) one pool job runs.
SHORT_BATCH = 32


def _call_each(calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
    """In a pool thread: each call's result, or its Failure."""
    results: list[Any] = []
    for fn, args, kwargs in calls:
        try:
            results.append(fn(*args, **kwargs))
        except BaseException:
            results.append(Failure())
    return results


def _hand_out(outcome: list[Any] | Failure, waiting: list[defer.Deferred[Any]]) -> None:
    for i, d in enumerate(waiting):
        result = outcome if isinstance(outcome, Failure) else outcome[i]
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)


_housekeeping: weakref.WeakKeyDictionary[Any, BlockingPool] = weakref.WeakKeyDictionary()


def housekeeping_pool(reactor: Any = None) -> BlockingPool:
    """The pool (2 threads, one per reactor) for quick file work that must not wait behind long jobs.

    A container's :class:`BlockingPool` may be busy for minutes with hashing and extraction,
    its queue behind them; a cache lock refreshed late is taken over by another host. Lock
    files are created, refreshed and removed here instead. Stopped with the reactor.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    pool = _housekeeping.get(reactor)
    if pool is None or pool._stopped:
        pool = _housekeeping[reactor] = BlockingPool(reactor, maxthreads=2, name="ion-housekeeping")
    return pool


def run_short(pool: Any, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
    """``pool.run_short(fn, ...)`` (see :meth:`BlockingPool.run_short`), or ``pool.run`` for a pool
    that has no such thing (a test's stand-in)."""
    return getattr(pool, "run_short", pool.run)(fn, *args, **kwargs)


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

    run_short = run
