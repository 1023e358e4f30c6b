"""pytest fixtures for repository servers (loaded by the ``pytest11`` entry point wherever ioncore is installed).

- ``moto_server`` (session): a :class:`~ion.testing.servers.MotoServer` on
  ``127.0.0.1:<free port>``, started once for the session.
- ``s3_env``: points boto3 at ``moto_server`` for one test (``AWS_ENDPOINT_URL_S3``,
  dummy credentials, no config files, no instance metadata); returns the server.
  ``s3_env_anonymous`` does the same without any credentials.
- ``http_repository``: ``http_repository(root)`` starts an
  :class:`~ion.testing.servers.HTTPRepositoryServer` over ``root`` (counting
  requests; faults set on it); every one is stopped after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from ion.testing.asyncfixtures import async_yield_fixture
from ion.testing.servers import HTTPRepositoryServer, MotoServer

__all__ = ["moto_server", "s3_env", "s3_env_anonymous", "http_repository"]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto's S3 on loopback, for the whole session (tests make buckets of their own)."""
    pytest.importorskip("moto.server", reason="moto[server] is needed (pip install -e '.[test]')")
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


def _apply(monkeypatch: pytest.MonkeyPatch, env: dict[str, str | None]) -> None:
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)


@pytest.fixture
def s3_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """boto3 pointed at ``moto_server`` with dummy credentials, for this test only."""
    _apply(monkeypatch, moto_server.env(credentials=True))
    return moto_server


@pytest.fixture
def s3_env_anonymous(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """boto3 pointed at ``moto_server`` with no credentials at all, for this test only."""
    _apply(monkeypatch, moto_server.env(credentials=False))
    return moto_server


@async_yield_fixture
async def http_repository() -> AsyncIterator[Callable[..., HTTPRepositoryServer]]:
    """``http_repository(root, tls=None)``: a started HTTP repository over ``root`` (HTTPS with
    ``tls=(certificate, key)``); stopped after the test."""
    servers: list[HTTPRepositoryServer] = []

    def start(root: str | Path, tls: tuple[bytes, bytes] | None = None) -> HTTPRepositoryServer:
        server = HTTPRepositoryServer(root, tls=tls).start()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.stop()
