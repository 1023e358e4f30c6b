"""Test helpers shipped with ioncore, for ioncore's tests and for people writing services.

- :class:`ContainerFactory` makes started containers (sharing one embedded
  broker by default) and terminates all of them at teardown.
- :class:`ClockedSystem` runs a container on a ``task.Clock``: deliveries and
  timeouts happen only when the test pumps or advances, so Deferreds can be
  checked with ``successResultOf`` and no test sleeps. :class:`ClockedCluster`
  does the same for several containers on one embedded broker.
- :func:`rpc` calls an op from a throw-away client process, for one-line end-to-end checks.

The pytest fixtures over these live in :mod:`ion.testing.pytest_plugin`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from ion.core.config import Config
from ion.core.container import Container
from ion.core.messaging.memory import MemoryBroker
from ion.core.process import Process
from ion.core.threads import SynchronousPool

__all__ = ["on_ci", "ContainerFactory", "ClockedSystem", "ClockedCluster", "rpc", "client_process", "test_config"]


def on_ci() -> bool:
    """Whether the tests run on CI (``CI`` set to true, 1 or yes): there, a missing broker, server or
    browser fails its tests rather than skipping them."""
    import os

    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def test_config(overlay: Mapping[str, Any] | None = None) -> Config:
    """The shipped defaults (``res/config/ion.config``, without ``ionlocal.config``) plus ``overlay``."""
    from ion.core.config import deep_merge, read_literal_file, resource_root

    base = read_literal_file(resource_root() / "config" / "ion.config", "config file")
    return Config(deep_merge(base, overlay or {}))


test_config.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


class ContainerFactory:
    """Makes containers and terminates every one it made.

    :param broker: the embedded broker the containers share (default: a new one).
    :param broker_url: ``memory://`` or an AMQP URL for containers on RabbitMQ (or a list of them,
        the nodes of one cluster; a container may be given its own with ``broker_url=``).
    """

    def __init__(self, broker: MemoryBroker | None = None, *, broker_url: str | Sequence[str] = "memory://",
                 reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.broker_url = broker_url
        first = broker_url if isinstance(broker_url, str) else broker_url[0]
        self.broker = broker if broker is not None or not first.startswith("memory") else MemoryBroker(reactor)
        self.containers: list[Container] = []

    @defer.inlineCallbacks
    def __call__(self, *, sysname: str | None = "test", config: Mapping[str, Any] | None = None,
                 args: Mapping[str, Any] | None = None, clock: IReactorTime | None = None,
                 **kwargs: Any) -> Any:
        """A started container; ``config`` overlays the shipped defaults."""
        container = Container(config=test_config(config), broker_url=kwargs.pop("broker_url", self.broker_url),
                              broker=self.broker,
                              sysname=sysname, reactor=self.reactor, clock=clock, args=args, **kwargs)
        self.containers.append(container)
        yield container.start()
        return container

    @defer.inlineCallbacks
    def teardown(self) -> Any:
        """Terminate every container made, the last first."""
        while self.containers:
            container = self.containers.pop()
            if not container.is_final:
                yield container.terminate()


@defer.inlineCallbacks
def client_process(container: Container, name: str = "test-client") -> Any:
    """Spawn a plain process to make calls from; fires with the Process."""
    pid = yield container.spawn(Process, name=name)
    return container.proc_manager.get(pid)


@defer.inlineCallbacks
def rpc(container: Container, target: str, op: str, content: Any = None, **kwargs: Any) -> Any:
    """Call ``op`` at ``target`` from a throw-away process; fires with the reply content."""
    proc = yield client_process(container)
    try:
        content, _headers = yield proc.rpc_send(target, op, content, **kwargs)
    finally:
        yield container.proc_manager.terminate_process(proc.id)
    return content


class ClockedCluster:
    """Containers on one embedded broker and one :class:`task.Clock`: nothing happens until the
    test pumps or advances (several containers of one system, e.g. for elections and agents)."""

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.broker = MemoryBroker(self.clock)
        self.containers: list[Container] = []

    def start_container(self, contid: str, sysname: str = "sys",
                        config: Mapping[str, Any] | None = None) -> Container:
        """A started container ``contid`` of system ``sysname``; ``config`` overlays the defaults."""
        c = Container(config=test_config(config), broker=self.broker, sysname=sysname, contid=contid,
                      reactor=self.clock, clock=self.clock)
        # No reactor thread to hand results back to: blocking calls run inline.
        c.blocking = SynchronousPool()  # type: ignore[assignment]
        self.containers.append(c)
        self.result(c.start())
        return c

    def spawn_in(self, container: Container, cls: type[Process], spawnargs: Mapping[str, Any] | None = None,
                 name: str | None = None) -> Any:
        """Spawn ``cls`` in ``container``; the process."""
        pid = self.result(container.spawn(cls, spawnargs, name=name))
        return container.proc_manager.get(pid)

    def pump(self, rounds: int = 1000) -> None:
        """Deliver every queued message (and whatever those cause), without moving time on."""
        for _ in range(rounds):
            if not [c for c in self.clock.getDelayedCalls() if c.getTime() <= self.clock.seconds()]:
                return
            self.clock.advance(0)
        raise AssertionError(f"the system did not settle within {rounds} rounds")

    def advance(self, seconds: float, step: float | None = None) -> None:
        """Move time on (firing timeouts) and deliver what follows; with ``step``, in steps of
        that many seconds, delivering what each causes."""
        if not step:
            self.clock.advance(seconds)
            self.pump()
            return
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step
            self.pump()

    def result(self, d: defer.Deferred[Any]) -> Any:
        """Pump, then return what ``d`` fired with (re-raising its failure)."""
        self.pump()
        results: list[Any] = []
        d.addBoth(results.append)
        if not results:
            raise AssertionError(f"{d!r} has not fired after pumping")
        from twisted.python.failure import Failure

        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]


class ClockedSystem(ClockedCluster):
    """A container on a :class:`task.Clock`: nothing happens until the test pumps.

    ::

        system = ClockedSystem()
        proc = system.spawn(MyService)
        d = client.rpc_send("my", "op", 1)
        system.pump()
        content, headers = self.successResultOf(d)
        system.clock.advance(15)  # drives timeouts
    """

    def __init__(self, config: Mapping[str, Any] | None = None, sysname: str = "clocked",
                 contid: str = "clocked") -> None:
        super().__init__()
        self.container = self.start_container(contid, sysname, config)

    def spawn(self, cls: type[Process], spawnargs: Mapping[str, Any] | None = None,
              name: str | None = None) -> Process:
        """Spawn and return a process."""
        proc = self.spawn_in(self.container, cls, spawnargs, name)
        assert proc is not None
        return proc
