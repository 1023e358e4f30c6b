"""Cache locks through the broker on the real RabbitMQ (issue 18).

- the contract the embedded broker keeps too (test_broker_locks.py): an exclusive queue per lock,
  another connection's declare refused with RESOURCE_LOCKED and retried, the queue freed when its
  connection closes, the same marker (cluster name and vhost) seen from every connection;
- two deployers on two "hosts" (``ION_HOST_ID``) sharing one cache folder and the broker, each its
  own OS process (``python -m tests.services.deploy.scenario_support --broker``); the lock holder is
  SIGKILLed mid-download (the HTTP server stalls its GET half-way): the other takes the lock over
  and completes, and the file is downloaded twice, no more; and the same with the holder stopped
  (SIGSTOP: a silent host, dropped by the broker after the AMQP heartbeat, 5 s);
- the same through the services: two ``twistd cc fetch.app`` containers;
- the SIGKILL case on the 3-node cluster (marked ``cluster``), each host on a node of its own.

``lock_timeout`` is 600 s and every wait of the tests fails after 30 s, so no takeover can have
waited for the lock file's timeout (no timing assertions: the times are printed).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from ion.core.messaging.amqp import AmqpTransport
from ion.services.cache.entry import EntryKey
from ion.services.cache.errors import LockTimeoutError
from ion.services.cache.locks import BrokerLocks, LockHolder, _Acquisition
from ion.services.fetch.core import FetchRequest
from ion.services.fetch.service import FetchClient
from ion.services.records.deployer import parse_repository_url
from ion.testing import ContainerFactory, client_process
from tests.core.test_multicontainer import launch  # noqa: F401 - the fixture, by name
from tests.services.deploy import scenario_support
from tests.services.deploy.scenario_support import TGZ, ChildDeployer, item, tree, within, write_deployment

pytestmark = [pytest.mark.amqp]

# Fixtures of scenario_support, used by name.
http_servers = scenario_support.http_servers
make_repo = scenario_support.make_repo

KEY = EntryKey("repo.file", "linux", "tool", "1.0", True)


def _locks(amqp_url: str) -> tuple[BrokerLocks, list[AmqpTransport]]:
    made: list[AmqpTransport] = []

    def connect() -> AmqpTransport:
        t = AmqpTransport(amqp_url, reconnect=False, heartbeat=5)
        made.append(t)
        return t

    return BrokerLocks(connect, reactor), made


@pytest_twisted.ensureDeferred
async def test_exclusive_queue_lock_contract_on_rabbitmq(amqp_url: str, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    a, a_conns = _locks(amqp_url)
    b, _ = _locks(amqp_url)
    queue = BrokerLocks.queue_name(KEY, tmp_path / "1.0.lock")
    try:
        far = reactor.seconds() + 30
        held = await within(a.acquire(queue, far, _Acquisition(), str(KEY), 30))
        assert held is not None and held.marker
        # One try, refused (405 RESOURCE_LOCKED): a LockTimeoutError, not a fallback to files.
        with pytest.raises(LockTimeoutError, match="broker lock"):
            await b.acquire(queue, reactor.seconds(), _Acquisition(), str(KEY), 0)
        waiting = defer.ensureDeferred(b.acquire(queue, far, _Acquisition(), str(KEY), 30))
        await a_conns[0].close()  # what a SIGKILL does to the holder's connection
        taken = await within(waiting)
        assert taken is not None and taken.marker == held.marker  # one broker, one vhost: one marker
        # pika's warning for each refusal (a waiter is refused at every retry) is dropped.
        assert not [r for r in caplog.records if "RESOURCE_LOCKED" in r.getMessage()]
        await b.release(taken)
        again = await within(a.acquire(queue, far, _Acquisition(), str(KEY), 30))  # a new connection
        assert again is not None and len(a_conns) == 2
        await a.release(again)
    finally:
        await a.close()
        await b.close()


def _lock_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.lock") if p.is_file())


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
@pytest_twisted.ensureDeferred
async def test_holder_killed_mid_download_the_other_host_takes_over_via_the_broker(
        amqp_url: str, make_repo: Any, tmp_path: Path, fault: str) -> None:
    await _holder_dies(make_repo, tmp_path, fault, amqp_url, amqp_url)


@pytest.mark.cluster
@pytest_twisted.ensureDeferred
async def test_on_a_cluster_a_holder_killed_mid_download_is_taken_over_from_another_node(
        cluster_urls: list[str], make_repo: Any, tmp_path: Path) -> None:
    """The same on the 3-node cluster, each host connected to a node of its own: the holder's exclusive
    lock queue lives on its node, which deletes it when the SIGKILL closes the connection; the waiter,
    on another node, is handed the lock."""
    await _holder_dies(make_repo, tmp_path, "SIGKILL", cluster_urls[0], cluster_urls[1])


async def _holder_dies(make_repo: Any, tmp_path: Path, fault: str, url_a: str, url_b: str) -> None:
    """Host a (on ``url_a``) holds the lock mid-download when ``fault`` hits it; host b (on ``url_b``)
    must take the lock over and complete, with two downloads in all and no lock file left."""
    url, server = make_repo("http")
    server.stalls[f"deps/{TGZ}"] = 1  # the first GET sends half the file, then nothing
    cache_root = tmp_path / "cache"
    first = write_deployment(tmp_path / "a.json", url, [item("zlib", "1.2", tmp_path / "dest-a")])
    second = write_deployment(tmp_path / "b.json", url, [item("zlib", "1.2", tmp_path / "dest-b")])
    a = ChildDeployer().start(first, cache_root, "host-a", wait_for_go=False, broker=url_a)
    b: ChildDeployer | None = None
    try:
        await within(server.wait_for(f"deps/{TGZ}", "GET"))
        [lock] = _lock_files(cache_root)
        holder = LockHolder.parse(lock.read_text())
        assert holder is not None and (holder.host_id, holder.pid) == ("host-a", a.pid) and holder.broker
        b = ChildDeployer().start(second, cache_root, "host-b", wait_for_go=False, broker=url_b)
        await within(b.ready)
        assert a.pid is not None
        killed = time.monotonic()
        if fault == "SIGKILL":
            os.kill(a.pid, signal.SIGKILL)
            assert await within(a.ended) == -signal.SIGKILL
        else:
            os.kill(a.pid, signal.SIGSTOP)  # silent: its connections stay open until the heartbeat says
        assert await within(b.ended) == 0, b.err.decode()[-3000:]
        print(f"\nlock taken over and the download completed {time.monotonic() - killed:.2f} s after the {fault}")
        result = b.result()
        assert result["ok"] and [r["state"] for r in result["items"]] == ["downloaded"], result
        assert tree(tmp_path / "dest-b") == {"zlib/include/zlib.h": scenario_support.ZLIB_H,
                                             "zlib/lib/libz.a": b"\0" * 4000}
        assert server.gets(f"deps/{TGZ}") == 2, server.requests
        assert _lock_files(cache_root) == []
    finally:
        for child in (a, b):
            if child is not None and child.pid is not None and not child.ended.called:
                os.kill(child.pid, signal.SIGKILL)
                os.kill(child.pid, signal.SIGCONT)
                await child.ended


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_two_containers_sharing_a_cache_holder_killed_mid_fetch(
        launch: Any, amqp_url: str, make_repo: Any, tmp_path: Path) -> None:  # noqa: F811
    """The same through the services: two ``twistd cc fetch.app`` containers (Fetch, Cache, Unpack), each
    a system of its own (so each Fetch locks through its own Cache service) on one broker, hosts
    ``host-a`` and ``host-b`` sharing one cache folder. A's container is SIGKILLed while its Fetch
    downloads; B's fetch of the same entry, waiting for the lock, takes it over and completes."""
    url, server = make_repo("http")
    server.stalls[f"deps/{TGZ}"] = 1
    cache = tmp_path / "cache"
    settings = ",".join([f"ion.services.cache.root='{cache}'", "ion.services.cache.lock_timeout=600",
                         f"ion.services.unpack.allowed_roots=['{cache}']", "ion.services.fetch.retry_delay=0",
                         "ion.services.fetch.allowed_networks=['127.0.0.0/8','::1/128']"])
    a = await launch("res/apps/fetch.app", args=["-s", "hosta", "-a", settings], env={"ION_HOST_ID": "host-a"},
                     name="container A")
    b = await launch("res/apps/fetch.app", args=["-s", "hostb", "-a", settings], env={"ION_HOST_ID": "host-b"},
                     name="container B")
    factory = ContainerFactory(broker_url=amqp_url)
    try:
        fetch_a = FetchClient(await client_process(await factory(sysname="hosta")))
        fetch_b = FetchClient(await client_process(await factory(sysname="hostb")))
        request = FetchRequest(parse_repository_url(url), "linux", "zlib", "1.2")
        first = defer.ensureDeferred(fetch_a.fetch(request, timeout=120))
        first.addErrback(lambda f: f.value)  # A dies with the call in hand
        await within(server.wait_for(f"deps/{TGZ}", "GET"))
        [lock] = _lock_files(cache)
        holder = LockHolder.parse(lock.read_text())
        assert holder is not None and holder.host_id == "host-a" and holder.broker, lock.read_text()
        second = defer.ensureDeferred(fetch_b.fetch(request, timeout=120))
        killed = time.monotonic()
        a.signal("KILL")
        assert await a.exited() == -signal.SIGKILL
        result = await within(second)
        print(f"\nB's fetch completed {time.monotonic() - killed:.2f} s after A's SIGKILL")
        assert result["state"] == "downloaded", result
        assert "took over the lock" in b.output and "host-a" in b.output, b.output[-3000:]
        assert server.gets(f"deps/{TGZ}") == 2, server.requests
        assert _lock_files(cache) == []
    except BaseException:
        print(f"container A:\n{a.output[-3000:]}\ncontainer B:\n{b.output[-3000:]}\nrequests: {server.requests}")
        raise
    finally:
        await factory.teardown()
