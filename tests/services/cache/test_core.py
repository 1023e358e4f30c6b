"""The Cache core: keys, staging, atomic publish, lookup, verify/repair, prune, clear."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from ion.services.cache import core, store
from ion.services.cache.core import Cache
from ion.services.cache.entry import ENTRY_FILE, EntryInfo, EntryKey, FileMeta, repo_id
from ion.services.cache.errors import (
    CorruptEntryError,
    EntryNotFoundError,
    InvalidKeyError,
    OutsideCacheError,
)

from .conftest import failure_of, fired, messages, put, stage, write_lock


def version(key: EntryKey, v: str, unpack: bool = True) -> EntryKey:
    return EntryKey(key.repo_id, key.platform, key.name, v, unpack)


# -- hashing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_sha256_file_hashes_every_size_whatever_its_buffer(tmp_path: Path, size: int) -> None:
    """sha256_file reads into a buffer of at most the file's size and a byte, at most ``chunk``:
    files smaller, equal to and larger than a chunk (4096 here), empty ones, all hash whole."""
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert store.sha256_file(tmp_path / "f", 4096) == hashlib.sha256(data).hexdigest()
    assert store.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


# -- keys ---------------------------------------------------------------------------------------------
def test_repo_ids():
    """repo_id: <bucket>.s3, <host>.http(s), <path-hash>.file, plus a hash of a URL prefix."""
    assert repo_id("s3://my-bucket") == "my-bucket.s3"
    assert repo_id("s3://my-bucket/") == "my-bucket.s3"
    a, b = repo_id("s3://my-bucket/team/a"), repo_id("s3://my-bucket/team/b")
    assert a.startswith("my-bucket~") and a.endswith(".s3") and a != b
    assert repo_id("https://example.com") == "example.com.https"
    assert repo_id("http://user:secret@example.com:8080/deps").startswith("example.com_8080~")
    assert "secret" not in repo_id("http://user:secret@example.com:8080/deps")
    assert repo_id("file:///srv/repo").endswith(".file")
    assert repo_id("file:///srv/repo") == repo_id("file:///srv/repo/") != repo_id("file:///srv/other")
    for bad in ["ftp://x/y", "s3://", "http:///path", "file://otherhost/x"]:
        with pytest.raises(InvalidKeyError):
            repo_id(bad)
    for url in ["s3://b/p", "https://h/p", "file:///p"]:
        EntryKey(repo_id(url), "linux", "n", "1")  # every repo id makes a valid key


def test_entry_key_validation():
    """Keys whose parts cannot name a folder, or would collide with the layout, are refused."""
    EntryKey("r.file", "linux", "name", "1.0~rc1")
    for args in [("r", "p", "n", "1"), ("r.file", "", "n", "1"), ("r.file", "p", "..", "1"),
                 ("r.file", "p", "a/b", "1"), ("r.file", "p", "n", "1~packed"), ("r.file", "p", "n", "1.lock"),
                 ("r.file", "p", "n", ".entry"), ("staging", "p", "n", "1")]:
        with pytest.raises(InvalidKeyError):
            EntryKey(*args)
    with pytest.raises(InvalidKeyError):
        EntryKey("r.file", "p", "n", "1", "false")  # type: ignore[arg-type]
    key = EntryKey.from_wire({"url": "s3://b", "platform": "p", "name": "n", "version": "1", "unpack": False})
    assert key == EntryKey("b.s3", "p", "n", "1", False) and EntryKey.from_wire(key.to_wire()) == key


def test_entry_file_round_trip_with_odd_names(cache, key):
    """.entry records every file (odd names included) and reads back identical."""
    files = {"a b.txt": b"1", "100%/x[1].bin": b"22", "ünï/çödé": b"333", "new\nline": b"4", "d/.hidden": b"5"}
    info = put(cache, key, files)
    again = fired(cache.info(key))
    assert again.files == info.files and set(again.files) == set(files)
    assert again.content_names() == sorted({"a b.txt", "100%", "ünï", "new\nline", "d"})


# -- staging and publish -------------------------------------------------------------------------------
def test_two_staging_folders_never_collide(cache, key):
    """Two fetches of archives with the same name get their own staging folders and entries."""
    other = version(key, "2.0")
    s1, m1 = stage(cache, {"pkg.tgz": b"first"})
    s2, m2 = stage(cache, {"pkg.tgz": b"second!"})
    assert s1 != s2 and s1.parent == s2.parent == cache.staging_root
    l1, l2 = fired(cache.lock(key)), fired(cache.lock(other))
    fired(cache.publish(key, s1, m1, lock=l1))
    fired(cache.publish(other, s2, m2, lock=l2))
    assert (cache.entry_path(key) / "pkg.tgz").read_bytes() == b"first"
    assert (cache.entry_path(other) / "pkg.tgz").read_bytes() == b"second!"


def test_unpack_true_and_false_are_two_entries(cache, key):
    """unpack:true and unpack:false of one version are separate entries with separate locks."""
    packed = version(key, key.version, unpack=False)
    put(cache, key, {"bin/tool": b"unpacked"})
    assert fired(cache.lookup(packed)) is None
    put(cache, packed, {"tool.tgz": b"archive"})
    assert cache.entry_path(packed).name == "1.0~packed"
    assert set(fired(cache.lookup(key)).files) == {"bin/tool"}
    assert set(fired(cache.lookup(packed)).files) == {"tool.tgz"}
    assert cache.lock_path(key) != cache.lock_path(packed)


def test_entry_without_entry_file_is_not_served(cache, key):
    """A folder without .entry is incomplete: lookup gives None, info says incomplete, list skips it."""
    path = cache.entry_path(key)
    path.mkdir(parents=True)
    (path / "bin").mkdir()
    (path / "bin" / "tool").write_bytes(b"half")
    assert fired(cache.lookup(key)) is None
    err = failure_of(cache.info(key), EntryNotFoundError)
    assert "incomplete" in str(err) and str(path) in str(err) and err.code == 404
    assert fired(cache.list()) == []
    info = put(cache, key, {"bin/tool": b"whole"})
    assert (info.path / "bin" / "tool").read_bytes() == b"whole"


def test_crash_between_rename_and_entry_file_is_not_served(cache, key, monkeypatch):
    """If publish dies after the content is in place but before .entry, the entry is not served."""

    def crash(*args, **kwargs):
        raise OSError("power cut")

    lock = fired(cache.lock(key))
    staging, metas = stage(cache, {"bin/tool": b"new"})
    with monkeypatch.context() as m:
        m.setattr(store, "write_entry_file", crash)
        failure_of(cache.publish(key, staging, metas), OSError)
    assert (cache.entry_path(key) / "bin" / "tool").exists()  # content renamed in ...
    assert not (cache.entry_path(key) / ENTRY_FILE).exists()  # ... .entry never written
    assert fired(cache.lookup(key)) is None
    staging, metas = stage(cache, {"bin/tool": b"again"})
    fired(cache.publish(key, staging, metas))
    fired(cache.unlock(lock))
    assert (fired(cache.lookup(key)).path / "bin" / "tool").read_bytes() == b"again"


def test_entry_file_is_written_after_the_content(cache, key, monkeypatch):
    """When .entry is written, every file of the entry is already at its final path."""
    seen = []
    real = store.write_entry_file

    def spy(path, info, now):
        seen.append(sorted(p.name for p in path.rglob("*")))
        assert not (path / ENTRY_FILE).exists()
        real(path, info, now)

    monkeypatch.setattr(store, "write_entry_file", spy)
    put(cache, key, {"a": b"1", "d/b": b"2"})
    assert seen == [["a", "b", "d"]]


def test_publish_refuses_content_that_does_not_match(cache, key):
    """publish refuses (and publishes nothing) when the staged tree and the file list disagree."""
    lock = fired(cache.lock(key))
    cases = [
        ({"a": b"1", "extra": b"2"}, lambda m: m.pop("extra"), "extra"),
        ({"a": b"1"}, lambda m: m.__setitem__("a", FileMeta(5, None, m["a"].sha256)), "size"),
        ({"a": b"1"}, lambda m: m.__setitem__("gone", FileMeta(1, None, "0" * 64)), "gone"),
        ({".entry": b"fake"}, lambda m: m.pop(".entry"), ".entry"),
    ]
    for files, spoil, word in cases:
        staging = fired(cache.new_staging())
        metas = {}
        for rel, data in files.items():
            (staging / rel).write_bytes(data)
            metas[rel] = FileMeta(len(data), None, core.sha256_file(staging / rel))
        spoil(metas)
        err = failure_of(cache.publish(key, staging, metas), CorruptEntryError)
        assert word in str(err) and str(key) in str(err)
    staging = fired(cache.new_staging())
    os.symlink("/etc/passwd", staging / "out")
    assert "points out" in str(failure_of(cache.publish(key, staging, {}), CorruptEntryError))
    with pytest.raises(InvalidKeyError):
        FileMeta(1, None, "not-a-hash")
    failure_of(cache.publish(key, staging, {"../x": {"size": 1, "sha256": "0" * 64}}), InvalidKeyError)
    failure_of(cache.publish(key, "/tmp", {}), OutsideCacheError)
    failure_of(cache.publish(key, cache.staging_root / ".." / "x", {}), OutsideCacheError)
    fired(cache.unlock(lock))
    assert fired(cache.lookup(key)) is None


def test_publish_keeps_internal_symlinks(cache, key):
    """A symlink inside the entry is recorded and served; verify notices if it is changed."""
    lock = fired(cache.lock(key))
    staging, metas = stage(cache, {"lib/libx.so.1": b"elf"})
    os.symlink("libx.so.1", staging / "lib" / "libx.so")
    info = fired(cache.publish(key, staging, metas))
    fired(cache.unlock(lock))
    assert info.links == {"lib/libx.so": "libx.so.1"}
    assert fired(cache.verify(key))[0].good
    link = info.path / "lib" / "libx.so"
    link.unlink()
    os.symlink("/etc/passwd", link)
    assert fired(cache.lookup(key)) is None
    assert "symlink" in fired(cache.verify(key))[0].problems["lib/libx.so"]


def test_publish_replaces_an_existing_entry(cache, key):
    """Publishing over a complete entry (keep_updated) replaces it whole; no old file stays."""
    put(cache, key, {"old": b"1", "same": b"a"})
    put(cache, key, {"new": b"2", "same": b"b"})
    info = fired(cache.lookup(key))
    assert set(info.files) == {"new", "same"}
    assert sorted(p.name for p in info.path.iterdir()) == [ENTRY_FILE, "new", "same"]
    assert [p for p in cache.staging_root.iterdir()] == []


def test_lookup_records_use_and_checks_sizes(cache, key, clock, log_events):
    """lookup records last use, and a truncated file makes the entry unserved (and logged)."""
    put(cache, key, {"f": b"12345"})
    clock.advance(100)
    info = fired(cache.lookup(key))
    assert info.last_used == clock.seconds() == os.stat(info.path / ENTRY_FILE).st_mtime
    (info.path / "f").write_bytes(b"12")
    assert fired(cache.lookup(key)) is None
    assert any("not serving" in m and "size 2, expected 5" in m for m in messages(log_events))


def test_lookup_rehashes_a_file_written_since_it_was_published(cache, key, clock, log_events):
    """A file written after publish (e.g. edited through a deployed link: same size, one byte flipped)
    is re-hashed by lookup and the entry is not served; a file only touched, content unchanged, is."""
    info = put(cache, key, {"f": b"12345", "g": b"same"})
    assert info.content_mtime_ns is not None
    assert fired(cache.info(key)).content_mtime_ns == info.content_mtime_ns  # kept in .entry
    later = info.content_mtime_ns + 5_000_000_000
    os.utime(info.path / "g", ns=(later, later))  # touched, same bytes
    assert fired(cache.lookup(key)) is not None
    (info.path / "f").write_bytes(b"12346")
    os.utime(info.path / "f", ns=(later, later))
    assert fired(cache.lookup(key)) is None
    assert any("f: changed since it was published" in m for m in messages(log_events))


def test_an_entry_file_without_content_mtime_still_serves(cache, key):
    """.entry files written before content_mtime_ns existed parse and serve (sizes checked only)."""
    info = put(cache, key, {"f": b"1"})
    text = (info.path / ENTRY_FILE).read_text()
    (info.path / ENTRY_FILE).write_text("\n".join(line for line in text.splitlines()
                                                  if not line.startswith("content_mtime_ns")) + "\n")
    served = fired(cache.lookup(key))
    assert served is not None and served.content_mtime_ns is None


def test_corrupt_entry_file(cache, key):
    """An unreadable .entry: lookup gives None, info raises CorruptEntryError naming the file."""
    info = put(cache, key, {"f": b"1"})
    (info.path / ENTRY_FILE).write_text("[entry]\nname = other\n")
    assert fired(cache.lookup(key)) is None
    err = failure_of(cache.info(key), CorruptEntryError)
    assert str(info.path / ENTRY_FILE) in str(err)


def test_discard_staging(cache):
    """discard_staging removes a staging folder, and only one."""
    staging, _ = stage(cache, {"x": b"1"})
    fired(cache.discard_staging(staging))
    assert not staging.exists()
    failure_of(cache.discard_staging(cache.root), OutsideCacheError)


# -- verify and repair -----------------------------------------------------------------------------------
def test_verify_detects_a_flipped_byte_and_repair_quarantines(cache, key):
    """verify finds a same-size flipped byte; repair makes the entry incomplete so it is refetched."""
    other = version(key, "2.0")
    put(cache, key, {"bin/tool": b"abcdef", "README": b"ok"})
    put(cache, other)
    path = cache.entry_path(key) / "bin" / "tool"
    st = os.stat(path)
    path.write_bytes(b"abcdeX")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot: same size, same mtime
    assert fired(cache.lookup(key)) is not None  # the cheap check cannot see it
    reports = {r.key: r for r in fired(cache.verify())}
    assert reports[other].good
    bad = reports[key]
    assert bad.status == "bad" and list(bad.problems) == ["bin/tool"] and "sha256" in bad.problems["bin/tool"]
    assert fired(cache.lookup(key, verify=True)) is None
    repaired = {r.key: r for r in fired(cache.repair())}
    assert repaired[other].action == "kept"
    assert repaired[key].action == "quarantined"
    moved = repaired[key].moved_to
    assert moved is not None and (moved / "bin" / "tool").read_bytes() == b"abcdeX"
    assert not (moved / ENTRY_FILE).exists()
    assert fired(cache.lookup(key)) is None and not cache.entry_path(key).exists()
    put(cache, key, {"bin/tool": b"abcdef", "README": b"ok"})
    assert fired(cache.verify(key))[0].good


def test_verify_detects_added_and_missing_files(cache, key):
    """Files added to or removed from an entry make it bad."""
    info = put(cache, key, {"a": b"1", "b": b"2"})
    (info.path / "b").unlink()
    (info.path / "planted").write_bytes(b"evil")
    report = fired(cache.verify(key))[0]
    assert report.problems == {"b": "missing", "planted": "unexpected file"}


def test_verify_unknown_entry_is_404(cache, key):
    """verify of a key without an entry folder raises EntryNotFoundError."""
    assert failure_of(cache.verify(key), EntryNotFoundError).code == 404


def test_repair_leaves_a_locked_entry_alone(make_cache, key):
    """repair does not touch a bad entry whose lock another host holds: its fetch replaces it."""
    a, b = make_cache("host-a"), make_cache("host-b")
    info = put(a, key, {"f": b"abc"})
    (info.path / "f").write_bytes(b"abX")
    fired(b.lock(key))
    report = fired(a.repair(key))[0]
    assert report.status == "bad" and report.action == "busy"
    assert (info.path / ENTRY_FILE).exists()


def test_repair_removes_incomplete_entries(cache, key):
    """repair removes an incomplete entry folder."""
    cache.entry_path(key).mkdir(parents=True)
    report = fired(cache.repair())[0]
    assert report.status == "incomplete" and report.action == "removed"
    assert not cache.entry_path(key).exists()


# -- prune and clear ----------------------------------------------------------------------------------------
def test_prune_older_than(cache, key, clock):
    """prune(older_than) removes entries not used for that long, keeps the others."""
    old, recent = version(key, "1.0"), version(key, "2.0")
    put(cache, old)
    put(cache, recent)
    clock.advance(1000)
    fired(cache.lookup(recent))
    clock.advance(100)
    report = fired(cache.prune(older_than=500))
    assert [e.key for e in report.removed] == [old] and report.bytes_freed > 0
    assert fired(cache.lookup(old)) is None and fired(cache.lookup(recent)) is not None
    assert not cache.entry_path(old).exists()


def test_prune_keeps_n_per_dependency(cache, key, clock):
    """prune(keep=2) keeps the two most recently used versions of each dependency."""
    versions = [version(key, v) for v in ("1", "2", "3", "4")]
    lone = EntryKey(key.repo_id, key.platform, "other", "1")
    for k in versions + [lone]:
        put(cache, k)
        clock.advance(10)
    fired(cache.lookup(versions[0]))  # used last: kept although it is the oldest version
    report = fired(cache.prune(keep=2))
    assert {e.key for e in report.removed} == {versions[1], versions[2]}
    assert {e.key for e in fired(cache.list())} == {versions[0], versions[3], lone}


def test_prune_never_removes_a_locked_entry(make_cache, key):
    """An entry whose lock is held (here or by another host) survives prune and stays served."""
    a, b = make_cache("host-a"), make_cache("host-b")
    mine, theirs, free = version(key, "1"), version(key, "2"), version(key, "3")
    for k in (mine, theirs, free):
        put(a, k)
    fired(a.lock(mine))
    fired(b.lock(theirs))
    report = fired(a.prune(keep=0))
    assert [e.key for e in report.removed] == [free]
    assert set(report.busy) == {mine, theirs}
    assert fired(a.lookup(mine)) is not None and fired(a.lookup(theirs)) is not None


def test_prune_arguments_are_checked(cache):
    """prune refuses a negative age or keep."""
    failure_of(cache.prune(older_than=-1), InvalidKeyError)
    failure_of(cache.prune(keep=-1), InvalidKeyError)


def test_clear_keeps_held_locks(make_cache, key, clock):
    """clear removes every entry but those whose lock is held; held lock files stay, stale ones go."""
    a = make_cache("host-a")
    held, free, stale = version(key, "1"), version(key, "2"), version(key, "3")
    for k in (held, free, stale):
        put(a, k)
    lock = fired(a.lock(held))
    write_lock(a.lock_path(stale), b"host-x::1::1.0", clock.seconds() - 1000)  # taken over, entry removed
    leftover = a.lock_path(version(key, "9"))  # a lock without an entry, left by a dead host
    write_lock(leftover, b"host-y::1::1.0", clock.seconds() - 1000)
    report = fired(a.clear())
    assert {e.key for e in report.removed} == {free, stale}
    assert report.busy == [held] and report.locks == [leftover]
    assert lock.path.exists() and lock.active
    assert fired(a.lookup(held)) is not None
    fired(a.unlock(lock))
    assert not lock.path.exists()


def test_cleanup_of_abandoned_staging(cache, clock, make_cache):
    """Staging folders of dead local pids or silent other hosts go; live ones stay."""
    mine = fired(cache.new_staging())
    other_host = make_cache("host-b")
    fresh_remote = fired(other_host.new_staging())
    old_remote = fired(other_host.new_staging())
    (old_remote / "big.part").write_bytes(b"x")
    for p in (old_remote, old_remote / "big.part"):
        os.utime(p, (clock.seconds() - 61, clock.seconds() - 61))
    for p in (fresh_remote,):
        os.utime(p, (clock.seconds(), clock.seconds()))
    proc = __import__("subprocess").Popen(["true"])
    proc.wait()
    dead = cache.staging_root / f"{cache._host_tag}-{proc.pid}-{int(time.time() * 1000)}-abcd"
    dead.mkdir()
    earlier_me = cache.staging_root / f"{cache._host_tag}-{os.getpid()}-1000-abcd"
    earlier_me.mkdir()
    other_cache_here = make_cache("host-a")  # another Cache of this process: its folder is not abandoned
    theirs = fired(other_cache_here.new_staging())
    removed = set(fired(cache.cleanup_staging()))
    assert removed == {old_remote, dead, earlier_me}
    assert mine.exists() and fresh_remote.exists() and theirs.exists()


def test_cache_root_layout(cache, key, root: Path):
    """The entry lives at <root>/<repo-id>/<platform>/<name>/<version>[~packed]/."""
    info = put(cache, key)
    assert info.path == root / "repo.file" / "linux" / "tool" / "1.0"
    assert (info.path / ENTRY_FILE).read_text().count("[entry]") == 1
    assert isinstance(info, EntryInfo) and info.size == len(b"#!/bin/sh\necho tool\n")


def test_real_cache_defaults(tmp_path, monkeypatch):
    """A Cache made with defaults resolves its host id and root, and never uses the hostname."""
    monkeypatch.setenv("ION_HOST_ID", "from-env")
    monkeypatch.setenv("ION_CACHE_DIR", str(tmp_path / "c"))
    c = Cache(core.default_root())
    assert c.host_id == "from-env" and c.root == tmp_path / "c"
    assert c.locks.lock_timeout == 600 and c.locks.wait_timeout == 1200 and c.locks.refresh_interval == 150


def test_publish_over_an_empty_folder_or_an_incomplete_entry(cache, key):
    """Publish is one rename where nothing is there; an empty folder at the entry's path is replaced by it
    as well, and an incomplete entry (no .entry) is moved aside first, then removed: the staging folder
    is gone either way and no old file stays."""
    path = cache.entry_path(key)
    path.mkdir(parents=True)
    put(cache, key, {"a": b"1"})
    assert sorted(p.name for p in path.iterdir()) == [ENTRY_FILE, "a"]
    (path / ENTRY_FILE).unlink()  # incomplete now
    put(cache, key, {"b": b"2"})
    assert sorted(p.name for p in path.iterdir()) == [ENTRY_FILE, "b"]
    assert set(fired(cache.lookup(key)).files) == {"b"}
    assert list(cache.staging_root.iterdir()) == []


def test_entry_and_lock_paths_are_made_once_per_key_and_forgotten_when_too_many(cache, key, monkeypatch):
    """entry_path/lock_path: the same paths as joined from the key, kept per key (one join per key,
    not per call) and all forgotten once more keys than _PATHS_KEPT were met."""
    monkeypatch.setattr(core, "_PATHS_KEPT", 3)
    want = cache.root.joinpath(*key.relpath.parts)
    assert cache.entry_path(key) == want and cache.lock_path(key) == want.with_name(want.name + ".lock")
    assert cache.entry_path(key) is cache.entry_path(key)
    others = [version(key, f"2.{i}") for i in range(3)]
    for other in others:
        assert cache.entry_path(other) == cache.root.joinpath(*other.relpath.parts)
    assert len(cache._paths) <= 3 and cache.entry_path(key) == want  # made again after the clear
