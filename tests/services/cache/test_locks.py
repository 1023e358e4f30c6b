"""Entry locks: atomic creation, in-process waiting, takeover rules, release on every path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, task

from ion.services.cache import locks
from ion.services.cache.core import Cache
from ion.services.cache.entry import EntryKey
from ion.services.cache.errors import CorruptEntryError, InvalidKeyError, LockNotHeldError, LockTimeoutError
from ion.services.cache.locks import LockHolder, resolve_host_id

from .conftest import GatedPool, failure_of, fired, messages, put, stage, write_lock


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("method", ["excl", "link"])
def test_lock_file_creation_is_atomic_between_two_hosts(make_cache, key, clock, method):
    """Threads of two caches posing as two hosts race for one lock file: exactly one wins each round,
    with O_EXCL creation and with the link-count method."""
    a, b = make_cache("host-a", lock_method=method), make_cache("host-b", lock_method=method)
    path = a.lock_path(key)
    path.parent.mkdir(parents=True)
    now = clock.seconds()
    for _ in range(30):
        barrier = threading.Barrier(16)
        wins: list[str] = []
        errors: list[str] = []

        def contend(cache: Cache, barrier: threading.Barrier, wins: list[str], errors: list[str]) -> None:
            holder = LockHolder(cache.host_id, os.getpid(), time.time()).render().encode()
            barrier.wait()
            attempt = locks._try_acquire(path, holder, now, cache.locks.judge, method)
            if attempt.taken_over:
                errors.append(f"{cache.host_id} took a live lock over: {attempt.taken_over}")
            if attempt.acquired:
                wins.append(cache.host_id)
            elif attempt.observed is None:
                errors.append("lost without seeing the winner")

        threads = [threading.Thread(target=contend, args=(a if i % 2 else b, barrier, wins, errors)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(wins) == 1, wins
        assert LockHolder.parse(path.read_text()).host_id == wins[0]
        assert os.stat(path).st_nlink == 1 and os.listdir(path.parent) == [path.name]  # no link-count leftovers
        path.unlink()


def test_link_method_holds_even_when_link_reports_an_error(make_cache, key, clock, monkeypatch):
    """NFS can report a failed link() that was made (a lost reply): the link count decides."""
    cache = make_cache(lock_method="link")
    real_link = os.link

    def link_then_fail(src, dst):
        real_link(src, dst)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(locks.os, "link", link_then_fail)
    lock = fired(cache.lock(key))
    assert LockHolder.parse(lock.path.read_text()).host_id == "host-a"
    monkeypatch.setattr(locks.os, "link", real_link)
    other = make_cache("host-b", lock_method="link")
    failure_of(other.lock(key, timeout=0), LockTimeoutError)
    fired(cache.unlock(lock))
    assert not lock.path.exists()
    # No link-count leftovers: the folder went with its last lock, or holds no dot file.
    assert not lock.path.parent.exists() or not [n for n in os.listdir(lock.path.parent) if n.startswith(".")]


def test_unknown_lock_method_is_refused(make_cache):
    with pytest.raises(InvalidKeyError, match="lock_method must be one of excl, link"):
        make_cache(lock_method="flock")


def test_second_host_waits_for_the_first(make_cache, key, clock):
    """Two caches on one root: the second lock request waits until the first is released."""
    a, b = make_cache("host-a"), make_cache("host-b")
    lock_a = fired(a.lock(key))
    d = b.lock(key, timeout=300)
    clock.advance(30)
    assert not d.called
    fired(a.unlock(lock_a))
    clock.advance(1)  # the next poll (backoff capped at 1 s)
    lock_b = fired(d)
    assert LockHolder.parse(lock_b.path.read_text()).host_id == "host-b"
    fired(b.unlock(lock_b))
    assert not lock_b.path.exists()


def test_in_process_waiter_waits_on_the_holder_without_polling(cache, key, clock, pool):
    """A second lock of one entry in one process waits on a Deferred: no file attempts, fires on release."""
    first = fired(cache.lock(key))
    d = cache.lock(key)
    attempts = pool.calls.count("_try_acquire")
    for _ in range(100):
        clock.advance(1)
    assert not d.called
    assert pool.calls.count("_try_acquire") == attempts  # nobody polled the lock file
    fired(cache.unlock(first))
    second = fired(d)  # at once: no clock advance needed
    assert second.active and second.path.exists()


def test_same_host_dead_pid_is_taken_over_at_once(cache, key, clock, log_events):
    """A lock file of this host whose pid is dead is taken over without waiting, naming the holder."""
    pid = dead_pid()
    write_lock(cache.lock_path(key), f"host-a::{pid}::{time.time():.6f}".encode(), clock.seconds())
    lock = fired(cache.lock(key))
    assert lock.holder.pid == os.getpid()
    assert any(f"pid {pid}" in m and "took over" in m and "host-a" in m for m in messages(log_events))


def test_own_pid_of_an_earlier_process_is_taken_over_at_once(cache, key, clock):
    """A lock file with our pid but started before this process is a restarted container's: taken over."""
    write_lock(cache.lock_path(key), f"host-a::{os.getpid()}::1000.0".encode(), clock.seconds())
    assert fired(cache.lock(key)).active


