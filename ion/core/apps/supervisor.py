"""App supervisors: restart processes that die, give up on ones that keep dying.

Follows OTP's ``supervisor``: children start left to right and stop in reverse;
strategies ``one_for_one`` (restart the one that died), ``one_for_all``
(restart all) and ``rest_for_one`` (restart it and those started after it);
more than ``max_restarts`` restarts within ``restart_period`` seconds and the
supervisor stops every child and reports the app failed.

A process *dies* when it ends in ERROR (a lifecycle hook failed, or something
put it there). A process terminated on request — by the app, ``kill()`` or
``op_terminate`` — or that terminates itself normally is not restarted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from ion.core.exceptions import ConfigurationError
from ion.core.lifecycle import State
from ion.core.process import Process, ProcessDesc

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

    def __init__(self, container: "Container", app_name: str, *, strategy: str = "one_for_one",
                 max_restarts: int = 3, restart_period: float = 5.0,
                 on_give_up: Callable[[str], None] | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ConfigurationError(f"app {app_name}: unknown restart strategy {strategy!r}; "
                                     f"use one of {', '.join(STRATEGIES)}")
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
        self._restarting = False
        container.proc_manager.add_exit_listener(self._exited)

    @property
    def pids(self) -> list[str]:
        return [c.pid for c in self.children if c.pid]

    @defer.inlineCallbacks
    def start_child(self, desc: ProcessDesc) -> Any:
        """Spawn and supervise one child; fires with its pid."""
        spec = ChildSpec(desc)
        self.children.append(spec)
        spec.pid = yield self.container.spawn(desc)
        return spec.pid

    def _exited(self, proc: Process, final: State) -> None:
        spec = next((c for c in self.children if c.pid == proc.id), None)
        if spec is None:
            return
        if final is not State.ERROR or self.stopping or self.failed or self._restarting:
            if final is not State.ERROR:
                spec.pid = None
            return
        spec.pid = None
        cause = proc.error_cause.getErrorMessage() if proc.error_cause else "unknown cause"
        now = self.container.clock.seconds()
        self.restarts.append(now)
        while self.restarts and now - self.restarts[0] > self.restart_period:
            self.restarts.popleft()
        if len(self.restarts) > self.max_restarts:
            reason = (f"app {self.app_name}: process {proc.proc_name} keeps dying ({len(self.restarts)} "
                      f"restarts within {self.restart_period:g} s, last cause: {cause}); stopping the app")
            self._log.error("{reason}", reason=reason)
            self.failed = reason
            d = self.stop()
            d.addErrback(lambda f: self._log.failure("stopping {app} failed", f, app=self.app_name))
            if self.on_give_up is not None:
                self.on_give_up(reason)
            return
        self._log.warn("app {app}: {name} ({pid}) died ({cause}); restarting ({strategy})",
                       app=self.app_name, name=proc.proc_name, pid=proc.id, cause=cause,
                       strategy=self.strategy)
        d = self._restart(spec)
        d.addErrback(lambda f: self._log.failure("app {app}: restart failed", f, app=self.app_name))

    @defer.inlineCallbacks
    def _restart(self, dead: ChildSpec) -> Any:
        index = self.children.index(dead)
        if self.strategy == "one_for_one":
            group = [dead]
        elif self.strategy == "one_for_all":
            group = list(self.children)
        else:
            group = self.children[index:]
        self._restarting = True
        try:
            for spec in reversed(group):
                if spec.pid is not None:
                    pid, spec.pid = spec.pid, None
                    yield self.container.proc_manager.terminate_process(pid)
        finally:
            self._restarting = False
        for spec in group:
            spec.pid = yield self.container.spawn(spec.desc)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Terminate the children in reverse start order; nothing is restarted after."""
        self.stopping = True
        self.container.proc_manager.remove_exit_listener(self._exited)
        for spec in reversed(self.children):
            pid, spec.pid = spec.pid, None
            if pid is not None and self.container.proc_manager.get(pid) is not None:
                try:
                    yield self.container.proc_manager.terminate_process(pid)
                except Exception as exc:
                    self._log.warn("app {app}: {pid} did not stop cleanly: {exc}",
                                   app=self.app_name, pid=pid, exc=exc)
