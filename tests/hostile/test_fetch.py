"""Hostile inputs to the Fetch service (issue 12): a full disk, HTTP errors while listing or downloading,
repositories that point at loopback, private or link-local addresses.

Every test runs against real things: a real HTTP server on loopback, a real full filesystem (a 4 MiB
tmpfs), the Fetch and Deploy services on the embedded broker. A test that would hang ends on a Deferred
timeout (``within``) instead, never on a sleep.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.web import server

from ion.core.threads import BlockingPool
from ion.services.cache.core import Cache
from ion.services.deploy.spec import parse_repository_url
from ion.services.fetch.core import Fetcher, FetchRequest, local_unpack
from ion.services.fetch.errors import AccessDeniedError, TransferError, WriteError
from ion.services.fetch.repository import FetchConfig
from ion.testing.servers import HTTPRepositoryServer, _FaultyRoot, write_tree

#: Seconds a fetch may take before the test fails as hung (a guard, not a measure).
GUARD = 60.0
NOTES = "deps/linux/notes/1.0/notes.txt"
BIG = "deps/linux/big/1.0/big.bin"


def within(d: Any, seconds: float = GUARD) -> defer.Deferred[Any]:
    """``d`` (a Deferred or coroutine), failed with a TimeoutError if it has not fired within ``seconds``."""
    from twisted.internet import reactor

    if not isinstance(d, defer.Deferred):
        d = defer.ensureDeferred(d)
    return d.addTimeout(seconds, reactor)


# -- an HTTP repository that answers chosen statuses ----------------------------------------------------
class _StatusRoot(_FaultyRoot):
    """The repository's files, except where the server was told to answer an error status."""

    def render(self, request: Any) -> Any:
        owner: StatusServer = self.owner  # type: ignore[assignment]
        method = request.method.decode("ascii")
        rel = unquote(request.path.decode("ascii", "replace")).lstrip("/")
        if method == "GET" and rel == owner.watch:
            owner.watched.append(request.notifyFinish())
        queued = owner.statuses.get((method, rel))
        code = queued.pop(0) if queued else owner.always.get((method, rel))
        if code is None:
            return super().render(request)
        owner.requests.append((method, rel))
        owner._notify()
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain")
        return f"error {code}\n".encode()


class StatusServer(HTTPRepositoryServer):
    """:class:`HTTPRepositoryServer` that can answer an error status to chosen requests.

    :ivar statuses: ``{(method, relative path): [code, ...]}``: the next requests get these, one each.
    :ivar always: ``{(method, relative path): code}``: every request gets it (after ``statuses``).
    :ivar watch: a relative path whose GETs' ``notifyFinish()`` Deferreds go to ``watched``.
    """

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.statuses: dict[tuple[str, str], list[int]] = {}
        self.always: dict[tuple[str, str], int] = {}
        self.watch: str | None = None
        self.watched: list[defer.Deferred[None]] = []

    def start(self) -> StatusServer:
        self._site = server.Site(_StatusRoot(self))
        self._site.displayTracebacks = False
        self._site.noisy = False
        self._port = self.reactor.listenTCP(0, self._site, interface="127.0.0.1")
        return self


@pytest_twisted.async_yield_fixture
async def status_server(tmp_path: Path) -> AsyncIterator[Callable[[dict[str, bytes]], StatusServer]]:
    """``status_server(files)``: a started :class:`StatusServer` over ``files`` (under ``deps/``)."""
    servers: list[StatusServer] = []

    def start(files: dict[str, bytes]) -> StatusServer:
        www = tmp_path / f"www{len(servers)}"
        write_tree(www / "deps", files)
        s = StatusServer(www).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        await s.stop()


@pytest.fixture
def pool() -> Iterator[BlockingPool]:
    from twisted.internet import reactor

    p = BlockingPool(reactor, maxthreads=4)
    p.start()
    yield p
    p.stop()


