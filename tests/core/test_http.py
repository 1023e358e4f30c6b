"""The container's HTTP port: /healthz, /readyz and /metrics over real HTTP, and systemd's notify socket."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task, threads
from twisted.internet.protocol import Protocol

from ion.core.exceptions import ConfigurationError
from ion.core.health import sd_notify
from ion.core.process import Process
from ion.core.tap import Options
from ion.testing import ContainerFactory, client_process


def http_config(tmp_path: Path, **http: Any) -> dict[str, Any]:
    """The HTTP port on any free port, the console's token file in ``tmp_path`` (not the working folder)."""
    return {"ion.core.http": {"port": 0, "token_file": str(tmp_path / "console.token"), **http}}


async def get(url: str) -> tuple[int, bytes]:
    response = await treq.get(url, persistent=False)
    return response.code, await response.content()


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    code, body = await get(url)
    return code, json.loads(body)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(name, sorted labels): value}`` of a scrape, parsed by prometheus_client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


async def wait_for(check: Any, what: str, limit: float = 20.0) -> Any:
    """Poll ``check()`` (async) every 50 ms until it answers non-None; fail after ``limit`` seconds."""
    for _ in range(int(limit / 0.05)):
        found = await check()
        if found is not None:
            return found
        await task.deferLater(reactor, 0.05, lambda: None)
    pytest.fail(f"timed out waiting for {what}")


class SlowToStop(Process):
    """Holds its terminate until ``release`` fires: the container stays in its drain meanwhile."""

    release: defer.Deferred[None]

    def on_terminate(self, *args: Any, **kwargs: Any) -> Any:
        return SlowToStop.release


def test_no_port_unless_asked(container: Any) -> None:
    assert container.http.port is None and container.http.url is None


@pytest_twisted.ensureDeferred
async def test_health_ready_and_metrics(container_factory: Any, tmp_path: Path) -> None:
    container = await container_factory(config=http_config(tmp_path))
    await container.app_manager.start_app("hello")
    url = container.http.url
    assert url is not None and url.startswith("http://127.0.0.1:")
    assert container.http.console.token_path == str(tmp_path / "console.token")

    code, alive = await get_json(url + "/healthz")
    assert code == 200 and alive["alive"] is True and alive["container"] == container.id
    code, ready = await get_json(url + "/readyz")
    assert (code, ready["ready"], ready["problems"]) == (200, True, [])

    client = await client_process(container)
    await client.rpc_send("hello", "hello", "you")
    code, text = await get(url + "/metrics")
    assert code == 200
    found = samples(text)
    assert found[("ion_broker_connected", ())] == 1.0
    assert found[("ion_processes", (("state", "ACTIVE"),))] == len(container.proc_manager.processes) >= 3
    assert found[("ion_processes", (("state", "ERROR"),))] == 0
    assert found[("ion_apps", (("state", "running"),))] == 1
    assert found[("ion_container_info", (("broker", "memory://"), ("container", container.id),
                                         ("system", container.sysname)))] == 1
    assert found[("ion_receiver_prefetch", (("process", "hello"),))] >= 1
    assert (("ion_conversations_in_flight", (("process", "test-client"), ("role", "initiator"))) in found)
    # Every message counted where it was sent and received, and the call's latency on both sides.
    assert found[("ion_messages_sent_total", (("op", "hello"), ("process", "test-client")))] == 1
    assert found[("ion_messages_received_total", (("op", "hello"), ("process", "hello")))] == 1
    assert found[("ion_messages_sent_total", (("op", "result"), ("process", "hello")))] == 1
    assert found[("ion_messages_received_total", (("op", "result"), ("process", "test-client")))] == 1
    assert found[("ion_rpc_client_seconds_count", (("op", "hello"), ("target", "hello")))] == 1
    assert found[("ion_rpc_server_seconds_count", (("op", "hello"), ("process", "hello")))] == 1
    assert found[("ion_rpc_client_seconds_bucket", (("le", "+Inf"), ("op", "hello"), ("target", "hello")))] == 1
    # Labels are names, never pids.
    assert not any(container.id in dict(labels).get("process", "") for _, labels in found)

    code, _ = await get(url + "/nosuch")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_readyz_is_503_at_once_when_the_container_stops(container_factory: Any, tmp_path: Path) -> None:
    """A terminate (SIGTERM's drain) makes /readyz 503 naming it while the processes still stop;
    /healthz stays 200; then the port closes."""
    container = await container_factory(config=http_config(tmp_path))
    SlowToStop.release = defer.Deferred()
    await container.spawn(SlowToStop, name="slow")
    url = container.http.url
    stopping = container.terminate()
    stopped: list[object] = []
    stopping.addBoth(stopped.append)
    try:
        code, body = await get_json(url + "/readyz")
        assert code == 503 and body["ready"] is False
        assert body["problems"] == [f"container {container.id} is stopping"]
        assert (await get(url + "/healthz"))[0] == 200
        assert not stopped
    finally:
        SlowToStop.release.callback(None)
    await stopping
    assert container.http.port is None
    with pytest.raises(Exception, match="refused"):
        await get(url + "/healthz")