def test_live_pid_on_this_host_is_waited_for(cache, key, clock):
    """A lock file of this host with a live pid (our parent) is not taken over while fresh."""
    write_lock(cache.lock_path(key), f"host-a::{os.getppid()}::{time.time():.6f}".encode(), clock.seconds())
    d = cache.lock(key, timeout=30)
    clock.advance(30)
    failure_of(d, LockTimeoutError)


def test_other_host_is_taken_over_only_after_lock_timeout(cache, key, clock, log_events):
    """Another host's lock that is not refreshed is taken over after lock_timeout, with a log naming it."""
    write_lock(cache.lock_path(key), b"host-x::4242::1700000000.0", clock.seconds())
    d = cache.lock(key, timeout=600)
    for _ in range(59):
        clock.advance(1)
    assert not d.called
    clock.advance(2)
    lock = fired(d)
    assert lock.active
    lines = [m for m in messages(log_events) if "took over" in m]
    assert lines and "host host-x pid 4242" in lines[0] and "not refreshed" in lines[0]


def test_holder_refreshes_and_is_never_taken_over(make_cache, key, clock):
    """A live holder refreshes its lock's mtime, so another host keeps waiting past lock_timeout."""
    a, b = make_cache("host-a"), make_cache("host-b")
    lock_a = fired(a.lock(key))
    d = b.lock(key, timeout=1000)
    for _ in range(200):  # over three lock_timeouts
        clock.advance(1)
        assert clock.seconds() - os.stat(lock_a.path).st_mtime <= a.locks.refresh_interval
    assert not d.called and lock_a.active
    fired(a.unlock(lock_a))
    clock.advance(1)
    assert fired(d).holder.host_id == "host-b"


def test_holder_that_stops_refreshing_loses_the_lock(make_cache, key, clock):
    """A holder that stalls past lock_timeout loses the lock: it can no longer publish, nor delete the new one."""
    a, b = make_cache("host-a"), make_cache("host-b")
    lock_a = fired(a.lock(key))
    lock_a._refresh_call.cancel()  # the holder stalls (a frozen process, a dead host)
    d = b.lock(key, timeout=1000)
    clock.advance(61)
    clock.advance(1)
    lock_b = fired(d)
    staging, metas = stage(a, {"f": b"x"})
    failure_of(a.publish(key, staging, metas, lock=lock_a), LockNotHeldError)
    fired(a.unlock(lock_a))
    assert lock_b.path.exists() and LockHolder.parse(lock_b.path.read_text()).host_id == "host-b"


def test_corrupt_lock_file_is_treated_as_stale(cache, key, clock, log_events):
    """A lock file that does not parse is taken over at once, and the log says so."""
    write_lock(cache.lock_path(key), b"\x00garbage", clock.seconds())
    assert fired(cache.lock(key)).active
    assert any("corrupt" in m for m in messages(log_events))


def test_empty_lock_file_is_one_being_created(cache, key, clock, log_events):
    """An empty lock file (created, content not yet written) is waited for a few seconds
    (EMPTY_GRACE); older, its creator died before writing it: taken over, far before lock_timeout."""
    write_lock(cache.lock_path(key), b"", clock.seconds())
    d = cache.lock(key, timeout=600)
    clock.advance(locks.EMPTY_GRACE - 1)
    assert not d.called
    clock.advance(2)
    assert fired(d).active
    assert any("its creator died before writing it" in m for m in messages(log_events))


def test_lock_timeout_names_the_holder(cache, key, clock):
    """Waiting longer than the timeout fails with LockTimeoutError naming the holder and the lock file."""
    write_lock(cache.lock_path(key), b"host-x::17::1700000000.0", clock.seconds())
    d = cache.lock(key, timeout=5)
    clock.advance(3)
    assert not d.called
    clock.advance(2)
    err = failure_of(d, LockTimeoutError)
    assert "host-x" in str(err) and str(cache.lock_path(key)) in str(err) and err.code == 409


def test_timeout_zero_fails_at_once_when_held_in_process(cache, key):
    """lock(timeout=0) on an entry held in this process fails at once."""
    fired(cache.lock(key))
    failure_of(cache.lock(key, timeout=0), LockTimeoutError)


def test_in_process_wait_times_out(cache, key, clock):
    """An in-process waiter gives up after its timeout; the holder keeps the lock."""
    first = fired(cache.lock(key))
    d = cache.lock(key, timeout=10)
    clock.advance(10)
    failure_of(d, LockTimeoutError)
    assert first.active
    fired(cache.unlock(first))
    assert fired(cache.lock(key, timeout=0)).active


def test_lock_released_when_the_function_fails(cache, key):
    """with_lock releases the lock when the function raises; the error reaches the caller."""

    def boom(lock):
        assert lock.path.exists()
        raise RuntimeError("fetch failed")

    failure_of(cache.with_lock(key, boom), RuntimeError)
    assert not cache.lock_path(key).exists()
    assert fired(cache.lock(key, timeout=0)).active


def test_lock_released_when_the_function_succeeds(cache, key):
    """with_lock fires with the function's result (plain or async) and releases the lock."""

    async def work(lock, n):
        return n * 2

    assert fired(cache.with_lock(key, work, 21)) == 42
    assert not cache.lock_path(key).exists() and not cache.locks.held


def test_lock_released_when_cancelled_while_holding(cache, key):
    """Cancelling with_lock cancels the function's Deferred and releases the lock."""
    inner: defer.Deferred[None] = defer.Deferred()
    d = cache.with_lock(key, lambda lock: inner)
    assert cache.lock_path(key).exists()
    d.cancel()
    failure_of(d, defer.CancelledError)
    assert inner.called
    assert not cache.lock_path(key).exists()
    assert fired(cache.lock(key, timeout=0)).active


def test_cancelled_waiters_leave_nothing(make_cache, key, clock):
    """Cancelling a lock request waiting in-process or on another host leaves no lock and no waiter."""
    a, b = make_cache("host-a"), make_cache("host-b")
    held = fired(a.lock(key))
    local = a.lock(key)
    remote = b.lock(key)
    clock.advance(5)
    local.cancel()
    remote.cancel()
    failure_of(local, defer.CancelledError)
    failure_of(remote, defer.CancelledError)
    fired(a.unlock(held))
    assert not a.lock_path(key).exists()
    assert not a.locks._local and not b.locks._local
    assert not clock.getDelayedCalls()


def test_cancelled_during_the_file_step_releases_the_file(make_cache, key, root, clock):
    """A lock request cancelled while its lock file is being created removes the file when it lands."""
    gated = GatedPool({"_try_acquire"})
    cache = make_cache(pool=gated)
    d = cache.lock(key)
    d.cancel()
    failure_of(d, defer.CancelledError)
    gated.release()  # the create finishes after the cancel
    assert not cache.lock_path(key).exists()
    assert not cache.locks.held and not cache.locks._local
    again = cache.lock(key, timeout=0)
    gated.release()
    assert fired(again).active


def test_release_all_cancels_waits_and_releases(make_cache, key, clock):
    """close() releases every held lock and cancels pending requests."""
    a, b = make_cache("host-a"), make_cache("host-b")
    other = key.__class__(key.repo_id, key.platform, key.name, "2.0")
    fired(a.lock(key))
    fired(b.lock(other))
    pending = a.lock(other)
    fired(a.close())
    failure_of(pending, defer.CancelledError)
    assert not a.lock_path(key).exists() and a.lock_path(other).exists()


def test_unlock_twice_is_harmless(cache, key):
    """Releasing a lock twice does nothing the second time."""
    lock = fired(cache.lock(key))
    fired(cache.unlock(lock))
    fired(cache.unlock(lock))
    assert not lock.held


def test_publish_needs_the_lock(cache, key):
    """publish without holding the entry's lock is refused and nothing is published."""
    staging, metas = stage(cache, {"f": b"x"})
    failure_of(cache.publish(key, staging, metas), LockNotHeldError)
    assert fired(cache.lookup(key)) is None and staging.exists()


def test_stale_lock_of_dead_publisher_then_publish(cache, key, clock):
    """After a fetcher died holding the lock, the next one takes it over at once and publishes."""
    write_lock(cache.lock_path(key), f"host-a::{dead_pid()}::{time.time():.6f}".encode(), clock.seconds())
    info = put(cache, key, {"f": b"data"})
    assert fired(cache.lookup(key)).files == info.files
    assert not cache.lock_path(key).exists()


def test_host_id_sources(tmp_path):
    """The host id comes from ION_HOST_ID, else the machine-id, else a UUID kept in the config folder."""
    ns = str(tmp_path / "no-ns")
    assert resolve_host_id({"ION_HOST_ID": "tester"}, pid_ns=ns) == "tester"
    mid = tmp_path / "machine-id"
    mid.write_text("abc123\n")
    assert resolve_host_id({}, machine_id_files=(str(mid),), pid_ns=ns) == "abc123"
    first = resolve_host_id({}, machine_id_files=(str(tmp_path / "none"),), config_home=tmp_path / "cfg", pid_ns=ns)
    again = resolve_host_id({}, machine_id_files=(), config_home=tmp_path / "cfg", pid_ns=ns)
    assert first == again == (tmp_path / "cfg" / "ion" / "host-id").read_text().strip()
    assert len(first) == 32 and first != os.uname().nodename
    with pytest.raises(InvalidKeyError):
        resolve_host_id({"ION_HOST_ID": "a::b"}, pid_ns=ns)


def test_lock_holder_format():
    """Lock files hold host_id::pid::started; anything else does not parse."""
    holder = LockHolder("h1", 12, 1700000000.5)
    assert LockHolder.parse(holder.render()) == holder
    for bad in ["", "h1::12", "h1::x::1", "h1::0::1", "h 1::12::1", "h1::12::nan", "a::b::c::d"]:
        assert LockHolder.parse(bad) is None, bad


def test_lock_path_is_beside_the_entry(cache, key, root: Path):
    """The lock file is <version>[~packed].lock beside the entry folder."""
    assert cache.lock_path(key) == root / "repo.file/linux/tool/1.0.lock"
    packed = key.__class__(key.repo_id, key.platform, key.name, key.version, False)
    assert cache.lock_path(packed) == root / "repo.file/linux/tool/1.0~packed.lock"


@pytest_twisted.ensureDeferred
async def test_two_hosts_with_real_threads_take_turns(tmp_path):
    """On the real reactor and thread pool, holders on two hosts never overlap and all get their turn."""
    from twisted.internet import reactor

    from ion.core.threads import BlockingPool

    pool = BlockingPool(reactor, maxthreads=4)
    try:
        caches = [Cache(tmp_path / "c", host_id=h, lock_timeout=60, clock=reactor, pool=pool) for h in ("a", "b")]
        key = EntryKey("repo.file", "linux", "tool", "1.0")
        inside: list[str] = []
        turns: list[str] = []

        async def turn(lock, who):
            assert not inside, f"{who} entered while {inside} held the lock"
            inside.append(who)
            await task.deferLater(reactor, 0, lambda: None)  # let the others run meanwhile
            inside.remove(who)
            turns.append(who)

        await defer.gatherResults([caches[i % 2].with_lock(key, turn, f"{i}") for i in range(4)],
                                  consumeErrors=True)
        assert sorted(turns) == ["0", "1", "2", "3"]
        assert not caches[0].lock_path(key).exists()
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_lock_files_are_handled_while_the_blocking_pool_is_busy(tmp_path, key, monkeypatch):
    """Lock files are created, refreshed and removed beside the cache's blocking pool, so a
    pool busy with long jobs (hashing, extraction) never lets a held lock go stale."""
    from twisted.internet import reactor

    from ion.core.threads import BlockingPool

    refreshed: defer.Deferred[bool] = defer.Deferred()
    real_refresh = locks._refresh

    def refresh(*args):
        ok = real_refresh(*args)
        reactor.callFromThread(lambda: refreshed.called or refreshed.callback(ok))
        return ok

    monkeypatch.setattr(locks, "_refresh", refresh)
    pool = BlockingPool(reactor, maxthreads=1)
    cache = Cache(tmp_path / "cache", host_id="test-host", pool=pool, lock_timeout=60, refresh_interval=0.05)
    release = threading.Event()
    busy = pool.run(release.wait, 30)  # the pool's only thread, taken until the test lets it go
    try:
        lock = await cache.lock(key).addTimeout(10, reactor)
        os.utime(lock.path, (1, 1))  # as if not refreshed for ages
        assert await refreshed.addTimeout(10, reactor)
        assert lock.path.stat().st_mtime > 2
        await cache.unlock(lock).addTimeout(10, reactor)
        assert not lock.path.exists() and not busy.called
    finally:
        release.set()
        await busy
        await pool.stop()


# -- a publish that releases the lock in its own pool job ------------------------------------------------
def test_publish_with_release_publishes_and_releases_in_one_pool_job(cache, key, pool, clock):
    """``publish(release=True)``: the lock checked, the entry published and the lock file removed in one
    pool job; the lock is released (a waiter gets it), and the unlock that follows does nothing."""
    lock = fired(cache.lock(key))
    staging, metas = stage(cache, {"f": b"x"})
    waiter = cache.lock(key, timeout=10)
    del pool.calls[:]
    info = fired(cache.publish(key, staging, metas, lock=lock, release=True))
    assert pool.calls == ["_publish_locked", "_try_acquire"]  # (then the waiter's try, which wins)
    assert (info.path / "f").read_bytes() == b"x"
    assert not lock.held and cache.locks.held.get(lock.path) is not lock
    other = fired(waiter)  # handed over: the file was removed
    assert other.active and other.path.exists()
    del pool.calls[:]
    fired(cache.unlock(lock))  # twice is harmless: no job, and the new holder's file stays
    assert pool.calls == [] and other.path.exists()
    fired(cache.unlock(other))
    assert not other.path.exists()


