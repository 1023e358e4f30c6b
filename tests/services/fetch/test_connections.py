"""Many small files (#17 §5): connections and requests a cold fetch makes, counted by the real
loopback servers (TCP connections they accept, requests they answer), never timed.

A repository makes at most ``max_connections`` requests at once (``ion-deploy --jobs``), so it
opens at most that many connections, reused for every file; a listing to download asks nothing
per file (S3 lists sizes and ETags; an HTTP file's GET says its size, Content-MD5 and ETag).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from ion.services.cache.core import Cache
from ion.services.fetch.core import Fetcher, FetchRequest, local_unpack
from ion.services.fetch.repository import FetchConfig

ROOT = Path(__file__).resolve().parents[3]
#: Small items, and the files of one version folder.
N = 24
JOBS = 3
ITEMS = {f"linux/s{i:02d}/1.0/s{i:02d}.bin": bytes([i]) * 4096 for i in range(N)}
FOLDER = {f"linux/folder/1.0/sub{i % 3}/f{i:02d}.bin": bytes([i]) * 4096 for i in range(N)}


def counters(kind: str, server: Any, url: Any) -> tuple[int, dict[str, int]]:
    """(connections accepted, {method: requests}) so far, for this repository's server (S3: its bucket)."""
    if kind == "s3":
        prefix = f"/{url.location}"
        methods = {m for m, _ in server.requests}
        return server.connections, {m: server.count(m, prefix) for m in methods}
    methods = {m for m, _ in server.requests}
    return server.connections, {m: sum(1 for x, _ in server.requests if x == m) for m in methods}


def delta(before: tuple[int, dict[str, int]], after: tuple[int, dict[str, int]]) -> tuple[int, dict[str, int]]:
    return after[0] - before[0], {m: n - before[1].get(m, 0) for m, n in after[1].items() if n - before[1].get(m, 0)}


async def fetch_all(fetcher: Fetcher, requests: list[FetchRequest], jobs: int) -> list[Any]:
    """Fetch ``requests`` ``jobs`` at a time, as the Deployer does."""
    semaphore = defer.DeferredSemaphore(jobs)
    return list(await defer.gatherResults([semaphore.run(fetcher.fetch, r) for r in requests], consumeErrors=True))


@pytest.mark.parametrize("kind", ["http", "s3"])
@pytest_twisted.ensureDeferred
async def test_cold_small_items_reuse_jobs_connections_and_make_no_head(kind: str, make_repo: Any, pool: Any,
                                                                       tmp_path: Path) -> None:
    """N one-file items, JOBS at a time: at most JOBS connections, one listing and one GET per item, no HEAD."""
    url, server = make_repo(kind, ITEMS)
    fetcher = Fetcher(Cache(tmp_path / "cache", host_id="t", pool=pool), local_unpack(pool), pool=pool,
                      config=FetchConfig(retry_delay=0.0, max_connections=JOBS))
    before = counters(kind, server, url)
    try:
        results = await fetch_all(fetcher, [FetchRequest(url, "linux", f"s{i:02d}", "1.0", unpack=False)
                                            for i in range(N)], JOBS)
    finally:
        await fetcher.close()
    assert {r.state for r in results} == {"downloaded"}
    assert (results[5].path / "s05.bin").read_bytes() == bytes([5]) * 4096
    connections, requests = delta(before, counters(kind, server, url))
    assert 1 <= connections <= JOBS, connections
    assert requests == {"GET": 2 * N}  # a listing (an index page) and the file, per item; no HEAD


@pytest.mark.parametrize("kind", ["http", "s3"])
@pytest_twisted.ensureDeferred
async def test_cold_folder_of_many_files_reuses_jobs_connections_and_makes_no_head(kind: str, make_repo: Any,
                                                                                   pool: Any, tmp_path: Path) -> None:
    """One version folder of N files (in sub-folders): downloaded JOBS at a time over at most JOBS
    connections; the listing asks nothing per file."""
    url, server = make_repo(kind, FOLDER)
    fetcher = Fetcher(Cache(tmp_path / "cache", host_id="t", pool=pool), local_unpack(pool), pool=pool,
                      config=FetchConfig(retry_delay=0.0, max_connections=JOBS))
    before = counters(kind, server, url)
    try:
        result = await fetcher.fetch(FetchRequest(url, "linux", "folder", "1.0", unpack=False))
    finally:
        await fetcher.close()
    assert result.state == "downloaded"
    assert sorted(p.relative_to(result.path).as_posix() for p in result.path.rglob("*.bin")) == \
        sorted(k.removeprefix("linux/folder/1.0/") for k in FOLDER)
    connections, requests = delta(before, counters(kind, server, url))
    assert 1 <= connections <= JOBS, connections
    listings = 1 if kind == "s3" else 4  # S3: one page; HTTP: the folder's index page and its 3 sub-folders'
    assert requests == {"GET": listings + N}


