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

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.logger import Logger

from ion.core.lifecycle import State
from ion.core.process import Process

if TYPE_CHECKING:
    from ion.core.container import Container

__all__ = ["ContainerMetrics", "RPC_BUCKETS", "target_label"]

#: Buckets of the RPC latency histograms: 100 µs to a minute.
RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
               10.0, 30.0, 60.0)


def target_label(receiver: str, sysname: str) -> str:
    """A bounded label for a message's receiver: the service name for ``<sysname>.<service>``,
    ``agent`` for an agent's queue, ``pid`` for a process's own queue (pids are unbounded)."""
    name = receiver[len(sysname) + 1:] if receiver.startswith(sysname + ".") else receiver
    if name.startswith("agent."):
        return "agent"
    if "." in name or name.isdigit():
        return "pid"
    return name

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
        # The messaging families, counted by every process as it sends, receives and answers
        # (their labelled children cached by each process: a count is one dict lookup and an add).
        self.received = Tallies("ion_messages_received", "Messages received, by process name and op "
                                     "(a reply's op is result or error; an op the process has not: other).",
                                     ("process", "op"))
        self.sent = Tallies("ion_messages_sent", "Messages sent, by process name and op.", ("process", "op"))
        self.rpc_client = Timings(
            "ion_rpc_client_seconds", "Seconds from a request to its reply, on the caller, by target (a service "
            "name, agent or pid) and op; timeouts and lost calls are in ion_rpc_client_failures_total.",
            ("target", "op"), buckets=RPC_BUCKETS)
        self.rpc_failures = Tallies("ion_rpc_client_failures", "Calls that ended without a reply, by target "
                                         "and reason (timeout or error).", ("target", "op", "reason"))
        self.rpc_server = Timings("ion_rpc_server_seconds", "Seconds an op took to answer, on the service, "
                                         "by process name and op.", ("process", "op"), buckets=RPC_BUCKETS)

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
        for family in (self.received, self.sent, self.rpc_client, self.rpc_failures, self.rpc_server):
            yield family.family()
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


class Tally:
    """One counter, counted on the reactor thread: an add, no lock (read by :meth:`ContainerMetrics.snapshot`,
    on the same thread). The per-message families use these: a ``prometheus_client`` child takes a lock
    and checks its arguments, several µs per message in all."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Tallies:
    """A counter family of :class:`Tally` children by label values (``labels(...)`` as in prometheus_client)."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.children: dict[tuple[str, ...], Tally] = {}

    def labels(self, *values: str) -> Tally:
        child = self.children.get(values)
        if child is None:
            values = _bounded(self.children, values)
            child = self.children.get(values) or self.children.setdefault(values, Tally())
        return child

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.children.items():
            family.add_metric(values, child.value)
        return family


class Timing:
    """One histogram, observed on the reactor thread: a bisect and two adds (see :class:`Tally`)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class Timings:
    """A histogram family of :class:`Timing` children by label values."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 buckets: tuple[float, ...]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.buckets = tuple(sorted(buckets))
        self.children: dict[tuple[str, ...], Timing] = {}

    def labels(self, *values: str) -> Timing:
        child = self.children.get(values)
        if child is None:
            values = _bounded(self.children, values)
            child = self.children.get(values) or self.children.setdefault(values, Timing(self.buckets))
        return child

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.children.items():
            running, buckets = 0, []
            for bound, count in zip((*self.buckets, float("inf")), child.counts, strict=True):
                running += count
                buckets.append((floatToGoString(bound), running))
            family.add_metric(values, buckets, child.sum)
        return family


#: Series a per-message family keeps; beyond, new label values are counted under ``other``
#: (a caller can name any op or target: a typo, a scan must not grow the registry for good).
MAX_SERIES = 500


def _bounded(children: Mapping[tuple[str, ...], Any], values: tuple[str, ...]) -> tuple[str, ...]:
    return values if len(children) < MAX_SERIES else ("other",) * len(values)


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
