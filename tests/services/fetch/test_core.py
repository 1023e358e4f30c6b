"""The Fetcher: lookup, lock, download, verify, unpack and publish of one entry, on real repositories and a real cache."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from ion.services.cache.core import Cache
from ion.services.fetch.core import Fetcher, FetchProgress, FetchRequest, entry_is_current, local_unpack
from ion.services.fetch.errors import ChecksumMismatchError, InvalidRequestError, NotFoundError
from ion.services.fetch.repository import FetchConfig
from ion.services.unpack.core import UnpackError

from .conftest import CONTENT, KINDS, tgz


@pytest.fixture
def cache(tmp_path: Path, pool: Any) -> Iterator[Cache]:
    """A cache on a temp root, on the running reactor and the test's pool."""
    c = Cache(tmp_path / "cache", host_id="test-host", pool=pool)
    yield c


@pytest.fixture
def fetcher(cache: Cache, pool: Any) -> Iterator[Fetcher]:
    """A Fetcher over ``cache`` with the unpack core in the pool; retries without delay."""
    f = Fetcher(cache, local_unpack(pool), pool=pool, config=FetchConfig(retry_delay=0.0))
    yield f


def request(url: Any, name: str, version: str, **kwargs: Any) -> FetchRequest:
    return FetchRequest(url, "linux", name, version, **kwargs)


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".entry"}


async def assert_clean(cache: Cache, key: Any) -> None:
    """The entry's lock is free and no staging folder is left."""
    lock = await cache.lock(key, timeout=0)
    await cache.unlock(lock)
    assert not cache.lock_path(key).exists()
    assert not cache.staging_root.exists() or list(cache.staging_root.iterdir()) == []


# -- fetching -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_fetch_unpacks_and_publishes_then_serves_from_cache(kind: str, make_repo: Any, fetcher: Fetcher,
                                                                  cache: Cache) -> None:
    """An archive is downloaded, extracted with the other files kept in their sub-folders; then it is cached."""
    url, _ = make_repo(kind)
    req = request(url, "zlib", "1.1")
    first = await fetcher.fetch(req)
    assert first.state == "downloaded"
    assert tree(first.path) == {
        "docs/README.txt": CONTENT["linux/zlib/1.1/docs/README.txt"],
        "docs/api/index.html": CONTENT["linux/zlib/1.1/docs/api/index.html"],
        "zlib/include/zlib.h": b"/* 1.1 */\n",
        "zlib/lib/libz.a": b"\0" * 300,
    }
    assert first.info.content_names() == ["docs", "zlib"]
    second = await fetcher.fetch(req)
    assert second.state == "cached" and second.path == first.path
    await assert_clean(cache, req.key)
    await fetcher.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_every_file_of_a_version_is_kept(kind: str, make_repo: Any, fetcher: Fetcher) -> None:
    """A version of three plain files keeps all three (Umpire kept only the last)."""
    url, _ = make_repo(kind)
    result = await fetcher.fetch(request(url, "multi", "2.0"))
    assert tree(result.path) == {n: CONTENT[f"linux/multi/2.0/{n}"] for n in ("a.bin", "b.bin", "c.bin")}
    assert result.files == ["a.bin", "b.bin", "c.bin"]
    await fetcher.close()


@pytest_twisted.ensureDeferred
async def test_unpack_false_is_another_entry_keeping_the_archive(make_repo: Any, fetcher: Fetcher) -> None:
    """``unpack: false`` keeps the archive as it is, in an entry of its own."""
    url, _ = make_repo("file")
    packed = await fetcher.fetch(request(url, "zlib", "1.10", unpack=False))
    unpacked = await fetcher.fetch(request(url, "zlib", "1.10"))
    assert packed.state == unpacked.state == "downloaded" and packed.path != unpacked.path
    assert packed.path.name == "1.10~packed"
    assert tree(packed.path) == {"zlib-1.10.tgz": CONTENT["linux/zlib/1.10/zlib-1.10.tgz"]}
    assert tree(unpacked.path) == {"zlib/include/zlib.h": b"/* 1.10 */\n"}


@pytest_twisted.ensureDeferred
async def test_zip_is_extracted_and_plain_file_kept(make_repo: Any, fetcher: Fetcher) -> None:
    """A zip is extracted and a file that is no archive is kept beside it."""
    url, _ = make_repo("http")
    result = await fetcher.fetch(request(url, "tool", "3.0"))
    assert tree(result.path) == {"notes.txt": CONTENT["linux/tool/3.0/notes.txt"],
                                 "tool/README": b"tool\n", "tool/bin/tool": b"#!/bin/sh\necho tool\n"}
    await fetcher.close()