def test_publish_with_release_of_a_lost_lock_publishes_nothing_and_keeps_the_other_file(make_cache, key, clock):
    """A holder that lost its lock and publishes with ``release``: refused (LockNotHeldError), nothing
    published, the new holder's lock file untouched, by the publish and by the unlock after it."""
    a, b = make_cache("host-a"), make_cache("host-b")
    lock_a = fired(a.lock(key))
    lock_a._refresh_call.cancel()  # the holder stalls
    d = b.lock(key, timeout=1000)
    clock.advance(61)
    clock.advance(1)
    lock_b = fired(d)
    staging, metas = stage(a, {"f": b"x"})
    failure_of(a.publish(key, staging, metas, lock=lock_a, release=True), LockNotHeldError)
    assert lock_a.lost and not a.entry_path(key).exists()
    fired(a.unlock(lock_a))
    assert lock_b.path.exists() and LockHolder.parse(lock_b.path.read_text()).host_id == "host-b"


def test_failed_publish_with_release_keeps_the_lock_and_its_refresh(cache, key, pool, clock):
    """A publish with ``release`` that fails (content not as described) keeps the lock, still refreshed;
    the unlock after it removes the file and its empty folders in one pool job."""
    lock = fired(cache.lock(key))
    staging, metas = stage(cache, {"f": b"x"})
    metas["missing"] = metas["f"]
    failure_of(cache.publish(key, staging, metas, lock=lock, release=True), CorruptEntryError)
    assert lock.active and not lock.releasing and lock._refresh_call is not None and lock._refresh_call.active()
    fired(cache.discard_staging(staging))
    del pool.calls[:]
    fired(cache.unlock(lock))
    assert pool.calls == ["_remove_then"]
    assert not lock.path.exists() and not lock.path.parent.exists()  # its folders tidied in that job


def test_lock_with_lookup_looks_the_entry_up_in_the_job_that_takes_it(cache, key, pool):
    """``lock(lookup=True)``: the lookup made once the lock is held (whoever held it may have published
    the entry meanwhile) runs in the pool job that takes the lock; ``looked_up`` holds its answer."""
    first = fired(cache.lock(key))
    waiting = cache.lock(key, timeout=10, lookup=True)
    staging, metas = stage(cache, {"f": b"x"})
    fired(cache.publish(key, staging, metas, lock=first))
    del pool.calls[:]
    fired(cache.unlock(first))
    second = fired(waiting)
    assert pool.calls == ["_remove_then", "_try_acquire"]  # the release, then the take with its lookup
    assert second.looked_up is not None and set(second.looked_up[0].files) == {"f"}
    fired(cache.unlock(second))
    other = EntryKey(key.repo_id, key.platform, key.name, "2.0", key.unpack)
    third = fired(cache.lock(other, lookup=True))
    assert third.looked_up == (None,)
    fired(cache.unlock(third))
    assert fired(cache.lock(other)).looked_up is None  # (not asked)


# -- lock files moved aside by a publish, deleted once no lock is held -------------------------------------
def _aside(lock_path: Path) -> list[str]:
    """The moved-aside files (``.<lock>.<host>-<pid>.<hex>.stale``) beside ``lock_path``."""
    return sorted(n for n in os.listdir(lock_path.parent)
                  if n.startswith(f".{lock_path.name}.") and n.endswith(".stale"))


