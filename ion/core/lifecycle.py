"""The state machine every long-lived part of the container follows (DESIGN §3).

::

    INIT --initialize--> READY --activate--> ACTIVE --deactivate--> READY
      any non-final state --terminate--> TERMINATED        (final)
      any state, on an exception in a transition --> ERROR (final; cause kept)

The transitions are a declared table. Subclasses implement the ``on_*`` hooks,
which may return Deferreds; a transition completes when its hook's result
fires. Transitions are serialised: an event that arrives while one is in
progress waits for it, and is checked against the state reached by then.

Parts that own children (the container its managers, the process manager
its processes, a process its children, the app manager its apps, a
supervisor its processes) start them in order and stop them in reverse, one
after another, with :func:`stop_in_reverse` -- the order of Twisted's
``MultiService.stopService``, which also takes sync and async children alike.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from enum import StrEnum
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.core.exceptions import IllegalStateError

__all__ = ["State", "LifecycleObject", "StateListener", "stop_in_reverse"]

T = TypeVar("T")


class State(StrEnum):
    """Lifecycle states; the value is what logs and the shell show."""

    INIT = "INIT"
    READY = "READY"
    ACTIVE = "ACTIVE"
    TERMINATED = "TERMINATED"
    ERROR = "ERROR"


FINAL_STATES = frozenset({State.TERMINATED, State.ERROR})

#: (state, event) -> (target state, hook name). The state does not change while
#: the hook runs; it becomes the target when the hook's result fires.
TRANSITIONS: dict[tuple[State, str], tuple[State, str]] = {
    (State.INIT, "initialize"): (State.READY, "on_initialize"),
    (State.READY, "activate"): (State.ACTIVE, "on_activate"),
    (State.ACTIVE, "deactivate"): (State.READY, "on_deactivate"),
    (State.INIT, "terminate"): (State.TERMINATED, "on_terminate"),
    (State.READY, "terminate"): (State.TERMINATED, "on_terminate"),
    (State.ACTIVE, "terminate"): (State.TERMINATED, "on_terminate"),
}

StateListener = Callable[["LifecycleObject", State, State], None]


class LifecycleObject:
    """Base class of Process, Receiver, Container and App.

    :ivar state: the current :class:`State`.
    :ivar error_cause: the :class:`Failure` that sent the object to ERROR.
    """

    _log = Logger()

    def __init__(self) -> None:
        self.state: State = State.INIT
        self.error_cause: Failure | None = None
        self._lock = defer.DeferredLock()
        self._listeners: list[StateListener] = []

    # -- public events -----------------------------------------------------
    def initialize(self, *args: Any, **kwargs: Any) -> defer.Deferred[None]:
        """INIT → READY."""
        return self._fire("initialize", args, kwargs)

    def activate(self, *args: Any, **kwargs: Any) -> defer.Deferred[None]:
        """READY → ACTIVE."""
        return self._fire("activate", args, kwargs)

    def deactivate(self, *args: Any, **kwargs: Any) -> defer.Deferred[None]:
        """ACTIVE → READY."""
        return self._fire("deactivate", args, kwargs)

    def terminate(self, *args: Any, **kwargs: Any) -> defer.Deferred[None]:
        """Any non-final state → TERMINATED."""
        return self._fire("terminate", args, kwargs)

    def error(self, reason: Failure | BaseException | str) -> None:
        """Put the object in ERROR from outside a transition (e.g. a lost resource)."""
        if self.state in FINAL_STATES:
            return
        if not isinstance(reason, Failure):
            exc = reason if isinstance(reason, BaseException) else RuntimeError(reason)
            reason = Failure(exc)
        self._enter_error(reason)

    # -- hooks for subclasses ----------------------------------------------
    def on_initialize(self, *args: Any, **kwargs: Any) -> Any:
        """Acquire what the object needs; may return a Deferred."""

    def on_activate(self, *args: Any, **kwargs: Any) -> Any:
        """Start working (consume messages, start timers)."""

    def on_deactivate(self, *args: Any, **kwargs: Any) -> Any:
        """Stop working but keep resources."""

    def on_terminate(self, *args: Any, **kwargs: Any) -> Any:
        """Release everything; called from any non-final state (see ``self.state``)."""

    def on_error(self, cause: Failure) -> Any:
        """React to entering ERROR; exceptions raised here are logged and dropped."""

    # -- observation ---------------------------------------------------------
    def add_state_listener(self, listener: StateListener) -> None:
        """Call ``listener(obj, old, new)`` after every state change."""
        self._listeners.append(listener)

    def remove_state_listener(self, listener: StateListener) -> None:
        """Stop calling ``listener``; no error if it was not added."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    @property
    def is_final(self) -> bool:
        """True once TERMINATED or ERROR."""
        return self.state in FINAL_STATES

    # -- machinery -----------------------------------------------------------
    def _check(self, event: str) -> tuple[State, str]:
        try:
            return TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalStateError(
                f"{self!r}: event {event!r} is illegal in state {self.state.value}"
            ) from None

    def _fire(self, event: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> defer.Deferred[None]:
        if not self._lock.locked:
            # Idle: an illegal event is refused synchronously, as the caller expects.
            self._check(event)
        return self._lock.run(self._transition, event, args, kwargs)

    def _transition(self, event: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> defer.Deferred[None]:
        target, hook = self._check(event)
        d = defer.maybeDeferred(getattr(self, hook), *args, **kwargs)

        def done(_: object) -> None:
            if self.state not in FINAL_STATES:
                self._set_state(target)

        def failed(failure: Failure) -> Failure:
            self._enter_error(failure)
            return failure

        d.addCallbacks(done, failed)
        return d

    def _set_state(self, new: State) -> None:
        old, self.state = self.state, new
        if old is new:
            return
        for listener in list(self._listeners):
            try:
                listener(self, old, new)
            except Exception:
                self._log.failure("state listener {listener!r} failed", listener=listener)

    def _enter_error(self, cause: Failure) -> None:
        if self.state is State.ERROR:
            return
        self.error_cause = cause
        self._log.error(
            "{obj!r} entered ERROR from {state}: {cause}",
            obj=self, state=self.state.value, cause=cause.getErrorMessage(),
        )
        self._set_state(State.ERROR)
        try:
            d = defer.maybeDeferred(self.on_error, cause)
            d.addErrback(lambda f: self._log.failure("on_error of {obj!r} failed", f, obj=self))
        except Exception:  # pragma: no cover - maybeDeferred captures
            pass


@defer.inlineCallbacks
def stop_in_reverse(children: Iterable[T], stop: Callable[[T], Any],
                    failed: Callable[[T, Exception], None] | None = None,
                    ) -> Generator[defer.Deferred[Any], Any, None]:
    """Stop ``children`` the last first, one after another; fires once all are stopped.

    The order of Twisted's ``MultiService.stopService``, and like it ``stop(child)`` may
    return a Deferred or not; unlike it, each stop ends before the next begins (what
    started later may use what started earlier until it is gone). ``children`` is read
    once, now; ``stop`` returns None for a child it skips (one that ended meanwhile).

    :param failed: told ``(child, exception)`` of a stop that failed (it logs it), and
        the other children are stopped still; without it, the first failure ends the
        sequence and fails the Deferred.
    """
    for child in reversed(list(children)):
        try:
            yield defer.maybeDeferred(stop, child)
        except Exception as exc:
            if failed is None:
                raise
            failed(child, exc)