@pytest_twisted.ensureDeferred
async def test_a_file_kept_beside_archives_is_hashed_on_s3(make_repo: Any, fetcher: Fetcher, cache: Cache) -> None:
    """On S3 the download of a file to unpack skips its sha256 (the ETag's md5 checks it); a file that
    turns out to be no archive is kept, and hashed then, so its entry records its true digest."""
    url, _ = make_repo("s3")
    result = await fetcher.fetch(request(url, "tool", "3.0"))
    notes = CONTENT["linux/tool/3.0/notes.txt"]
    assert result.info.files["notes.txt"].sha256 == hashlib.sha256(notes).hexdigest()
    assert result.info.files["notes.txt"].remote_checksum.startswith("md5:")
    assert all(r.good for r in await cache.verify())
    await fetcher.close()


@pytest.mark.parametrize("digests_known", [True, False])
@pytest_twisted.ensureDeferred
async def test_extracted_files_are_hashed_once(digests_known: bool, make_repo: Any, cache: Cache, pool: Any,
                                               monkeypatch: Any) -> None:
    """The local unpack hashes files as it writes them and the entry records those digests
    without reading the tree again; an unpack that names no digests (the Unpack service)
    gets the files hashed from disk. Either way the entry's digests are the files'."""
    from ion.services.fetch import core as fetch_core

    reread: list[str] = []
    real = fetch_core.sha256_file
    monkeypatch.setattr(fetch_core, "sha256_file", lambda path, chunk=1 << 20: reread.append(str(path)) or real(path, chunk))
    unpack = local_unpack(pool)

    def without_digests(archive: Path, target: Path) -> Any:
        return unpack(archive, target).addCallback(lambda files: None if files is None else {})

    fetcher = Fetcher(cache, unpack if digests_known else without_digests, pool=pool,
                      config=FetchConfig(retry_delay=0.0))
    url, _ = make_repo("file")
    got = await fetcher.fetch(request(url, "zlib", "1.1"))
    extracted = {"zlib/include/zlib.h", "zlib/lib/libz.a"}
    hashed = {rel for rel in extracted if any(path.endswith("/" + rel) for path in reread)}  # in staging
    assert (len(reread), hashed) == ((0, set()) if digests_known else (2, extracted))
    assert {rel: meta.sha256 for rel, meta in got.info.files.items()} == {
        rel: hashlib.sha256(data).hexdigest() for rel, data in tree(got.path).items()}
    assert all(r.good for r in await cache.verify())
    await fetcher.close()


@pytest_twisted.ensureDeferred
async def test_progress_reports_each_phase(make_repo: Any, fetcher: Fetcher) -> None:
    """Progress goes through lookup, waiting, listing, downloading (bytes), unpacking, publishing, done."""
    url, _ = make_repo("file")
    events: list[FetchProgress] = []
    await fetcher.fetch(request(url, "zlib", "1.10"), progress=events.append)
    phases = [e.phase for e in events]
    assert phases[:3] == ["lookup", "waiting", "listing"]
    assert phases[-3:] == ["unpacking", "publishing", "done"] and events[-1].state == "downloaded"
    downloading = [e for e in events if e.phase == "downloading"]
    size = len(CONTENT["linux/zlib/1.10/zlib-1.10.tgz"])
    assert downloading[0].done == 0 and downloading[-1].done == size and downloading[-1].total == size
    assert {e.file for e in downloading} == {"zlib-1.10.tgz"}


@pytest_twisted.ensureDeferred
async def test_same_entry_twice_at_once_downloads_once(make_repo: Any, fetcher: Fetcher) -> None:
    """Two fetches of one entry at once: one downloads, the other waits on the lock and gets it cached."""
    url, server = make_repo("http")
    req = request(url, "multi", "2.0")
    a, b = await defer.gatherResults([fetcher.fetch(req), fetcher.fetch(req)])
    assert sorted([a.state, b.state]) == ["cached", "downloaded"] and a.path == b.path
    assert server.count("deps/linux/multi/2.0/a.bin", "GET") == 1
    await fetcher.close()


@pytest_twisted.ensureDeferred
async def test_keep_updated_twice_at_once_downloads_once(make_repo: Any, fetcher: Fetcher) -> None:
    """Two keep_updated fetches of an uncached entry at once: the one that waited on the lock
    finds the entry published and current, and downloads nothing."""
    url, server = make_repo("http")
    req = request(url, "multi", "2.0", keep_updated=True)
    a, b = await defer.gatherResults([fetcher.fetch(req), fetcher.fetch(req)])
    assert sorted([a.state, b.state]) == ["cached", "downloaded"]
    assert server.count("deps/linux/multi/2.0/a.bin", "GET") == 1
    await fetcher.close()


# -- integrity ------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_item_sha256_is_checked(make_repo: Any, fetcher: Fetcher, cache: Cache) -> None:
    """The item's sha256 (one digest, or per file) must match, or nothing is published."""
    url, _ = make_repo("file")
    data = CONTENT["linux/zlib/1.10/zlib-1.10.tgz"]
    ok = await fetcher.fetch(request(url, "zlib", "1.10", unpack=False, sha256=hashlib.sha256(data).hexdigest()))
    assert ok.state == "downloaded"
    bad = request(url, "multi", "2.0", sha256={"b.bin": "0" * 64})
    with pytest.raises(ChecksumMismatchError) as info:
        await fetcher.fetch(bad)
    assert info.value.file == "b.bin" and info.value.got == "sha256:" + hashlib.sha256(b"B" * 2000).hexdigest()
    assert "the item's sha256" in str(info.value)
    assert await cache.lookup(bad.key) is None
    await assert_clean(cache, bad.key)


@pytest_twisted.ensureDeferred
async def test_item_sha256_naming_a_missing_file_or_one_digest_for_many(make_repo: Any, fetcher: Fetcher,
                                                                        cache: Cache) -> None:
    """A sha256 for a file the version lacks, or one digest for several files, is refused before any download."""
    url, _ = make_repo("file")
    with pytest.raises(ChecksumMismatchError, match="not there"):
        await fetcher.fetch(request(url, "multi", "2.0", sha256={"z.bin": "0" * 64}))
    with pytest.raises(InvalidRequestError, match="holds 3 files"):
        await fetcher.fetch(request(url, "multi", "2.0", sha256="0" * 64))
    await assert_clean(cache, request(url, "multi", "2.0").key)


@pytest_twisted.ensureDeferred
async def test_wrong_content_md5_publishes_nothing(make_repo: Any, fetcher: Fetcher, cache: Cache) -> None:
    """An HTTP file whose Content-MD5 does not match fails the fetch; no entry, no lock, no staging left."""
    url, _ = make_repo("http", content_md5={"deps/linux/multi/2.0/c.bin": "AAAAAAAAAAAAAAAAAAAAAA=="})
    req = request(url, "multi", "2.0")
    with pytest.raises(ChecksumMismatchError, match="c.bin"):
        await fetcher.fetch(req)
    assert await cache.lookup(req.key) is None and not cache.entry_path(req.key).exists()
    await assert_clean(cache, req.key)
    await fetcher.close()


@pytest_twisted.ensureDeferred
async def test_s3_wrong_sha256_publishes_nothing(make_repo: Any, fetcher: Fetcher, cache: Cache) -> None:
    """An S3 download that does not match the item's sha256 fails; nothing is published."""
    url, _ = make_repo("s3")
    req = request(url, "zlib", "1.10", sha256="1" * 64)
    with pytest.raises(ChecksumMismatchError):
        await fetcher.fetch(req)
    assert await cache.lookup(req.key) is None
    await assert_clean(cache, req.key)


@pytest_twisted.ensureDeferred
async def test_unsafe_archive_publishes_nothing(make_repo: Any, fetcher: Fetcher, cache: Cache) -> None:
    """An archive with a member escaping the target fails the fetch with the unpack error; nothing published."""
    url, _ = make_repo("file", {"linux/evil/1.0/evil.tgz": tgz({"../../evil": b"x"})})
    req = request(url, "evil", "1.0")
    with pytest.raises(UnpackError):
        await fetcher.fetch(req)
    assert await cache.lookup(req.key) is None
    await assert_clean(cache, req.key)


# -- failures and the lock ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_missing_version_releases_the_lock(kind: str, make_repo: Any, fetcher: Fetcher, cache: Cache) -> None:
    """A version not in the repository fails with NotFoundError naming the URL; the lock is released."""
    url, _ = make_repo(kind)
    req = request(url, "zlib", "1.2")
    with pytest.raises(NotFoundError, match="linux/zlib/1.2/"):
        await fetcher.fetch(req)
    await assert_clean(cache, req.key)
    await fetcher.close()