@pytest_twisted.ensureDeferred
async def test_readyz_names_a_process_of_an_app_that_is_not_active(container_factory: Any,
                                                                    tmp_path: Path) -> None:
    container = await container_factory(config=http_config(tmp_path))
    await container.app_manager.start_app("hello")
    supervisor = container.app_manager.running["hello"].state
    pid = supervisor.pids[0]
    proc = container.proc_manager.get(pid)
    from ion.core.lifecycle import State

    proc._set_state(State.READY)  # as while it (re)starts
    code, body = await get_json(container.http.url + "/readyz")
    assert code == 503 and body["problems"] == [f"app hello: process hello ({pid}) is READY"]
    proc._set_state(State.ACTIVE)
    assert (await get(container.http.url + "/readyz"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_a_port_in_use_fails_the_start_naming_it(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    factory = ContainerFactory()
    try:
        with pytest.raises(ConfigurationError, match=rf"ion.core.http: cannot listen on 127.0.0.1:{port}"):
            await factory(config=http_config(tmp_path, port=port))
        assert not (tmp_path / "console.token").exists()
    finally:
        taken.close()
        await factory.teardown()


@pytest_twisted.ensureDeferred
async def test_an_app_cannot_open_the_port(container_factory: Any) -> None:
    """The port is the container's: an app's config layer is not read for it."""
    container = await container_factory()
    container.config.overlay_app("sneaky", {"ion.core.http": {"port": 0}})
    await container.http.start()
    assert container.http.port is None


def test_the_http_option_sets_the_port() -> None:
    opts = Options()
    opts.parseOptions(["--http", "0", "--no-shell"])
    assert opts["config_overrides"]["ion.core.http"] == {"port": 0}
    from twisted.python.usage import UsageError

    for bad in ("x", "70000"):
        with pytest.raises(UsageError, match="--http takes a port number"):
            Options().parseOptions(["--http", bad])


@pytest_twisted.ensureDeferred
async def test_readyz_follows_the_broker_connection(rabbitmq: Any, amqp_url: str, tmp_path: Path) -> None:
    """On RabbitMQ: the broker closes the container's connection, /readyz is 503 naming it, then 200 again
    once the transport has reconnected."""
    factory = ContainerFactory(broker_url=amqp_url)
    try:
        container = await factory(config=http_config(tmp_path))
        url = container.http.url + "/readyz"
        assert (await get(url))[0] == 200
        vhost = unquote(urlsplit(amqp_url).path.lstrip("/"))
        await threads.deferToThread(rabbitmq.ctl, "close_all_connections", "-p", vhost, "test: broker loss")

        async def unready() -> Any:
            code, body = await get_json(url)
            return body if code == 503 else None

        body = await wait_for(unready, "/readyz to say the connection is lost")
        assert any(p.startswith("not connected to the broker") for p in body["problems"])

        async def ready_again() -> Any:
            return True if (await get(url))[0] == 200 else None

        await wait_for(ready_again, "/readyz to be 200 after the reconnect", limit=60)
        code, text = await get(container.http.url + "/metrics")
        assert samples(text)[("ion_broker_reconnects_total", ())] >= 1
    finally:
        await factory.teardown()


def test_sd_notify_sends_to_the_notify_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": path}) is True
        assert server.recv(100) == b"READY=1"
    assert sd_notify("READY=1", {}) is False
    assert sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_calls_without_an_answer_and_unknown_ops_are_counted_bounded() -> None:
    """A timeout and an unknown op: ``ion_rpc_client_failures_total`` by reason; an op the process has not
    is counted as ``other`` (a caller may send any name: the labels stay bounded); a pid target is ``pid``."""
    from prometheus_client import generate_latest

    from ion.core.exceptions import ConversationTimeout, ReceivedApplicationError
    from ion.services.hello import HelloService
    from ion.testing import ClockedCluster
    from tests.core.support import failure_of

    cluster = ClockedCluster()
    home = cluster.start_container("home", "s")
    hello = cluster.spawn_in(home, HelloService)
    caller = cluster.spawn_in(home, Process, name="caller")
    for op in ("nope1", "nope2"):
        d = caller.rpc_send("hello", op, None)
        assert failure_of(cluster.pump() or d, ReceivedApplicationError).response_code == 404
    d = caller.rpc_send("nobody-here", "hello", None, timeout=5)  # mandatory: returned, an error at once
    cluster.pump()
    d2 = caller.rpc_send(hello.id, "hello", "x", timeout=5)
    cluster.result(d2)
    cluster.result(home.transport.declare_queue("s.silent"))  # a queue nobody consumes: no answer ever
    cluster.result(home.transport.bind("s.silent", home.exchange_name, "s.silent"))
    silent = caller.rpc_send("s.silent", "x", None, timeout=5)
    cluster.pump()
    cluster.clock.advance(6)
    failure_of(silent, ConversationTimeout)
    failure_of(d, Exception)
    home.metrics.snapshot()
    found = samples(generate_latest(home.metrics.registry))
    assert found[("ion_messages_received_total", (("op", "other"), ("process", "hello")))] == 2
    assert found[("ion_rpc_client_seconds_count", (("op", "nope1"), ("target", "hello")))] == 1
    assert found[("ion_rpc_client_seconds_count", (("op", "hello"), ("target", "pid")))] == 1
    assert found[("ion_rpc_client_failures_total", (("op", "x"), ("reason", "timeout"), ("target", "silent")))] == 1
    assert found[("ion_rpc_client_failures_total", (("op", "hello"), ("reason", "error"),
                                                     ("target", "nobody-here")))] == 1


def test_a_family_keeps_a_bounded_number_of_series() -> None:
    """Callers name ops and targets: past MAX_SERIES, new label values are counted as ``other``."""
    from ion.core.metrics import MAX_SERIES, Tallies, Timings

    sent = Tallies("t", "doc", ("process", "op"))
    took = Timings("h", "doc", ("target", "op"), buckets=(0.1, 1.0))
    for i in range(MAX_SERIES + 50):
        sent.labels("p", f"op{i}").inc()
        took.labels(f"svc{i}", "x").observe(0.5)
    assert len(sent.children) == len(took.children) == MAX_SERIES + 1
    assert sent.children[("other", "other")].value == 50
    assert took.children[("other", "other")].counts == [0, 50, 0]
    assert sent.labels("p", "op3").value == 1  # a kept series keeps counting


# -- who may talk to the port, and what outlives it ---------------------------------------------------------------
async def get_with_host(url: str, host: str) -> tuple[int, Any]:
    """GET ``url`` with the ``Host`` header ``host`` (as a page of a rebound name would send it)."""
    response = await treq.get(url, headers={"host": [host]}, persistent=False)
    await response.content()
    return response.code, response.headers


@pytest_twisted.ensureDeferred
async def test_the_console_answers_only_its_own_hosts_and_the_probes_any(container_factory: Any,
                                                                         tmp_path: Path) -> None:
    """DNS rebinding: a Host that is not the bound address, a loopback name or an allowed one gets 421 on
    the console, its files and its API; /healthz, /readyz and /metrics answer any Host. The console's
    responses carry the security headers."""
    from ion.core.http import SECURITY_HEADERS

    container = await container_factory(config=http_config(tmp_path, allowed_hosts=["Console.Example"]))
    url, port = container.http.url, container.http.port
    for path in ("/", "/static/app.js", "/api/system", "/api/events", "/nosuch"):
        code, headers = await get_with_host(url + path, "evil.example")
        assert code == 421, path
        assert headers.getRawHeaders("x-frame-options") == ["DENY"]
        assert (await get_with_host(url + path, f"evil.example:{port}"))[0] == 421
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await get_with_host(url + path, "evil.example"))[0] == 200, path
        assert (await get_with_host(url + path, "10.1.2.3:9100"))[0] == 200, path
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}",
                 "console.example", f"console.example:{port}"):
        code, headers = await get_with_host(url + "/api/system", host)
        assert code == 200, host
        for name, value in SECURITY_HEADERS.items():
            assert headers.getRawHeaders(name.decode()) == [value.decode()], name
    csp = (await get_with_host(url + "/", f"127.0.0.1:{port}"))[1].getRawHeaders("content-security-policy")[0]
    for part in ("default-src 'self'", "script-src 'self'", "object-src 'none'", "frame-ancestors 'none'"):
        assert part in csp
    assert (await get_with_host(url + "/", "127.0.0.1"))[0] == 421  # a browser sends the port it uses


