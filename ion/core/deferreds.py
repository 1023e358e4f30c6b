"""Small Deferred helpers the container and the services share."""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["observe", "shielded"]

T = TypeVar("T")
_log = Logger()


def observe(d: defer.Deferred[Any]) -> defer.Deferred[None]:
    """A Deferred that fires (with None) once ``d`` has fired, whatever with.

    ``d`` keeps its result for its own callbacks, and cancelling the observer
    leaves ``d`` alone: for waiting on work (to drain it, say) without owning it.
    """
    seen: defer.Deferred[None] = defer.Deferred()

    def fired(result: Any) -> Any:
        if not seen.called:
            seen.callback(None)
        return result

    d.addBoth(fired)
    return seen


def shielded(d: defer.Deferred[T]) -> defer.Deferred[T]:
    """A Deferred with ``d``'s result (or failure); cancelling it fails it at once with
    :class:`~twisted.internet.defer.CancelledError` and leaves ``d`` running: for clean-up work that
    must end even when its caller is cancelled (a lock's release)."""
    out: defer.Deferred[T] = defer.Deferred()

    def hand(result: Any) -> None:
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
        elif isinstance(result, Failure):
            _log.failure("shielded work failed after its caller stopped waiting", result)

    d.addBoth(hand)
    return out
