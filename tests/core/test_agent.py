"""The container agent: announcements, heartbeats on a Clock, the nodes table, ps and remote spawn."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from ion.core.agent import MISSED_HEARTBEATS, ContainerAgent, agent_queue
from ion.core.container import Container
from ion.core.exceptions import ConfigurationError, ReceivedApplicationError
from ion.core.lifecycle import State
from ion.core.observer import ObserverProcess, describe
from ion.core.process import Process, Receiver
from ion.services.hello import HelloService
from ion.testing import ClockedCluster, client_process, rpc

INTERVAL = 5.0


class EventSpy(Process):
    """Collects every ``container.*`` event of its system (a Receiver bound on the events exchange)."""

    name = "spy"

    def slc_init(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def receivers_to_create(self) -> list[Receiver]:
        return super().receivers_to_create() + [
            Receiver(self, f"{self.id}.events", self._event, exchange=self.container.events_exchange,
                     bindings=["container.#"])]

    def _event(self, msg: dict[str, Any], receiver: Receiver) -> None:
        self.events.append((msg["receiver"], msg["content"]))


class Cluster(ClockedCluster):
    """Containers of system ``sys`` on one embedded broker and one task.Clock, with a short heartbeat."""

    def advance(self, seconds: float, step: float | None = 1.0) -> None:
        """Move time on one second at a time, delivering what each step causes."""
        super().advance(seconds, step)

    def container(self, contid: str, sysname: str = "sys", **config: Any) -> Container:
        return self.start_container(contid, sysname, {"ion.core.container": {"heartbeat_interval": INTERVAL,
                                                                              **config}})

    def spawn(self, container: Container, cls: type[Process], **kw: Any) -> Any:
        return self.spawn_in(container, cls, **kw)

    def agent(self, container: Container) -> ContainerAgent:
        agent = container.proc_manager.get(container.agent_pid)
        assert isinstance(agent, ContainerAgent)
        return agent

    def call(self, container: Container, target: str, op: str, content: Any = None) -> Any:
        return self.result(rpc(container, target, op, content))

    def stop(self, container: Container) -> None:
        self.result(container.terminate())


@pytest.fixture
def cluster() -> Any:
    c = Cluster()
    yield c
    for container in reversed(c.containers):
        if not container.is_final:
            c.result(container.terminate())


def test_agent_is_the_first_process(cluster: Cluster) -> None:
    """Every container spawns its agent at activation, as its first process, named 'agent'."""
    c1 = cluster.container("c1")
    assert c1.agent_pid == "c1.1"
    assert list(c1.proc_manager.processes) == ["c1.1"]
    agent = cluster.agent(c1)
    assert agent.proc_name == "agent" and agent.state is State.ACTIVE
    assert agent.agent_queue == agent_queue("sys", "c1") == "sys.agent.c1"
    assert "sys.agent.c1" in cluster.broker.queues


def test_agent_is_terminated_last(cluster: Cluster) -> None:
    """Container terminate stops processes in reverse start order, the agent last."""
    c1 = cluster.container("c1")
    cluster.spawn(c1, HelloService)
    cluster.spawn(c1, Process, name="other")
    order: list[str] = []
    c1.proc_manager.add_exit_listener(lambda proc, state: order.append(proc.proc_name))
    cluster.stop(c1)
    assert order == ["other", "hello", "agent"]


def test_agent_can_be_turned_off(cluster: Cluster) -> None:
    """ion.core.container: agent False runs no agent."""
    c1 = cluster.container("c1", agent=False)
    assert c1.agent_pid is None and not c1.proc_manager.processes


def test_bad_heartbeat_interval_fails_the_start(cluster: Cluster) -> None:
    """A heartbeat_interval that is not a positive number stops the container from starting."""
    with pytest.raises(ConfigurationError, match="heartbeat_interval"):
        cluster.container("c1", heartbeat_interval=0)


def test_start_heartbeat_and_stop_are_announced(cluster: Cluster) -> None:
    """The agent announces start, a heartbeat every interval (on the clock) and stop."""
    c1 = cluster.container("c1")
    spy = cluster.spawn(c1, EventSpy)
    c2 = cluster.container("c2")
    assert [key for key, _ in spy.events] == ["container.start", "container.heartbeat"]
    start = spy.events[0][1]
    assert start["container"] == "c2" and start["sysname"] == "sys"
    assert start["pids"] == 1 and start["started_at"] == c2.started_at
    assert start["agent"] == "sys.agent.c2" and start["interval"] == INTERVAL
    # c1's agent answered the newcomer's start with a heartbeat at once.
    assert spy.events[1][1]["container"] == "c1" and spy.events[1][1]["pids"] == 2

    spy.events.clear()
    cluster.advance(INTERVAL - 1)
    assert spy.events == []
    cluster.advance(1)
    assert sorted(content["container"] for key, content in spy.events if key == "container.heartbeat") == [
        "c1", "c2"]
    spy.events.clear()
    cluster.advance(INTERVAL * 2)
    assert len(spy.events) == 4

    spy.events.clear()
    cluster.stop(c2)
    assert [(key, content["container"]) for key, content in spy.events] == [("container.stop", "c2")]


def test_two_containers_list_each_other(cluster: Cluster) -> None:
    """nodes() of either container lists both, with their process counts."""
    c1 = cluster.container("c1")
    c2 = cluster.container("c2")
    cluster.spawn(c2, HelloService)
    for c in (c1, c2):
        nodes = cluster.call(c, c.agent_pid, "nodes")
        assert [n["container"] for n in nodes] == ["c1", "c2"]
    # c2's own entry is current; c1 learns c2's new count at the next heartbeat.
    assert cluster.call(c2, "sys.agent.c2", "nodes")[1]["pids"] == 3
    cluster.advance(INTERVAL)
    assert {n["container"]: n["pids"] for n in cluster.call(c1, "sys.agent.c1", "nodes")}["c2"] == 2


def test_other_systems_are_not_listed(cluster: Cluster) -> None:
    """A container of another system on the same broker is not a node of this one."""
    c1 = cluster.container("c1")
    cluster.container("x1", sysname="other")
    cluster.advance(INTERVAL)
    assert [n["container"] for n in cluster.agent(c1).live_nodes()] == ["c1"]


def test_stopped_container_is_dropped_at_once(cluster: Cluster) -> None:
    """A container.stop removes the container from the table."""
    c1 = cluster.container("c1")
    c2 = cluster.container("c2")
    assert "c2" in cluster.agent(c1).nodes
    cluster.stop(c2)
    assert [n["container"] for n in cluster.agent(c1).live_nodes()] == ["c1"]


def test_wait_for_node(cluster: Cluster) -> None:
    """wait_for_node fires once the agent hears of that container, or times out on the clock."""
    c1 = cluster.container("c1")
    agent = cluster.agent(c1)
    d = agent.wait_for_node("c2")
    late = agent.wait_for_node("c3", timeout=INTERVAL)
    assert not d.called
    cluster.container("c2")
    assert d.called and cluster.result(d)["container"] == "c2"
    cluster.advance(INTERVAL)
    with pytest.raises(defer.TimeoutError):
        cluster.result(late)


def test_silent_container_is_dropped_after_three_missed_heartbeats(cluster: Cluster) -> None:
    """A container that stops heartbeating (no stop event) is dropped after 3 intervals."""
    c1 = cluster.container("c1")
    c2 = cluster.container("c2")
    cluster.advance(INTERVAL)
    cluster.agent(c2)._stop_heartbeat()  # as if c2 hung or lost its connection
    cluster.advance(INTERVAL * MISSED_HEARTBEATS)
    assert "c2" in cluster.agent(c1).nodes  # exactly 3 intervals: not yet
    cluster.advance(INTERVAL)
    assert [n["container"] for n in cluster.agent(c1).live_nodes()] == ["c1"]


def test_ps_op_lists_this_containers_processes(cluster: Cluster) -> None:
    """The agent's ps op answers the processes of its container."""
    c1 = cluster.container("c1")
    hello = cluster.spawn(c1, HelloService)
    table = cluster.call(c1, "sys.agent.c1", "ps")
    by_pid = {row["pid"]: row for row in table}
    assert by_pid["c1.1"]["name"] == "agent" and by_pid["c1.1"]["class"] == "ContainerAgent"
    assert by_pid[hello.id]["state"] == "ACTIVE" and by_pid[hello.id]["module"] == "ion.services.hello"


