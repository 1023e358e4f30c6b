"""Helpers of the end-to-end deploy tests: repository content, served by file:, http: (twisted.web) and
s3: (moto); a container running deploy.app; an HTTP server that holds chosen files; and a child-process
deployer (``python -m tests.services.deploy.scenario_support``) for the multi-process tests.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.web import resource, server

from ion.testing.servers import HTTPRepositoryServer, MotoServer, _FaultyRoot, tgz, write_tree, zipped

#: The repository root (``ion`` importable from it).
REPO_ROOT = Path(__file__).resolve().parents[3]
#: Seconds any single wait of these tests may take before the test fails (no test sleeps).
WAIT = 30.0


TGZ = "linux/zlib/1.2/zlib-1.2.tgz"
ZIP = "linux/tool/3.0/tool.zip"
PLAIN = "linux/notes/1.0/notes.txt"
ZLIB_H = b"/* zlib 1.2 */\n"

#: Umpire-style repository content: a tgz, a zip and a plain file.
CONTENT: dict[str, bytes] = {
    TGZ: tgz({"zlib/include/zlib.h": ZLIB_H, "zlib/lib/libz.a": b"\0" * 4000}),
    ZIP: zipped({"tool/bin/tool": b"#!/bin/sh\necho tool\n", "tool/README": b"tool 3.0\n"}),
    PLAIN: b"plain file kept as it is\n",
}


def item(name: str, version: str, destination: Path, **extra: Any) -> dict[str, Any]:
    """A deployment-file item (platform linux)."""
    return {"name": name, "version": version, "platform": "linux", "destination": str(destination), **extra}


def run_main(*argv: str) -> tuple[int, str, str]:
    """``ion-deploy ARGV`` in this process (only for runs that stop before the reactor starts):
    ``(exit code, stdout, stderr)``."""
    import io

    from ion.services.deploy.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def ion_deploy_process(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``ion-deploy ARGS --cache-dir tmp_path/cache`` in a subprocess, in ``tmp_path`` (the repository's
    ``ion`` importable; ``ION_CACHE_DIR`` left out of its environment, ``env`` added to it)."""
    environ = {k: v for k, v in os.environ.items() if k != "ION_CACHE_DIR"}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), environ.get("PYTHONPATH", "")])
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "ion.services.deploy.cli", *args,
                           "--cache-dir", str(tmp_path / "cache")],
                          cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120)


def write_deployment(path: Path, url: str, items: list[dict[str, Any]]) -> Path:
    """Write Umpire's JSON (one repository) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"url": url, "items": items}], indent=1))
    return path


def by_name(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The items of a deploy answer, keyed by ``platform/name/version`` + destination."""
    return {f"{r['item']} -> {r['destination']}": r for r in result["items"]}


def files_named(root: Path, pattern: str) -> list[Path]:
    """Every file under ``root`` whose name matches ``pattern``, sorted. Safe to call while the system
    runs: a folder removed during the walk (a staging folder cleaned up) is skipped, not an error."""
    found: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root):  # os.walk ignores folders that vanish
        found.extend(Path(dirpath, name) for name in fnmatch.filter(filenames, pattern))
    return sorted(found)


