"""The lifecycle state machine of DESIGN §3: its table, serialisation and error handling; stop_in_reverse."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ion.core.exceptions import IllegalStateError
from ion.core.lifecycle import TRANSITIONS, LifecycleObject, State, stop_in_reverse

EVENTS = ("initialize", "activate", "deactivate", "terminate")

#: DESIGN §3, written out independently of the module's own table.
EXPECTED = {
    (State.INIT, "initialize"): State.READY,
    (State.READY, "activate"): State.ACTIVE,
    (State.ACTIVE, "deactivate"): State.READY,
    (State.INIT, "terminate"): State.TERMINATED,
    (State.READY, "terminate"): State.TERMINATED,
    (State.ACTIVE, "terminate"): State.TERMINATED,
}


class Boom(Exception):
    """The exception the tests' hooks raise."""


class Recorder(LifecycleObject):
    """A LifecycleObject whose hooks record their calls and return what the test set.

    ``self.returns[hook]`` may be a value, a Deferred, or an exception to raise.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any], State]] = []
        self.returns: dict[str, Any] = {}
        self.errors: list[Failure] = []

    def _hook(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.calls.append((name, args, kwargs, self.state))
        result = self.returns.get(name)
        if isinstance(result, BaseException):
            raise result
        return result

    def on_initialize(self, *args: Any, **kwargs: Any) -> Any:
        return self._hook("on_initialize", args, kwargs)

    def on_activate(self, *args: Any, **kwargs: Any) -> Any:
        return self._hook("on_activate", args, kwargs)

    def on_deactivate(self, *args: Any, **kwargs: Any) -> Any:
        return self._hook("on_deactivate", args, kwargs)

    def on_terminate(self, *args: Any, **kwargs: Any) -> Any:
        return self._hook("on_terminate", args, kwargs)

    def on_error(self, cause: Failure) -> Any:
        self.errors.append(cause)
        return self._hook("on_error", (cause,), {})

    def hooks_called(self) -> list[str]:
        return [c[0] for c in self.calls]


class LifecycleTests(SynchronousTestCase):
    """Behaviour of LifecycleObject."""

    def drive(self, obj: Recorder, state: State) -> Recorder:
        """Bring ``obj`` (fresh, with synchronous hooks) to ``state``."""
        if state is State.READY:
            self.successResultOf(obj.initialize())
        elif state is State.ACTIVE:
            self.successResultOf(obj.initialize())
            self.successResultOf(obj.activate())
        elif state is State.TERMINATED:
            self.successResultOf(obj.terminate())
        elif state is State.ERROR:
            obj.error(Boom("driven to ERROR"))
        self.assertIs(obj.state, state)
        obj.calls.clear()
        return obj

    # -- the table ----------------------------------------------------------------
    def test_new_object_is_in_init(self) -> None:
        """A new object starts in INIT, with no error cause, and is not final."""
        obj = Recorder()
        self.assertIs(obj.state, State.INIT)
        self.assertIsNone(obj.error_cause)
        self.assertFalse(obj.is_final)

    def test_declared_table_is_the_design_table(self) -> None:
        """The module's transition table holds exactly the transitions of DESIGN §3."""
        self.assertEqual({k: v[0] for k, v in TRANSITIONS.items()}, EXPECTED)

    def test_every_legal_transition(self) -> None:
        """Each legal (state, event) calls its hook once, then reaches the target state."""
        for (start, event), target in EXPECTED.items():
            with self.subTest(state=start, event=event):
                obj = self.drive(Recorder(), start)
                self.assertIsNone(self.successResultOf(getattr(obj, event)()))
                self.assertIs(obj.state, target)
                self.assertEqual(obj.hooks_called(), [f"on_{event}"])
                # The hook runs while the object is still in the old state.
                self.assertIs(obj.calls[0][3], start)

    def test_full_cycle(self) -> None:
        """INIT→READY→ACTIVE→READY→ACTIVE→TERMINATED is a legal path."""
        obj = Recorder()
        for event in ("initialize", "activate", "deactivate", "activate", "terminate"):
            self.successResultOf(getattr(obj, event)())
        self.assertIs(obj.state, State.TERMINATED)
        self.assertTrue(obj.is_final)

    def test_every_illegal_event_raises_synchronously(self) -> None:
        """Each undeclared (state, event) raises IllegalStateError at once, naming both; nothing changes."""
        for start in State:
            for event in EVENTS:
                if (start, event) in EXPECTED:
                    continue
                with self.subTest(state=start, event=event):
                    obj = self.drive(Recorder(), start)
                    cause = obj.error_cause
                    with self.assertRaises(IllegalStateError) as ctx:
                        getattr(obj, event)()
                    self.assertIn(event, str(ctx.exception))
                    self.assertIn(start.value, str(ctx.exception))
                    self.assertIs(obj.state, start)
                    self.assertIs(obj.error_cause, cause)
                    self.assertEqual(obj.hooks_called(), [])

    def test_hook_arguments_are_passed_through(self) -> None:
        """Positional and keyword arguments of an event reach its hook."""
        obj = Recorder()
        self.successResultOf(obj.initialize(1, "two", three=3))
        self.assertEqual(obj.calls[0][:3], ("on_initialize", (1, "two"), {"three": 3}))

    def test_hook_return_value_is_not_the_event_result(self) -> None:
        """The event's Deferred fires with None whatever the hook returned."""
        obj = Recorder()
        obj.returns["on_initialize"] = defer.succeed("something")
        self.assertIsNone(self.successResultOf(obj.initialize()))

    # -- Deferred hooks -----------------------------------------------------------
    def test_deferred_hook_delays_the_transition(self) -> None:
        """A hook's Deferred holds the object in its old state until it fires."""
        obj = Recorder()
        hook: defer.Deferred[None] = defer.Deferred()
        obj.returns["on_initialize"] = hook
        d = obj.initialize()
        self.assertNoResult(d)
        self.assertIs(obj.state, State.INIT)
        hook.callback(None)
        self.assertIsNone(self.successResultOf(d))
        self.assertIs(obj.state, State.READY)

    def test_deferred_terminate_hook_delays_terminated(self) -> None:
        """TERMINATED is reached only when on_terminate's Deferred fires."""
        obj = self.drive(Recorder(), State.ACTIVE)
        hook: defer.Deferred[None] = defer.Deferred()
        obj.returns["on_terminate"] = hook
        d = obj.terminate()
        self.assertNoResult(d)
        self.assertIs(obj.state, State.ACTIVE)
        self.assertFalse(obj.is_final)
        hook.callback(None)
        self.successResultOf(d)
        self.assertIs(obj.state, State.TERMINATED)

    # -- serialisation -------------------------------------------------------------
    def test_event_during_transition_waits(self) -> None:
        """An event fired while a hook is pending is not refused, and its hook runs only afterwards."""
        obj = Recorder()
        hook: defer.Deferred[None] = defer.Deferred()
        obj.returns["on_initialize"] = hook
        d1 = obj.initialize()
        d2 = obj.activate()  # illegal in INIT, but it waits for READY
        self.assertNoResult(d2)
        self.assertEqual(obj.hooks_called(), ["on_initialize"])
        hook.callback(None)
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertEqual(obj.hooks_called(), ["on_initialize", "on_activate"])
        self.assertIs(obj.state, State.ACTIVE)

    def test_waiting_event_is_checked_against_the_new_state(self) -> None:
        """A waiting event that is illegal in the state reached fails with IllegalStateError."""
        obj = Recorder()
        hook: defer.Deferred[None] = defer.Deferred()
        obj.returns["on_initialize"] = hook
        d1 = obj.initialize()
        d2 = obj.initialize()  # legal now, illegal once READY
        self.assertNoResult(d2)
        hook.callback(None)
        self.successResultOf(d1)
        self.failureResultOf(d2, IllegalStateError)
        self.assertIs(obj.state, State.READY)
        self.assertEqual(obj.hooks_called(), ["on_initialize"])

    def test_waiting_events_run_in_order(self) -> None:
        """Several waiting events run one after the other, first come first served."""
        obj = Recorder()
        seen: list[tuple[State, State]] = []
        obj.add_state_listener(lambda o, old, new: seen.append((old, new)))
        hook: defer.Deferred[None] = defer.Deferred()
        obj.returns["on_initialize"] = hook
        ds = [obj.initialize(), obj.activate(), obj.deactivate(), obj.terminate()]
        for d in ds:
            self.assertNoResult(d)
        hook.callback(None)
        for d in ds:
            self.successResultOf(d)
        self.assertEqual(seen, [(State.INIT, State.READY), (State.READY, State.ACTIVE),
                                (State.ACTIVE, State.READY), (State.READY, State.TERMINATED)])

    def test_second_deferred_hook_also_serialised(self) -> None:
        """With two pending hooks in a row, the second starts only after the first completes."""
        obj = Recorder()
        h1: defer.Deferred[None] = defer.Deferred()
        h2: defer.Deferred[None] = defer.Deferred()
        obj.returns["on_initialize"] = h1
        obj.returns["on_activate"] = h2
        d1, d2 = obj.initialize(), obj.activate()
        h1.callback(None)
        self.successResultOf(d1)
        self.assertIs(obj.state, State.READY)
        self.assertNoResult(d2)
        d3 = obj.terminate()  # waits behind the pending activate
        self.assertNoResult(d3)
        h2.callback(None)
        self.successResultOf(d2)
        self.successResultOf(d3)
        self.assertEqual(obj.hooks_called(), ["on_initialize", "on_activate", "on_terminate"])
        self.assertEqual(obj.calls[2][3], State.ACTIVE)  # terminate saw ACTIVE

    def test_terminate_while_initializing_waits(self) -> None:
        """terminate during a pending initialize runs after it, from READY."""
        obj = Recorder()
        hook: defer.Deferred[None] = defer.Deferred()
        obj.returns["on_initialize"] = hook
        obj.initialize()
        d = obj.terminate()
        self.assertNoResult(d)
        hook.callback(None)
        self.successResultOf(d)
        self.assertIs(obj.state, State.TERMINATED)
        self.assertEqual(obj.calls[-1][0], "on_terminate")
        self.assertIs(obj.calls[-1][3], State.READY)

    def test_event_fired_from_a_listener_runs_after_the_transition(self) -> None:
        """A listener that fires the next event does not re-enter: the event runs once the first completes."""
        obj = Recorder()
        results: list[defer.Deferred[None]] = []

        def on_change(o: LifecycleObject, old: State, new: State) -> None:
            if new is State.READY:
                results.append(o.activate())

        obj.add_state_listener(on_change)
        self.successResultOf(obj.initialize())
        self.successResultOf(results[0])
        self.assertIs(obj.state, State.ACTIVE)

    # -- errors ---------------------------------------------------------------------
    def test_hook_exception_enters_error(self) -> None:
        """An exception raised by a hook: ERROR, cause kept, on_error called, the event fails."""
        obj = self.drive(Recorder(), State.READY)
        exc = Boom("activation failed")
        obj.returns["on_activate"] = exc
        f = self.failureResultOf(obj.activate(), Boom)
        self.assertIs(f.value, exc)
        self.assertIs(obj.state, State.ERROR)
        self.assertTrue(obj.is_final)
        assert obj.error_cause is not None
        self.assertIs(obj.error_cause.value, exc)
        self.assertEqual([e.value for e in obj.errors], [exc])

    def test_hook_deferred_failure_enters_error(self) -> None:
        """A hook's Deferred that fails: ERROR once it fails, cause kept, on_error called, the event fails."""
        obj = Recorder()
        hook: defer.Deferred[None] = defer.Deferred()
        obj.returns["on_initialize"] = hook
        d = obj.initialize()
        self.assertIs(obj.state, State.INIT)
        self.assertEqual(obj.errors, [])
        hook.errback(Boom("late"))
        f = self.failureResultOf(d, Boom)
        self.assertIs(obj.state, State.ERROR)
        assert obj.error_cause is not None
        self.assertIs(obj.error_cause.value, f.value)
        self.assertEqual(len(obj.errors), 1)

    def test_terminate_hook_failure_enters_error(self) -> None:
        """A failing on_terminate leaves the object in ERROR, not TERMINATED."""
        obj = self.drive(Recorder(), State.ACTIVE)
        obj.returns["on_terminate"] = Boom("cannot release")
        self.failureResultOf(obj.terminate(), Boom)
        self.assertIs(obj.state, State.ERROR)

    def test_events_waiting_behind_a_failing_hook_are_refused(self) -> None:
        """Events queued behind a hook that fails are checked against ERROR and refused."""
        obj = Recorder()
        hook: defer.Deferred[None] = defer.Deferred()
        obj.returns["on_initialize"] = hook
        d1, d2, d3 = obj.initialize(), obj.activate(), obj.terminate()
        hook.errback(Boom())
        self.failureResultOf(d1, Boom)
        self.failureResultOf(d2, IllegalStateError)
        self.failureResultOf(d3, IllegalStateError)
        self.assertEqual(obj.hooks_called(), ["on_initialize", "on_error"])

    def test_on_error_failure_is_logged_and_dropped(self) -> None:
        """An exception in on_error is logged; the object is still in ERROR with the first cause."""
        obj = Recorder()
        obj.returns["on_initialize"] = Boom("first")
        obj.returns["on_error"] = ZeroDivisionError("in on_error")
        f = self.failureResultOf(obj.initialize(), Boom)
        self.assertIs(obj.state, State.ERROR)
        assert obj.error_cause is not None
        self.assertIs(obj.error_cause.value, f.value)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_error_from_outside(self) -> None:
        """error() puts a live object in ERROR with the cause wrapped in a Failure, and calls on_error."""
        for reason in (Boom("lost"), "lost", Failure(Boom("lost"))):
            with self.subTest(reason=reason):
                obj = self.drive(Recorder(), State.ACTIVE)
                obj.error(reason)
                self.assertIs(obj.state, State.ERROR)
                assert obj.error_cause is not None
                self.assertIn("lost", obj.error_cause.getErrorMessage())
                self.assertEqual(len(obj.errors), 1)
        obj = Recorder()
        obj.error("plain text")
        assert obj.error_cause is not None
        self.assertIsInstance(obj.error_cause.value, RuntimeError)

    def test_error_during_pending_hook_is_final(self) -> None:
        """error() while a hook is pending wins: the hook completing later does not leave ERROR."""
        obj = Recorder()
        hook: defer.Deferred[None] = defer.Deferred()
        obj.returns["on_initialize"] = hook
        d1, d2 = obj.initialize(), obj.activate()
        obj.error(Boom("lost"))
        self.assertIs(obj.state, State.ERROR)
        hook.callback(None)
        self.successResultOf(d1)
        self.assertIs(obj.state, State.ERROR)
        self.failureResultOf(d2, IllegalStateError)

    def test_hook_failing_after_error_keeps_first_cause(self) -> None:
        """A hook that fails after error() was called keeps the first cause and does not call on_error again."""
        obj = Recorder()
        hook: defer.Deferred[None] = defer.Deferred()
        obj.returns["on_initialize"] = hook
        d = obj.initialize()
        obj.error(Boom("first"))
        first = obj.error_cause
        hook.errback(ValueError("second"))
        self.failureResultOf(d, ValueError)
        self.assertIs(obj.state, State.ERROR)
        self.assertIs(obj.error_cause, first)
        self.assertEqual(len(obj.errors), 1)

    def test_error_is_final(self) -> None:
        """From ERROR no event is legal, and a second error() keeps the first cause and calls no hook."""
        obj = self.drive(Recorder(), State.ERROR)
        first = obj.error_cause
        errors_before = len(obj.errors)
        obj.error(Boom("second"))
        self.assertIs(obj.error_cause, first)
        self.assertEqual(len(obj.errors), errors_before)
        for event in EVENTS:
            self.assertRaises(IllegalStateError, getattr(obj, event))
        self.assertIs(obj.state, State.ERROR)

    def test_terminated_is_final(self) -> None:
        """From TERMINATED no event is legal and error() is ignored."""
        obj = self.drive(Recorder(), State.TERMINATED)
        obj.error(Boom("after the end"))
        self.assertIs(obj.state, State.TERMINATED)
        self.assertIsNone(obj.error_cause)
        self.assertEqual(obj.errors, [])
        for event in EVENTS:
            self.assertRaises(IllegalStateError, getattr(obj, event))

    # -- listeners --------------------------------------------------------------------
    def test_listeners_get_obj_old_new(self) -> None:
        """Every listener is called with (obj, old, new) after each change, in the order added."""
        obj = Recorder()
        seen: list[tuple[str, LifecycleObject, State, State, State]] = []
        obj.add_state_listener(lambda o, old, new: seen.append(("a", o, old, new, o.state)))
        obj.add_state_listener(lambda o, old, new: seen.append(("b", o, old, new, o.state)))
        self.successResultOf(obj.initialize())
        self.successResultOf(obj.activate())
        self.assertEqual(seen, [
            ("a", obj, State.INIT, State.READY, State.READY),
            ("b", obj, State.INIT, State.READY, State.READY),
            ("a", obj, State.READY, State.ACTIVE, State.ACTIVE),
            ("b", obj, State.READY, State.ACTIVE, State.ACTIVE),
        ])

    def test_listener_sees_error_with_cause_set(self) -> None:
        """On a change to ERROR, listeners are called and error_cause is already set."""
        obj = Recorder()
        seen: list[tuple[State, State, Any]] = []
        obj.add_state_listener(lambda o, old, new: seen.append((old, new, o.error_cause)))
        obj.returns["on_initialize"] = Boom("x")
        self.failureResultOf(obj.initialize(), Boom)
        self.assertEqual(len(seen), 1)
        self.assertEqual(seen[0][:2], (State.INIT, State.ERROR))
        self.assertIsInstance(seen[0][2].value, Boom)

    def test_failing_listener_does_not_break_the_transition(self) -> None:
        """A listener that raises is logged; the transition and the other listeners go on."""
        obj = Recorder()
        seen: list[State] = []

        def bad(o: LifecycleObject, old: State, new: State) -> None:
            raise ZeroDivisionError("listener")

        obj.add_state_listener(bad)
        obj.add_state_listener(lambda o, old, new: seen.append(new))
        self.successResultOf(obj.initialize())
        self.assertIs(obj.state, State.READY)
        self.assertEqual(seen, [State.READY])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_removed_listener_is_not_called(self) -> None:
        """remove_state_listener stops the calls; removing an unknown listener is harmless."""
        obj = Recorder()
        seen: list[State] = []

        def listener(o: LifecycleObject, old: State, new: State) -> None:
            seen.append(new)

        obj.add_state_listener(listener)
        self.successResultOf(obj.initialize())
        obj.remove_state_listener(listener)
        obj.remove_state_listener(listener)
        self.successResultOf(obj.activate())
        self.assertEqual(seen, [State.READY])

    def test_no_listener_call_without_change(self) -> None:
        """A refused event changes nothing and calls no listener."""
        obj = Recorder()
        seen: list[State] = []
        obj.add_state_listener(lambda o, old, new: seen.append(new))
        self.assertRaises(IllegalStateError, obj.activate)
        self.assertEqual(seen, [])


