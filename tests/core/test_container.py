"""The container: no singleton, systems isolated by sysname, pids, and terminate order."""

from __future__ import annotations

import re

import pytest
import pytest_twisted

import ion.core.container as container_module
from ion.core.container import Container
from ion.core.exceptions import IonError, ReceivedError
from ion.core.lifecycle import State
from ion.services.hello import HelloClient, HelloService
from ion.testing import client_process
from tests.core import apps_fixtures as fx
from tests.core.apps_fixtures import write_app


@pytest.fixture(autouse=True)
def _clean_fixture_state():
    fx.reset()
    yield
    fx.reset()


# ---------------------------------------------------------------------------------------------------
# several containers in one OS process
# ---------------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_containers_of_one_system_call_each_others_services(container_factory):
    """Two containers with one sysname on one broker: a client in one calls a service in the other."""
    one = await container_factory(sysname="shared")
    two = await container_factory(sysname="shared")
    assert one.id != two.id and one.broker is two.broker
    service_pid = await one.spawn(HelloService)
    client = await client_process(two)
    assert await HelloClient(client).hello("from two") == "Hello there, from two"
    pong, headers = await client.rpc_send("hello", "ping", "x", timeout=5)
    assert pong["pid"] == service_pid and service_pid.startswith(one.id + ".")
    content, _ = await client.rpc_send(service_pid, "hello", "by pid", timeout=5)
    assert content == {"value": "Hello there, by pid"}


@pytest.mark.parametrize("target", ["hello", "one.hello", "pid"])
@pytest_twisted.ensureDeferred
async def test_containers_of_different_systems_cannot_see_each_other(container_factory, target):
    """With different sysnames on one broker, a call to the other system's service or process gets 404."""
    one = await container_factory(sysname="one")
    two = await container_factory(sysname="two")
    service_pid = await one.spawn(HelloService)
    client = await client_process(two)
    with pytest.raises(ReceivedError) as info:
        await client.rpc_send(service_pid if target == "pid" else target, "hello", "x", timeout=5)
    assert info.value.response_code == 404
    # The service itself is fine: its own system reaches it.
    local = await client_process(one)
    assert await HelloClient(local).hello("me") == "Hello there, me"


@pytest_twisted.ensureDeferred
async def test_containers_do_not_share_config_or_apps(container_factory, tmp_path):
    """Each container has its own config layers, app manager and process table."""
    one = await container_factory()
    two = await container_factory()
    write_app(tmp_path / "apps", "only-one", config={"tests.core": {"mine": 1}})
    one.app_manager.search_path.insert(0, tmp_path / "apps")
    await one.app_manager.start_app("only-one")
    assert one.config.get("tests.core", "mine") == 1
    assert two.config.get("tests.core", "mine") is None
    assert list(two.app_manager.running) == []
    assert not set(one.proc_manager.processes) & set(two.proc_manager.processes)
    assert one.config is not two.config and one.app_manager is not two.app_manager


def test_no_module_level_container():
    """ion.core.container holds no Container instance (nor a registry of them) at module level."""
    for value in vars(container_module).values():
        assert not isinstance(value, Container)
        if isinstance(value, (list, dict, set)):
            assert not any(isinstance(v, Container) for v in value)


@pytest_twisted.ensureDeferred
async def test_terminating_one_container_leaves_the_other_working(container_factory):
    """A container that terminates closes only its own connection; its peer on the broker keeps going."""
    one = await container_factory()
    two = await container_factory()
    await one.spawn(HelloService)
    await two.spawn(HelloService)
    await one.terminate()
    assert one.transport.closed and not two.transport.closed
    client = await client_process(two)
    for i in range(3):  # every request now goes to the one instance left
        pong, _ = await client.rpc_send("hello", "ping", i, timeout=5)
        assert pong["pid"].startswith(two.id + ".")


# ---------------------------------------------------------------------------------------------------
# identity
# ---------------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_pids_are_container_id_and_a_counter(container_factory):
    """Pids are '<container-id>.<n>' with n increasing per container."""
    one = await container_factory()
    two = await container_factory()
    pids_one = [await one.spawn(fx.Recorder) for _ in range(3)]
    pids_two = [await two.spawn(fx.Recorder) for _ in range(2)]
    for container, pids in ((one, pids_one), (two, pids_two)):
        numbers = []
        for pid in pids:
            match = re.fullmatch(re.escape(container.id) + r"\.(\d+)", pid)
            assert match, pid
            numbers.append(int(match.group(1)))
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
        assert container.proc_manager.get(pids[0]).backend_name == pids[0] + "b"
    assert not set(pids_one) & set(pids_two)


@pytest_twisted.ensureDeferred
async def test_default_sysname_is_the_container_id(container_factory):
    """A container given no sysname is a system of its own: sysname == id, exchange ion.<id>."""
    container = await container_factory(sysname=None)
    assert container.sysname == container.id
    assert container.exchange_name == f"ion.{container.id}"
    assert container.events_exchange == f"ion.{container.id}.events"