@pytest_twisted.ensureDeferred
async def test_metrics_are_rendered_in_the_containers_own_pool(container_factory: Any, tmp_path: Path) -> None:
    """/metrics: generate_latest runs in the container's blocking pool (not the global reactor's thread
    pool), and the answer has Prometheus's content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    container = await container_factory(config=http_config(tmp_path, console=False))
    ran: list[Any] = []
    run = container.blocking.run

    def spy(fn: Any, *args: Any, **kwargs: Any) -> Any:
        ran.append(fn)
        return run(fn, *args, **kwargs)

    container.blocking.run = spy
    response = await treq.get(container.http.url + "/metrics", persistent=False)
    text = await response.content()
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == [CONTENT_TYPE_LATEST]
    assert ran == [generate_latest]
    assert samples(text)[("ion_broker_connected", ())] == 1.0


class _Client(Protocol):
    """A raw HTTP/1.1 client connection: what it received, and when the server closed it."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_a_keep_alive_connection_is_closed_when_the_container_stops(tmp_path: Path) -> None:
    """A keep-alive connection (a request answered, the connection kept open) does not outlive the
    container: its stop closes it (Twisted's own idle timeout is a minute)."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    factory = ContainerFactory()
    try:
        container = await factory(config=http_config(tmp_path))
        port = container.http.port
        client = _Client()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        client.transport.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())

        async def answered() -> Any:
            return True if b'"alive": true' in client.received else None

        await wait_for(answered, "the answer on the keep-alive connection")
        assert not client.closed.called
        await container.terminate()

        async def closed() -> Any:
            return True if client.closed.called else None

        await wait_for(closed, "the connection closed by the container's stop", limit=5)
    finally:
        await factory.teardown()


@pytest_twisted.ensureDeferred
async def test_an_endless_body_is_refused_at_once(container_factory: Any, tmp_path: Path) -> None:
    """A request announcing a body far over the limit gets its 413 and a closed connection at once, before
    any of the body is sent: the port never reads (and drops) what a client could send forever."""
    import socket as sockets

    container = await container_factory(config=http_config(tmp_path))
    port = container.http.port

    def ask() -> bytes:
        with sockets.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(f"POST /api/kill HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
                         f"content-length: {10 ** 12}\r\n\r\n".encode())
            answer = b""
            while chunk := conn.recv(4096):  # until the port closes the connection
                answer += chunk
            return answer

    answer = await threads.deferToThread(ask)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer
