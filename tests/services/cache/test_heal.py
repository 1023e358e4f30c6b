"""A cache that heals itself (issue 17 §3): the periodic verification fetches a bad entry again at once,
from the repository its ``.entry`` names, on real file: and HTTP repositories (rounds on a task.Clock)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task

from ion.core.threads import BlockingPool
from ion.services.cache.core import Cache
from ion.services.cache.entry import EntryKey, repo_id
from ion.services.cache.verify import BAD, BAD_TO_GOOD, GOOD, GOOD_TO_BAD, REFETCHED, CacheVerifier, VerifyConfig
from ion.services.fetch.core import Fetcher, FetchRequest, local_unpack, refetch_request
from ion.services.fetch.errors import InvalidRequestError
from ion.services.fetch.repository import FetchConfig
from ion.services.records.deployer import parse_repository_url
from ion.testing.pytest_plugin import async_yield_fixture
from ion.testing.servers import HTTPRepositoryServer, tgz, write_tree

from .test_verify import flip as _flip

TOOL = b"#!/bin/sh\necho the good tool\n" * 50
FILES = {
    "linux/tool/1.0/tool.tgz": tgz({"tool/bin/tool": TOOL, "tool/README": b"tool 1.0\n"}),
    "linux/lib/2.0/lib.so": b"\x7fELF" + bytes(range(256)) * 40,
}
TOOL_KEY_PARTS = ("linux", "tool", "1.0")


@async_yield_fixture
async def pool() -> AsyncIterator[BlockingPool]:
    """A real blocking pool (the fetch's file work), not the synchronous stand-in of the other cache tests."""
    from twisted.internet import reactor

    p = BlockingPool(reactor, maxthreads=4)
    p.start()
    yield p
    p.stop()


@pytest.fixture
def clock() -> task.Clock:
    c = task.Clock()
    c.advance(1_700_000_000)
    return c


@pytest.fixture
def real_cache(tmp_path: Path, pool: BlockingPool) -> Cache:
    """The cache on the real reactor (locks, mtimes); the verifier's schedule and pacing run on ``clock``."""
    return Cache(tmp_path / "cache", host_id="heal-host", pool=pool, lock_timeout=60)


@pytest.fixture
def fetcher(real_cache: Cache, pool: BlockingPool) -> Fetcher:
    """The in-process fetch path (lock, download, checksums, unpack, publish); no retries: a refused
    connection fails at once."""
    return Fetcher(real_cache, local_unpack(pool), pool=pool, config=FetchConfig(retries=0, retry_delay=0.0))


@pytest.fixture
def make_verifier(real_cache: Cache, fetcher: Fetcher, clock: task.Clock) -> Callable[..., CacheVerifier]:
    def make(**config: Any) -> CacheVerifier:
        config.setdefault("interval", 60.0)
        config.setdefault("bandwidth", None)
        config.setdefault("refetch_backoff", 100.0)
        config.setdefault("refetch_max_backoff", 250.0)
        return CacheVerifier(real_cache, VerifyConfig(**config), clock=clock, refetch=fetcher.refetch)

    return make


async def scheduled_round(verifier: CacheVerifier, clock: task.Clock) -> Any:
    """Let the schedule start the next round (one interval on the clock) and wait for its report."""
    assert verifier.config.interval is not None
    clock.advance(verifier.config.interval)
    report = await verifier.run_round()  # joins the round the schedule started (its trigger says so)
    assert report.trigger == "schedule"
    return report


def flip(path: Path) -> None:
    """Rot one byte of a file the fetch published (writable first: an archive may have made it read-only)."""
    path.chmod(0o644)
    _flip(path)


def row(report: Any, key: EntryKey) -> Any:
    return next(o for o in report.outcomes if o.key == key)


@pytest_twisted.ensureDeferred
async def test_corrupted_entry_healed_by_the_verify_round_without_a_deploy(
        tmp_path: Path, http_repository: Callable[..., HTTPRepositoryServer], fetcher: Fetcher,
        real_cache: Cache, clock: task.Clock, make_verifier: Callable[..., CacheVerifier]) -> None:
    """An unpacked entry from an HTTP repository (Content-MD5 checked) gets a byte flipped: the scheduled
    round quarantines it and fetches it again at once (``refetched``), nobody deploys, and the next round
    says ``bad→good`` with the good bytes back in the cache."""
    write_tree(tmp_path / "www" / "deps", FILES)
    server = http_repository(tmp_path / "www")
    server.content_md5 = True
    url = parse_repository_url(f"{server.url}/deps")
    first = await fetcher.fetch(FetchRequest(url, *TOOL_KEY_PARTS))
    key = first.key
    assert first.state == "downloaded" and (first.path / "tool/bin/tool").read_bytes() == TOOL
    verifier = make_verifier()
    await verifier.start()
    try:
        assert row(await scheduled_round(verifier, clock), key).outcome == GOOD
        flip(first.path / "tool/bin/tool")
        gets = len([r for r in server.requests if r[0] == "GET"])
        report = await scheduled_round(verifier, clock)
        bad = row(report, key)
        assert bad.outcome == GOOD_TO_BAD and bad.action == REFETCHED and "tool/bin/tool" in bad.problems
        assert bad.moved_to is not None and (bad.moved_to / "tool/bin/tool").read_bytes() != TOOL
        assert bad.url == first.info.url
        assert len([r for r in server.requests if r[0] == "GET"]) > gets  # fetched again, now
        healed = await real_cache.lookup(key)
        assert healed is not None and (healed.path / "tool/bin/tool").read_bytes() == TOOL
        assert verifier.refetches == {"refetched": 1, "failed": 0}
        assert row(await scheduled_round(verifier, clock), key).outcome == BAD_TO_GOOD
        assert row(await scheduled_round(verifier, clock), key).outcome == GOOD
    finally:
        await verifier.stop()
        await fetcher.close()


@pytest_twisted.ensureDeferred
async def test_repository_down_leaves_it_quarantined_with_a_reason_and_a_backoff(
        tmp_path: Path, http_repository: Callable[..., HTTPRepositoryServer], fetcher: Fetcher,
        real_cache: Cache, clock: task.Clock, make_verifier: Callable[..., CacheVerifier]) -> None:
    """The repository is down when the bad entry is found: it stays quarantined, the round says why and
    when it is tried again; rounds before then do not ask the repository; each failure doubles the wait
    (up to the maximum); the state (failures, next try) survives a restart of the verifier."""
    write_tree(tmp_path / "www" / "deps", FILES)
    server = http_repository(tmp_path / "www")
    url = parse_repository_url(f"{server.url}/deps")
    first = await fetcher.fetch(FetchRequest(url, "linux", "lib", "2.0", unpack=False))
    key = first.key
    await server.stop()  # down: connections refused
    await fetcher.close()  # (its kept-alive connection to the server too)
    flip(first.path / "lib.so")
    verifier = make_verifier(interval=60.0)
    await verifier.start()
    try:
        bad = row(await scheduled_round(verifier, clock), key)
        assert bad.outcome == GOOD_TO_BAD and bad.action is not None
        assert bad.action.startswith("refetch failed: ") and bad.action.endswith("; next try in 100 s")
        assert "127.0.0.1" in bad.action or "refused" in bad.action.lower()
        assert bad.retry_at == pytest.approx(clock.seconds() + 100)
        assert await real_cache.lookup(key) is None and bad.moved_to is not None and bad.moved_to.is_dir()
        waiting = row(await scheduled_round(verifier, clock), key)  # 60 s later: not due yet
        assert waiting.outcome == BAD and waiting.action is not None
        assert waiting.action.startswith("awaiting refetch (next try in 40 s; 1 failed, the last: ")
        assert verifier.refetches == {"refetched": 0, "failed": 1}
        again = row(await scheduled_round(verifier, clock), key)  # 120 s: tried again, fails again
        assert again.outcome == BAD and again.action is not None and again.action.endswith("next try in 200 s")
        assert verifier.refetches == {"refetched": 0, "failed": 2}
        saved = verifier.states[str(key.relpath)]
        assert saved.failures == 2 and saved.error is not None
    finally:
        await verifier.stop()
    restarted = make_verifier(interval=60.0)
    await restarted.load()
    state = restarted.states[str(key.relpath)]
    assert (state.failures, state.retry_at, state.url) == (2, saved.retry_at, first.info.url)
    clock.advance(300)
    third = row(await restarted.run_round(), key)
    assert third.action is not None and third.action.endswith("next try in 250 s")  # the maximum
    await fetcher.close()


@pytest_twisted.ensureDeferred
async def test_a_file_repository_back_after_a_failure_heals_the_entry(
        tmp_path: Path, fetcher: Fetcher, real_cache: Cache, clock: task.Clock,
        make_verifier: Callable[..., CacheVerifier]) -> None:
    """A packed entry from a file: repository whose version folder went away: the refetch fails (404-like,
    named); once the folder is back, the first round after the backoff fetches it again and the next
    one says bad→good."""
    repo = write_tree(tmp_path / "repo", FILES)
    url = parse_repository_url(f"file://{repo}")
    first = await fetcher.fetch(FetchRequest(url, "linux", "lib", "2.0", unpack=False))
    key = first.key
    flip(first.path / "lib.so")
    folder = repo / "linux" / "lib" / "2.0"
    folder.rename(repo / "moved")
    verifier = make_verifier()
    bad = row(await verifier.run_round(), key)
    assert bad.outcome == GOOD_TO_BAD and bad.action is not None and bad.action.startswith("refetch failed: ")
    assert str(folder) in bad.action
    (repo / "moved").rename(folder)
    clock.advance(100)
    healed = row(await verifier.run_round(), key)
    assert healed.outcome == BAD and healed.action == REFETCHED
    info = await real_cache.lookup(key)
    assert info is not None and (info.path / "lib.so").read_bytes() == FILES["linux/lib/2.0/lib.so"]
    assert row(await verifier.run_round(), key).outcome == BAD_TO_GOOD
    await fetcher.close()


@pytest_twisted.ensureDeferred
async def test_an_entry_removed_after_its_refetch_is_not_fetched_again(
        tmp_path: Path, fetcher: Fetcher, real_cache: Cache, make_verifier: Callable[..., CacheVerifier]) -> None:
    """Fetched again, then removed (prune, clear, the reaper) before the next round: it is no longer wanted,
    so that round forgets it instead of fetching it once more."""
    repo = write_tree(tmp_path / "repo", FILES)
    first = await fetcher.fetch(FetchRequest(parse_repository_url(f"file://{repo}"), "linux", "lib", "2.0",
                                             unpack=False))
    flip(first.path / "lib.so")
    verifier = make_verifier()
    assert row(await verifier.run_round(), first.key).action == REFETCHED
    await real_cache.clear()
    report = await verifier.run_round()
    assert [o for o in report.outcomes if o.key == first.key] == [] and str(first.key.relpath) not in verifier.states
    assert await real_cache.lookup(first.key) is None and verifier.refetches["refetched"] == 1
    await fetcher.close()


@pytest_twisted.ensureDeferred
async def test_a_quarantined_entry_cleared_while_its_refetch_waits_is_not_fetched_again(
        tmp_path: Path, fetcher: Fetcher, real_cache: Cache, clock: task.Clock,
        make_verifier: Callable[..., CacheVerifier]) -> None:
    """Its refetch failed and waits for its backoff when the operator clears the cache (its quarantined
    copy goes too): the operator let it go, so the round after the backoff forgets it rather than
    downloading it again (found in review)."""
    repo = write_tree(tmp_path / "repo", FILES)
    first = await fetcher.fetch(FetchRequest(parse_repository_url(f"file://{repo}"), "linux", "lib", "2.0",
                                             unpack=False))
    flip(first.path / "lib.so")
    folder = repo / "linux" / "lib" / "2.0"
    folder.rename(repo / "moved")
    verifier = make_verifier()
    bad = row(await verifier.run_round(), first.key)
    assert bad.action is not None and bad.action.startswith("refetch failed: ") and bad.moved_to is not None
    assert verifier.states[str(first.key.relpath)].moved_to == str(bad.moved_to)
    (repo / "moved").rename(folder)  # the repository is back: a refetch would now succeed
    await real_cache.clear()
    assert not bad.moved_to.exists()
    clock.advance(100)
    report = await verifier.run_round()
    assert [o for o in report.outcomes if o.key == first.key] == [] and str(first.key.relpath) not in verifier.states
    assert verifier.refetches == {"refetched": 0, "failed": 1} and await real_cache.lookup(first.key) is None
    await fetcher.close()


@pytest_twisted.ensureDeferred
async def test_entry_without_a_recorded_url_awaits_a_deploy(real_cache: Cache, fetcher: Fetcher,
                                                            make_verifier: Callable[..., CacheVerifier]) -> None:
    """An entry whose .entry names no URL (published by hand) is quarantined and left for the next
    deploy, the round saying why; nothing is fetched."""
    key = EntryKey("repo.file", "linux", "tool", "1.0")
    lock = await real_cache.lock(key)
    staging = await real_cache.new_staging()
    (staging / "tool").write_bytes(TOOL)
    from ion.services.cache.core import sha256_file
    from ion.services.cache.entry import FileMeta

    info = await real_cache.publish(key, staging, {"tool": FileMeta(len(TOOL), None, sha256_file(staging / "tool"))})
    await real_cache.unlock(lock)
    flip(info.path / "tool")
    verifier = make_verifier()
    bad = row(await verifier.run_round(), key)
    assert bad.outcome == GOOD_TO_BAD and bad.action is not None
    assert bad.action.startswith("quarantined; awaiting refetch (its .entry named no repository URL")
    assert verifier.refetches == {"refetched": 0, "failed": 0}
    assert row(await verifier.run_round(), key).action.startswith("awaiting refetch (its .entry named no")
    await fetcher.close()


def test_refetch_request_leads_back_to_the_entry_repository(tmp_path: Path) -> None:
    """The version folder URL an entry recorded is turned back into its repository (file: path, http with
    a prefix and quoted parts, s3 with and without a prefix); a URL of another repository is refused."""
    cases = [f"file://{tmp_path}/repo", "http://127.0.0.1:8080/deps", "https://example.org", "s3://bucket/a/b",
             "s3://bucket"]
    for repository in cases:
        parsed = parse_repository_url(repository)
        key = EntryKey(repo_id(parsed.wire_url), "linux", "my lib", "1.0+b", False)
        from ion.services.fetch.repository import repository_for

        version_url = repository_for(parsed, None, None, FetchConfig()).version_url(key.platform, key.name,
                                                                                    key.version)
        request = refetch_request(key, version_url)
        assert request.key == key and request.repository.wire_url.rstrip("/") == parsed.wire_url.rstrip("/")
    key = EntryKey(repo_id("http://a.example/deps"), "linux", "lib", "1.0")
    for wrong in (None, "", "http://b.example/deps/linux/lib/1.0/", "http://a.example/deps/linux/lib/2.0/",
                  "/elsewhere/linux/lib/1.0/"):
        with pytest.raises(InvalidRequestError):
            refetch_request(key, wrong)
    d = Fetcher(object(), local_unpack(None), pool=None).refetch(key, "/elsewhere/linux/lib/1.0/")
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(InvalidRequestError)
    assert isinstance(d, defer.Deferred)


# -- through the services ------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_cache_service_heals_through_the_fetch_service(container_factory: Any, tmp_path: Path) -> None:
    """The Cache service's verify round quarantines a rotten entry and has the Fetch service fetch it again
    (its locks, checks and bounds), with no deploy: the round says refetched, the next bad→good, and the
    ion_cache_verify_refetches counter counts it."""
    from ion.services.cache.service import CacheClient, CacheService
    from ion.services.fetch.service import FetchClient
    from ion.testing import client_process

    cache_root = tmp_path / "cache"
    repo = write_tree(tmp_path / "repo", FILES)
    container = await container_factory(config={
        "ion.services.cache": {"root": str(cache_root), "host_id": "test-host", "verify_interval": 0,
                               "verify_bandwidth": 0},
        "ion.services.unpack": {"allowed_roots": [str(cache_root)]},
        "ion.services.fetch": {"allowed_file_repositories": [str(tmp_path)], "retry_delay": 0.0},
    })
    await container.app_manager.start_app("fetch")
    proc = await client_process(container)
    fetched = await FetchClient(proc).fetch(FetchRequest(parse_repository_url(f"file://{repo}"), *TOOL_KEY_PARTS))
    key = EntryKey.from_wire(fetched["key"])
    flip(Path(fetched["path"]) / "tool/bin/tool")
    cache = CacheClient(proc)
    bad = row(await cache.verify_round(), key)
    assert bad.outcome == GOOD_TO_BAD and bad.action == REFETCHED and bad.moved_to is not None
    assert (Path(fetched["path"]) / "tool/bin/tool").read_bytes() == TOOL
    assert row(await cache.verify_round(), key).outcome == BAD_TO_GOOD
    service = container.proc_manager.find("cache")
    assert isinstance(service, CacheService) and service.verifier.refetches == {"refetched": 1, "failed": 0}
    families = {f.name: f for f in service.metric_families()}
    if families:  # the gauges are given by the elected instance only
        samples = {s.labels["result"]: s.value for s in families["ion_cache_verify_refetches"].samples
                   if s.name.endswith("_total")}
        assert samples == {"refetched": 1, "failed": 0}
