# -*- test-case-name: tests.core.test_http -*-
"""The container's Prometheus metrics (``prometheus_client``), served on its HTTP port.

Each container has its own :class:`~prometheus_client.CollectorRegistry`
(several containers may share one OS process, as in the tests), served at
``/metrics`` by :mod:`ion.core.http`. Names begin with ``ion_``; labels are
bounded: process *names* (``deploy``, ``fetch``), never pids nor
conversation ids.

**Two kinds.** What the container *is* (processes per state, conversations
in flight, receivers' prefetch occupancy, the broker connection, apps) is
read at scrape time: :meth:`ContainerMetrics.snapshot` takes it on the
reactor thread, then ``prometheus_client`` renders it in its thread, so the
render never walks structures the reactor is changing. What *happens*
(reconnects so far) is counted as it happens. A service adds its own
families with :meth:`ContainerMetrics.add_source` (a function called in the
snapshot, on the reactor thread).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.logger import Logger

from ion.core.lifecycle import State

if TYPE_CHECKING:
    from ion.core.container import Container

__all__ = ["ContainerMetrics", "Source"]

#: ``source()`` -> metric families of one part of the system (called on the reactor thread).
Source = Callable[[], Iterable[Metric]]

_log = Logger()


class _Snapshot(Collector):
    """Hands the registry the families taken by the last :meth:`ContainerMetrics.snapshot`."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def describe(self) -> list[Metric]:
        return []  # the names vary with what the container runs: no registration-time check

    def collect(self) -> Iterable[Metric]:
        return list(self.families)


class ContainerMetrics:
    """One container's registry and the families read from its state."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self.registry = CollectorRegistry(auto_describe=False)
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)
        self._sources: dict[str, Source] = {}

    def add_source(self, name: str, source: Source) -> None:
        """Add (or replace) the families ``source()`` gives, under ``name`` (e.g. a service's pid)."""
        self._sources[name] = source

    def remove_source(self, name: str) -> None:
        self._sources.pop(name, None)

    def snapshot(self) -> None:
        """Read the container's state now (on the reactor thread) for the next render."""
        families = list(self._container_families())
        for name, source in list(self._sources.items()):
            try:
                families.extend(source())
            except Exception:
                _log.failure("metrics source {name} failed; its families are left out", name=name)
        self._snapshot.families = families

    def _container_families(self) -> Iterator[Metric]:
        c = self.container
        info = InfoMetricFamily("ion_container", "The container: its id, system and broker.",
                                labels=("container", "system", "broker"))
        info.add_metric((c.id, c.sysname, _broker_display(c)), {})
        yield info
        if c.started_at is not None:
            yield GaugeMetricFamily("ion_container_uptime_seconds", "Seconds since the container became active.",
                                    value=c.clock.seconds() - c.started_at)
        exchanges = c.exchange_manager
        yield GaugeMetricFamily("ion_broker_connected", "1 while the connection to the broker is up.",
                                value=1.0 if exchanges.connected else 0.0)
        yield CounterMetricFamily("ion_broker_reconnects", "Connections to the broker restored after a loss.",
                                  value=exchanges.reconnects)

        processes = list(c.proc_manager.processes.values())
        states = Counter(p.state for p in processes)
        by_state = GaugeMetricFamily("ion_processes", "Processes of the container by lifecycle state.",
                                     labels=("state",))
        for state in State:
            by_state.add_metric((state.value,), states.get(state, 0))
        yield by_state

        initiated: Counter[str] = Counter()
        responding: Counter[str] = Counter()
        inflight: Counter[str] = Counter()
        window: Counter[str] = Counter()
        for proc in processes:
            initiated[proc.proc_name] += len(proc.conversations.initiated)
            responding[proc.proc_name] += len(proc.conversations.responding)
            for receiver in proc.receivers:
                inflight[proc.proc_name] += receiver.inflight
                window[proc.proc_name] += receiver.prefetch or 0
        convs = GaugeMetricFamily("ion_conversations_in_flight", "Conversations open, by process name and role "
                                  "(initiator: waiting for a reply; responder: being answered).",
                                  labels=("process", "role"))
        for name in sorted(set(initiated) | set(responding)):
            convs.add_metric((name, "initiator"), initiated[name])
            convs.add_metric((name, "responder"), responding[name])
        yield convs
        occupied = GaugeMetricFamily("ion_receiver_inflight", "Deliveries taken from the broker and not yet "
                                     "settled, by process name.", labels=("process",))
        capacity = GaugeMetricFamily("ion_receiver_prefetch", "The broker's delivery window of the process "
                                     "name's receivers (summed).", labels=("process",))
        for name in sorted(window):
            occupied.add_metric((name,), inflight[name])
            capacity.add_metric((name,), window[name])
        yield occupied
        yield capacity

        apps = GaugeMetricFamily("ion_apps", "Apps of the container: running or failed.", labels=("state",))
        apps.add_metric(("running",), len(c.app_manager.running))
        apps.add_metric(("failed",), len(c.app_manager.failed))
        yield apps


def _broker_display(container: Container) -> str:
    from ion.core.messaging.transport import parse_broker_url

    try:
        return str(parse_broker_url(container.broker_url))  # str() leaves the password out
    except Exception:
        return "?"
