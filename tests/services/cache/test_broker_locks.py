"""Cache locks through the broker (issue 18): an exclusive queue per lock, freed by the broker when
its holder's connection closes, so a dead host's lock is taken over without waiting for lock_timeout.

Unit tests on the embedded broker (which keeps the exclusive-queue contract of RabbitMQ: another
connection's declare is refused with RESOURCE_LOCKED, the queue goes with its connection), on a
``task.Clock`` with a synchronous pool. The same contract on the real RabbitMQ, and the SIGKILL of a
container holding a lock mid-download: test_broker_locks_rabbitmq.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task

from ion.core.messaging.memory import MemoryBroker, MemoryTransport
from ion.core.messaging.transport import parse_broker_url
from ion.services.cache.core import Cache
from ion.services.cache.entry import EntryKey
from ion.services.cache.errors import LockNotHeldError, LockTimeoutError
from ion.services.cache.locks import (
    BROKER_LOCK_PREFIX,
    BrokerLocks,
    LockHolder,
    broker_identity,
    cache_identity,
    lock_transport_factory,
)

from .conftest import failure_of, fired, messages, stage


class Host:
    """One 'host': its own connection factory to the shared embedded broker, its BrokerLocks, its Cache."""

    def __init__(self, broker: MemoryBroker, make_cache: Callable[..., Cache], clock: task.Clock, host_id: str,
                 **kwargs: Any) -> None:
        self.connections: list[MemoryTransport] = []

        def connect() -> MemoryTransport:
            t = broker.connect()
            self.connections.append(t)
            return t

        self.locks = BrokerLocks(connect, clock)
        self.cache = make_cache(host_id, lock_timeout=600, broker_locks=self.locks, **kwargs)

    def die(self) -> None:
        """What the broker sees when the host's process is SIGKILLed: its connection closes."""
        for t in self.connections:
            t.close()


@pytest.fixture
def shared_broker(clock: task.Clock) -> MemoryBroker:
    return MemoryBroker(clock)


@pytest.fixture
def host(shared_broker: MemoryBroker, make_cache: Callable[..., Cache], clock: task.Clock) -> Callable[..., Host]:
    return lambda host_id, **kw: Host(shared_broker, make_cache, clock, host_id, **kw)


def test_holding_the_lock_is_holding_its_exclusive_queue(host, shared_broker, key, clock):
    a = host("host-a")
    lock = fired(a.cache.lock(key))
    queue = lock.broker.queue
    assert queue == BrokerLocks.queue_name(key, lock.path, cache_identity(a.cache.root))
    assert queue.startswith(BROKER_LOCK_PREFIX) and len(queue) < 255
    assert shared_broker.queues[queue].exclusive_owner is a.connections[0]
    holder = LockHolder.parse(lock.path.read_text())
    assert holder.broker == lock.broker.marker and holder.broker  # the lock file says it
    fired(a.cache.unlock(lock))
    assert queue not in shared_broker.queues and not lock.path.exists()


def test_hosts_with_caches_of_their_own_do_not_wait_for_each_other(shared_broker, key, clock, pool, tmp_path):
    """Two hosts on one broker, each with a cache of its own (the default: a local cache root): the
    same entry's lock in one cache does not hold up the other's fetch (a broker lock names its
    cache). Two hosts sharing one cache, mounted at different paths, still share the broker lock."""
    def cache_at(root: Path, host_id: str) -> Cache:
        return Host(shared_broker, lambda h, **kw: Cache(root, host_id=h, clock=clock, pool=pool, **kw), clock,
                    host_id).cache

    a, b = cache_at(tmp_path / "a-cache", "host-a"), cache_at(tmp_path / "b-cache", "host-b")
    held = fired(a.lock(key))
    other = fired(b.lock(key, timeout=5))  # at once: another cache's entry
    assert held.broker.queue != other.broker.queue
    fired(b.unlock(other))
    # The same cache seen through another path (another host's mount point): one lock for both.
    (tmp_path / "mount").symlink_to(tmp_path / "a-cache")
    c = cache_at(tmp_path / "mount", "host-c")
    waiting = c.lock(key, timeout=5)
    clock.pump([0.5] * 3)
    assert not waiting.called
    fired(a.unlock(held))
    clock.pump([0.5] * 2)
    fired(c.unlock(fired(waiting)))


