"""The reaper's policy, link records and rounds, on a real cache folder (task.Clock, synchronous pool)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task

from ion.core.exceptions import ConfigurationError
from ion.services.cache.core import Cache
from ion.services.cache.entry import EntryKey
from ion.services.cache.reaper import (
    LINKS_DIR,
    STATE_FILE,
    CacheReaper,
    ReapPolicy,
    links_folder,
    live_links,
    record_link,
)
from ion.services.deploy.place import place

from .conftest import fired, put

HOUR = 3600.0


def version(key: EntryKey, v: str) -> EntryKey:
    return EntryKey(key.repo_id, key.platform, key.name, v, key.unpack)


def sized(n: int) -> dict[str, bytes]:
    return {"data.bin": b"x" * n}


def reaper(cache: Cache, clock: task.Clock, events: list[Any] | None = None, **policy: Any) -> CacheReaper:
    policy.setdefault("min_idle", 0.0)
    return CacheReaper(cache, ReapPolicy(**policy), name="reaper-1", clock=clock,
                       publish=(lambda key, content: events.append((key, content))) if events is not None else None)


def keys_of(cache: Cache) -> set[str]:
    return {e.key.version for e in fired(cache.list())}


# -- policy ---------------------------------------------------------------------------------------------
def test_max_age_evicts_entries_unused_for_longer(cache: Cache, key: EntryKey, clock: task.Clock) -> None:
    """reap_max_age: what was not used for that long goes; what was used since stays."""
    for v in ("1", "2"):
        put(cache, version(key, v))
    clock.advance(2 * HOUR)
    fired(cache.lookup(version(key, "2")))
    report = fired(reaper(cache, clock, max_age=HOUR).run())
    assert [e.key.version for e in report.pruned.removed] == ["1"]
    assert keys_of(cache) == {"2"}
    assert report.entries == 2 and report.error is None


def test_keep_n_versions_per_dependency(cache: Cache, key: EntryKey, clock: task.Clock) -> None:
    """reap_keep: the N most recently used versions of each dependency stay."""
    for v in ("1", "2", "3"):
        put(cache, version(key, v))
        clock.advance(10)
    other = EntryKey(key.repo_id, key.platform, "other", "1")
    put(cache, other)
    fired(reaper(cache, clock, keep=1).run())
    assert keys_of(cache) == {"3", "1"}  # tool 3, and other's only version
    assert {e.key.name for e in fired(cache.list())} == {"tool", "other"}


def test_max_bytes_evicts_least_recently_used_first(cache: Cache, key: EntryKey, clock: task.Clock) -> None:
    """reap_max_bytes: the oldest go until the cache fits."""
    for v in ("1", "2", "3", "4"):
        put(cache, version(key, v), sized(1000))
        clock.advance(10)
    fired(cache.lookup(version(key, "1")))  # now the most recently used
    report = fired(reaper(cache, clock, max_bytes=2500).run())
    assert [e.key.version for e in report.pruned.removed] == ["2", "3"]
    assert keys_of(cache) == {"1", "4"}
    assert report.bytes_before == 4000 and report.pruned.bytes_freed == 2000


def test_min_idle_protects_recently_used_entries(cache: Cache, key: EntryKey, clock: task.Clock) -> None:
    """An entry used within reap_min_idle is never evicted, whatever the policy."""
    for v in ("1", "2"):
        put(cache, version(key, v))
    clock.advance(100)
    fired(reaper(cache, clock, keep=0, max_bytes=0, min_idle=600).run())
    assert keys_of(cache) == {"1", "2"}
    clock.advance(600)
    fired(reaper(cache, clock, keep=0, min_idle=600).run())
    assert keys_of(cache) == set()


def test_locked_entry_is_never_evicted(make_cache: Callable[..., Cache], key: EntryKey, clock: task.Clock) -> None:
    """An entry another host holds the lock of stays (reported busy)."""
    a, b = make_cache("host-a"), make_cache("host-b")
    for v in ("1", "2"):
        put(a, version(key, v))
    fired(b.lock(version(key, "1")))
    report = fired(reaper(a, clock, keep=0).run())
    assert [k.version for k in report.pruned.busy] == ["1"]
    assert keys_of(a) == {"1"}


def test_policy_from_config() -> None:
    """reap_* keys: numbers >= 0; reap_interval 0 turns rounds off; a bad value names its key."""
    config = {"reap_interval": 0, "reap_max_age": 86400, "reap_keep": 3, "reap_max_bytes": 10 ** 9}
    policy = ReapPolicy.from_config(lambda k, d: config.get(k, d))
    assert (policy.interval, policy.max_age, policy.keep, policy.max_bytes) == (None, 86400.0, 3, 10 ** 9)
    assert (policy.min_idle, policy.link_ttl, policy.tick) == (600.0, 7 * 86400.0, 5.0)
    for bad_key, bad in (("reap_keep", 1.5), ("reap_max_age", -1), ("reap_min_idle", "10"), ("reap_tick", 0),
                         ("reap_max_bytes", True)):
        with pytest.raises(ConfigurationError, match=bad_key):
            ReapPolicy.from_config(lambda k, d, bk=bad_key, b=bad: b if k == bk else d)


# -- links ------------------------------------------------------------------------------------------------
def _deploy(cache: Cache, key: EntryKey, dest: Path, *, link: bool = True) -> None:
    info = fired(cache.lookup(key))
    place(info.path, info.content_names(), dest, link=link, platform=key.platform, name=key.name,
          version=key.version, entry_stamp="s")


def test_a_linked_entry_stays_until_its_links_are_gone(cache: Cache, key: EntryKey, clock: task.Clock,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Placing by symlink records the destination; the reaper keeps the entry while the link is
    there, and once it is gone removes the dead record and then the entry."""
    monkeypatch.setenv("ION_HOST_ID", "host-a")
    put(cache, key)
    dest = tmp_path / "app"
    _deploy(cache, key, dest)
    entry = cache.entry_path(key)
    assert (dest / "bin").is_symlink()
    assert len(os.listdir(links_folder(entry))) == 1
    clock.advance(HOUR)
    report = fired(reaper(cache, clock, keep=0).run())
    assert report.linked == 1 and not report.pruned.removed and keys_of(cache) == {key.version}
    (dest / "bin").unlink()
    report = fired(reaper(cache, clock, keep=0).run())
    assert [e.key for e in report.pruned.removed] == [key]
    assert not links_folder(entry).exists() and not (entry.parent / LINKS_DIR).exists()


