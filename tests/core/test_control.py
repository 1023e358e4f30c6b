"""The one control API (ion.core.control.SystemControl) on the embedded broker and a task.Clock:
discovery within one round trip, nodes, ps of one and of every container, ping, call, spawn, kill
(refused to a non-operator, audited where it runs) and following the audit trail."""

from __future__ import annotations

from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
from twisted.internet import defer

from ion.core.container import Container
from ion.core.control import AuditListener, ControlError, SystemControl
from ion.core.exceptions import ConversationError, ReceivedApplicationError
from ion.core.process import Process
from ion.services.hello import HelloService
from ion.testing import ClockedCluster

INTERVAL = 5.0


class Cluster(ClockedCluster):
    """Containers of system ``sys`` with a 5 s heartbeat, and a caller process in a container."""

    def container(self, contid: str, **config: Any) -> Container:
        return self.start_container(contid, "sys", {"ion.core.container": {"heartbeat_interval": INTERVAL},
                                                    **config})

    def control(self, container: Container, **kwargs: Any) -> SystemControl:
        return SystemControl(self.spawn_in(container, Process, name="caller"), **kwargs)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.result(defer.ensureDeferred(coro))


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    for container in reversed(c.containers):
        if not container.is_final:
            c.result(container.terminate())


def test_a_new_container_sees_the_system_within_one_round_trip(cluster: Cluster) -> None:
    """The agents answer a newcomer's container.start with a heartbeat at once: a short-lived client
    container lists every container after delivery alone, long before any heartbeat interval."""
    cluster.container("c1")
    cluster.container("c2")
    client = cluster.container("cli")
    control = cluster.control(client, client=True)
    assert cluster.clock.seconds() == 0  # no time has passed: no periodic heartbeat yet
    assert [n["container"] for n in cluster.run(control.nodes())] == ["c1", "c2"]
    # discover() waits its settle time on the clock, then lists.
    d = defer.ensureDeferred(control.discover(1.0))
    cluster.pump()
    assert not d.called
    cluster.advance(1.0)
    assert [n["container"] for n in cluster.result(d)] == ["c1", "c2"]
    # Not a client: its own container is a node too.
    assert [n["container"] for n in cluster.run(cluster.control(client).nodes())] == ["c1", "c2", "cli"]


def test_ps_of_one_node_and_of_every_node(cluster: Cluster) -> None:
    """ps(node) asks that container's agent (an id or a unique prefix); ps() asks every one."""
    c1 = cluster.container("c1")
    c2 = cluster.container("c2")
    hello = cluster.spawn_in(c2, HelloService)
    control = cluster.control(c1)
    rows = cluster.run(control.ps("c2"))
    assert {(r["container"], r["pid"], r["name"]) for r in rows} == {("c2", "c2.1", "agent"),
                                                                   ("c2", hello.id, "hello")}
    every = cluster.run(control.ps())
    assert {r["container"] for r in every} == {"c1", "c2"}
    assert hello.id in {r["pid"] for r in every} and "c1.2" in {r["pid"] for r in every}
    cluster.container("c10")
    with pytest.raises(ControlError, match="ambiguous"):
        control.resolve_node("c")
    assert control.resolve_node("c1") == "c1" and control.resolve_node("c2") == "c2"
    with pytest.raises(ControlError, match="no container 'nowhere' in system sys"):
        cluster.run(control.ps("nowhere"))
    with pytest.raises(ControlError, match="no container 'nowhere'"):
        cluster.run(control.spawn("hello", node="nowhere"))


def test_ps_of_every_node_reports_one_that_does_not_answer(cluster: Cluster) -> None:
    """A container that is listed but does not answer gives an error row; the others are listed."""
    c1 = cluster.container("c1")
    c2 = cluster.container("c2")
    control = cluster.control(c1, timeout=2.0)
    # c2's agent stops consuming (as if hung) but is still in c1's table.
    agent2 = c2.proc_manager.get(c2.agent_pid)
    for receiver in agent2.receivers:
        if receiver.name == "sys.agent.c2":
            cluster.result(receiver.deactivate())
    d = defer.ensureDeferred(control.ps())
    cluster.advance(3.0, step=1.0)
    rows = cluster.result(d)
    assert {r["container"] for r in rows} == {"c1", "c2"}
    (bad,) = [r for r in rows if r["container"] == "c2"]
    assert bad["pid"] is None and bad["error"]