def tree(path: Path) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file under ``path`` (links followed, bookkeeping skipped)."""
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames[:] = [d for d in dirnames if d != ".ion-deploy"]
        for name in filenames:
            full = Path(dirpath, name)
            if name != ".entry":
                out[full.relative_to(path).as_posix()] = full.read_bytes()
    return dict(sorted(out.items()))


# -- an HTTP repository that can hold files back -----------------------------------------------------
class _Gate(resource.Resource):
    isLeaf = True

    def __init__(self, owner: GatedHTTPServer, inner: resource.Resource) -> None:
        super().__init__()
        self.owner = owner
        self.inner = inner

    def render(self, request: Any) -> Any:
        rel = unquote(request.path.decode("ascii", "replace")).lstrip("/")
        gate = self.owner.holds.get(rel)
        if gate is None or request.method != b"GET":
            return self.inner.render(request)
        self.owner.held[rel] += 1
        self.owner._notify_held()

        def release(_: object) -> None:
            if request.finished or getattr(request, "_disconnected", False):
                return
            body = self.inner.render(request)
            if body is not server.NOT_DONE_YET:
                request.write(body)
                request.finish()

        gate.addCallback(lambda r: (release(r), r)[1])
        return server.NOT_DONE_YET


class GatedHTTPServer(HTTPRepositoryServer):
    """An :class:`HTTPRepositoryServer` whose ``holds[rel]`` Deferred holds GETs of ``rel`` until fired."""

    def __init__(self, root: str | os.PathLike[str], reactor: Any = None) -> None:
        super().__init__(root, reactor)
        self.holds: dict[str, defer.Deferred[None]] = {}
        self.held: Counter[str] = Counter()
        self._held_waiters: list[tuple[str, defer.Deferred[None]]] = []

    def start(self) -> GatedHTTPServer:
        self._site = server.Site(_Gate(self, _FaultyRoot(self)))
        self._site.displayTracebacks = False
        self._site.noisy = False
        self._port = self.reactor.listenTCP(0, self._site, interface="127.0.0.1")
        return self

    def hold(self, rel: str) -> defer.Deferred[None]:
        """Hold GETs of ``rel`` until the returned Deferred is fired (``.callback(None)``)."""
        gate: defer.Deferred[None] = defer.Deferred()
        self.holds[rel] = gate
        return gate

    def wait_held(self, rel: str) -> defer.Deferred[None]:
        """Fires once a GET of ``rel`` is being held."""
        d: defer.Deferred[None] = defer.Deferred()
        self._held_waiters.append((rel, d))
        self._notify_held()
        return d

    def _notify_held(self) -> None:
        for waiter in list(self._held_waiters):
            if self.held[waiter[0]]:
                self._held_waiters.remove(waiter)
                waiter[1].callback(None)

    def gets(self, rel: str) -> int:
        """GETs of ``rel`` served (held ones count once released)."""
        return self.count(rel, "GET")


def within(d: Any, seconds: float = WAIT) -> defer.Deferred[Any]:
    """``d`` (a Deferred or coroutine) with a timeout on the reactor, so a test waiting fails instead of hanging."""
    from twisted.internet import reactor

    return defer.ensureDeferred(d).addTimeout(seconds, reactor)


async def deploy_held(client: Any, url: str, server: Any, tmp_path: Path, dest: Path) -> str:
    """Start an async deploy of notes 1.0 and zlib 1.2 (``<dest>/notes``, ``<dest>/zlib``) from ``url``,
    whose zlib download ``server`` holds (the caller's ``server.hold(f"deps/{TGZ}")``); fires with the
    job id once that download waits at the server."""
    from ion.services.deploy.spec import load_deployment

    spec = load_deployment(write_deployment(tmp_path / "d.json", url, [
        item("notes", "1.0", dest / "notes"), item("zlib", "1.2", dest / "zlib")]))
    job: str = await within(client.deploy_async(spec))
    await within(server.wait_held(f"deps/{TGZ}"))
    return job


async def job_ended(client: Any, job: str, polls: int = 500, every: float = 0.02) -> dict[str, Any]:
    """``client.job_status(job)`` once the job no longer runs (RUNNING or PARTIAL), polled ``every``
    seconds; the last status after ``polls`` polls (the caller's assertion then says what it was)."""
    from twisted.internet import reactor, task

    status: dict[str, Any] = {}
    for _ in range(polls):
        status = await within(client.job_status(job))
        if status["state"] not in ("RUNNING", "PARTIAL"):
            break
        await task.deferLater(reactor, every, lambda: None)
    return status


def report_system(containers: list[Any], log_events: list[dict[str, Any]]) -> None:
    """Print what a failed multi-container test needs read: every log event (all containers of this OS
    process, each line with its time and namespace), every process's open conversations (those it
    started, those it answers) and every thread's stack (a pool thread that waits for ever shows there)."""
    import threading
    import traceback

    from twisted.logger import formatEvent

    for event in log_events:
        print(f"{event.get('log_time', 0):.3f} {event.get('log_namespace')}: {formatEvent(event)}")
    for container in containers:
        for pid, proc in container.proc_manager.processes.items():
            table = proc.conversations
            print(f"PROCESS {pid} {type(proc).__name__} {proc.state}: calls {list(table.initiated.values())}; "
                  f"answering {[(c, r.state, r.request.get('op'), r.request.get('sender')) for c, r in table.responding.items()]}")
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        print(f"THREAD {names.get(ident, ident)}\n{''.join(traceback.format_stack(frame))}")


class EventSink:
    """Collects the system's ``deploy.progress`` events; :meth:`wait` fires on the first that matches."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], defer.Deferred[dict[str, Any]]]] = []

    def receive(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for waiter in list(self._waiters):
            if waiter[0](event):
                self._waiters.remove(waiter)
                waiter[1].callback(event)

    def wait(self, match: Callable[[dict[str, Any]], bool]) -> defer.Deferred[dict[str, Any]]:
        """Fires with the first event (already seen or to come) for which ``match`` is true."""
        for event in self.events:
            if match(event):
                return defer.succeed(event)
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._waiters.append((match, d))
        return within(d)


async def event_sink(container: Any) -> EventSink:
    """An :class:`EventSink` bound to ``deploy.progress`` on ``container``'s events exchange."""
    from ion.core.process import Process, Receiver

    sink = EventSink()

    class _Listener(Process):
        def receivers_to_create(self) -> list[Receiver]:
            return super().receivers_to_create() + [
                Receiver(self, f"{self.sysname}.sink.{self.id}", lambda msg, _r: sink.receive(msg["content"]),
                         exchange=self.container.events_exchange, bindings=["deploy.progress"])]

    await container.spawn(_Listener, name="deploy-events")
    return sink


# -- fixtures --------------------------------------------------------------------------------------
@pytest_twisted.async_yield_fixture
async def http_servers() -> Any:
    """``start(root)``: a started :class:`GatedHTTPServer`; all stopped after the test (gates released)."""
    servers: list[GatedHTTPServer] = []

    def start(root: str | Path) -> GatedHTTPServer:
        s = GatedHTTPServer(root).start()
        servers.append(s)
        return s

    yield start
    for s in reversed(servers):
        for gate in s.holds.values():
            if not gate.called:
                gate.callback(None)
        await s.stop()


@pytest.fixture
def make_repo(tmp_path: Path, http_servers: Callable[[Path], GatedHTTPServer],
              request: pytest.FixtureRequest) -> Callable[..., tuple[str, Any]]:
    """``make_repo(kind, files=CONTENT)`` -> (repository URL, server or None), under ``tmp_path/repos``
    (file:), a twisted.web server (http:) or a moto bucket (s3:, boto3 pointed at it for the test)."""
    counter = iter(range(1000))

    def make(kind: str, files: Mapping[str, bytes] = CONTENT) -> tuple[str, Any]:
        n = next(counter)
        if kind == "file":
            root = write_tree(tmp_path / "repos" / f"repo{n}", files)
            return f"file://{root}", None
        if kind == "http":
            www = tmp_path / f"www{n}"
            write_tree(www / "deps", files)
            s = http_servers(www)
            return f"{s.url}/deps", s
        if kind == "s3":
            moto: MotoServer = request.getfixturevalue("s3_env")
            bucket = moto.new_bucket()
            moto.put_tree(bucket, files, prefix="deps")
            return f"s3://{bucket}/deps", moto
        raise ValueError(kind)

    return make


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts every file download of any repository in this process, by remote path."""
    from ion.services.fetch.repository import Repository

    counts: Counter[str] = Counter()
    original = Repository.download

    def counting(self: Any, remote: Any, dest: Any, progress: Any = None, **kwargs: Any) -> Any:
        counts[remote.path] += 1
        return original(self, remote, dest, progress, **kwargs)

    monkeypatch.setattr(Repository, "download", counting)
    return counts


def child_settings(cache: Path, dest: Path, **deploy: Any) -> dict[str, Any]:
    """Settings (``twistd cc -a``, dotted keys) of a deploy.app container in a child process, on the
    cache ``cache``, writing below ``dest``, fetching from loopback; ``deploy``: more
    ``ion.services.deploy`` keys (``takeover_interval=0.5`` ...)."""
    return {
        "ion.services.cache.root": str(cache), "ion.services.cache.host_id": "test-host",
        "ion.services.unpack.allowed_roots": [str(cache)], "ion.services.fetch.retry_delay": 0.0,
        "ion.services.fetch.allowed_networks": ["127.0.0.0/8", "::1/128"],
        "ion.services.deploy.allowed_destinations": [str(dest)], "ion.core.process.terminate_timeout": 1,
        **{f"ion.services.deploy.{key}": value for key, value in deploy.items()},
    }


def system_config(tmp_path: Path, **deploy: Any) -> dict[str, Any]:
    """Config of a deploy.app container: cache, destinations and file: repositories inside ``tmp_path``."""
    cache_root = tmp_path / "cache"
    section = {"allowed_destinations": [str(tmp_path / "dest")],
               "allowed_file_repositories": [str(tmp_path / "repos")],
               # An owner without consumer counts as gone at once (test_drain_jobs tests the settle).
               "takeover_settle": 0.0}
    section.update(deploy)
    return {
        "ion.services.cache": {"root": str(cache_root), "host_id": "test-host"},
        "ion.services.unpack": {"allowed_roots": [str(cache_root)]},
        # The HTTP repositories of the tests are on loopback: allowed here, not by default.
        "ion.services.fetch": {"retry_delay": 0.0, "progress_interval": 0.0,
                               "allowed_networks": ["127.0.0.0/8", "::1/128"]},
        "ion.services.deploy": section,
    }


@pytest_twisted.async_fixture
async def deploy_system(container_factory: Any, tmp_path: Path) -> Any:
    """A container running deploy.app (fetch, cache, unpack too) and a DeployClient; see :func:`system_config`."""
    from ion.services.deploy.service import DeployClient
    from ion.testing import client_process

    (tmp_path / "dest").mkdir()
    (tmp_path / "repos").mkdir()
    container = await container_factory(config=system_config(tmp_path))
    await container.app_manager.start_app("deploy")
    proc = await client_process(container)
    client = DeployClient(proc)
    client.events = await event_sink(container)  # type: ignore[attr-defined]
    client.container = container  # type: ignore[attr-defined]
    return client


# -- a deployer in another OS process ------------------------------------------------------------------
class ChildDeployer(protocol.ProcessProtocol):
    """Runs ``python -m tests.services.deploy.scenario_support`` (see :func:`main`) under the reactor.

    ``ready`` fires once the child waits for ``go()``; ``ended`` with its exit code (or signal).
    """

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[Any] = defer.Deferred()
        self.pid: int | None = None

    def start(self, deployment: Path, cache_root: Path, host_id: str, *, wait_for_go: bool = True,
              env: Mapping[str, str] | None = None, broker: str | None = None) -> ChildDeployer:
        from twisted.internet import reactor

        repo_root = str(Path(__file__).resolve().parents[3])
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = repo_root + os.pathsep + full_env.get("PYTHONPATH", "")
        args = [sys.executable, "-m", "tests.services.deploy.scenario_support", str(deployment), str(cache_root),
                host_id] + (["--wait"] if wait_for_go else []) + (["--broker", broker] if broker else [])
        transport = reactor.spawnProcess(self, sys.executable, args, env=full_env, path=repo_root)
        self.pid = transport.pid
        return self

    def go(self) -> None:
        self.transport.write(b"go\n")
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if b"READY\n" in self.out and not self.ready.called:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        self.ended.callback(code if sig is None else -sig)

    def result(self) -> dict[str, Any]:
        """The JSON the child printed last."""
        lines = [line for line in self.out.decode().splitlines() if line.startswith("{")]
        assert lines, f"the child printed no result; stderr:\n{self.err.decode()}"
        return dict(json.loads(lines[-1]))


async def deploy_in_process(deployment: Path, cache_root: Path, host_id: str, *,
                            wait_timeout: float | None = None, broker: str | None = None) -> list[Any]:
    """Deploy ``deployment`` with the in-process Fetcher + Deployer over a local Cache (no services);
    with ``broker`` (an amqp:// URL), the Cache takes its locks through that broker as well."""
    from twisted.internet import reactor

    from ion.core.threads import BlockingPool
    from ion.services.cache.core import Cache
    from ion.services.deploy.core import Deployer
    from ion.services.deploy.spec import load_deployment
    from ion.services.fetch.core import Fetcher, local_unpack
    from ion.services.fetch.repository import FetchConfig

    pool = BlockingPool(reactor, maxthreads=4)
    pool.start()
    broker_locks = None
    if broker is not None:
        from ion.core.messaging.amqp import AmqpTransport
        from ion.services.cache.locks import BrokerLocks

        broker_locks = BrokerLocks(lambda: AmqpTransport(broker, reconnect=False, heartbeat=5), reactor)
    cache = Cache(cache_root, host_id=host_id, pool=pool, wait_timeout=wait_timeout, broker_locks=broker_locks)
    fetcher = Fetcher(cache, local_unpack(pool), pool=pool, config=FetchConfig(retry_delay=0.0))

    def fetch(item: Any, progress: Any) -> defer.Deferred[dict[str, Any]]:
        d = fetcher.fetch(item)
        d.addCallback(lambda r: {"state": r.state, "path": str(r.path), "names": r.info.content_names(),
                                 "stamp": str(r.info.fetched_at)})
        return d

    try:
        return list(await Deployer(fetch, pool).deploy(load_deployment(deployment)))
    finally:
        await fetcher.close()
        await cache.close()
        pool.stop()


def main(argv: list[str]) -> int:
    """``DEPLOYMENT CACHE_ROOT HOST_ID [--wait] [--broker URL]``: deploy in process (its cache locks through
    the broker of ``--broker`` as well), print ``READY`` (then wait for a line on stdin with ``--wait``) and
    finally ``{"ok", "items": [...]}``; exit 0 when every item deployed."""
    from twisted.internet import task

    deployment, cache_root, host_id = Path(argv[0]), Path(argv[1]), argv[2]
    outcome: dict[str, Any] = {}

    async def run(_reactor: Any) -> None:
        print("READY", flush=True)
        if "--wait" in argv:
            from twisted.internet import threads

            await threads.deferToThread(sys.stdin.readline)
        broker = argv[argv.index("--broker") + 1] if "--broker" in argv else None
        results = await deploy_in_process(deployment, cache_root, host_id, broker=broker)
        outcome["ok"] = all(r.ok for r in results)
        print(json.dumps({"ok": outcome["ok"], "items": [r.to_wire() for r in results]}), flush=True)
        if not outcome["ok"]:
            raise SystemExit(1)

    task.react(lambda r: defer.ensureDeferred(run(r)))
    return 0  # pragma: no cover - react exits


if __name__ == "__main__":
    main(sys.argv[1:])