def test_sysname_and_contid_from_args():
    """The 'sysname' and 'contid' container args name the container; keyword arguments win over them."""
    from ion.core.messaging.memory import MemoryBroker
    from ion.testing import test_config

    broker = MemoryBroker()
    c = Container(config=test_config(), broker=broker, args={"sysname": "fromargs", "contid": "c-1"})
    assert (c.id, c.sysname) == ("c-1", "fromargs")
    assert c.new_pid() == "c-1.1" and c.new_pid() == "c-1.2"
    c = Container(config=test_config(), broker=broker, sysname="kw", contid="c-2", args={"sysname": "fromargs"})
    assert (c.id, c.sysname) == ("c-2", "kw")


def test_default_container_ids_differ():
    """Two containers made in one OS process get different ids."""
    from ion.core.container import default_container_id

    assert len({default_container_id() for _ in range(20)}) > 1


# ---------------------------------------------------------------------------------------------------
# processes and terminate
# ---------------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_terminate_stops_apps_then_processes_then_transport(container, tmp_path):
    """Terminate stops the apps first, then the other processes last-spawned first, then closes the transport."""
    write_app(tmp_path / "apps", "a")
    container.app_manager.search_path.insert(0, tmp_path / "apps")
    await container.spawn(fx.Recorder, {"label": "p1"})
    await container.app_manager.start_app("a")
    await container.spawn(fx.Recorder, {"label": "p2"})
    await container.spawn(fx.Recorder, {"label": "p3"})
    transport = container.transport
    close = transport.close

    def recording_close():
        fx.EVENTS.append(("terminate", "transport", "-"))
        return close()

    transport.close = recording_close
    await container.terminate()
    assert fx.events("terminate") == ["a", "p3", "p2", "p1", "transport"]
    assert container.state is State.TERMINATED
    assert transport.closed
    assert container.proc_manager.processes == {}
    assert container.app_manager.running == {}


@pytest_twisted.ensureDeferred
async def test_process_that_fails_to_start_leaves_nothing_behind(container, broker):
    """A process whose init hook fails raises to the spawner, is not listed, and its queues are gone."""
    fx.FAIL_INITS["count"] = 1
    before = set(container.proc_manager.processes)
    queues_before = set(broker.queues)
    with pytest.raises(RuntimeError, match="flaky init"):
        await container.spawn(fx.Flaky)
    assert set(container.proc_manager.processes) == before
    assert set(broker.queues) == queues_before


@pytest_twisted.ensureDeferred
async def test_terminate_unknown_process(container):
    """Terminating a pid the container does not run fails with IonError naming it."""
    with pytest.raises(IonError, match="no process nope.1"):
        await container.proc_manager.terminate_process("nope.1")


@pytest_twisted.ensureDeferred
async def test_exit_listeners_see_terminations_and_errors(container):
    """Exit listeners hear of every process end with its final state, and whether it was asked for."""
    heard = []
    container.proc_manager.add_exit_listener(
        lambda proc, final: heard.append((proc.id, final, container.proc_manager.is_stopping(proc.id))))
    asked = await container.spawn(fx.Recorder)
    crashed = await container.spawn(fx.Recorder)
    await container.proc_manager.terminate_process(asked)
    container.proc_manager.get(crashed).error(RuntimeError("boom"))
    assert heard == [(asked, State.TERMINATED, True), (crashed, State.ERROR, False)]
    assert not container.proc_manager.is_stopping(asked)


@pytest_twisted.ensureDeferred
async def test_children_terminate_with_their_parent(container):
    """A process's children terminate with it, the last spawned first, before its own hook runs."""
    parent = container.proc_manager.get(await container.spawn(fx.Recorder, {"label": "parent"}))
    await parent.spawn_child(fx.Recorder, {"label": "c1"})
    await parent.spawn_child(fx.Recorder, {"label": "c2"})
    await container.proc_manager.terminate_process(parent.id)
    assert fx.events("terminate") == ["c2", "c1", "parent"]
    assert not [p for p in container.proc_manager.processes.values() if isinstance(p, fx.Recorder)]


@pytest_twisted.ensureDeferred
async def test_find_by_pid_or_name(container):
    """find() takes a pid or a process label."""
    pid = await container.spawn(fx.Recorder, name="findme")
    assert container.proc_manager.find(pid).id == pid
    assert container.proc_manager.find("findme").id == pid
    assert container.proc_manager.find("nobody") is None


def test_clocked_container_pids(clocked):
    """The clocked harness's container is a normal container: pids '<contid>.<n>'."""
    proc = clocked.spawn(fx.Recorder)
    assert re.fullmatch(r"clocked\.\d+", proc.id)
    assert clocked.container.sysname == "clocked"