def test_ping_and_call(cluster: Cluster) -> None:
    """ping and call reach a service by name and a process by pid; an unknown target is a 404."""
    c1 = cluster.container("c1")
    c2 = cluster.container("c2")
    hello = cluster.spawn_in(c2, HelloService)
    control = cluster.control(c1)
    pong = cluster.run(control.ping("hello"))
    assert pong["pid"] == hello.id and pong["state"] == "ACTIVE"
    assert cluster.run(control.ping(hello.id))["pid"] == hello.id
    assert cluster.run(control.call("hello", "hello", "you")) == {"value": "Hello there, you"}
    with pytest.raises(ConversationError) as info:
        cluster.run(control.call("no_such_service", "x"))
    assert info.value.response_code == 404


def test_spawn_here_and_in_another_node(cluster: Cluster) -> None:
    """spawn goes to the agent of the named container (default: the caller's own)."""
    c1 = cluster.container("c1")
    c2 = cluster.container("c2")
    control = cluster.control(c1)
    pid = cluster.run(control.spawn("ion.services.hello", node="c2", name="h2", spawnargs={"greeting": "Ahoy"}))
    assert pid.startswith("c2.") and c2.proc_manager.get(pid).proc_name == "h2"
    here = cluster.run(control.spawn("hello"))
    assert here in c1.proc_manager.processes
    with pytest.raises(ReceivedApplicationError, match="cannot spawn"):
        cluster.run(control.spawn("no_such_module.x", node="c2"))


def test_spawn_without_an_agent_is_a_clear_error(cluster: Cluster) -> None:
    c1 = cluster.start_container("c1", "sys", {"ion.core.container": {"agent": False}})
    control = cluster.control(c1)
    with pytest.raises(ControlError, match="runs no agent"):
        cluster.run(control.spawn("hello"))
    with pytest.raises(ControlError, match="runs no agent"):
        cluster.run(control.nodes())


def test_kill_here_and_there_is_audited_where_it_runs(cluster: Cluster, tmp_path: Any) -> None:
    """kill sends the terminate op: a local process is waited for; a remote one answers that it is
    terminating; each is recorded by the container it runs in, and follow_audit sees the records."""
    c1 = cluster.container("c1")
    c2 = cluster.container("c2", **{"ion.core.audit": {"path": str(tmp_path / "c2.jsonl")}})
    watcher = cluster.control(c1)
    records: list[dict[str, Any]] = []
    listener = cluster.run(watcher.follow_audit(records.append))
    assert isinstance(listener, AuditListener)

    control = cluster.control(c1)
    here = cluster.spawn_in(c1, HelloService)
    done = cluster.run(control.kill(here.id))
    assert done == {"pid": here.id, "name": "hello", "container": "c1", "done": True}
    assert c1.proc_manager.get(here.id) is None

    there = cluster.spawn_in(c2, HelloService)
    done = cluster.run(control.kill(there.id))
    assert done["pid"] == there.id and done["done"] is False
    cluster.pump()
    assert c2.proc_manager.get(there.id) is None
    assert [(r["action"], r["target"].split()[-1].strip("()"), r["container"], r["result"]) for r in records] == [
        ("process.terminate", here.id, "c1", "ok"), ("process.terminate", there.id, "c2", "ok")]
    assert '"process.terminate"' in (tmp_path / "c2.jsonl").read_text()

    cluster.result(c1.proc_manager.terminate_process(listener.id))
    cluster.run(control.kill(cluster.spawn_in(c1, HelloService).id))
    assert len(records) == 2  # no longer following


def test_kill_refuses_what_it_must_not_terminate(cluster: Cluster) -> None:
    c1 = cluster.container("c1")
    control = cluster.control(c1, caller="the shell")
    with pytest.raises(ControlError, match="the shell's own process"):
        cluster.run(control.kill(control.proc.id))
    with pytest.raises(ControlError, match="container agent"):
        cluster.run(control.kill("agent"))
    with pytest.raises(ControlError, match="no process 'c1.99'"):
        cluster.run(control.kill("c1.99"))