def test_a_copied_destination_records_no_link(cache: Cache, key: EntryKey, clock: task.Clock,
                                               tmp_path: Path) -> None:
    """link: false copies: nothing points into the cache, nothing is recorded."""
    put(cache, key)
    _deploy(cache, key, tmp_path / "app", link=False)
    assert not links_folder(cache.entry_path(key)).exists()


def test_another_hosts_link_record_protects_until_its_ttl(cache: Cache, key: EntryKey, clock: task.Clock,
                                                          tmp_path: Path) -> None:
    """A record of another host (whose disk this one cannot see) counts until reap_link_ttl."""
    put(cache, key)
    entry = cache.entry_path(key)
    record_link(entry, Path("/elsewhere/app"), host_id="host-b", now=clock.seconds())
    clock.advance(2 * HOUR)
    fired(reaper(cache, clock, keep=0, link_ttl=3 * HOUR).run())
    assert keys_of(cache) == {key.version}
    clock.advance(2 * HOUR)
    fired(reaper(cache, clock, keep=0, link_ttl=3 * HOUR).run())
    assert keys_of(cache) == set()


def test_record_link_refreshes_and_bad_records_protect_nothing(tmp_path: Path) -> None:
    """A second record of the same link is the same file (its mtime refreshed after an hour);
    an unreadable record is dropped."""
    entry = tmp_path / "repo.file" / "linux" / "tool" / "1.0"
    entry.mkdir(parents=True)
    first = record_link(entry, Path("/x/app"), host_id="h2", now=1000.0)
    assert record_link(entry, Path("/x/app"), host_id="h2", now=1000.0 + 2 * HOUR) == first
    assert os.stat(first).st_mtime == 1000.0 + 2 * HOUR
    assert json.loads(first.read_text()) == {"destination": "/x/app", "host": "h2", "entry": str(entry)}
    (links_folder(entry) / "junk.json").write_text("{not json")
    assert live_links(entry, "h1", 1000.0 + 2 * HOUR, link_ttl=HOUR) == 1
    assert sorted(os.listdir(links_folder(entry))) == [first.name]