def test_a_waiter_gets_the_lock_when_the_holder_releases(host, key, clock):
    a, b = host("host-a"), host("host-b")
    held = fired(a.cache.lock(key))
    waiting = b.cache.lock(key, timeout=30)
    clock.advance(5)
    assert not waiting.called
    fired(a.cache.unlock(held))
    clock.advance(0.5)  # the next retry of the declare (backoff capped at 0.5 s)
    lock = fired(waiting)
    assert LockHolder.parse(lock.path.read_text()).host_id == "host-b"
    fired(b.cache.unlock(lock))


def test_dead_holders_lock_is_taken_over_at_once_not_after_lock_timeout(host, key, clock, log_events):
    """Host A dies holding the lock (its connection closes, its lock file stays, fresh): host B,
    waiting, gets the broker lock within one retry and takes the file over at once, although
    lock_timeout is 600 s and A's file is seconds old."""
    a, b = host("host-a"), host("host-b")
    held = fired(a.cache.lock(key))
    waiting = b.cache.lock(key, timeout=30)
    clock.advance(3)
    a.die()
    assert held.path.exists()
    clock.advance(0.5)
    lock = fired(waiting)
    assert LockHolder.parse(lock.path.read_text()).host_id == "host-b"
    assert any("took over the lock" in m and "host-a" in m and "broker lock" in m for m in messages(log_events))
    fired(b.cache.unlock(lock))


def test_a_lock_file_without_the_marker_waits_for_lock_timeout(host, key, clock):
    """A lock file taken without the broker (ion-deploy without --broker, or a broker that could not be
    reached) is judged as before: another host's is taken over only after lock_timeout."""
    local = host("host-a").cache
    plain = Cache(local.root, host_id="host-a", lock_timeout=600, clock=clock, pool=local.pool)
    held = fired(plain.lock(key))
    assert LockHolder.parse(held.path.read_text()).broker is None
    held._refresh_call.cancel()  # its host dies: nobody refreshes the file any more
    b = host("host-b")
    waiting = b.cache.lock(key, timeout=2000)
    clock.pump([1] * 590)
    assert not waiting.called  # B holds the broker lock and waits on the file
    clock.pump([1] * 15)
    lock = fired(waiting)
    assert LockHolder.parse(lock.path.read_text()).host_id == "host-b"


def test_a_marker_of_another_broker_is_not_trusted(host, key, clock, shared_broker):
    """The marker names the broker (and the queue): a holder on another broker sharing the cache keeps its lock."""
    a = host("host-a")
    held = fired(a.cache.lock(key))
    other = Host(MemoryBroker(clock), lambda h, **kw: Cache(a.cache.root, host_id=h, clock=clock, pool=a.cache.pool,
                                                             **kw), clock, "host-b")
    waiting = other.cache.lock(key, timeout=60)
    a.die()  # A's connection is gone, but on the other broker: B's broker lock says nothing of A
    clock.pump([0.5] * 20)
    assert not waiting.called
    waiting.cancel()
    failure_of(waiting, defer.CancelledError)
    assert held.path.exists()


def test_waiting_for_the_broker_lock_times_out_naming_it(host, key, clock):
    a, b = host("host-a"), host("host-b")
    fired(a.cache.lock(key))
    waiting = b.cache.lock(key, timeout=5)
    clock.pump([0.5] * 11)
    err = failure_of(waiting, LockTimeoutError)
    assert "broker lock" in str(err) and "5 s" in str(err)


def test_cancelling_a_wait_leaves_nothing_held(host, shared_broker, key, clock):
    a, b = host("host-a"), host("host-b")
    held = fired(a.cache.lock(key))
    queue = held.broker.queue
    waiting = b.cache.lock(key, timeout=60)
    clock.advance(1)
    waiting.cancel()
    failure_of(waiting, defer.CancelledError)
    fired(a.cache.unlock(held))
    clock.pump([0.5] * 4)
    assert queue not in shared_broker.queues and not b.locks.held
    lock = fired(host("host-c").cache.lock(key, timeout=0))  # free for anyone
    assert lock.active