@pytest_twisted.ensureDeferred
async def test_cancel_releases_the_lock_and_staging(make_repo: Any, cache: Cache, pool: Any) -> None:
    """A fetch cancelled while unpacking releases the lock and removes its staging folders."""
    url, _ = make_repo("file")
    started: defer.Deferred[None] = defer.Deferred()
    pending: list[defer.Deferred[bool]] = []

    def stuck_unpack(archive: Path, target: Path) -> defer.Deferred[bool]:
        d: defer.Deferred[bool] = defer.Deferred()
        pending.append(d)
        from twisted.internet import reactor

        reactor.callLater(0, started.callback, None)  # once the fetch is waiting on ``d``
        return d

    fetcher = Fetcher(cache, stuck_unpack, pool=pool)
    req = request(url, "zlib", "1.10")
    d = fetcher.fetch(req)
    await started
    assert cache.lock_path(req.key).exists() and len(list(cache.staging_root.iterdir())) == 2
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await assert_clean(cache, req.key)
    assert await cache.lookup(req.key) is None


@pytest_twisted.ensureDeferred
async def test_dropped_connection_retried_inside_a_fetch(make_repo: Any, fetcher: Fetcher) -> None:
    """A file whose connection drops once is fetched on the retry."""
    url, server = make_repo("http", drops={"deps/linux/big/1.0/big.bin": 1})
    result = await fetcher.fetch(request(url, "big", "1.0"))
    assert tree(result.path) == {"big.bin": CONTENT["linux/big/1.0/big.bin"]}
    assert server.dropped["deps/linux/big/1.0/big.bin"] == 1
    await fetcher.close()


# -- keep_updated --------------------------------------------------------------------------------------------
def change_remote(kind: str, url: Any, server: Any, rel: str, data: bytes) -> None:
    if kind == "s3":
        server.put_tree(url.location, {rel: data}, prefix="deps")
        return
    path = Path(url.location, rel) if kind == "file" else server.root / "deps" / rel
    path.write_bytes(data)
    stamp = path.stat().st_mtime + 10
    os.utime(path, (stamp, stamp))


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_keep_updated_refetches_a_changed_version(kind: str, make_repo: Any, fetcher: Fetcher) -> None:
    """keep_updated leaves a current entry alone, and fetches again once the remote file changed."""
    url, server = make_repo(kind)
    req = request(url, "zlib", "1.10", keep_updated=True)
    first = await fetcher.fetch(req)
    assert first.state == "downloaded"
    again = await fetcher.fetch(req)
    assert again.state == "cached"
    if kind == "http":
        assert server.count("deps/linux/zlib/1.10/zlib-1.10.tgz", "GET") == 1
    change_remote(kind, url, server, "linux/zlib/1.10/zlib-1.10.tgz", tgz({"zlib/include/zlib.h": b"/* 1.10.1 */\n"}))
    updated = await fetcher.fetch(req)
    assert updated.state == "updated"
    assert tree(updated.path) == {"zlib/include/zlib.h": b"/* 1.10.1 */\n"}
    assert (await fetcher.fetch(req)).state == "cached"
    await fetcher.close()


@pytest_twisted.ensureDeferred
async def test_keep_updated_on_a_public_bucket_without_credentials(moto_server: Any, s3_env_anonymous: Any,
                                                                   fetcher: Fetcher) -> None:
    """keep_updated checks a public bucket anonymously (Umpire failed without credentials)."""
    from ion.services.deploy.spec import parse_repository_url

    bucket = moto_server.new_bucket()
    moto_server.put_tree(bucket, {"linux/pub/1.0/pub.txt": b"v1\n"}, prefix="deps", acl="public-read")
    req = request(parse_repository_url(f"s3://{bucket}/deps"), "pub", "1.0", keep_updated=True)
    assert (await fetcher.fetch(req)).state == "downloaded"
    assert (await fetcher.fetch(req)).state == "cached"
    moto_server.put_tree(bucket, {"linux/pub/1.0/pub.txt": b"v2\n"}, prefix="deps", acl="public-read")
    updated = await fetcher.fetch(req)
    assert updated.state == "updated" and tree(updated.path) == {"pub.txt": b"v2\n"}