def test_publish_with_release_deletes_the_moved_aside_lock_files_once_no_lock_is_held(make_cache, key, pool,
                                                                                       clock):
    """A publish with ``release`` frees the lock at once (another host takes it) but deletes the file it
    moved aside only once its table has held no lock for a while (the end of a deployment), in one
    pool job."""
    a, b = make_cache("host-a"), make_cache("host-b")
    other = EntryKey(key.repo_id, key.platform, "other", key.version, key.unpack)
    first, second = fired(a.lock(key)), fired(a.lock(other))
    staging, metas = stage(a, {"f": b"x"})
    fired(a.publish(key, staging, metas, lock=first, release=True))
    assert not first.path.exists() and len(_aside(first.path)) == 1  # free, its file moved aside
    assert locks.debris_tag("host-a", os.getpid()) in _aside(first.path)[0]
    taken = fired(b.lock(key, timeout=0))  # the lock is free: another host takes it, the file aside stays
    assert len(_aside(first.path)) == 1
    fired(b.unlock(taken))
    staging, metas = stage(a, {"g": b"y"})
    del pool.calls[:]
    fired(a.publish(other, staging, metas, lock=second, release=True))  # the last lock of host-a
    assert pool.calls == ["_publish_locked"] and len(_aside(first.path) + _aside(second.path)) == 2
    clock.advance(locks.ASIDE_DELAY / 2)
    third = fired(a.lock(other))  # busy again before the pause is over: nothing deleted
    fired(a.unlock(third))
    clock.advance(locks.ASIDE_DELAY / 2)
    assert len(_aside(first.path) + _aside(second.path)) == 2
    del pool.calls[:]
    clock.advance(locks.ASIDE_DELAY / 2)  # a pause of ASIDE_DELAY since the last release
    assert pool.calls == ["_unlink_each"]
    assert _aside(first.path) == [] and _aside(second.path) == [] and not second.path.exists()
    assert set(fired(a.lookup(key)).files) == {"f"} and set(fired(a.lookup(other)).files) == {"g"}


def test_release_all_deletes_the_moved_aside_lock_files(cache, key):
    """Closing the cache (``release_all``) deletes the files moved aside, whatever else it releases."""
    other = EntryKey(key.repo_id, key.platform, "other", key.version, key.unpack)
    first, second = fired(cache.lock(key)), fired(cache.lock(other))
    staging, metas = stage(cache, {"f": b"x"})
    fired(cache.publish(key, staging, metas, lock=first, release=True))
    assert len(_aside(first.path)) == 1 and second.held
    fired(cache.close())
    assert _aside(first.path) == [] and not second.path.exists()


_KILLED_PUBLISHER = """
import os, signal, sys
from pathlib import Path
from twisted.internet import task
from ion.core.threads import SynchronousPool
from ion.services.cache.core import Cache, sha256_file
from ion.services.cache.entry import EntryKey, FileMeta

cache = Cache(sys.argv[1], host_id="host-a", lock_timeout=60, clock=task.Clock(), pool=SynchronousPool())
done, held = EntryKey("repo.file", "linux", "done", "1.0", True), EntryKey("repo.file", "linux", "held", "1.0", True)


def fired(d):
    results = []
    d.addBoth(results.append)
    return results[0]


lock = fired(cache.lock(done))
fired(cache.lock(held))
staging = fired(cache.new_staging())
(staging / "f").write_bytes(b"x")
fired(cache.publish(done, staging, {"f": FileMeta(1, None, sha256_file(staging / "f"))}, lock=lock, release=True))
os.kill(os.getpid(), signal.SIGKILL)  # the lock of 'held' held, the file of 'done' moved aside
"""


def test_a_publisher_killed_with_lock_files_moved_aside_leaves_them_to_the_next_taker(make_cache, root, clock):
    """SIGKILL after a publish moved its lock file aside, while another lock is held: the entry is
    complete, and the files the dead process left (the file moved aside, the lock file it held) are
    debris of a dead pid: the next taker of each lock removes them at once."""
    child = subprocess.run([sys.executable, "-c", _KILLED_PUBLISHER, str(root)], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3])))
    assert child.returncode == -signal.SIGKILL, child.stderr
    cache = make_cache("host-a")
    done = EntryKey("repo.file", "linux", "done", "1.0", True)
    held = EntryKey("repo.file", "linux", "held", "1.0", True)
    assert len(_aside(cache.lock_path(done))) == 1 and cache.lock_path(held).exists()
    assert set(fired(cache.lookup(done)).files) == {"f"}  # published before the kill: complete
    lock = fired(cache.lock(done, timeout=0))  # taken; the dead process's file swept on the way
    assert _aside(cache.lock_path(done)) == []
    fired(cache.unlock(lock))
    fired(cache.unlock(fired(cache.lock(held, timeout=0))))  # its dead holder's lock: taken over at once