def make_fetcher(root: Path, pool: BlockingPool, **config: Any) -> tuple[Cache, Fetcher]:
    cache = Cache(root, host_id="test-host", pool=pool)
    settings = {"retry_delay": 0.0, "retries": 2}
    settings.update(config)
    return cache, Fetcher(cache, local_unpack(pool), pool=pool, config=FetchConfig(**settings))


def notes_request(server: StatusServer) -> FetchRequest:
    return FetchRequest(parse_repository_url(f"{server.url}/deps"), "linux", "notes", "1.0", unpack=False)


async def assert_clean(cache: Cache, request: FetchRequest) -> None:
    """Nothing published, the entry's lock free, no staging folder left."""
    key = request.key
    assert await cache.lookup(key) is None
    lock = await cache.lock(key, timeout=0)
    await cache.unlock(lock)
    assert not cache.lock_path(key).exists()
    assert not cache.staging_root.exists() or list(cache.staging_root.iterdir()) == []


def assert_one_clear_line(message: str) -> None:
    assert "\n" not in message, message
    for noise in ("FirstError", "Traceback", "Failure instance"):
        assert noise not in message, message


# -- 1. a full disk ---------------------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB filesystem (tmpfs), unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 4 MiB tmpfs (root needed): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest_twisted.ensureDeferred
async def test_a_download_onto_a_full_disk_fails_at_once_and_leaves_nothing(tiny_disk: Path, pool: BlockingPool,
                                                                            status_server: Any) -> None:
    """A 12 MiB file onto a 4 MiB disk, more than ``max_buffered`` waiting to be written: the write error
    (ENOSPC) ends the fetch with an error naming the file and the OS reason; the connection is dropped, the
    staging folder removed and the lock released. Before the fix: a hang (the paused download re-armed its
    stall timer for ever)."""
    srv = status_server({"linux/big/1.0/big.bin": os.urandom(1 << 20) * 12})
    srv.watch = BIG
    cache, fetcher = make_fetcher(tiny_disk / "cache", pool, chunk_size=64 << 10, max_buffered=256 << 10)
    request = FetchRequest(parse_repository_url(f"{srv.url}/deps"), "linux", "big", "1.0", unpack=False)
    try:
        with pytest.raises(WriteError) as info:
            await within(fetcher.fetch(request))
    finally:
        await fetcher.close()
    message = str(info.value)
    assert "No space left on device" in message and "big.bin" in message, message
    assert_one_clear_line(message)
    assert info.value.code == 507
    await assert_clean(cache, request)
    # The server saw its response cut: the connection was dropped, not read to its end.
    assert len(srv.watched) == 1
    with pytest.raises(Exception):  # noqa: B017 - ConnectionLost or ConnectionDone, as the server saw it
        await within(srv.watched[0])


# -- 2. HTTP errors while listing and downloading -----------------------------------------------------
@pytest.mark.parametrize("method", ["HEAD", "GET"])
@pytest_twisted.ensureDeferred
async def test_one_503_on_a_file_is_retried_and_the_fetch_succeeds(method: str, tmp_path: Path, pool: BlockingPool,
                                                                   status_server: Any) -> None:
    """A 503 on a file's HEAD (listing) or GET (download), once: retried after ``retry_delay`` (0 here);
    the fetch succeeds."""
    srv = status_server({"linux/notes/1.0/notes.txt": b"notes\n"})
    srv.statuses[(method, NOTES)] = [503]
    cache, fetcher = make_fetcher(tmp_path / "cache", pool)
    try:
        result = await within(fetcher.fetch(notes_request(srv)))
    finally:
        await fetcher.close()
    assert result.state == "downloaded"
    assert (result.path / "notes.txt").read_bytes() == b"notes\n"
    assert srv.count(NOTES, method) == 2