def test_losing_the_broker_connection_loses_the_lock(host, key, clock, log_events):
    """The lock connection drops while holding: the broker has freed the queue, another host may take
    the lock file over at once, so the holder's lock counts as lost (publish refuses it); the
    release still removes the file if it is still ours, and the next lock makes a new connection."""
    a = host("host-a")
    lock = fired(a.cache.lock(key))
    conn = a.connections[0]
    conn.close()
    conn._notify_connection("lost", "heartbeat missed")
    assert lock.lost and not lock.active
    assert any("lost the lock of" in m and "broker" in m for m in messages(log_events))
    staging, metas = stage(a.cache, {"f": b"x"})
    failure_of(a.cache.publish(key, staging, metas, lock=lock), LockNotHeldError)
    fired(a.cache.unlock(lock))
    assert not lock.path.exists()
    again = fired(a.cache.lock(key, timeout=0))
    assert again.active and len(a.connections) == 2
    fired(a.cache.unlock(again))


def test_connection_lost_while_waiting_for_the_file_goes_on_with_the_file_alone(host, key, clock):
    """The broker lock is held, the lock file is another's (unmarked, e.g. ion-deploy's), and the lock
    connection drops meanwhile: the file is then taken without the marker, so the lock stays good."""
    a = host("host-a")
    plain = Cache(a.cache.root, host_id="host-x", lock_timeout=600, clock=clock, pool=a.cache.pool)
    other = fired(plain.lock(key))
    waiting = a.cache.lock(key, timeout=60)
    clock.advance(1)
    conn = a.connections[0]
    conn.close()
    conn._notify_connection("lost", "gone")
    fired(plain.unlock(other))
    clock.advance(1)
    lock = fired(waiting)
    assert lock.active and LockHolder.parse(lock.path.read_text()).broker is None
    fired(a.cache.unlock(lock))
    assert not lock.path.exists()


def test_broker_unreachable_falls_back_to_the_lock_file(make_cache, key, clock, log_events):
    """No connection can be made: the lock is taken with its file alone (no marker), with a warning."""

    def refuse() -> Any:
        class Down(MemoryTransport):
            def connect(self) -> defer.Deferred[None]:
                from ion.core.exceptions import TransportError

                return defer.fail(TransportError("cannot connect to broker at rabbit:5672: connection refused"))

        return Down(MemoryBroker(clock))

    attempts: list[Any] = []
    cache = make_cache("host-a", broker_locks=BrokerLocks(lambda: attempts.append(1) or refuse(), clock))
    lock = fired(cache.lock(key, timeout=0))
    assert lock.active and lock.broker is None
    assert LockHolder.parse(lock.path.read_text()).broker is None
    assert any("going on with the lock file alone" in m and "connection refused" in m for m in messages(log_events))
    fired(cache.unlock(lock))
    # Within retry_connect (10 s) of the failure the next lock goes to its file at once ...
    clock.advance(5)
    fired(cache.unlock(fired(cache.lock(key, timeout=0))))
    assert len(attempts) == 1
    # ... and then the broker is tried again.
    clock.advance(6)
    fired(cache.unlock(fired(cache.lock(key, timeout=0))))
    assert len(attempts) == 2


def test_same_host_processes_still_use_the_file(host, key, clock):
    """Within one process the in-process lock orders fetches; the broker lock comes after it."""
    a = host("host-a")
    first = fired(a.cache.lock(key))
    second = a.cache.lock(key, timeout=10)
    assert not second.called
    fired(a.cache.unlock(first))
    clock.advance(0.5)
    lock = fired(second)
    assert lock.broker is not None and len(a.connections) == 1
    fired(a.cache.unlock(lock))


def test_close_releases_and_closes_the_connection(host, shared_broker, key):
    a = host("host-a")
    lock = fired(a.cache.lock(key))
    fired(a.cache.close())
    assert not lock.held and a.connections[0].closed
    assert not [q for q in shared_broker.queues if q.startswith(BROKER_LOCK_PREFIX)]


def _parse_of_the_previous_release(text: str) -> tuple[str, int, float] | None:
    """``LockHolder.parse`` as released before broker locks (c603f93): still run by hosts not upgraded yet
    (and by their ion-deploy) that share the cache during a rolling upgrade."""
    parts = text.strip().split("::")
    if len(parts) != 3:
        return None  # then judged "corrupt lock file (treated as stale)": taken over at once
    host, pid_s, started_s = parts
    try:
        pid, started = int(pid_s), float(started_s)
    except ValueError:
        return None
    if not host or any(c.isspace() for c in host) or pid <= 0:
        return None
    return host, pid, started


