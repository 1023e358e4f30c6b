"""pytest fixtures for ioncore: loaded in any project where ioncore is installed (its ``pytest11``
entry point), with no conftest line; ``pytest_plugins = ["ion.testing.pytest_plugin"]`` works too.

- ``broker``: a fresh embedded broker.
- ``container_factory``: makes started containers on that broker; terminates them all at teardown.
- ``container``: one started container (sysname ``test``).
- ``clocked``: a :class:`~ion.testing.ClockedSystem` (container on a ``task.Clock``).
- ``process_factory``: ``await process_factory(ServiceCls, **spawnargs)`` spawns a
  process into ``container`` and returns the instance (terminated with the container).
- ``log_events``: every ``twisted.logger`` event published while the test runs.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import pytest
from twisted.logger import ILogObserver, globalLogPublisher

from ion.core.container import Container
from ion.core.messaging.memory import MemoryBroker
from ion.core.process import Process
from ion.testing import ClockedSystem, ContainerFactory, on_ci
from ion.testing.asyncfixtures import async_fixture, async_yield_fixture


@pytest.fixture
def broker() -> MemoryBroker:
    from twisted.internet import reactor

    return MemoryBroker(reactor)


@async_yield_fixture
async def container_factory(broker: MemoryBroker) -> AsyncIterator[ContainerFactory]:
    factory = ContainerFactory(broker)
    yield factory
    await factory.teardown()


@async_fixture
async def container(container_factory: ContainerFactory) -> Container:
    return await container_factory()


@pytest.fixture
def process_factory(container: Container) -> Any:
    async def spawn(cls: type[Process], name: str | None = None, **spawnargs: Any) -> Process:
        pid = await container.spawn(cls, spawnargs, name=name)
        proc = container.proc_manager.get(pid)
        assert proc is not None
        return proc

    return spawn


@pytest.fixture
def clocked() -> Any:
    return ClockedSystem()


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    """Every log event published while the test runs (the observer is removed afterwards)."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


# -- RabbitMQ: one private broker per test session, a fresh vhost per test -------------------------
#
# - ``rabbitmq`` (session): a started :class:`~ion.testing.rabbitmq.RabbitMQServer` (or the broker
#   named by ``ION_TEST_AMQP_URL``). Without RabbitMQ the tests that use it are skipped with the
#   reason, except when ``CI=true``: there they fail, never skip silently.
# - ``amqp_url``: ``amqp://guest:guest@127.0.0.1:<port>/<fresh vhost>``, deleted after the test.
# - ``rabbitmq_cluster`` (session, started the first time a test asks for it): a 3-node
#   :class:`~ion.testing.rabbitmq.RabbitMQCluster`; ``cluster_urls``: one URL per node on a fresh vhost.
# - ``amqp_user``: a non-guest :class:`~ion.testing.rabbitmq.BrokerLogin` with all rights on that
#   vhost (``.name``, ``.password``, ``.url`` ...), deleted after the test.


def require_managed_broker(rabbitmq: Any, why: str) -> None:
    """Skip (fail when CI=true) a test that must control the broker (restart it, count its
    queues) when the session uses an external one (ION_TEST_AMQP_URL)."""
    if not getattr(rabbitmq, "managed", False):
        _no_broker(f"this test needs a broker started by the test session ({why}); "
                   f"ION_TEST_AMQP_URL names an external one")


def _no_broker(reason: str) -> None:
    if on_ci():
        pytest.fail(f"RabbitMQ is required on CI (CI=true) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"RabbitMQ unavailable: {reason}")


@pytest.fixture(scope="session")
def rabbitmq() -> Any:
    """The session's RabbitMQ: started here (about 10 s) and stopped at the end of the session."""
    from ion.testing import rabbitmq as rmq

    external = rmq.from_environment()
    if external is not None:
        yield external
        return
    if rmq.find_rabbitmq() is None and on_ci():
        try:
            rmq.install_rabbitmq()  # bin/test does this; a bare pytest run on CI gets it here
        except rmq.BrokerUnavailable as exc:
            _no_broker(str(exc))
    if rmq.find_rabbitmq() is None:
        _no_broker("rabbitmq-server is not installed (bin/test installs it; or "
                   "`apt-get install -y rabbitmq-server`; or set ION_TEST_AMQP_URL)")
    try:
        server = rmq.RabbitMQServer()
        server.start()
    except rmq.BrokerUnavailable as exc:
        _no_broker(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def rabbitmq_cluster() -> Any:
    """The session's 3-node :class:`~ion.testing.rabbitmq.RabbitMQCluster`, started (about 12-25 s)
    the first time a test asks for it, stopped at the end of the session. Skipped without RabbitMQ,
    failed when ``CI=true``."""
    from ion.testing import rabbitmq as rmq

    if rmq.find_rabbitmq() is None and on_ci():
        try:
            rmq.install_rabbitmq()
        except rmq.BrokerUnavailable as exc:
            _no_broker(str(exc))
    if rmq.find_rabbitmq() is None:
        _no_broker("rabbitmq-server is not installed (bin/test installs it; or `apt-get install -y rabbitmq-server`)")
    try:
        cluster = rmq.RabbitMQCluster(3)
        cluster.start()
    except rmq.BrokerUnavailable as exc:
        _no_broker(f"cannot start a 3-node cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_urls(rabbitmq_cluster: Any) -> Any:
    """One URL per node of ``rabbitmq_cluster`` (every node running), on a fresh vhost deleted after the test."""
    rabbitmq_cluster.ensure_running()
    vhost = f"ion-cluster-{uuid.uuid4().hex[:8]}"
    rabbitmq_cluster.add_vhost(vhost)
    yield rabbitmq_cluster.urls(vhost)
    rabbitmq_cluster.ensure_running()
    rabbitmq_cluster.delete_vhost(vhost)


@pytest.fixture
def amqp_url(rabbitmq: Any) -> Any:
    """A broker URL on a vhost of its own, so the test sees no other test's messages."""
    from urllib.parse import unquote, urlsplit

    url = rabbitmq.new_vhost_url()
    yield url
    vhost = unquote(urlsplit(url).path.lstrip("/"))
    if vhost:
        rabbitmq.delete_vhost(vhost)


@pytest.fixture
def amqp_user(rabbitmq: Any, amqp_url: str) -> Any:
    """A broker user other than guest, with a random password and all rights on ``amqp_url``'s vhost."""
    from urllib.parse import unquote, urlsplit

    from ion.testing.rabbitmq import BrokerUnavailable

    vhost = unquote(urlsplit(amqp_url).path.lstrip("/")) or "/"
    try:
        login = rabbitmq.new_user(vhost)
    except BrokerUnavailable as exc:
        _no_broker(f"cannot create a broker user: {exc}")
    yield login
    rabbitmq.delete_user(login.name)