@pytest_twisted.ensureDeferred
async def test_keep_updated_check_describes_each_http_file_within_the_connections(make_repo: Any, pool: Any,
                                                                                  tmp_path: Path) -> None:
    """keep_updated compares each file's marker with the entry's: that listing HEADs every file
    (still at most JOBS connections), and a current entry downloads nothing."""
    url, server = make_repo("http", FOLDER)
    fetcher = Fetcher(Cache(tmp_path / "cache", host_id="t", pool=pool), local_unpack(pool), pool=pool,
                      config=FetchConfig(retry_delay=0.0, max_connections=JOBS))
    req = FetchRequest(url, "linux", "folder", "1.0", unpack=False, keep_updated=True)
    try:
        first = await fetcher.fetch(req)
        before = counters("http", server, url)
        second = await fetcher.fetch(req)
    finally:
        await fetcher.close()
    assert (first.state, second.state) == ("downloaded", "cached")
    connections, requests = delta(before, counters("http", server, url))
    assert connections <= JOBS
    assert requests == {"GET": 4, "HEAD": N}


def test_ion_deploy_jobs_bounds_its_s3_connections(s3_env: Any, tmp_path: Path) -> None:
    """``ion-deploy --jobs 2`` (a subprocess) of N small S3 items opens at most 2 connections to the
    repository, and asks one listing and one GET per item."""
    bucket = s3_env.new_bucket()
    s3_env.put_tree(bucket, ITEMS, prefix="repo")
    items = [{"name": f"s{i:02d}", "version": "1.0", "platform": "linux", "unpack": False,
              "destination": str(tmp_path / "dest" / f"s{i:02d}")} for i in range(N)]
    spec = tmp_path / "deploy.json"
    spec.write_text(json.dumps([{"url": f"s3://{bucket}/repo", "items": items}]))
    env = {k: v for k, v in os.environ.items() if k != "ION_CACHE_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    connections, gets = s3_env.connections, s3_env.count("GET", f"/{bucket}")
    proc = subprocess.run([sys.executable, "-m", "ion.services.deploy.cli", str(spec), "--cache-dir",
                           str(tmp_path / "cache"), "--jobs", "2", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {i["state"] for i in json.loads(proc.stdout)["items"]} == {"downloaded"}
    assert 1 <= s3_env.connections - connections <= 2
    assert s3_env.count("GET", f"/{bucket}") - gets == 2 * N
    assert s3_env.count("HEAD", f"/{bucket}") == 0


@pytest_twisted.ensureDeferred
async def test_cancel_while_a_folder_downloads_in_parallel_leaves_nothing(make_repo: Any, pool: Any,
                                                                          tmp_path: Path) -> None:
    """A fetch cancelled while JOBS files of its folder are in flight (one of them stalled) ends every
    download before it removes the staging folder: CancelledError, lock free, nothing published."""
    files = {f"linux/many/1.0/f{i}.bin": bytes([i]) * 5000 for i in range(3 * JOBS)}
    url, server = make_repo("http", files, stalls={"deps/linux/many/1.0/f3.bin": 1})
    cache = Cache(tmp_path / "cache", host_id="t", pool=pool)
    fetcher = Fetcher(cache, local_unpack(pool), pool=pool, config=FetchConfig(retry_delay=0.0, max_connections=JOBS))
    req = FetchRequest(url, "linux", "many", "1.0", unpack=False)
    d = fetcher.fetch(req)
    try:
        await server.wait_for("deps/linux/many/1.0/f3.bin", "GET")
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
    finally:
        await fetcher.close()
    assert await cache.lookup(req.key) is None
    lock = await cache.lock(req.key, timeout=0)
    await cache.unlock(lock)
    assert not cache.staging_root.exists() or list(cache.staging_root.iterdir()) == []