@pytest.mark.parametrize("method", ["HEAD", "GET"])
@pytest.mark.parametrize("code", [500, 502, 503, 504, 429])
@pytest_twisted.ensureDeferred
async def test_a_server_error_that_persists_fails_after_the_retries_in_one_line(
        method: str, code: int, tmp_path: Path, pool: BlockingPool, status_server: Any) -> None:
    """5xx (and 429) every time: tried 1 + ``retries`` times, then a TransferError of one line naming the
    status and the URL (no FirstError, no traceback); nothing is left in the cache."""
    srv = status_server({"linux/notes/1.0/notes.txt": b"notes\n"})
    srv.always[(method, NOTES)] = code
    cache, fetcher = make_fetcher(tmp_path / "cache", pool, retries=2)
    request = notes_request(srv)
    try:
        with pytest.raises(TransferError) as info:
            await within(fetcher.fetch(request))
    finally:
        await fetcher.close()
    message = str(info.value)
    assert_one_clear_line(message)
    assert f"HTTP {code}" in message and f"{srv.url}/{NOTES}" in message, message
    assert "after 3 attempts" in message, message
    assert srv.count(NOTES, method) == 3
    await assert_clean(cache, request)


@pytest.mark.parametrize("method", ["HEAD", "GET"])
@pytest.mark.parametrize("code", [401, 403])
@pytest_twisted.ensureDeferred
async def test_a_403_on_a_file_is_access_denied_at_once_not_wrapped(method: str, code: int, tmp_path: Path,
                                                                    pool: BlockingPool, status_server: Any) -> None:
    """A 401/403 on a file while listing (HEAD) or downloading (GET): an AccessDeniedError of one line naming
    the status and the URL, at the first answer (a 4xx is not retried), not a FirstError stack dump."""
    srv = status_server({"linux/notes/1.0/notes.txt": b"notes\n", "linux/notes/1.0/other.txt": b"other\n"})
    srv.always[(method, NOTES)] = code
    cache, fetcher = make_fetcher(tmp_path / "cache", pool, retries=3)
    request = notes_request(srv)
    try:
        with pytest.raises(AccessDeniedError) as info:
            await within(fetcher.fetch(request))
    finally:
        await fetcher.close()
    message = str(info.value)
    assert_one_clear_line(message)
    assert f"{code}" in message and f"{srv.url}/{NOTES}" in message, message
    assert info.value.code == 403
    assert srv.count(NOTES, method) == 1
    await assert_clean(cache, request)


@pytest_twisted.ensureDeferred
async def test_a_403_while_listing_reaches_a_fetch_service_caller_as_a_403(container_factory: Any, tmp_path: Path,
                                                                           status_server: Any) -> None:
    """Through the Fetch service: the caller gets AccessDeniedError (403) with the one-line message."""
    from ion.services.fetch.service import FetchClient
    from ion.testing import client_process

    srv = status_server({"linux/notes/1.0/notes.txt": b"notes\n"})
    srv.always[("HEAD", NOTES)] = 403
    container = await container_factory(config=service_config(tmp_path, allowed_networks=["127.0.0.0/8"]))
    await container.app_manager.start_app("fetch")
    client = FetchClient(await client_process(container))
    with pytest.raises(AccessDeniedError) as info:
        await within(client.fetch(notes_request(srv)))
    assert info.value.code == 403
    assert_one_clear_line(str(info.value))
    assert f"{srv.url}/{NOTES}" in str(info.value) and "403" in str(info.value)


def service_config(tmp_path: Path, **fetch: Any) -> dict[str, Any]:
    """Config of a container running fetch.app or deploy.app on ``tmp_path``'s cache."""
    cache_root = tmp_path / "cache"
    section: dict[str, Any] = {"retry_delay": 0.0, "retries": 1, "progress_interval": 0.0}
    section.update(fetch)
    return {
        "ion.services.cache": {"root": str(cache_root), "host_id": "test-host"},
        "ion.services.unpack": {"allowed_roots": [str(cache_root)]},
        "ion.services.fetch": section,
        "ion.services.deploy": {"allowed_destinations": [str(tmp_path / "dest")], "job_dir": False},
    }