@pytest_twisted.ensureDeferred
async def test_keep_updated_sees_a_new_file(make_repo: Any, fetcher: Fetcher) -> None:
    """A file added to the version folder makes the entry outdated."""
    url, _ = make_repo("file")
    req = request(url, "multi", "2.0", keep_updated=True)
    first = await fetcher.fetch(req)
    listing = await fetcher.repository(url).list_version("linux", "multi", "2.0")
    assert entry_is_current(first.info, listing)
    Path(url.location, "linux/multi/2.0/d.bin").write_bytes(b"D")
    assert (await fetcher.fetch(req)).state == "updated"


@pytest_twisted.ensureDeferred
async def test_keep_updated_uses_the_cache_when_the_check_fails(make_repo: Any, fetcher: Fetcher,
                                                                tmp_path: Path) -> None:
    """When keep_updated cannot reach the repository, the cached entry is used, with a warning."""
    url, _ = make_repo("file")
    req = request(url, "multi", "2.0", keep_updated=True)
    await fetcher.fetch(req)
    os.rename(Path(url.location, "linux/multi"), tmp_path / "moved")
    result = await fetcher.fetch(req)
    assert result.state == "cached" and result.warnings and "could not check" in result.warnings[0]


# -- requests ---------------------------------------------------------------------------------------------------
def test_request_from_wire_checks_its_keys(tmp_path: Path) -> None:
    """A request from a message is validated key by key; a relative file: URL needs its base folder."""
    good = FetchRequest.from_wire({"url": "file:repo", "platform": "linux", "name": "z", "version": "1.0",
                                   "unpack": False, "sha256": "A" * 64, "base_dir": str(tmp_path)})
    assert good.repository.location == str(tmp_path / "repo") and good.sha256 == "a" * 64 and not good.unpack
    assert FetchRequest.from_wire(good.to_wire()).key == good.key
    for bad, match in (({"url": "s3://b"}, "lacks 'platform', 'name', 'version'"),
                       ({"url": "ftp://x", "platform": "l", "name": "n", "version": "1"}, "unknown URL scheme"),
                       ({"url": "s3://bkt", "platform": "l", "name": "n", "version": "1", "unpack": "false"},
                        "'unpack' must be true or false"),
                       ({"url": "s3://bkt", "platform": "l", "name": "n", "version": "1.lock"}, "reserved")):
        with pytest.raises(InvalidRequestError, match=match):
            FetchRequest.from_wire(bad)


def test_tgz_helper_makes_real_archives() -> None:
    """The test archives are real tar.gz files (the helper the other tests rely on)."""
    with tarfile.open(fileobj=io.BytesIO(tgz({"a/b": b"c"})), mode="r:gz") as tf:
        assert tf.getnames() == ["a/b"]


def test_remote_lock_renewal_survives_a_passing_failure() -> None:
    """A renewal that fails once (timeout) is retried at the next tick; an unknown lock stops renewing."""
    from pathlib import Path as _Path

    from twisted.internet import defer as _defer
    from twisted.internet import task as _task

    from ion.core.exceptions import ConversationTimeout
    from ion.services.cache.entry import EntryKey
    from ion.services.cache.errors import UnknownLockError
    from ion.services.cache.service import RemoteLock
    from ion.services.fetch.core import RemoteCache

    clock = _task.Clock()
    lock = RemoteLock("t", EntryKey("r.file", "linux", "z", "1.0"), _Path("/x"), "pid", 30.0)
    outcomes: list = [ConversationTimeout("cache", "renew", 5, "c#1"), None, UnknownLockError("gone")]
    renewals: list[int] = []

    class Client:
        def lock(self, key: object, timeout: object = None) -> _defer.Deferred[RemoteLock]:
            return _defer.succeed(lock)

        def renew(self, held: RemoteLock) -> _defer.Deferred[None]:
            renewals.append(1)
            outcome = outcomes.pop(0)
            return _defer.fail(outcome) if outcome is not None else _defer.succeed(None)

    cache = RemoteCache(Client(), clock)
    cache.lock(lock.key)
    loop = cache._renewals["t"]
    clock.advance(10)
    assert len(renewals) == 1 and loop.running  # the timeout did not stop renewing
    clock.advance(10)
    assert len(renewals) == 2 and loop.running
    clock.advance(10)
    assert len(renewals) == 3 and not loop.running  # the service no longer knows the lock
