"""What a SIGKILL leaves of a lock (issue 12), and who removes it.

Each test builds the exact files a process killed at one moment leaves (the
holder a real dead pid: a child that has exited), then runs the cache step a
successful rerun runs. Moments:

- between ``publish`` and the release of the lock: the entry is complete, the
  lock file names the dead pid. The rerun is a cache hit and never locks, so
  :meth:`Cache.lookup` itself must remove it;
- between creating the lock file and writing its content: an empty file
  (taken over after ``EMPTY_GRACE``, never before: it may be a live creator's);
- with ``lock_method: link``, between creating the content file and removing
  it: ``.<version>.lock.<host>-<pid>.<hex>.tmp`` (hard-linked to the lock file
  when the link was made);
- between renaming a lock aside (takeover or release) and deleting it:
  ``.<version>.lock.<host>-<pid>.<hex>.stale``.
"""

from __future__ import annotations

import os
import subprocess
import time
import types
from pathlib import Path

import pytest

from ion.services.cache import locks
from ion.services.cache.errors import LockTimeoutError
from ion.services.cache.locks import LockHolder, debris_tag

from .conftest import failure_of, fired, messages, put, write_lock


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def holder(host: str, pid: int) -> bytes:
    return LockHolder(host, pid, time.time()).render().encode()


def litter(path: Path) -> list[str]:
    """The lock file and every temporary file of it in its folder (none once the folder is gone:
    ``Cache.unlock`` removes the folders its lock leaves empty)."""
    if not path.parent.exists():
        return []
    return sorted(n for n in os.listdir(path.parent) if locks._is_litter(path.name, n))


def debris(path: Path, host: str, pid: int, kind: str, content: bytes | None = None) -> Path:
    """A temporary file of the lock ``path`` as process ``pid`` of ``host`` names it."""
    tmp = path.with_name(f".{path.name}.{debris_tag(host, pid)}.0123456789ab.{kind}")
    tmp.write_bytes(content if content is not None else holder(host, pid))
    return tmp


# -- killed between publish and release: the next run is a cache hit -------------------------------------
def test_cache_hit_removes_the_lock_of_a_dead_pid_of_this_host(cache, key, clock, log_events):
    """The entry was published, then its holder was killed before releasing: the lookup that serves
    the entry removes the lock, with a warning naming the dead holder."""
    put(cache, key)
    pid = dead_pid()
    write_lock(cache.lock_path(key), holder("host-a", pid), clock.seconds())
    info = fired(cache.lookup(key))
    assert info is not None
    assert litter(cache.lock_path(key)) == []
    said = [m for m in messages(log_events) if "left on the published entry" in m]
    assert len(said) == 1 and f"pid {pid} is dead on this host" in said[0], messages(log_events)
    # A lock held in this process (a fetch checking the entry under it) is never touched by a lookup.
    lock = fired(cache.lock(key))
    assert fired(cache.lookup(key)) is not None
    assert lock.active and fired(cache.locks.check(lock))
    fired(cache.unlock(lock))
    assert litter(lock.path) == []


def test_cache_hit_keeps_a_live_holder_and_another_hosts_fresh_lock(make_cache, key, clock):
    """A live local holder (it may be refetching a keep_updated entry) and another host's fresh lock
    stay; another host's lock not refreshed for lock_timeout goes, as a contender would take it."""
    cache = make_cache("host-a")
    put(cache, key)
    path = cache.lock_path(key)
    write_lock(path, holder("host-a", os.getppid()), clock.seconds())
    assert fired(cache.lookup(key)) is not None
    assert litter(path) == [path.name]
    write_lock(path, holder("host-b", 4242), clock.seconds())
    clock.advance(cache.lock_timeout - 1)
    assert fired(cache.lookup(key)) is not None
    assert litter(path) == [path.name]
    clock.advance(2)
    assert fired(cache.lookup(key)) is not None
    assert litter(path) == []