def test_apps_op_lists_this_containers_apps(cluster: Cluster) -> None:
    """The agent's apps op answers the running apps, with their pids, and the failed ones."""
    c1 = cluster.container("c1")
    assert cluster.call(c1, "sys.agent.c1", "apps") == []
    cluster.result(c1.app_manager.start_app("hello"))
    c1.app_manager.failed["broken"] = "gave up"
    (hello, broken) = cluster.call(c1, "sys.agent.c1", "apps")
    assert (hello["app"], hello["failed"], hello["pids"]) == ("hello", None,
                                                              list(c1.app_manager.running["hello"].state.pids))
    assert (broken["app"], broken["failed"]) == ("broken", "gave up")


def test_spawn_op_starts_a_process_in_that_container(cluster: Cluster) -> None:
    """Another container asks c2's agent to spawn; the pid is c2's and the service answers."""
    c1 = cluster.container("c1")
    c2 = cluster.container("c2")
    pid = cluster.call(c1, "sys.agent.c2", "spawn",
                       {"module": "ion.services.hello", "spawnargs": {"greeting": "Ahoy"}, "name": "h2"})
    assert pid.startswith("c2.")
    proc = c2.proc_manager.get(pid)
    assert isinstance(proc, HelloService) and proc.proc_name == "h2"
    assert cluster.call(c1, "hello", "hello", "x") == {"value": "Ahoy, x"}
    # A one-process app by name, and a bare module string, work too.
    pid2 = cluster.call(c1, "sys.agent.c2", "spawn", {"app": "hello"})
    assert c2.proc_manager.get(pid2).proc_name == "hello"
    pid3 = cluster.call(c1, "sys.agent.c2", "spawn", "ion.services.hello")
    assert pid3 in c2.proc_manager.processes


