"""Containers on a 3-node RabbitMQ cluster, and a node killed under them (issue #18).

The session's :class:`~ion.testing.rabbitmq.RabbitMQCluster` (the ``rabbitmq_cluster``
fixture, started once, the first time one of these tests runs) and a fresh vhost per test.
Each container gets all three node addresses, starting with a different one, so each is
connected to its own node; service queues are quorum queues (the default with several
addresses). Every test kills one node (``kill -9`` of its Erlang VM) and starts it again.
``pytest -m cluster`` runs them alone (with tests/services/deploy/test_takeover_cluster.py: a deploy job
whose owner's node dies).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from ion.core.container import Container
from ion.core.exceptions import ConnectionLostError, ConversationError, ConversationTimeout
from ion.core.messaging.amqp import AmqpTransport
from ion.core.service import ServiceProcess
from ion.services.cache.reaper import election_queue
from ion.services.cache.service import CacheService
from ion.testing import ContainerFactory, client_process

pytestmark = [pytest.mark.amqp, pytest.mark.cluster]

SYSNAME = "clsys"
#: Reconnect quickly: the next node is tried 0.05-0.1 s after a loss, then every 0.25-0.5 s at most.
FAST_RECONNECT = {"reconnect_initial": 0.1, "reconnect_max": 0.5}
#: Far longer than any failover: a call that waits this long has hung (and fails as a timeout).
RPC_TIMEOUT = 120.0


class CounterService(ServiceProcess):
    """Counts its executions (request number, redelivered flag), in every instance of this process."""

    service_name = "counter"
    executions: ClassVar[list[tuple[int, bool]]] = []

    def op_count(self, content: Any, headers: dict[str, Any], msg: dict[str, Any]) -> int:
        CounterService.executions.append((int(content["n"]), bool(msg.get("redelivered"))))
        return int(content["n"])


def rotated(urls: list[str], first: int) -> list[str]:
    """The node addresses starting with node ``first``: a container connects to that node first."""
    return urls[first:] + urls[:first]


def container_config(**messaging: Any) -> dict[str, Any]:
    return {"ion.core.messaging": {**FAST_RECONNECT, **messaging},
            "ion.core.process": {"rpc_timeout": RPC_TIMEOUT, "terminate_timeout": 1}}


async def until(check: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        await task.deferLater(reactor, 0.05, lambda: None)


def node_of(container: Container) -> int:
    """The AMQP port of the node ``container`` is connected to now."""
    transport = container.transport
    assert isinstance(transport, AmqpTransport)
    return transport.url.port


def queue_info(cluster: Any, vhost: str, queue: str, item: str) -> str | None:
    """One ``rabbitmqctl list_queues`` item of ``queue`` (``leader``, ``messages`` ...); None while
    the queue is not listed (a quorum queue is not, for a moment, while it elects a new leader)."""
    out = cluster.ctl("list_queues", "-p", vhost, "--no-table-headers", "-q", "name", item)
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == queue:
            return parts[1]
    return None


def queue_leader(cluster: Any, vhost: str, queue: str) -> str | None:
    """The node leading quorum queue ``queue`` (None: not listed right now)."""
    return queue_info(cluster, vhost, queue, "leader")


def new_leader(cluster: Any, vhost: str, queue: str, dead: int) -> bool:
    """Whether ``queue`` is listed with a leader other than node ``dead``."""
    return queue_leader(cluster, vhost, queue) not in (None, cluster.nodes[dead].nodename)


def queue_messages(cluster: Any, vhost: str, queue: str) -> int | None:
    """Messages in ``queue`` (a quorum queue answers 0 for a moment after its leader died: poll)."""
    count = queue_info(cluster, vhost, queue, "messages")
    return None if count is None else int(count)


def vhost_of(url: str) -> str:
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(url).path.lstrip("/"))


def services_ticks(services: list[Any]) -> tuple[int, ...]:
    """The election ticks each Cache service instance received so far."""
    return tuple(service.election.ticks_received for service in services)


def restart(cluster: Any, node: int) -> defer.Deferred[None]:
    return threads.deferToThread(cluster.restart_node, node)


@pytest.mark.parametrize("victim", ["service", "client"])
@pytest_twisted.ensureDeferred
async def test_a_thousand_calls_across_the_death_of_a_node(rabbitmq_cluster: Any, cluster_urls: list[str],
                                                           victim: str) -> None:
    """1,000 RPCs from a client container (node 0) to a service with an instance in each of two other
    containers (nodes 1 and 2; node 1 leads the quorum service queue). ``kill -9`` of node 1 (the
    ``service`` case) or of node 0 (the ``client`` case) after 300 calls: every call either succeeds
    or fails at once with ConversationError/ConnectionLostError (none waits for its timeout), the
    stream completes after failover, every call answered was executed, and a request executed twice
    was redelivered the second time. With the client's node alive every call succeeds."""
    cluster = rabbitmq_cluster
    vhost = vhost_of(cluster_urls[0])
    CounterService.executions = []
    factory = ContainerFactory(broker_url=cluster_urls)
    killed: int | None = None
    try:
        servers = []
        for node in (1, 2):  # node 1's instance declares the service queue first: node 1 leads it
            server = await factory(sysname=SYSNAME, broker_url=rotated(cluster_urls, node), config=container_config())
            await server.spawn(CounterService)
            servers.append(server)
        client = await factory(sysname=SYSNAME, broker_url=rotated(cluster_urls, 0), config=container_config())
        assert client.service_queue_type == "quorum"
        assert [node_of(c) for c in (client, *servers)] == cluster.ports
        assert queue_leader(cluster, vhost, f"{SYSNAME}.counter") == cluster.nodes[1].nodename
        proc = await client_process(client)

        total, window, kill_at = 1000, 20, 300
        outcomes: dict[int, Any] = {}
        done: defer.Deferred[None] = defer.Deferred()
        next_n = [0]
        kill_now: defer.Deferred[None] = defer.Deferred()

        def launch() -> None:
            n = next_n[0]
            if n >= total:
                return
            next_n[0] += 1
            started = time.monotonic()

            def ended(result: Any) -> None:
                outcomes[n] = (result, time.monotonic() - started)
                if len(outcomes) == kill_at and not kill_now.called:
                    kill_now.callback(None)
                if len(outcomes) == total:
                    done.callback(None)
                else:
                    # A call that failed at once (no connection) is followed by the next a little later.
                    reactor.callLater(0 if isinstance(result, int) else 0.01, launch)

            proc.rpc_send("counter", "count", {"n": n}).addCallback(lambda r: r[0]).addBoth(ended)

        for _ in range(window):
            launch()
        await kill_now
        killed = 1 if victim == "service" else 0
        cluster.kill_node(killed)
        await done.addTimeout(RPC_TIMEOUT + 60, reactor)  # the stream completes (no call hangs)

        executed = Counter(n for n, _ in CounterService.executions)
        answered = [n for n, (r, _) in outcomes.items() if isinstance(r, int)]
        failed = {n: (r, secs) for n, (r, secs) in outcomes.items() if not isinstance(r, int)}
        for n, (result, secs) in failed.items():
            error = result.value
            assert isinstance(error, (ConversationError, ConnectionLostError)), (n, result)
            assert not isinstance(error, ConversationTimeout), (n, error, secs)
        assert all(outcomes[n][0] == n for n in answered)
        assert all(executed[n] >= 1 for n in answered), "an answered call that no instance executed"
        for n, count in executed.items():  # a second execution is a redelivery, never a duplicate
            runs = [redelivered for m, redelivered in CounterService.executions if m == n]
            assert len(runs) == count and all(runs[1:]), (n, runs)
        assert any(isinstance(outcomes[n][0], int) for n in range(total - window, total)), "no recovery"
        if victim == "service":
            assert not failed, failed  # the client's node stayed: the survivors took every request
            # The killed node's instance reconnected to another node and consumes again.
            await until(lambda: servers[0].transport.connected, what="service container reconnected")
            assert node_of(servers[0]) != cluster.ports[1]
        else:
            assert failed, "calls in flight when the client's node died fail"
            await until(lambda: client.transport.connected, what="client reconnected")
        content, _ = await proc.rpc_send("counter", "count", {"n": total})
        assert content == total
        await restart(cluster, killed)
        killed = None
    finally:
        await factory.teardown()
        if killed is not None:
            await restart(cluster, killed)


