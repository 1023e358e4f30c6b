"""Small Deferred helpers the container and the services share."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

__all__ = ["observe"]


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