def test_a_link_made_after_the_scan_is_seen_under_the_lock(cache: Cache, key: EntryKey, clock: task.Clock,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reaper checks the records again under the entry's lock, just before it removes it."""
    monkeypatch.setenv("ION_HOST_ID", "host-a")
    put(cache, key)
    clock.advance(HOUR)
    reap = reaper(cache, clock, keep=0)
    real_lock = cache.lock

    def lock_then_link(k: EntryKey, **kw: Any) -> Any:
        _deploy_links_only(cache, k, tmp_path / "late")
        return real_lock(k, **kw)

    monkeypatch.setattr(cache, "lock", lock_then_link)
    report = fired(reap.run())
    assert not report.pruned.removed and keys_of(cache) == {key.version}


def _deploy_links_only(cache: Cache, key: EntryKey, dest: Path) -> None:
    entry = cache.entry_path(key)
    dest.mkdir(parents=True, exist_ok=True)
    record_link(entry, dest)
    os.symlink(entry / "bin", dest / "bin")


# -- rounds -----------------------------------------------------------------------------------------------
def test_rounds_are_due_by_interval_across_reapers(cache: Cache, key: EntryKey, clock: task.Clock) -> None:
    """A tick runs a round when the last one of any reaper of this cache is reap_interval old;
    the report is kept in the cache root, and published as a cache.reap event."""
    events: list[Any] = []
    first = reaper(cache, clock, events, interval=HOUR)
    report = fired(first.tick())
    assert report is not None and first.rounds == 1
    assert fired(first.tick()) is None  # not due yet
    second = reaper(cache, clock, interval=HOUR)  # another instance, e.g. after a takeover
    clock.advance(HOUR / 2)
    assert fired(second.tick()) is None
    clock.advance(HOUR / 2)
    assert fired(second.tick()) is not None and second.rounds == 1
    state = json.loads((cache.root / STATE_FILE).read_text())
    assert state["reaper"] == "reaper-1" and state["started"] == clock.seconds() and "running" not in state
    assert fired(first.last_report()).started == clock.seconds()
    assert [k for k, _ in events] == ["cache.reap"] and events[0][1]["entries"] == 0


def test_no_interval_means_no_rounds(cache: Cache, clock: task.Clock) -> None:
    """reap_interval 0/None: ticks never run a round (run() still does, on request)."""
    quiet = reaper(cache, clock, interval=None)
    assert fired(quiet.tick()) is None and quiet.rounds == 0
    assert fired(quiet.run()).error is None and quiet.rounds == 1


def test_housekeeping_without_a_policy(cache: Cache, key: EntryKey, clock: task.Clock) -> None:
    """With no eviction policy a round still removes incomplete entries and keeps complete ones."""
    put(cache, key)
    incomplete = cache.entry_path(version(key, "9"))
    incomplete.mkdir(parents=True)
    report = fired(reaper(cache, clock).run())
    assert report.pruned.incomplete == [incomplete] and not incomplete.exists()
    assert keys_of(cache) == {key.version}