@pytest_twisted.ensureDeferred
async def test_requests_waiting_in_a_quorum_queue_survive_its_leader(rabbitmq_cluster: Any,
                                                                     cluster_urls: list[str]) -> None:
    """100 requests wait in the quorum service queue (no instance consumes it yet); the node leading it
    dies; an instance started afterwards on another node executes all 100, and every caller gets its
    answer."""
    cluster = rabbitmq_cluster
    vhost = vhost_of(cluster_urls[0])
    CounterService.executions = []
    factory = ContainerFactory(broker_url=cluster_urls)
    queue = f"{SYSNAME}.counter"
    killed: int | None = None
    raw = AmqpTransport(cluster_urls[1])
    try:
        client = await factory(sysname=SYSNAME, broker_url=rotated(cluster_urls, 0), config=container_config())
        # The service queue as an instance declares it, made through node 1 (which then leads it).
        await raw.connect()
        durable, arguments = client.shared_queue_options()
        await raw.declare_queue(queue, durable=durable, arguments=arguments)
        await raw.bind(queue, client.exchange_name, queue)
        await raw.close()
        assert queue_leader(cluster, vhost, queue) == cluster.nodes[1].nodename
        proc = await client_process(client)
        calls = [proc.rpc_send("counter", "count", {"n": n}).addCallback(lambda r: r[0]) for n in range(100)]
        await until(lambda: queue_messages(cluster, vhost, queue) == 100, what="100 requests waiting")
        killed = 1
        cluster.kill_node(1)
        await until(lambda: new_leader(cluster, vhost, queue, 1), what="a new leader")
        server = await factory(sysname=SYSNAME, broker_url=rotated(cluster_urls, 2), config=container_config())
        await server.spawn(CounterService)
        results = await defer.gatherResults(calls, consumeErrors=True).addTimeout(RPC_TIMEOUT, reactor)
        assert results == list(range(100))
        assert sorted(n for n, _ in CounterService.executions) == list(range(100))
        await restart(cluster, 1)
        killed = None
        assert len(cluster.cluster_nodes()) == 3  # the node rejoined
    finally:
        await factory.teardown()
        if killed is not None:
            await restart(cluster, killed)


