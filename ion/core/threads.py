"""A bounded thread pool for blocking work (hashing, extraction, boto3), owned by a container.

The reactor thread never blocks: blocking calls go through :meth:`BlockingPool.run`,
which returns a Deferred. The pool is started and stopped with its owner, as
``twisted.enterprise.adbapi`` does with its ``ThreadPool``. Calls that take well
under a millisecond (a stat, a small file read or write) go through
:meth:`BlockingPool.run_short`, which runs those of one reactor turn together, on a
thread of their own.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.core.deferreds import observe
from ion.core.settings import ContainerSettings

__all__ = ["BlockingPool", "SynchronousPool", "housekeeping_pool", "run_short"]

T = TypeVar("T")

_log = Logger()

#: A call handed to a pool thread: function, arguments, and the Deferred its outcome fires.
_Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], "defer.Deferred[Any]"]


class BlockingPool:
    """Up to ``maxthreads`` threads for blocking calls, with a Deferred-returning ``run``.

    A call is handed to the threads through one ``queue.SimpleQueue`` (a waiting thread is
    woken only when one is idle), and results come back to the reactor in batches: the
    first result of a batch asks the reactor (one ``callFromThread``) to deliver every
    result ready by then. A many-small-files deploy makes ~6 calls per item; Twisted's
    ``ThreadPool`` (a coordinator lock, a queue per thread, one ``callFromThread`` per
    result) cost ~75 µs of CPU per call on a loaded 2-CPU machine, this ~15 µs.

    :param reactor: the reactor results are delivered on.
    :param minthreads: accepted for compatibility; threads start as calls need them.
    :param maxthreads: the most blocking calls running at once; more wait their turn. Short
        calls (:meth:`run_short`) run on one more thread, one after the other.
    """

    def __init__(self, reactor: Any = None, *, minthreads: int = 0, maxthreads: int = ContainerSettings.max_threads,
                 name: str = "ion-blocking") -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.name = name
        self.maxthreads = max(1, maxthreads)
        #: Where :meth:`run_short`'s jobs run: a pool of one thread, made by the first short call.
        self._lane: BlockingPool | None = None
        self._short_shared = False  # (its thread could not start: short calls use the pool's threads)
        self._calls: SimpleQueue[_Call | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._unanswered = 0  # calls handed out and not yet answered (reactor thread only)
        self._results: collections.deque[tuple[defer.Deferred[Any], Any]] = collections.deque()
        self._delivery_asked = False
        self._started = False
        self._shutdown_trigger: Any = None
        self._stopped = False
        #: The join of the threads, once stop() asked for it.
        self._stopping: defer.Deferred[None] | None = None
        self._short: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], defer.Deferred[Any]]] = []

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> None:
        """Accept calls; the threads are stopped at reactor shutdown if nobody stops them first."""
        if self._started:
            return
        self._started = True
        self._shutdown_trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self._shutdown)

    def stop(self) -> defer.Deferred[None]:
        """Refuse new calls, let the calls handed out finish, and join the threads.

        The join happens off the reactor thread (it may wait for a long extraction),
        so the reactor keeps serving (and delivering results) while the pool drains; the
        Deferred fires when every thread is gone.
        """
        self._stopped = True
        self._remove_trigger()
        if self._stopping is None and self._started:
            self._stopping = threads.deferToThread(self._end_threads)
        # (A second stop() waits for the same threads; run_short's thread is stopped alike.)
        ending = [observe(d) for d in (self._stopping, self._lane.stop() if self._lane is not None else None)
                  if d is not None]
        return observe(defer.DeferredList(ending))

    def _shutdown(self) -> None:
        # The reactor is going away: nothing is left to keep responsive.
        self._stopped = True
        self._shutdown_trigger = None
        if self._started:
            self._end_threads()
        if self._lane is not None:
            self._lane._remove_trigger()
            self._lane._shutdown()

    def _end_threads(self) -> None:
        """Each thread ends after the calls queued before its end marker; wait for them all.
        (Calls queued before a reactor shutdown run first, as with Twisted's ``ThreadPool``.)"""
        ending, self._threads = self._threads, []
        for _ in ending:
            self._calls.put(None)
        for thread in ending:
            thread.join()
        self._started = False

    def _remove_trigger(self) -> None:
        if self._shutdown_trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            except (ValueError, KeyError):
                pass
            self._shutdown_trigger = None
        if self._lane is not None:
            self._lane._remove_trigger()

    def _add_thread(self) -> Failure | None:
        """Start one more thread; None, or why it could not start (``RuntimeError``: too many)."""
        thread = threading.Thread(target=self._serve, name=f"PoolThread-{self.name}-{len(self._threads)}")
        try:
            thread.start()
        except RuntimeError:
            return Failure()
        self._threads.append(thread)
        return None

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Call ``fn(*args, **kwargs)`` in a pool thread; fires with its result on the reactor."""
        if self._stopped:
            from ion.core.exceptions import IonError

            return defer.fail(IonError(f"{self.name}: the pool is stopped (its owner terminated)"))
        if not self._started:
            self.start()
        if self._unanswered >= len(self._threads) and len(self._threads) < self.maxthreads:
            failed = self._add_thread()
            if failed is not None and not self._threads:  # (else the threads there take it in turn)
                return defer.fail(failed)
        d: defer.Deferred[T] = defer.Deferred()
        self._unanswered += 1
        self._calls.put((fn, args, kwargs, d))
        return d

    def _serve(self) -> None:
        """A pool thread: run calls until an end marker; hand each outcome to the reactor."""
        get, results = self._calls.get, self._results
        while (call := get()) is not None:
            fn, args, kwargs, d = call
            try:
                outcome: Any = fn(*args, **kwargs)
            except BaseException:
                outcome = Failure()
            del fn, args, kwargs, call
            results.append((d, outcome))
            if not self._delivery_asked:
                self._delivery_asked = True
                self.reactor.callFromThread(self._deliver)
            del d, outcome

    def _deliver(self) -> None:
        """On the reactor: fire the Deferreds of the outcomes ready now (the flag is cleared first,
        so an outcome appended while this runs is taken here or asks again). Only those: one whose
        callbacks start the next call would otherwise keep this loop, and the reactor, going for as
        long as chained calls finish (timers, I/O and heartbeats waiting behind it)."""
        self._delivery_asked = False
        results = self._results
        for _ in range(len(results)):
            d, outcome = results.popleft()
            self._unanswered -= 1
            try:
                if isinstance(outcome, Failure):
                    d.errback(outcome)
                else:
                    d.callback(outcome)
            except Exception:
                _log.failure("{pool}: delivering a result", pool=self.name)

    def run_short(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Like :meth:`run`, for a call that takes well under a millisecond.

        The short calls made during one reactor turn run together, one after the other,
        in jobs of at most :data:`SHORT_BATCH` calls, and these jobs run one after the
        other on a thread of their own, beside the pool's. A warm deploy of 200 items makes
        400 such calls (cache lookups, placement checks), a cold one of a folder of 2,000
        small files 2,000 (each file written and hashed): a thread hand-off each cost more
        than the calls, and threads running them side by side fought for the GIL with
        the reactor (ion-deploy of that folder took 16-30 % less time with them on one thread
        than spread over eight, bench/README.md, session 14). A call that turns out long delays the short calls queued behind it,
        never the reactor, nor the pool's other calls (nor they it).
        """
        if self._stopped:
            return self.run(fn, *args, **kwargs)  # fails, naming the stopped pool
        d: defer.Deferred[T] = defer.Deferred()
        self._short.append((fn, args, kwargs, d))
        if len(self._short) == 1:
            self.reactor.callLater(0, self._run_short_calls)
        return d

    def _short_lane(self) -> Callable[..., defer.Deferred[Any]]:
        """Where short calls' jobs go: ``run`` of a pool of one thread, made and its thread started the
        first time; this pool's own ``run`` if that thread could not start (they share its threads then)."""
        if self._lane is None and not self._short_shared:
            lane = BlockingPool(self.reactor, maxthreads=1, name=f"{self.name}-short")
            lane.start()
            failed = lane._add_thread()
            if failed is None:
                self._lane = lane
            else:
                lane._remove_trigger()  # (no thread to stop; not stop(): that would need a thread too)
                self._short_shared = True
                _log.warn("{pool}: no thread of its own for short calls ({why}); they share the pool's",
                          pool=self.name, why=failed.getErrorMessage())
        return self._lane.run if self._lane is not None else self.run

    def _run_short_calls(self) -> None:
        calls, self._short = self._short, []
        run = self.run if self._stopped else self._short_lane()  # (stopped: fails, naming this pool)
        for i in range(0, len(calls), SHORT_BATCH):
            chunk = calls[i:i + SHORT_BATCH]
            run(_call_each, [(fn, args, kwargs) for fn, args, kwargs, _ in chunk]).addBoth(
                _hand_out, [d for *_, d in chunk])


#: The most short calls (:meth:`BlockingPool.run_short`) one job runs.
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
