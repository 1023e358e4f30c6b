"""The slow HTTP repository of the README's watchable sample (``python -m ion.testing.slowrepo``).

Functional checks, no timing assertions: the pacing producer never writes more
than ``rate * TICK`` bytes per tick (on a ``task.Clock``); the server, run as
the README runs it (its own process, loopback), serves the right bytes with
the autoindex listings, ``HEAD`` and ``Range`` the HTTP fetcher uses; and
``ion-deploy`` deploys ``examples/deployment-http.json`` from it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task

from ion.testing.slowrepo import TICK, PacedProducer, parse_rate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def test_parse_rate() -> None:
    assert parse_rate("20") == 20
    assert parse_rate("200k") == 200 * 1024
    assert parse_rate("1.5M") == 1536 * 1024
    assert parse_rate("64KiB/s") == 64 * 1024
    for bad in ("fast", "0", "-5", "10 kb per second"):
        with pytest.raises(ValueError):
            parse_rate(bad)


class FakeRequest:
    """What a paced producer writes to: every write, the producer registration, whether it finished."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.producer: Any = None
        self.streaming: bool | None = None
        self.finished = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def finish(self) -> None:
        self.finished = True


def test_paced_producer_writes_at_most_rate_per_tick_and_honours_pauses() -> None:
    """1000 bytes from offset 100 at 200 bytes/s: 20-byte pieces, one per tick; a pause stops the pieces
    until resumed; the bytes written are exactly the range; the request is finished once."""
    data = bytes(range(256)) * 8
    clock = task.Clock()
    request = FakeRequest()
    producer = PacedProducer(request, io.BytesIO(data), 100, 1000, 200, clock)
    producer.start()
    assert request.streaming is True and request.producer is producer
    clock.advance(0)
    for _ in range(9):
        clock.advance(TICK)
    assert [len(w) for w in request.writes] == [20] * 10
    producer.pauseProducing()
    clock.advance(10)
    assert len(request.writes) == 10
    producer.resumeProducing()
    clock.pump([TICK] * 200)
    assert all(len(w) <= 20 for w in request.writes) and len(request.writes) == 50
    assert b"".join(request.writes) == data[100:1100]
    assert request.finished and request.producer is None and not clock.getDelayedCalls()


class SlowRepo:
    """``python -m ion.testing.slowrepo`` in its own process; its URL and the folder it serves."""

    def __init__(self, root: Path, rate: str) -> None:
        self.root = root
        self.proc = subprocess.Popen([sys.executable, "-m", "ion.testing.slowrepo", str(root), "--rate", rate,
                                      "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+/) ", first)
        assert match, f"no URL in {first!r}: {self.proc.stderr.read() if self.proc.stderr else ''}"
        self.url = match.group(1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def slow_repo(tmp_path: Path) -> Iterator[SlowRepo]:
    """A copy of ``examples/repo`` plus a 40 KB file (many pieces at 64 KiB/s), served paced."""
    root = tmp_path / "repo"
    shutil.copytree(EXAMPLES / "repo", root)
    big = root / "noarch" / "big" / "1.0" / "big.bin"
    big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(40_000))
    repo = SlowRepo(root, "64k")
    yield repo
    repo.stop()


def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()


def test_serves_listings_files_head_and_ranges(slow_repo: SlowRepo) -> None:
    """Every file's bytes (GET), its size without a body (HEAD), a byte range (206), and the autoindex
    page listing a version folder's files, as the HTTP repository of the fetcher reads them."""
    files = sorted(p for p in slow_repo.root.rglob("*") if p.is_file())
    assert len(files) == 4
    for path in files:
        rel = path.relative_to(slow_repo.root).as_posix()
        data = path.read_bytes()
        status, headers, body = fetch(slow_repo.url + rel)
        assert (status, body, headers["content-length"]) == (200, data, str(len(data)))
        status, headers, body = fetch(slow_repo.url + rel, "HEAD")
        assert (status, body, headers["content-length"], headers["accept-ranges"]) == (200, b"", str(len(data)),
                                                                                        "bytes")
        status, headers, body = fetch(slow_repo.url + rel, headers={"Range": "bytes=5-"})
        assert (status, body, headers["content-range"]) == (206, data[5:], f"bytes 5-{len(data) - 1}/{len(data)}")
    status, _headers, page = fetch(slow_repo.url + "noarch/greetings/2.1/")
    assert status == 200 and b'href="greetings-2.1.zip"' in page


def test_ion_deploy_deploys_the_http_sample_from_it(slow_repo: SlowRepo, tmp_path: Path) -> None:
    """``examples/deployment-http.json`` (its URL pointed at this server's port): every item downloaded,
    the files placed are the repository's."""
    sample = json.loads((EXAMPLES / "deployment-http.json").read_text())
    assert sample[0]["url"] == "http://127.0.0.1:8765"
    sample[0]["url"] = slow_repo.url.rstrip("/")
    deployment = tmp_path / "deployment-http.json"
    deployment.write_text(json.dumps(sample))
    env = {k: v for k, v in os.environ.items() if k != "ION_CACHE_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", "ion.services.deploy.cli", str(deployment), "--json",
                             "--cache-dir", str(tmp_path / "cache")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [(i["name"], i["state"]) for i in data["items"]] == [
        ("hello-tools", "downloaded"), ("greetings", "downloaded"), ("motd", "downloaded")]
    motd = tmp_path / "examples/deployed/http/etc/motd.txt"
    assert motd.read_bytes() == (EXAMPLES / "repo/noarch/motd/1.0/motd.txt").read_bytes()
    assert (tmp_path / "examples/deployed/http/share/greetings/fr.txt").read_text() == "Bonjour\n"