@pytest_twisted.ensureDeferred
async def test_a_call_sent_just_after_the_queues_leader_died_is_answered(rabbitmq_cluster: Any,
                                                                        cluster_urls: list[str]) -> None:
    """The node leading the quorum service queue dies; a caller on another node whose channel never sent to
    that queue calls at once, while the queue elects a new leader. RabbitMQ (3.10) refuses every message
    such a channel sends it (basic.nack) from then on, or drops them unseen without a confirm: the call
    would wait out its whole timeout. The request goes with a confirm, the refusal moves publishing to a
    new channel and the request is sent again: the instance on the third node answers it."""
    cluster = rabbitmq_cluster
    vhost = vhost_of(cluster_urls[0])
    CounterService.executions = []
    factory = ContainerFactory(broker_url=cluster_urls)
    queue = f"{SYSNAME}.counter"
    killed: int | None = None
    try:
        leader = await factory(sysname=SYSNAME, broker_url=rotated(cluster_urls, 0), config=container_config())
        await leader.spawn(CounterService)  # declares the queue through node 0, which then leads it
        assert queue_leader(cluster, vhost, queue) == cluster.nodes[0].nodename
        other = await factory(sysname=SYSNAME, broker_url=rotated(cluster_urls, 1), config=container_config())
        await other.spawn(CounterService)
        caller = await factory(sysname=SYSNAME, broker_url=rotated(cluster_urls, 2), config=container_config())
        proc = await client_process(caller)
        killed = 0
        cluster.kill_node(0)
        started = time.monotonic()
        calls = [proc.rpc_send("counter", "count", {"n": n}, timeout=RPC_TIMEOUT).addCallback(lambda r: r[0])
                 for n in range(5)]
        results = await defer.gatherResults(calls, consumeErrors=True).addTimeout(RPC_TIMEOUT, reactor)
        assert results == list(range(5))
        print(f"\nfive calls sent as the leader's node died answered in {time.monotonic() - started:.2f} s")
        await restart(cluster, 0)
        killed = None
    finally:
        await factory.teardown()
        if killed is not None:
            await restart(cluster, killed)


@pytest_twisted.ensureDeferred
async def test_reaper_election_survives_the_node_of_its_queue(rabbitmq_cluster: Any, cluster_urls: list[str],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Cache service instances (nodes 1 and 2) elect a reaper through the single-active-consumer
    quorum queue, led by node 1 whose instance is active. Node 1 dies: the queue gets a new leader and
    the ticks go to one instance again (the election carries on); the killed node's container comes
    back on another node. (A deploy job on the cluster: tests/services/deploy/test_takeover_cluster.py.)"""
    monkeypatch.setenv("ION_CACHE_DIR", str(tmp_path))  # the containers' cache root
    cluster = rabbitmq_cluster
    vhost = vhost_of(cluster_urls[0])
    factory = ContainerFactory(broker_url=cluster_urls)
    queue = election_queue(SYSNAME)
    killed: int | None = None
    try:
        services = []
        for node in (1, 2):
            container = await factory(sysname=SYSNAME, broker_url=rotated(cluster_urls, node),
                                      config=container_config())
            pid = await container.spawn(CacheService, {"root": str(tmp_path / "cache"), "reap_tick": 0.1,
                                                       "reap_interval": 3600.0})
            services.append(container.proc_manager.get(pid))
        first, second = services
        await until(lambda: first.election.ticks_received >= 4, what="ticks at the first instance")
        assert second.election.ticks_received == 0
        assert queue_leader(cluster, vhost, queue) == cluster.nodes[1].nodename
        killed = 1
        cluster.kill_node(1)
        await until(lambda: new_leader(cluster, vhost, queue, 1), what="a new leader")
        # Ticks flow again, to one instance at a time.
        at_kill = first.election.ticks_received + second.election.ticks_received
        await until(lambda: first.election.ticks_received + second.election.ticks_received >= at_kill + 4,
                    what="ticks after the failover")
        await until(lambda: first.container.transport.connected, what="the first container reconnected")
        # From then on one instance, whichever it is, gets every tick.
        before = (first.election.ticks_received, second.election.ticks_received)
        await until(lambda: sum(services_ticks(services)) >= sum(before) + 10, what="ticks after reconnection")
        after = services_ticks(services)
        grew = [a > b for a, b in zip(after, before, strict=True)]
        assert grew.count(True) == 1, (before, after)
        await restart(cluster, 1)
        killed = None
    finally:
        await factory.teardown()
        if killed is not None:
            await restart(cluster, killed)
