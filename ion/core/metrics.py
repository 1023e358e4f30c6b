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
render never walks structures the reactor is changing; a process adds the
families of its own state by overriding
:meth:`~ion.core.process.Process.metric_families`. What *happens* (fetches,
bytes, lock waits) is counted as it happens, on counters and histograms made
once per container by :meth:`ContainerMetrics.counter` and
:meth:`ContainerMetrics.histogram` and shared by every instance.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.logger import Logger

from ion.core.lifecycle import State
from ion.core.process import Process

if TYPE_CHECKING:
    from ion.core.container import Container

__all__ = ["ContainerMetrics"]

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
        self._made: dict[str, Any] = {}

    def counter(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> PromCounter:
        """The counter ``name`` of this container (made on first use; every instance of a service
        shares it). ``name`` without ``_total``: prometheus_client adds it."""
        return self._make(PromCounter, name, documentation, labelnames)

    def histogram(self, name: str, documentation: str, labelnames: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = PromHistogram.DEFAULT_BUCKETS) -> PromHistogram:
        """The histogram ``name`` of this container (made on first use, shared like :meth:`counter`)."""
        return self._make(PromHistogram, name, documentation, labelnames, buckets=buckets)

    def _make(self, kind: type, name: str, documentation: str, labelnames: tuple[str, ...], **kwargs: Any) -> Any:
        made = self._made.get(name)
        if made is None:
            made = self._made[name] = kind(name, documentation, labelnames, registry=self.registry, **kwargs)
        elif not isinstance(made, kind) or tuple(getattr(made, "_labelnames", ())) != tuple(labelnames):
            raise ValueError(f"metric {name} exists already with other labels or of another kind")
        return made

    def snapshot(self) -> None:
        """Read the container's state now (on the reactor thread) for the next render."""
        self._snapshot.families = _merged(list(self._container_families()))

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

        for proc in processes:
            if type(proc).metric_families is not Process.metric_families:
                try:
                    yield from proc.metric_families()
                except Exception:
                    _log.failure("metrics of {proc} failed; they are left out", proc=repr(proc))

        apps = GaugeMetricFamily("ion_apps", "Apps of the container: running or failed.", labels=("state",))
        apps.add_metric(("running",), len(c.app_manager.running))
        apps.add_metric(("failed",), len(c.app_manager.failed))
        yield apps


def _merged(families: list[Metric]) -> list[Metric]:
    """One family per name; samples with the same labels added up (two instances of a service
    report one series; a scrape must never hold the same series twice)."""
    by_name: dict[str, Metric] = {}
    for family in families:
        have = by_name.get(family.name)
        if have is None:
            by_name[family.name] = family
            continue
        index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(have.samples)}
        for sample in family.samples:
            at = index.get((sample.name, tuple(sorted(sample.labels.items()))))
            if at is None:
                have.samples.append(sample)
            else:
                have.samples[at] = have.samples[at]._replace(value=have.samples[at].value + sample.value)
    return list(by_name.values())


def _broker_display(container: Container) -> str:
    from ion.core.messaging.transport import parse_broker_url

    try:
        return str(parse_broker_url(container.broker_url))  # str() leaves the password out
    except Exception:
        return "?"