def test_a_non_operator_cannot_kill_or_spawn(cluster: Cluster) -> None:
    """Another broker login (not an operator) is refused with a 403 where the action would run."""
    c1 = cluster.container("c1")
    hello = cluster.spawn_in(c1, HelloService)
    away = cluster.container("away", **{"ion.core.messaging": {"memory_user": "mallory"}})
    control = cluster.control(away)
    with pytest.raises(ReceivedApplicationError, match="not an operator") as info:
        cluster.run(control.kill(hello.id))
    assert info.value.response_code == 403
    assert c1.proc_manager.get(hello.id) is hello
    with pytest.raises(ReceivedApplicationError, match="not an operator"):
        cluster.run(control.spawn("hello", node="c1"))


def test_kill_names_one_process_and_never_an_agent(cluster: Cluster) -> None:
    """A service's or an agent's queue name would terminate whichever instance takes it: refused before
    sending; an agent refuses its terminate (409) even to an operator: it runs as long as its container."""
    c1 = cluster.container("c1")
    c2 = cluster.container("c2")
    cluster.spawn_in(c2, HelloService)
    control = cluster.control(c1)
    for name in ("sys.hello", "sys.agent.c2"):
        with pytest.raises(ControlError, match="is not a process id"):
            cluster.run(control.kill(name))
    with pytest.raises(ReceivedApplicationError, match="runs as long as its container") as refused:
        cluster.run(control.kill(str(c2.agent_pid)))
    assert refused.value.response_code == 409
    assert c2.proc_manager.get(str(c2.agent_pid)) is not None


def test_announcements_count_only_from_the_systems_operators(cluster: Cluster) -> None:
    """A login that is not an operator cannot add a container to nodes() (nor a console URL to lure an
    operator's browser); an operator's announced console is kept only as an http(s) URL."""
    from ion.core.agent import EVENT_HEARTBEAT

    c1 = cluster.container("c1")
    outsider = cluster.container("mallory", **{"ion.core.messaging": {"memory_user": "mallory"}})
    fake = {"container": "fake", "sysname": "sys", "pids": 1, "started_at": 0.0, "interval": INTERVAL,
            "agent": "sys.agent.fake", "console": "http://phish.example/"}
    outsider.publish_event(EVENT_HEARTBEAT, fake)
    c1.publish_event(EVENT_HEARTBEAT, dict(fake, container="real", console="javascript:alert(1)"))
    c1.publish_event(EVENT_HEARTBEAT, dict(fake, container="web", console="https://c.example:8080/"))
    cluster.pump()
    nodes = {n["container"]: n for n in cluster.run(cluster.control(c1).nodes())}
    assert "fake" not in nodes and "mallory" not in nodes
    assert nodes["real"]["console"] is None and nodes["web"]["console"] == "https://c.example:8080/"


def test_apps_start_and_stop_by_their_agent_audited(cluster: Cluster, tmp_path: Any) -> None:
    """start_app/stop_app go to the container's agent (a name, never a path), for operators only,
    and are recorded in that container's audit trail."""
    import json

    c1 = cluster.container("c1")
    c2 = cluster.container("c2", **{"ion.core.audit": {"path": str(tmp_path / "c2.jsonl")}})
    control = cluster.control(c1)
    assert cluster.run(control.start_app("hello", node="c2")) == {"app": "hello", "container": "c2",
                                                                   "started": True}
    assert "hello" in c2.app_manager.running and "hello" not in c1.app_manager.running
    assert cluster.run(control.start_app("hello", node="c2"))["started"] is False
    assert cluster.run(control.stop_app("hello", node="c2"))["stopped"] is True
    assert "hello" not in c2.app_manager.running
    with pytest.raises(ReceivedApplicationError, match="is not running") as gone:
        cluster.run(control.stop_app("hello", node="c2"))
    assert gone.value.response_code == 404
    with pytest.raises(ReceivedApplicationError, match="named by its name") as path:
        cluster.run(control.start_app("../../etc/x", node="c2"))
    assert path.value.response_code == 400
    outsider = cluster.container("m", **{"ion.core.messaging": {"memory_user": "mallory"}})
    with pytest.raises(ReceivedApplicationError) as refused:
        cluster.run(cluster.control(outsider).start_app("hello", node="c2"))
    assert refused.value.response_code == 403 and "hello" not in c2.app_manager.running
    cluster.result(c2.audit.flush())
    actions = [(r["action"], r["result"]) for r in map(json.loads, (tmp_path / "c2.jsonl").read_text().splitlines())]
    assert actions == [("app.start", "ok"), ("app.start", "ok"), ("app.stop", "ok"), ("app.stop", "error"),
                       ("app.start", "error"), ("app.start", "refused")]