# -- killed between creating the lock file and writing it ----------------------------------------------------
def test_cache_hit_removes_an_empty_lock_only_after_the_grace(cache, key, clock):
    """An empty lock file is one being written for EMPTY_GRACE; older, its creator died: a hit removes it."""
    put(cache, key)
    path = cache.lock_path(key)
    write_lock(path, b"", clock.seconds())
    clock.advance(locks.EMPTY_GRACE - 1)
    fired(cache.lookup(key))
    assert litter(path) == [path.name]
    clock.advance(2)
    fired(cache.lookup(key))
    assert litter(path) == []


# -- killed mid-step of the link method, or between a rename aside and the delete -----------------------------
def test_link_method_content_file_of_a_dead_pid_is_swept_by_the_next_lock(make_cache, key, clock, log_events):
    """lock_method link, killed after the link was made and before the content file was removed: the lock
    file and its hard-linked content file remain. The next lock takes the lock over and removes both."""
    cache = make_cache("host-a", lock_method="link")
    path = cache.lock_path(key)
    path.parent.mkdir(parents=True)
    pid = dead_pid()
    tmp = debris(path, "host-a", pid, "tmp")
    os.link(tmp, path)
    lock = fired(cache.lock(key))
    assert lock.active
    assert litter(path) == [path.name]
    fired(cache.unlock(lock))
    assert litter(path) == []
    assert any("took over" in m and f"pid {pid}" in m for m in messages(log_events))


def test_cache_hit_sweeps_temporary_files_of_dead_pids_only(make_cache, key, clock):
    """Beside a complete entry with no lock file: the content file and the moved-aside lock of a dead pid
    of this host go; those of a live local process and another host's recent ones stay."""
    cache = make_cache("host-a")
    put(cache, key)
    path = cache.lock_path(key)
    pid = dead_pid()
    dead = [debris(path, "host-a", pid, "tmp"), debris(path, "host-a", pid, "stale")]
    kept = [debris(path, "host-a", os.getppid(), "tmp"), debris(path, "host-b", pid, "stale")]
    assert fired(cache.lookup(key)) is not None
    assert litter(path) == sorted(p.name for p in kept)
    assert not any(p.exists() for p in dead)


def test_old_or_foreign_temporary_files_go_after_lock_timeout(make_cache, key, clock, monkeypatch):
    """Temporary files whose maker cannot be judged (another host's, or named before makers were) go
    once their ctime is older than lock_timeout, by wall time (ctime is the filesystem's)."""
    cache = make_cache("host-a")
    put(cache, key)
    path = cache.lock_path(key)
    files = [debris(path, "host-b", 17, "stale"),
             path.with_name(f".{path.name}.0123456789abcdef"),  # an earlier version's link-method file
             path.with_name(f"{path.name}.stale-0123456789ab")]  # an earlier version's moved-aside lock
    for f in files[1:]:
        f.write_bytes(b"host-b::17::1.0")
    fired(cache.lookup(key))
    assert litter(path) == sorted(f.name for f in files)
    later = time.time() + cache.lock_timeout + 1
    monkeypatch.setattr(locks, "time", types.SimpleNamespace(time=lambda: later))
    fired(cache.lookup(key))
    assert litter(path) == []


def test_files_moved_aside_are_named_after_their_maker(cache, key, clock, monkeypatch):
    """A release renames the lock aside to a name carrying this host and pid, so that if this process
    is killed right then, the next one of this host knows the file is a dead process's."""
    renamed: list[Path] = []
    real_rename = os.rename

    def spy(src, dst):
        renamed.append(Path(dst))
        return real_rename(src, dst)

    lock = fired(cache.lock(key))
    monkeypatch.setattr(locks.os, "rename", spy)
    fired(cache.unlock(lock))
    assert len(renamed) == 1
    m = locks._DEBRIS.match(renamed[0].name)
    assert m is not None and m["lock"] == lock.path.name
    assert f"{m['host']}-{m['pid']}" == debris_tag("host-a", os.getpid())


