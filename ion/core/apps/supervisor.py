"""App supervisors: restart processes that die, give up on ones that keep dying.

Follows OTP's ``supervisor``: children start left to right and stop in reverse
(:func:`~ion.core.lifecycle.stop_in_reverse`);
strategies ``one_for_one`` (restart the one that died), ``one_for_all``
(restart all) and ``rest_for_one`` (restart it and those started after it);
more than ``max_restarts`` restarts within ``restart_period`` seconds and the
supervisor stops every child and reports the app failed.

A process *dies* when it ends in ERROR (a lifecycle hook failed, or something
put it there). A process terminated on request — by the app, ``kill()`` or
``op_terminate``, even if its terminate hook then fails — or that terminates
itself normally is not restarted. A restart that fails (the new process
cannot start) counts as another death, so it is retried until the limit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from ion.core.exceptions import ConfigurationError
from ion.core.lifecycle import State, stop_in_reverse
from ion.core.process import Process, ProcessDesc
from ion.core.settings import AppsSettings

if TYPE_CHECKING:
    from ion.core.container import Container

__all__ = ["Supervisor", "ChildSpec", "STRATEGIES"]

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")


@dataclass
class ChildSpec:
    """A supervised child: what to spawn and its current pid."""

    desc: ProcessDesc
    pid: str | None = None


class Supervisor:
    """Supervises the processes of one app.

    :param on_give_up: called with a reason once the restart limit is exceeded.
    """

    _log = Logger()

    def __init__(self, container: Container, app_name: str, *, strategy: str = AppsSettings.restart_strategy,
                 max_restarts: int = AppsSettings.max_restarts, restart_period: float = AppsSettings.restart_period,
                 on_give_up: Callable[[str], None] | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ConfigurationError(f"app {app_name}: unknown restart strategy {strategy!r}; "
                                     f"use one of {', '.join(STRATEGIES)}")
        if max_restarts < 0 or restart_period <= 0:
            raise ConfigurationError(f"app {app_name}: max_restarts must be >= 0 and restart_period > 0 "
                                     f"(got {max_restarts}, {restart_period})")
        self.container = container
        self.app_name = app_name
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.restart_period = restart_period
        self.on_give_up = on_give_up
        self.children: list[ChildSpec] = []
        self.restarts: deque[float] = deque()
        self.failed: str | None = None
        self.stopping = False
        # Restarts (and the final stop) run one at a time.
        self._lock = defer.DeferredLock()
        container.proc_manager.add_exit_listener(self._exited)

    @property
    def pids(self) -> list[str]:
        """The pids of the live children, in start order."""
        return [c.pid for c in self.children if c.pid]

    @defer.inlineCallbacks
    def start_child(self, desc: ProcessDesc) -> Any:
        """Spawn and supervise one child; fires with its pid."""
        spec = ChildSpec(desc)
        self.children.append(spec)
        try:
            spec.pid = yield self.container.spawn(desc)
        except Exception:
            self.children.remove(spec)
            raise
        return spec.pid

    def _exited(self, proc: Process, final: State) -> None:
        # A child the supervisor is terminating itself (restart, stop) has no pid in its spec any more.
        spec = next((c for c in self.children if c.pid == proc.id), None)
        if spec is None:
            return
        spec.pid = None
        if self.stopping or self.failed:
            return
        if final is not State.ERROR or self.container.proc_manager.is_stopping(proc.id):
            # Ended normally or on request (even if it failed while terminating): it is not
            # restarted, and no longer supervised, so a later group restart does not revive it.
            self.children.remove(spec)
            return
        cause = proc.error_cause.getErrorMessage() if proc.error_cause else "unknown cause"
        self._died(spec, proc.proc_name, f"{proc.id} died: {cause}")

    def _died(self, spec: ChildSpec, name: str, cause: str) -> None:
        """Count a death (or a failed restart) and restart, or give up past the limit."""
        now = self.container.clock.seconds()
        self.restarts.append(now)
        while self.restarts and now - self.restarts[0] > self.restart_period:
            self.restarts.popleft()
        if len(self.restarts) > self.max_restarts:
            self._give_up(f"app {self.app_name}: process {name} keeps dying ({len(self.restarts)} "
                          f"restarts within {self.restart_period:g} s, last: {cause}); stopping the app")
            return
        self._log.warn("app {app}: {name} {cause}; restarting ({strategy})",
                       app=self.app_name, name=name, cause=cause, strategy=self.strategy)
        d = self._lock.run(self._restart, spec)
        d.addErrback(lambda f: self._log.failure("app {app}: restart failed", f, app=self.app_name))

    def _give_up(self, reason: str) -> None:
        self._log.error("{reason}", reason=reason)
        self.failed = reason
        d = self.stop()
        d.addErrback(lambda f: self._log.failure("stopping {app} failed", f, app=self.app_name))
        if self.on_give_up is not None:
            try:
                self.on_give_up(reason)
            except Exception:
                self._log.failure("app {app}: on_give_up failed", app=self.app_name)

    @defer.inlineCallbacks
    def _restart(self, dead: ChildSpec) -> Any:
        if self.stopping or self.failed or dead not in self.children or dead.pid is not None:
            return  # given up, or restarted already with its group
        index = self.children.index(dead)
        if self.strategy == "one_for_one":
            group = [dead]
        elif self.strategy == "one_for_all":
            group = list(self.children)
        else:
            group = self.children[index:]
        # The others of the group stop in reverse start order ...
        yield self._stop_specs(group, " for the restart")
        # ... and the whole group starts again, left to right.
        for spec in group:
            if self.stopping or self.failed:
                return
            try:
                spec.pid = yield self.container.spawn(spec.desc)
            except Exception as exc:
                # A failed restart counts as another death: retried until the limit.
                self._died(spec, spec.desc.name or "?", f"could not be restarted: {exc}")
                return

    def stop(self) -> defer.Deferred[None]:
        """Terminate the children in reverse start order; nothing is restarted after."""
        self.stopping = True
        self.container.proc_manager.remove_exit_listener(self._exited)
        return self._lock.run(self._stop_specs, self.children, "")

    def _stop_specs(self, specs: list[ChildSpec], why: str) -> defer.Deferred[None]:
        """Terminate the live processes of ``specs`` in reverse start order; each spec loses its pid
        as its turn comes (until then, its process dying counts as a death)."""
        stopped: dict[int, str] = {}  # id(spec) -> the pid it had, for the log

        def stop(spec: ChildSpec) -> defer.Deferred[None] | None:
            pid, spec.pid = spec.pid, None
            if pid is None or self.container.proc_manager.get(pid) is None:
                return None
            stopped[id(spec)] = pid
            return self.container.proc_manager.terminate_process(pid)

        return stop_in_reverse(specs, stop, lambda spec, exc: self._log.warn(
            "app {app}: {pid} did not stop cleanly{why}: {exc}", app=self.app_name, pid=stopped[id(spec)],
            why=why, exc=exc))