class StopInReverseTests(SynchronousTestCase):
    """stop_in_reverse: the one way parts stop their children (MultiService's order, one at a time)."""

    def test_children_stop_last_first_each_after_the_previous_sync_or_async(self) -> None:
        """Children stop in reverse order; an async stop holds the next one until it fires, a sync one does not."""
        stopped: list[str] = []
        pending: dict[str, defer.Deferred[None]] = {}

        def stop(child: str) -> defer.Deferred[None] | None:
            stopped.append(child)
            if child == "b":
                pending[child] = defer.Deferred()
                return pending[child]
            return None

        d = stop_in_reverse(["a", "b", "c"], stop)
        self.assertEqual(stopped, ["c", "b"])
        self.assertNoResult(d)
        pending["b"].callback(None)
        self.assertEqual(stopped, ["c", "b", "a"])
        self.assertIsNone(self.successResultOf(d))

    def test_a_failed_stop_is_reported_and_the_others_still_stop(self) -> None:
        """With ``failed``, a child whose stop raises or fails is reported and the rest are stopped."""
        stopped: list[str] = []
        reported: list[tuple[str, str]] = []

        def stop(child: str) -> defer.Deferred[None] | None:
            stopped.append(child)
            if child == "c":
                raise Boom("sync")
            return defer.fail(Boom("async")) if child == "b" else None

        d = stop_in_reverse(["a", "b", "c"], stop, lambda child, exc: reported.append((child, str(exc))))
        self.successResultOf(d)
        self.assertEqual(stopped, ["c", "b", "a"])
        self.assertEqual(reported, [("c", "sync"), ("b", "async")])

    def test_without_failed_the_first_failure_ends_the_sequence(self) -> None:
        """Without ``failed``, the first failing stop fails the result and the children before it are not stopped."""
        stopped: list[str] = []

        def stop(child: str) -> defer.Deferred[None]:
            stopped.append(child)
            return defer.fail(Boom(child)) if child == "b" else defer.succeed(None)

        self.failureResultOf(stop_in_reverse(["a", "b", "c"], stop), Boom)
        self.assertEqual(stopped, ["c", "b"])

    def test_the_children_are_read_once(self) -> None:
        """A child added while the others stop is not stopped by this call."""
        children = ["a", "b"]
        stopped: list[str] = []

        def stop(child: str) -> None:
            stopped.append(child)
            children.append("late")

        self.successResultOf(stop_in_reverse(children, stop))
        self.assertEqual(stopped, ["b", "a"])