def test_excl_lock_file_is_never_seen_empty(cache, key, monkeypatch):
    """lock_method excl: when the content is written, the lock name does not exist yet (on a filesystem
    with O_TMPFILE), so a process killed between creating the lock and writing it leaves no empty lock
    file (which the next run could only take over after EMPTY_GRACE)."""
    if not getattr(os, "O_TMPFILE", 0):
        pytest.skip("no O_TMPFILE on this system")
    path = cache.lock_path(key)
    seen: list[bool] = []
    real_write = os.write

    def spy(fd, data):
        if b"::" in bytes(data):
            seen.append(os.path.lexists(path))
        return real_write(fd, data)

    monkeypatch.setattr(locks.os, "write", spy)
    lock = fired(cache.lock(key))
    monkeypatch.setattr(locks.os, "write", real_write)
    assert seen == [False]
    assert path.read_bytes() == lock.holder.render().encode() and os.stat(path).st_nlink == 1
    fired(cache.unlock(lock))
    assert litter(path) == []


def test_excl_falls_back_to_o_excl_without_o_tmpfile(make_cache, key, clock, monkeypatch):
    """Where there is no O_TMPFILE (NFS, other systems), excl is O_EXCL then the write, as before:
    one holder at a time, and a dead holder's lock is taken over."""
    monkeypatch.setattr(locks, "_O_TMPFILE", 0)
    a, b = make_cache("host-a"), make_cache("host-b")
    lock = fired(a.lock(key))
    assert fired(a.locks.check(lock))
    failure_of(b.lock(key, timeout=0), LockTimeoutError)
    assert litter(lock.path) == [lock.path.name]
    fired(a.unlock(lock))
    write_lock(a.lock_path(key), holder("host-a", dead_pid()), clock.seconds())
    again = fired(a.lock(key, timeout=0))
    assert again.active
    fired(a.unlock(again))
    assert litter(again.path) == []


def test_prune_and_clear_sweep_temporary_files_left_without_a_lock_file(cache, key, clock):
    """Killed after creating the link method's content file and before linking it (no lock file): no
    deploy of that entry may come again, so prune, clear and the reaper's rounds sweep it."""
    put(cache, key)
    path = cache.lock_path(key)
    pid = dead_pid()
    files = [debris(path, "host-a", pid, "tmp"), debris(path, "host-a", pid, "stale")]
    report = fired(cache.prune())
    assert report.removed == [] and not any(f.exists() for f in files)
    debris(path, "host-a", pid, "tmp")
    fired(cache.clear())
    assert not path.parent.exists() or litter(path) == []


def test_debris_lock_name():
    """Which lock file a temporary file belongs to, in this naming and an earlier one's."""
    assert locks.debris_lock_name(".1.0.lock.0123abcd-17.00112233aabb.tmp") == "1.0.lock"
    assert locks.debris_lock_name(".1.0~packed.lock.0123abcd-17.00112233aabb.stale") == "1.0~packed.lock"
    assert locks.debris_lock_name(".1.0.lock.0123456789abcdef") == "1.0.lock"
    assert locks.debris_lock_name("1.0.lock.stale-0123456789ab") == "1.0.lock"
    assert locks.debris_lock_name("1.0.tar.gz") is None and locks.debris_lock_name(".entry") is None


def test_temporary_files_of_a_live_pid_go_once_older_than_lock_timeout(make_cache, key, clock, monkeypatch):
    """A temporary file lives microseconds in a live process: one of a live pid (reused by another
    process since) older than lock_timeout is debris too. Our own pid's recent ones stay."""
    cache = make_cache("host-a")
    put(cache, key)
    path = cache.lock_path(key)
    reused = debris(path, "host-a", os.getppid(), "stale")
    ours = debris(path, "host-a", os.getpid(), "tmp")
    fired(cache.lookup(key))
    assert reused.exists() and ours.exists()
    later = time.time() + cache.lock_timeout + 1
    monkeypatch.setattr(locks, "time", types.SimpleNamespace(time=lambda: later))
    fired(cache.lookup(key))
    assert litter(path) == []