def test_the_cache_actions_name_the_cache_services_queues() -> None:
    """The control API names the Cache service's ops by string (the core imports no service): they
    must be the queues and ops the service has."""
    import inspect

    from ion.services.cache.reaper import TICK_OP, election_queue
    from ion.services.cache.service import CacheService

    source = inspect.getsource(SystemControl.reap_cache)
    assert election_queue("{self.sysname}") in source and f'"{TICK_OP}"' in source
    for op in ("verify_round", "prune"):
        assert hasattr(CacheService, f"op_{op}")


def test_a_stop_announcement_counts_only_from_an_operator(cluster: Cluster) -> None:
    """A login that is not an operator cannot take a live container out of nodes() by announcing its stop."""
    from ion.core.agent import EVENT_STOP

    c1 = cluster.container("c1")
    cluster.container("c2")
    outsider = cluster.container("m", **{"ion.core.messaging": {"memory_user": "mallory"}})
    outsider.publish_event(EVENT_STOP, {"container": "c2", "sysname": "sys"})
    cluster.pump()
    assert "c2" in [n["container"] for n in cluster.run(cluster.control(c1).nodes())]
    c1.publish_event(EVENT_STOP, {"container": "c2", "sysname": "sys"})  # an operator's word counts
    cluster.pump()
    assert "c2" not in [n["container"] for n in cluster.run(cluster.control(c1).nodes())]


def test_a_second_start_of_an_app_waits_for_the_first(cluster: Cluster) -> None:
    """Two start_app of one app while it starts (a retry after a timeout, two operators): the agent takes
    one request at a time, so the app starts once and the second answers started: False."""
    c1 = cluster.container("c1")
    control = cluster.control(c1)
    gate: defer.Deferred[None] = defer.Deferred()
    real_start = c1.app_manager.start_app
    calls: list[str] = []

    def slow_start(name: Any, **kwargs: Any) -> Any:
        calls.append(str(name))
        return gate.addCallback(lambda _: real_start(name, **kwargs))

    c1.app_manager.start_app = slow_start  # type: ignore[method-assign]
    first = defer.ensureDeferred(control.start_app("hello"))
    second = defer.ensureDeferred(control.start_app("hello"))
    cluster.pump()
    assert calls == ["hello"] and not first.called and not second.called
    gate.callback(None)
    cluster.pump()
    assert cluster.result(first)["started"] is True and cluster.result(second)["started"] is False
    assert calls == ["hello"] and "hello" in c1.app_manager.running


def test_has_consumer_tells_a_listening_process_from_a_gone_one(cluster: Cluster) -> None:
    """``has_consumer``: True while a process's queue is consumed, False once its container's connection
    went (or for no such queue), None when the broker cannot be asked."""
    from ion.core.control import has_consumer

    watcher, doomed = cluster.container("w"), cluster.container("d")
    proc = cluster.spawn_in(doomed, Process)
    assert cluster.result(has_consumer(watcher.transport, proc.id)) is True
    assert cluster.result(has_consumer(watcher.transport, "sys.nobody.1")) is False
    cluster.result(doomed.transport.close())
    assert cluster.result(has_consumer(watcher.transport, proc.id)) is False
    assert cluster.result(has_consumer(doomed.transport, proc.id)) is None  # its own connection is closed
