"""The Cache service and its client, through RPC on the embedded broker."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from ion.core.apps.appfile import load_app_file
from ion.core.config import resource_root
from ion.core.process import Process
from ion.services.cache.core import sha256_file
from ion.services.cache.entry import ENTRY_FILE, EntryInfo, EntryKey, FileMeta
from ion.services.cache.errors import (
    CorruptEntryError,
    EntryNotFoundError,
    InvalidKeyError,
    LockTimeoutError,
    OutsideCacheError,
    UnknownLockError,
)
from ion.services.cache.service import CacheClient, CacheService
from ion.testing import client_process

from .conftest import SyncPool

KEY = EntryKey("repo.file", "linux", "tool", "1.0")


async def start(container, process_factory, root: Path) -> tuple[CacheService, CacheClient]:
    service = await process_factory(CacheService, root=str(root), host_id="svc-host", lock_timeout=60)
    caller = await client_process(container)
    return service, CacheClient(caller)


def write(staging: Path, files: dict[str, bytes]) -> dict[str, FileMeta]:
    metas = {}
    for rel, data in files.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
        metas[rel] = FileMeta(len(data), "etag-" + rel, sha256_file(staging / rel))
    return metas


@pytest_twisted.ensureDeferred
async def test_fetch_cycle_over_rpc(container, process_factory, tmp_path):
    """lock, new_staging, publish, unlock, lookup, info, list, verify, prune and clear all work over RPC."""
    service, cache = await start(container, process_factory, tmp_path / "c")
    assert await cache.lookup(KEY) is None
    lock = await cache.lock(KEY, timeout=5)
    assert lock.pid == service.id and Path(lock.path).exists()
    staging = await cache.new_staging()
    info = await cache.publish(lock, staging, write(staging, {"bin/tool": b"v1", "doc": b"d"}), url="file:///r")
    await cache.unlock(lock)
    assert not Path(lock.path).exists()
    assert info.path == tmp_path / "c" / "repo.file" / "linux" / "tool" / "1.0"
    assert info.files["bin/tool"].remote_checksum == "etag-bin/tool" and info.url == "file:///r"
    assert (await cache.lookup(KEY)).files == info.files
    assert (await cache.info(KEY)).content_names() == ["bin", "doc"]
    assert [e.key for e in await cache.list()] == [KEY]
    assert [r.status for r in await cache.verify()] == ["good"]
    (info.path / "doc").write_bytes(b"X")
    assert (await cache.repair(KEY))[0].action == "quarantined"
    assert await cache.lookup(KEY) is None
    report = await cache.prune(keep=1)
    assert len(report.quarantine) == 1
    report = await cache.clear()
    assert report.removed == []


@pytest_twisted.ensureDeferred
async def test_errors_come_back_as_cache_errors(container, process_factory, tmp_path):
    """Service errors reach the client as the same classes, with their 4xx codes."""
    service, cache = await start(container, process_factory, tmp_path / "c")
    for call, cls, code in [
        (lambda: cache.info(KEY), EntryNotFoundError, 404),
        (lambda: cache.unlock(type("L", (), {"token": "nope", "pid": service.id})()), UnknownLockError, 404),
        (lambda: cache.prune(keep=-1), InvalidKeyError, 400),
    ]:
        try:
            await call()
        except cls as err:
            assert err.code == code
        else:
            raise AssertionError(f"{cls.__name__} not raised")
    lock = await cache.lock(KEY, timeout=5)
    try:
        await cache.lock(KEY, timeout=0)
    except LockTimeoutError as err:
        assert err.code == 409 and str(KEY) in str(err)
    else:
        raise AssertionError("second lock granted")
    try:
        await cache.publish(lock, tmp_path, {})
    except OutsideCacheError as err:
        assert err.code == 403
    else:
        raise AssertionError("publish from outside the staging folder accepted")
    staging = await cache.new_staging()
    (staging / "undeclared").write_bytes(b"x")
    try:
        await cache.publish(lock, staging, {})
    except CorruptEntryError as err:
        assert "undeclared" in str(err) and err.code == 422
    else:
        raise AssertionError("undeclared file published")
    try:  # (a message's url is written into .entry: a string or nothing)
        await cache.publish(lock, staging, {}, url=12345)
    except InvalidKeyError as err:
        assert "url must be a string" in str(err) and err.code == 400
    else:
        raise AssertionError("a publish with a url that is no string accepted")
    try:
        await cache._call("lookup", {"key": {"platform": "linux"}})
    except InvalidKeyError as err:
        assert "repo_id" in str(err) and err.code == 400
    else:
        raise AssertionError("a key without repo_id accepted")
    await cache.unlock(lock)


@pytest_twisted.ensureDeferred
async def test_a_waiting_lock_does_not_block_unlock(container, process_factory, tmp_path):
    """While one caller waits for an entry's lock, the holder's unlock is still handled and hands it over."""
    service, first = await start(container, process_factory, tmp_path / "c")
    second = CacheClient(await client_process(container, "second"))
    lock = await first.lock(KEY, timeout=5)
    waiting = second.lock(KEY, timeout=30)
    await first.lookup(KEY)  # answered after the lock request (same queue): that one is waiting now
    assert not waiting.called and len(service.in_flight) == 1
    await first.renew(lock)
    await first.unlock(lock)
    granted = await waiting
    assert granted.token != lock.token
    await second.unlock(granted)


@pytest_twisted.ensureDeferred
async def test_terminating_the_service_releases_its_locks(container, process_factory, tmp_path):
    """Every lock held over RPC is released when the service terminates; pending waits are cancelled."""
    service, cache = await start(container, process_factory, tmp_path / "c")
    other = EntryKey(KEY.repo_id, KEY.platform, KEY.name, "2.0")
    held = [await cache.lock(KEY, timeout=5), await cache.lock(other, timeout=5)]
    waiting = cache.lock(KEY, timeout=30)
    await cache.lookup(other)  # answered after the lock request (same queue): that one is waiting now
    assert len(service.in_flight) == 1
    await container.proc_manager.terminate_process(service.id)
    assert not any(Path(lock.path).exists() for lock in held)
    try:
        await waiting
    except Exception as err:
        assert "terminat" in str(err)
    else:
        raise AssertionError("a lock was granted by a terminating service")


def test_lease_expiry_releases_a_forgotten_lock(clocked, tmp_path):
    """A lock whose caller neither renews nor releases it is released when its lease ends."""
    clocked.container.blocking = SyncPool()  # synchronous stand-in on the Clock-driven container
    service = clocked.spawn(CacheService, {"root": str(tmp_path / "c"), "host_id": "h", "lock_timeout": 60})
    caller = clocked.spawn(Process)
    cache = CacheClient(caller)
    lock = clocked.result(cache.lock(KEY, timeout=5, lease=30))
    assert Path(lock.path).exists()
    clocked.advance(20)
    assert clocked.result(cache.renew(lock)) == 30
    clocked.advance(20)
    assert Path(lock.path).exists()  # renewed at 20 s: good until 50 s
    clocked.advance(11)
    assert not Path(lock.path).exists()
    try:
        clocked.result(cache.unlock(lock))
    except UnknownLockError:
        pass
    else:
        raise AssertionError("an expired lock could still be unlocked")
    assert not service.cache.locks.held


def test_default_lease_frees_a_lock_whose_caller_gave_up(clocked, tmp_path):
    """Without an explicit lease a lock lasts lock_lease (60 s), well under lock_timeout:
    a lock granted to a caller that stopped waiting is not pinned for lock_timeout."""
    clocked.container.blocking = SyncPool()
    clocked.spawn(CacheService, {"root": str(tmp_path / "c"), "host_id": "h", "lock_timeout": 600})
    cache = CacheClient(clocked.spawn(Process))
    lock = clocked.result(cache.lock(KEY, timeout=5))
    assert lock.lease == 60
    clocked.advance(61)
    assert not Path(lock.path).exists()


def test_a_cancelled_lock_wait_stops_waiting_at_the_service(clocked, tmp_path):
    """Cancelling CacheClient.lock cancels the wait at the service instance: the lock, once free,
    is not taken for the caller that gave up."""
    clocked.container.blocking = SyncPool()
    service = clocked.spawn(CacheService, {"root": str(tmp_path / "c"), "host_id": "h", "lock_timeout": 600})
    holder, quitter = CacheClient(clocked.spawn(Process)), CacheClient(clocked.spawn(Process))
    held = clocked.result(holder.lock(KEY, timeout=5))
    waiting = quitter.lock(KEY, timeout=300)
    clocked.pump()
    assert len(service.in_flight) == 1
    waiting.cancel()
    clocked.pump()
    assert not service.in_flight
    with pytest.raises(defer.CancelledError):  # (the caller's own Deferred: failed, and handled here)
        clocked.result(waiting)
    clocked.result(holder.unlock(held))
    clocked.advance(2)
    assert not service._leases and not Path(held.path).exists()


def test_a_cancel_that_crosses_the_grant_releases_the_lock(clocked, tmp_path):
    """A cancel arriving after the lock was granted (the answer and the cancel crossed) releases that
    lock at once instead of leaving it to its lease."""
    clocked.container.blocking = SyncPool()
    service = clocked.spawn(CacheService, {"root": str(tmp_path / "c"), "host_id": "h", "lock_timeout": 600})
    holder = CacheClient(clocked.spawn(Process))
    caller = clocked.spawn(Process)
    held = clocked.result(holder.lock(KEY, timeout=5))
    agreed = []
    d = caller.request("cache", "lock", {"key": KEY.to_wire(), "timeout": 300}, timeout=400,
                       on_agree=lambda c, h: agreed.append(h["conv-id"]))
    clocked.pump()
    clocked.result(holder.unlock(held))
    clocked.advance(2)
    granted, _ = clocked.result(d)
    assert granted["token"] in service._leases and Path(granted["path"]).exists()
    answer, _ = clocked.result(caller.rpc_send(service.id, "cancel", {"conv": agreed[0]}))
    assert answer == {"cancelled": True, "released": True}
    assert not service._leases and not Path(granted["path"]).exists()


def test_cache_app_file_and_config():
    """res/apps/cache.app starts CacheService; ion.config has the ion.services.cache defaults."""
    app = load_app_file(resource_root() / "apps" / "cache.app")
    assert app.name == "cache" and list(app.args) == ["cache", "ion.services.cache.service", "CacheService"]
    config = ast.literal_eval((resource_root() / "config" / "ion.config").read_text())
    section = config["ion.services.cache"]
    assert section["root"] is None and section["lock_timeout"] == 600


def test_entry_file_is_not_content():
    """The description file name is reserved: a deployer never places it."""
    info = EntryInfo(KEY, Path("/x"), {"a": FileMeta(1, None, "0" * 64)}, links={".entry": "x"})
    assert info.content_names() == ["a"] and ENTRY_FILE not in info.content_names()


def test_a_lock_whose_holder_died_is_released_after_two_checks_not_its_lease(tmp_path, log_events):
    """Container A's process holds a lock through container B's Cache service, then A's connection goes
    (as when A is killed): its process queue has no consumer. B checks every lock_holder_check seconds
    and releases the lock at the second check that finds none (logged with the holder), long before
    its 60 s lease; a live holder keeps its lock through the same checks."""
    from ion.testing import ClockedCluster

    from .conftest import SyncPool

    cluster = ClockedCluster()
    a, b = cluster.start_container("a"), cluster.start_container("b")
    b.blocking = SyncPool()
    service = cluster.spawn_in(b, CacheService, {"root": str(tmp_path / "c"), "host_id": "h", "lock_timeout": 600})
    assert service.settings.lock_holder_check == 5
    cluster.advance(20)  # B's connection has been up reconnect_max + 10 s: the broker's word counts
    doomed = CacheClient(cluster.spawn_in(a, Process))
    alive = CacheClient(cluster.spawn_in(b, Process))
    lost = cluster.result(doomed.lock(KEY, timeout=5))
    other_key = EntryKey("repo.file", "linux", "other", "1.0")
    kept = cluster.result(alive.lock(other_key, timeout=5))
    assert lost.lease == 60
    cluster.advance(5)
    assert len(service._leases) == 2  # both still listen
    cluster.result(a.transport.close())  # A dies: its connection, and its consumers, are gone
    cluster.advance(5)
    assert Path(lost.path).exists()  # one check without a consumer: not yet
    cluster.advance(5)
    assert not Path(lost.path).exists() and [le.lock.key for le in service._leases.values()] == [other_key]
    released = [e for e in log_events if "no longer listens" in str(e.get("log_format"))]
    assert len(released) == 1 and released[0]["holder"] == doomed.proc.backend_name
    assert released[0]["holder_pid"] == doomed.proc.id
    # The entry is free for the next caller at once (a takeover's fetch does not wait for the lease).
    again = cluster.result(alive.lock(KEY, timeout=1))
    cluster.advance(20)
    assert Path(kept.path).exists() and Path(again.path).exists()
    cluster.result(alive.unlock(again))
    cluster.result(alive.unlock(kept))
    cluster.advance(5)
    assert service._holder_check is None  # no lock held: no checks


def test_no_lock_is_released_while_our_own_connection_settles(tmp_path):
    """Right after B's connection came back (a broker restart drops every connection at once), A's
    queue without consumer may only mean A is still reconnecting: no check counts until B's connection
    has been up reconnect_max + 10 s (20 s); then two checks without a consumer release the lock."""
    from ion.testing import ClockedCluster

    from .conftest import SyncPool

    cluster = ClockedCluster()
    a, b = cluster.start_container("a"), cluster.start_container("b")
    b.blocking = SyncPool()
    cluster.spawn_in(b, CacheService, {"root": str(tmp_path / "c"), "host_id": "h", "lock_timeout": 600})
    doomed = CacheClient(cluster.spawn_in(a, Process))
    lost = cluster.result(doomed.lock(KEY, timeout=5))
    cluster.result(a.transport.close())  # A's connection is gone ...
    b.exchange_manager.connected_since = cluster.clock.seconds()  # ... as B's just came back
    for _ in range(3):
        cluster.advance(5)  # the checks at 5, 10 and 15 s: none counts
    assert Path(lost.path).exists()
    cluster.advance(5)  # settled at 20 s: this check finds no consumer, and the next one too
    assert Path(lost.path).exists()
    cluster.advance(5)
    assert not Path(lost.path).exists()


def test_the_holder_check_can_be_turned_off(clocked, tmp_path):
    """lock_holder_check 0: only the lease frees a lock (no checks run)."""
    clocked.container.blocking = SyncPool()
    service = clocked.spawn(CacheService, {"root": str(tmp_path / "c"), "host_id": "h", "lock_timeout": 600,
                                           "lock_holder_check": 0})
    cache = CacheClient(clocked.spawn(Process))
    clocked.result(cache.lock(KEY, timeout=5))
    assert service.settings.lock_holder_check is None and service._holder_check is None


@pytest_twisted.ensureDeferred
async def test_an_unlock_cut_off_by_the_broker_connection_is_sent_again_once_reconnected(container, process_factory,
                                                                                        tmp_path):
    """A caller that lives on through a lost broker connection (a frozen container, a node's loss) must
    not leave its lock for the lease to end: an unlock (and a staging folder's discard) cut off by the
    loss waits for the connection and is sent again (here the first ones had run: the service no longer
    knowing the token counts as released), even when its caller is cancelled meanwhile, and the next
    caller gets the lock at once."""
    service, first = await start(container, process_factory, tmp_path / "c")
    second = CacheClient(await client_process(container, "second"))
    lock = await first.lock(KEY, timeout=5)
    staging = await first.new_staging()
    sent = []
    resent: defer.Deferred[None] = defer.Deferred()  # fires once the unlock sent again has its answer
    real = first._call

    def recording(op, content=None, **kw):
        sent.append(op)
        d = real(op, content, **kw)
        if op == "unlock" and sent.count("unlock") == 2:
            d.addBoth(lambda result: (resent.callback(None), result)[1])
        return d

    first._call = recording
    unlocking = first.unlock(lock)
    discarding = first.discard_staging(staging)
    manager = container.exchange_manager
    manager._connection_changed("lost", "the test")  # (both calls were in flight: they fail, 503)
    await first.lookup(KEY)  # (the embedded broker still delivers: the first two ran meanwhile)
    assert not unlocking.called and not discarding.called  # waiting for the connection, not failed
    unlocking.cancel()  # (a cancelled fetch's clean-up: the release goes on)
    assert isinstance(unlocking.result.value, defer.CancelledError)
    unlocking.addErrback(lambda f: None)
    manager._connection_changed("restored", None)
    await discarding
    await resent  # (its caller was cancelled: nobody else waits for it)
    await first.lookup(KEY)
    assert sent == ["unlock", "discard_staging", "lookup", "unlock", "discard_staging", "lookup"] or sent == [
        "unlock", "discard_staging", "lookup", "discard_staging", "unlock", "lookup"], sent
    assert lock.token not in service._leases and not Path(staging).exists()
    granted = await second.lock(KEY, timeout=1)
    await second.unlock(granted)


@pytest_twisted.ensureDeferred
async def test_a_resent_clean_up_raises_any_other_error(container, process_factory, tmp_path):
    """Sent again, only the error that says the first call ran (an unknown lock token) is taken for done."""
    from ion.core.exceptions import CONNECTION_LOST, ConversationError

    service, cache = await start(container, process_factory, tmp_path / "c")
    real = cache._call
    calls = []

    def cut_off_first(op, content=None, **kw):
        calls.append(op)
        if len(calls) == 1:
            raise ConversationError(service.id, "", f"{CONNECTION_LOST}: the test")
        return real(op, content, **kw)

    cache._call = cut_off_first
    with pytest.raises(OutsideCacheError):
        await cache.discard_staging(tmp_path / "elsewhere")
    assert calls == ["discard_staging", "discard_staging"]
    calls.clear()
    cache._call = lambda op, content=None, **kw: (_ for _ in ()).throw(
        ConversationError(service.id, "", "the service stopped"))  # 503, not a cut-off: raised at once
    with pytest.raises(ConversationError):
        await cache.unlock(await CacheClient(cache.proc).lock(KEY, timeout=5))


def test_clean_ups_of_one_outage_wait_for_the_connection_once(clocked, tmp_path, monkeypatch):
    """When the connection does not come back within CLEANUP_RECONNECT_WAIT, the clean-up fails (503,
    naming the wait), and the next ones of that outage fail at once rather than each waiting again; after
    a reconnection they wait again."""
    from ion.core.exceptions import CONNECTION_LOST, ConversationError
    from ion.services.cache import service as cache_service

    waits = []
    real_wait = cache_service.reconnected

    def counted(*args, **kw):
        waits.append(args)
        return real_wait(*args, **kw)

    monkeypatch.setattr(cache_service, "reconnected", counted)
    clocked.container.blocking = SyncPool()
    svc = clocked.spawn(CacheService, {"root": str(tmp_path / "c"), "host_id": "h", "lock_timeout": 600})
    cache = CacheClient(clocked.spawn(Process))

    def cut_off(op, content=None, **kw):
        raise ConversationError(svc.id, "", f"{CONNECTION_LOST}: the test")

    cache._call = cut_off
    manager = clocked.container.exchange_manager
    wait = cache_service.CLEANUP_RECONNECT_WAIT
    manager._connection_changed("lost", "the test")
    try:
        first = cache.discard_staging(tmp_path / "c" / "staging" / "x")
        clocked.advance(wait - 1, step=0.1)  # (the wait looks at the connection every 0.1 s)
        assert not first.called  # waiting for the connection
        clocked.advance(1.5, step=0.1)
        with pytest.raises(ConversationError, match=f"not reconnected to the broker within {wait:g} s"):
            clocked.result(first)
        with pytest.raises(ConversationError, match=CONNECTION_LOST):  # at once: the call's own error
            clocked.result(cache.discard_staging(tmp_path / "c" / "staging" / "y"))
        assert len(waits) == 1
    finally:
        manager._connection_changed("restored", None)
    manager._connection_changed("lost", "again")
    try:
        again = cache.discard_staging(tmp_path / "c" / "staging" / "z")
        clocked.advance(wait + 0.5, step=0.1)
        with pytest.raises(ConversationError, match="not reconnected"):  # a new outage: it waits again
            clocked.result(again)
        assert len(waits) == 2
    finally:
        manager._connection_changed("restored", None)