@pytest.mark.parametrize("content, match", [
    ({"module": "no_such_module_here"}, "cannot spawn 'no_such_module_here'"),
    ({"app": "no_such_app"}, "no app named"),
    ({}, "needs 'module'"),
    (42, "needs a module or app name"),
    ({"module": "ion.services.hello", "spawnargs": [1]}, "spawnargs"),
])
def test_spawn_op_errors_are_400(cluster: Cluster, content: Any, match: str) -> None:
    """A spawn request the agent cannot carry out is answered with a clear 400."""
    c1 = cluster.container("c1")
    with pytest.raises(ReceivedApplicationError, match=match) as info:
        cluster.call(c1, "sys.agent.c1", "spawn", content)
    assert info.value.response_code == 400


@pytest_twisted.ensureDeferred
async def test_agents_on_the_real_reactor(container_factory: Any) -> None:
    """With the reactor, two containers of one system (shared broker) list each other."""
    a = await container_factory(sysname="live")
    b = await container_factory(sysname="live")
    # Events and requests travel on different queues: wait until each agent heard of the other.
    from twisted.internet import reactor

    await a.proc_manager.get(a.agent_pid).wait_for_node(b.id).addTimeout(10, reactor)
    await b.proc_manager.get(b.agent_pid).wait_for_node(a.id).addTimeout(10, reactor)
    proc = await client_process(a)
    content, _ = await proc.rpc_send(agent_queue("live", a.id), "nodes")
    assert sorted(n["container"] for n in content) == sorted([a.id, b.id])
    content, _ = await proc.rpc_send(agent_queue("live", b.id), "nodes")
    assert sorted(n["container"] for n in content) == sorted([a.id, b.id])


# -- the observer -----------------------------------------------------------------------------------
def test_observer_sees_every_message(cluster: Cluster) -> None:
    """The observer's queue, bound with '#', gets a copy of each message of its system."""
    c1 = cluster.container("c1")
    observer = cluster.spawn(c1, ObserverProcess)
    cluster.spawn(c1, HelloService)
    before = observer.seen
    assert cluster.call(c1, "hello", "hello", "x") == {"value": "Hello there, x"}
    # the request and its reply
    assert observer.seen - before >= 2
    line = describe({"sender-name": "a", "sender": "c1.3b", "receiver": "sys.hello", "op": "hello",
                     "protocol": "rpc", "performative": "request", "conv-id": "c1.3#1", "conv-seq": 1,
                     "status": "OK"})
    assert line == "a(c1.3b) -> sys.hello: hello [rpc/request] conv=c1.3#1#1"