def test_lock_file_format_stays_readable():
    """``host::pid::started`` as before; the broker lock's marker, when taken with it, is written where the
    previous release still reads a holder (of another host: waited for, never taken for corrupt)."""
    plain = LockHolder.parse("h::12::1700000000.000000")
    assert plain is not None and plain.broker is None
    marked = LockHolder("h", 12, 1.5, "ab12").render()
    assert LockHolder.parse(marked) == LockHolder("h", 12, 1.5, "ab12")
    old = _parse_of_the_previous_release(marked)
    assert old is not None and old[0] != "h" and old[1:] == (12, 1.5)
    assert LockHolder.parse("h::12::1.500000::broker=ab12") == LockHolder("h", 12, 1.5, "ab12")  # read as well
    assert LockHolder.parse("h::12::1.5::other=x") is None and LockHolder.parse("h::12::1.5::broker=") is None


def test_lock_transport_factory(clock):
    broker = MemoryBroker(clock)
    t = broker.connect("svc")
    made = lock_transport_factory(t)()
    assert isinstance(made, MemoryTransport) and made is not t and made.broker is broker and made.user == "svc"
    assert lock_transport_factory(object()) is None
    from ion.core.messaging.amqp import AmqpTransport

    container = AmqpTransport(["amqp://u:p@10.0.0.1:5672/v", "amqp://u:p@10.0.0.2:5672/v"], reactor=clock, heartbeat=5)
    lock_conn = lock_transport_factory(container)()
    assert isinstance(lock_conn, AmqpTransport) and lock_conn is not container
    assert lock_conn.urls == container.urls and lock_conn.urls is not container.urls
    assert (lock_conn.reconnect_enabled, lock_conn.heartbeat, lock_conn.state) == (False, 5, "new")


@pytest_twisted.ensureDeferred
async def test_the_cache_service_takes_its_locks_through_the_broker(container, process_factory, tmp_path):
    """The Cache service of a container holds each lock's exclusive queue on a connection of its own
    (not the container's), and frees it at unlock and at terminate; ``broker_locks: false`` turns it off."""
    from ion.services.cache.service import CacheClient, CacheService
    from ion.testing import client_process

    key = EntryKey("repo.file", "linux", "tool", "1.0")
    service = await process_factory(CacheService, root=str(tmp_path / "c"), host_id="svc-host", lock_timeout=60)
    cache = CacheClient(await client_process(container))
    lock = await cache.lock(key, timeout=5)
    queue = BrokerLocks.queue_name(key, Path(lock.path), cache_identity(tmp_path / "c"))
    owner = container.broker.queues[queue].exclusive_owner
    assert owner is not None and owner is not container.transport and owner is service.cache.locks.broker.transport
    assert LockHolder.parse(Path(lock.path).read_text()).broker
    await cache.unlock(lock)
    assert queue not in container.broker.queues
    lock = await cache.lock(key, timeout=5)
    await container.proc_manager.terminate_process(service.id)
    assert queue not in container.broker.queues and owner.closed

    plain = await process_factory(CacheService, root=str(tmp_path / "d"), host_id="svc-host", broker_locks=False)
    assert plain.cache.locks.broker is None


class _Connected:
    """What broker_identity reads of an AMQP transport: the broker's server properties and the URL."""

    def __init__(self, cluster_name: Any, url: str) -> None:
        self.server_properties = {"cluster_name": cluster_name}
        self.url = parse_broker_url(url)


def test_the_nodes_of_one_unnamed_cluster_are_one_broker() -> None:
    """RabbitMQ's default cluster_name is the answering node's own name (rabbit@host), different on
    each node of one cluster (measured on a 3-node 3.10 cluster): a lock taken through one node must
    be taken over through another, so that default names no broker; a cluster named by
    set_cluster_name is told from others by its name."""
    one = broker_identity(_Connected(b"ion-c0@localhost", "amqp://u:p@127.0.0.1:5701/v"))
    other_node = broker_identity(_Connected("ion-c1@localhost", "amqp://u:p@127.0.0.1:5702/v"))
    assert one == other_node == "amqp:@/v"
    assert broker_identity(_Connected("ion-c1@localhost", "amqp://u:p@127.0.0.1:5702/w")) == "amqp:@/w"
    named = broker_identity(_Connected("prod-east", "amqp://u:p@10.0.0.1/v"))
    assert named == "amqp:prod-east/v" and named != broker_identity(_Connected("prod-west", "amqp://u:p@10.0.0.2/v"))
    assert broker_identity(_Connected("", "amqp://u:p@127.0.0.1/v")) is None
