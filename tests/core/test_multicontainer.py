"""Many containers, one system: containers in separate OS processes on the test RabbitMQ (issue 4).

Each test starts ``twistd -n --pidfile= cc --no-shell ...`` child processes
from the repository root and knows they are up from the lines they print
(never by sleeping); the test's own container joins the same system on the
same broker (a fresh vhost per test). Covered: RPC answered by another
process, round-robin between two, redelivery when one dies or stops, agent
``nodes()`` and remote ``spawn``, the plain-pika example of the README,
credentials from a credfile and from the environment, a refused login, and a
broker restart during a stream of calls.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task, threads, utils

from ion.core.agent import ContainerAgent, agent_queue
from ion.core.exceptions import ConversationError, ConversationTimeout, ReceivedContainerError
from ion.core.messaging.amqp import AmqpTransport
from ion.core.shell import ShellHelpers
from ion.services.hello import HelloClient
from ion.testing import ContainerFactory, client_process
from ion.testing.pytest_plugin import require_managed_broker

pytestmark = pytest.mark.amqp

REPO = Path(__file__).resolve().parents[2]
HELLO_APP = "res/apps/hello.app"
SYSNAME = "mysys"
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
#: The line a container prints once it and its apps are up.
READY = re.compile(r"container (?P<id>\S+) ready: system (?P<sysname>\S+),")


class ContainerProcess(protocol.ProcessProtocol):
    """One ``twistd -n cc`` in its own OS process; its output is kept and watched line by line."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.output = ""
        self._partial = ""
        self.lines: list[str] = []
        self._waiters: list[tuple[re.Pattern[str], int, defer.Deferred[re.Match[str]]]] = []
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.exit_code: int | None = None
        self.container_id: str | None = None
        self.audit_path: Path | None = None

    def __repr__(self) -> str:
        return f"<{self.name} {self.container_id} exit={self.exit_code}>"

    # -- output -----------------------------------------------------------------------------------
    def outReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self._got(data)

    def errReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self._got(data)

    def _got(self, data: bytes) -> None:
        text = data.decode(errors="replace")
        self.output += text
        self._partial += text
        *complete, self._partial = self._partial.split("\n")
        for line in complete:
            self.lines.append(line)
            for item in list(self._waiters):
                pattern, start, d = item
                if d.called:  # cancelled or timed out
                    self._waiters.remove(item)
                    continue
                match = pattern.search(line)
                if match and len(self.lines) > start:
                    self._waiters.remove(item)
                    d.callback(match)

    def wait_for(self, pattern: str, timeout: float = 60, *, after: int = 0) -> defer.Deferred[re.Match[str]]:
        """Fire with the match of the first output line (from line ``after`` on) matching ``pattern``."""
        regex = re.compile(pattern)
        for line in self.lines[after:]:
            match = regex.search(line)
            if match:
                return defer.succeed(match)
        d: defer.Deferred[re.Match[str]] = defer.Deferred()
        if self.exit_code is not None:
            d.errback(AssertionError(f"{self.name} has exited ({self.exit_code}) without printing "
                                     f"{pattern!r}:\n{self.output[-4000:]}"))
            return d
        self._waiters.append((regex, after, d))

        def timed_out(f: Any) -> Any:
            if f.check(defer.TimeoutError):
                raise AssertionError(f"{self.name} did not print {pattern!r} within {timeout:g} s:\n"
                                     f"{self.output[-4000:]}")
            return f

        return d.addTimeout(timeout, reactor).addErrback(timed_out)

    def count(self, text: str) -> int:
        """How many output lines contain ``text``."""
        return sum(1 for line in self.lines if text in line)

    # -- life and death ----------------------------------------------------------------------------
    async def ready(self, timeout: float = 60) -> str:
        """Wait for the 'ready' line; return the container id it names."""
        match = await self.wait_for(READY.pattern, timeout)
        self.container_id = match["id"]
        return self.container_id

    def processEnded(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        value = reason.value
        self.exit_code = value.exitCode if value.exitCode is not None else -(value.signal or 0)
        if self._partial:
            self.lines.append(self._partial)
        waiters, self._waiters = self._waiters, []
        for _pattern, _start, d in waiters:
            if not d.called:
                d.errback(AssertionError(f"{self.name} exited ({self.exit_code}):\n{self.output[-4000:]}"))
        self.ended.callback(self.exit_code)

    def signal(self, name: str) -> None:
        if self.exit_code is None:
            self.transport.signalProcess(name)

    async def exited(self, timeout: float = 60) -> int:
        """Wait for the process to end; its exit code (``-N`` for signal N)."""
        if self.exit_code is not None:
            return self.exit_code
        d: defer.Deferred[int] = defer.Deferred()
        self.ended.addBoth(lambda r: (d.callback(r) if not d.called else None, r)[1])
        try:
            return await d.addTimeout(timeout, reactor)
        except defer.TimeoutError:
            raise AssertionError(f"{self.name} did not exit within {timeout:g} s:\n{self.output[-4000:]}") from None

    async def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL if it has not ended within ``timeout`` seconds."""
        if self.exit_code is None:
            self.signal("TERM")
            try:
                return await self.exited(timeout)
            except AssertionError:
                self.signal("KILL")
        return await self.exited(30)


Launcher = Callable[..., Awaitable[ContainerProcess]]


def _vhost(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/")) or "/"


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ION_BROKER_USERNAME", "ION_BROKER_PASSWORD", "ION_LOGLEVELS")}
    env.update(extra or {})
    return env


@pytest_twisted.async_yield_fixture
async def launch(amqp_url: str, tmp_path: Path) -> AsyncIterator[Launcher]:
    """``await launch(*apps, args=[...], env={...}, ready=True)``: a container in a child process.

    By default it joins system ``mysys`` on the test's vhost (``--broker <amqp_url>``);
    ``broker_args`` replaces those options. Every child is stopped at teardown.
    """
    children: list[ContainerProcess] = []

    async def start(*apps: str, args: list[str] | None = None, broker_args: list[str] | None = None,
                    env: dict[str, str] | None = None, ready: bool = True, name: str | None = None) -> ContainerProcess:
        child = ContainerProcess(name or f"container {len(children) + 1}")
        broker = ["--broker", amqp_url] if broker_args is None else broker_args
        # Its audit file in the test's folder (twistd's default is its working folder, the repository).
        child.audit_path = tmp_path / f"audit-{len(children) + 1}.jsonl"
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "cc", "--no-shell", *broker, "-s", SYSNAME,
                "-a", f"ion.core.audit.path={child.audit_path}", *(args or []), *apps]
        reactor.spawnProcess(child, sys.executable, argv, env=_child_env(env), path=str(REPO))
        children.append(child)
        if ready:
            await child.ready()
        return child

    yield start
    for child in reversed(children):
        await child.stop()


@pytest_twisted.async_yield_fixture
async def here(amqp_url: str) -> AsyncIterator[ContainerFactory]:
    """The test's own containers, on the same broker and vhost."""
    factory = ContainerFactory(broker_url=amqp_url)
    yield factory
    await factory.teardown()


async def _first_line(children: list[ContainerProcess], pattern: str,
                      timeout: float = 60) -> tuple[ContainerProcess, re.Match[str]]:
    """The first of ``children`` to print a line matching ``pattern``, and the match."""
    ds = [child.wait_for(pattern, timeout).addCallback(lambda m, c=child: (c, m)) for child in children]
    try:
        result, _index = await defer.DeferredList(ds, fireOnOneCallback=True, fireOnOneErrback=False,
                                                  consumeErrors=True)
    finally:
        for d in ds:
            if not d.called:
                d.cancel()
    if not isinstance(result, tuple):
        raise AssertionError(f"no container printed {pattern!r}")
    return result


def _container_of(pid: str) -> str:
    return pid.rsplit(".", 1)[0]


async def _until_queue(rabbitmq: Any, amqp_url: str, queue: str, *, ready: int, unacked: int,
                       timeout: float = 30) -> None:
    """Wait until ``queue`` holds ``ready`` messages and ``unacked`` delivered but unacknowledged
    ones (``rabbitmqctl list_queues`` reads the queue itself: no statistics delay)."""
    vhost = _vhost(amqp_url)
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        out = await threads.deferToThread(rabbitmq.ctl, "-q", "list_queues", "-p", vhost, "name",
                                          "messages_ready", "messages_unacknowledged")
        rows = {f[0]: (int(f[1]), int(f[2])) for f in (line.split() for line in out.splitlines())
                if len(f) == 3 and f[1].isdigit()}
        seen = rows.get(queue)
        if seen == (ready, unacked):
            return
    raise AssertionError(f"queue {queue}: (ready, unacked) = {seen}, expected {(ready, unacked)}")


# -- RPC, round-robin, redelivery --------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_rpc_is_answered_by_a_container_in_another_process(launch: Launcher, here: ContainerFactory) -> None:
    """The hello service runs in a child `twistd cc`; this process's container calls it by name."""
    server = await launch(HELLO_APP)
    client = await here(sysname=SYSNAME)
    proc = await client_process(client)
    assert await HelloClient(proc).hello("x") == "Hello there, x"
    content, headers = await proc.rpc_send("hello", "ping", "?")
    assert _container_of(content["pid"]) == server.container_id != client.id
    assert content["service"] == "hello" and headers["broker-user"] == "guest"


@pytest_twisted.ensureDeferred
async def test_requests_are_shared_round_robin_between_two_processes(launch: Launcher,
                                                                     here: ContainerFactory) -> None:
    """Two containers run hello: calls one after the other alternate; calls in flight together are
    spread over both."""
    first, second = await launch(HELLO_APP), await launch(HELLO_APP)
    client = await here(sysname=SYSNAME)
    proc = await client_process(client)
    served: Counter[str] = Counter()
    for i in range(20):
        content, _ = await proc.rpc_send("hello", "ping", i)
        served[_container_of(content["pid"])] += 1
    assert served == {first.container_id: 10, second.container_id: 10}
    replies = await defer.gatherResults([proc.rpc_send("hello", "ping", i) for i in range(40)])
    together = Counter(_container_of(content["pid"]) for content, _ in replies)
    assert set(together) == {first.container_id, second.container_id}


@pytest_twisted.ensureDeferred
async def test_request_of_a_killed_container_is_redelivered_to_the_other(launch: Launcher,
                                                                        here: ContainerFactory) -> None:
    """SIGKILL the container handling a request (not acknowledged yet): the broker gives the request
    to the other container, which answers it."""
    first, second = await launch(HELLO_APP), await launch(HELLO_APP)
    client = await here(sysname=SYSNAME)
    proc = await client_process(client)
    label = secrets.token_hex(4)
    call = proc.rpc_send("hello", "sleep", {"seconds": 600, "if_redelivered": 0, "label": label}, timeout=60)
    holder, _ = await _first_line([first, second], rf"sleeping 600 s \[{label}\]")
    other = second if holder is first else first
    holder.signal("KILL")
    assert await holder.exited() == -9
    content, _ = await call
    assert content == {"slept": 0, "pid": content["pid"], "container": other.container_id, "redelivered": True,
                       "label": label}
    await other.wait_for(rf"sleeping 0 s \(redelivered\) \[{label}\]")


@pytest_twisted.ensureDeferred
async def test_sigterm_gives_waiting_requests_to_the_other_container(launch: Launcher, here: ContainerFactory,
                                                                    rabbitmq: Any, amqp_url: str) -> None:
    """A container stopping on SIGTERM gives back the requests waiting in its receiver (the other
    container answers them), answers the one it could not finish with a 503, and exits 0."""
    require_managed_broker(rabbitmq, "queue counts")
    first = await launch(HELLO_APP, args=["-a", "ion.core.process.terminate_timeout=1"])
    client = await here(sysname=SYSNAME)
    proc = await client_process(client)
    label = secrets.token_hex(4)
    held = proc.rpc_send("hello", "sleep", {"seconds": 600, "label": label}, timeout=60)
    await first.wait_for(rf"sleeping 600 s \[{label}\]")
    # first is the only instance and busy: these wait in its receiver's FIFO (prefetch window).
    waiting = [proc.rpc_send("hello", "ping", i, timeout=60) for i in range(6)]
    await _until_queue(rabbitmq, amqp_url, f"{SYSNAME}.hello", ready=0, unacked=7)
    second = await launch(HELLO_APP)
    assert not any(d.called for d in waiting)
    first.signal("TERM")
    replies = await defer.gatherResults(waiting)
    assert {_container_of(content["pid"]) for content, _ in replies} == {second.container_id}
    with pytest.raises(ReceivedContainerError) as info:
        await held
    assert info.value.response_code == 503 and "terminated before answering" in str(info.value)
    assert await first.exited() == 0
    assert "Traceback" not in first.output
    assert second.count(f"[{label}]") == 0  # answered (503) and acknowledged: not run a second time


# -- the agents ----------------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_nodes_lists_every_container_and_spawn_starts_a_process_in_another(
        launch: Launcher, here: ContainerFactory) -> None:
    """Each agent lists the live containers of the system; spawn(..., node=) starts a process in
    another container, which then answers calls."""
    with_hello = await launch(HELLO_APP)
    bare = await launch()
    client = await here(sysname=SYSNAME)
    agent = client.proc_manager.get(client.agent_pid)
    assert isinstance(agent, ContainerAgent)
    for child in (with_hello, bare):
        await agent.wait_for_node(child.container_id, timeout=30)
    everyone = {with_hello.container_id, bare.container_id, client.id}
    shell = await ShellHelpers.create(client)
    listing = await shell.nodes()
    assert {row["container"] for row in listing} == everyone
    # Every agent hears the others: ask one in another process.
    content, _ = await shell.proc.rpc_send(agent_queue(SYSNAME, with_hello.container_id), "nodes", None)
    assert {node["container"] for node in content} == everyone

    pid = str(await shell.spawn("hello", node=bare.container_id))
    assert _container_of(pid) == bare.container_id
    content, _ = await shell.proc.rpc_send(pid, "hello", "there")
    assert content == {"value": "Hello there, there"}
    table, _ = await shell.proc.rpc_send(agent_queue(SYSNAME, bare.container_id), "ps", None)
    assert {"pid": pid, "name": "hello"}.items() <= next(p for p in table if p["pid"] == pid).items()
    module_pid = str(await shell.spawn("ion.services.hello", node=bare.container_id, name="hello2"))
    assert _container_of(module_pid) == bare.container_id and module_pid != pid
    # Both spawns are in the audit file of the container that ran them, under the broker's login.
    # (The child writes its audit lines in its blocking pool, after answering: wait for them, bounded.)
    assert bare.audit_path is not None
    audit: list[dict[str, Any]] = []
    for _ in range(200):
        lines = bare.audit_path.read_text().splitlines() if bare.audit_path.exists() else []
        audit = [json.loads(line) for line in lines if line.endswith("}")]
        if len(audit) >= 2:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert [(r["action"], r["result"], r["user"], r["container"]) for r in audit] == [
        ("agent.spawn", "ok", "guest", bare.container_id)] * 2


# -- any AMQP client -----------------------------------------------------------------------------------------
def readme_pika_example() -> str:
    """The plain-pika example of README's "Many containers on RabbitMQ" section, verbatim."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Many containers on RabbitMQ", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    examples = [b for b in blocks if "pika.BlockingConnection" in b]
    assert len(examples) == 1, "README's section has one plain-pika example"
    return examples[0]


def test_readme_example_is_plain_pika_in_15_lines() -> None:
    """The README example imports no ioncore module and is 15 lines long."""
    code = readme_pika_example()
    imports = [line for line in code.splitlines() if line.startswith(("import ", "from "))]
    assert imports and all("ion" not in re.split(r"[ ,]+", line) for line in imports), imports
    assert "ion." not in "".join(imports)
    assert len(code.strip().splitlines()) <= 15


@pytest_twisted.ensureDeferred
async def test_plain_pika_client_calls_a_service(launch: Launcher, amqp_url: str, tmp_path: Path) -> None:
    """The README's plain-pika script (no ioncore import) calls hello in a container and prints the reply."""
    await launch(HELLO_APP)
    code = readme_pika_example()
    # -I: isolated (no PYTHONPATH, no user site); run from an empty folder, so ``ion`` is not at hand.
    out, err, status = await utils.getProcessOutputAndValue(
        sys.executable, ["-I", "-c", code, amqp_url, SYSNAME], env=_child_env(), path=str(tmp_path))
    assert status == 0, err.decode(errors="replace")
    assert out.decode().strip() == "OK {'value': 'Hello there, pika'}"


# -- credentials ---------------------------------------------------------------------------------------------
def _broker_options(rabbitmq: Any, amqp_url: str) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(rabbitmq.port), "-v", _vhost(amqp_url)]


async def _check_login(server: ContainerProcess, here: ContainerFactory, user: str, password: str) -> None:
    """The child logged in as ``user``: its replies carry that broker-validated user."""
    client = await here(sysname=SYSNAME)
    proc = await client_process(client)
    content, headers = await proc.rpc_send("hello", "whoami", None)
    assert content == {"user-id": "ANONYMOUS", "broker-user": "guest"}  # who called: this container
    assert headers["broker-user"] == user  # who answered: the child's login
    assert f"amqp://{user}@127.0.0.1" in server.output
    assert password not in server.output


@pytest_twisted.ensureDeferred
async def test_credentials_from_a_credfile(launch: Launcher, here: ContainerFactory, rabbitmq: Any,
                                           amqp_url: str, amqp_user: Any, tmp_path: Path) -> None:
    """--broker_credfile FILE ('user password') logs the container in as that (non-guest) user."""
    cred = tmp_path / "broker.cred"
    cred.write_text(f"{amqp_user.name} {amqp_user.password}\n")
    cred.chmod(0o600)
    server = await launch(HELLO_APP, broker_args=[*_broker_options(rabbitmq, amqp_url),
                                                  "--broker_credfile", str(cred)])
    await _check_login(server, here, amqp_user.name, amqp_user.password)


@pytest_twisted.ensureDeferred
async def test_credentials_from_the_environment(launch: Launcher, here: ContainerFactory, rabbitmq: Any,
                                                amqp_url: str, amqp_user: Any) -> None:
    """$ION_BROKER_USERNAME / $ION_BROKER_PASSWORD log the container in when no option gives a login."""
    server = await launch(HELLO_APP, broker_args=_broker_options(rabbitmq, amqp_url),
                          env={"ION_BROKER_USERNAME": amqp_user.name, "ION_BROKER_PASSWORD": amqp_user.password})
    await _check_login(server, here, amqp_user.name, amqp_user.password)


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_one_error_line_and_a_non_zero_exit(launch: Launcher, rabbitmq: Any,
                                                                    amqp_url: str, amqp_user: Any) -> None:
    """A refused login: one 'Error:' line naming the broker and the user, no traceback, no retry
    loop, a non-zero exit (EX_UNAVAILABLE)."""
    wrong = "not-" + amqp_user.password
    child = await launch(HELLO_APP, broker_args=_broker_options(rabbitmq, amqp_url), ready=False,
                         env={"ION_BROKER_USERNAME": amqp_user.name, "ION_BROKER_PASSWORD": wrong})
    code = await child.exited(60)
    errors = [line for line in child.lines if "Error:" in line]
    assert code == 69, child.output
    assert errors == [f"Error: broker at 127.0.0.1:{rabbitmq.port} refused login for user '{amqp_user.name}' "
                      "(wrong user name or password?)"], child.output
    assert "Traceback" not in child.output and "reconnect" not in child.output
    assert wrong not in child.output


# -- broker restart --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_broker_restart_during_a_stream_of_calls(launch: Launcher, amqp_url: str, rabbitmq: Any,
                                                       tmp_path: Path) -> None:
    """RabbitMQ stops (stop_app) and starts again while this container calls hello in a child
    container: both stay up and log the loss, the child reconnects with backoff and re-declares its
    queues; every call in flight at the loss fails at once with ConversationError, the stream goes
    on, and calls after the reconnection succeed."""
    require_managed_broker(rabbitmq, "restart")
    levels = tmp_path / "loglevels.config"
    levels.write_text('{"": "info", "ion": "info"}\n')  # the transport's reconnection lines too
    # Reconnection attempts after 0.25-0.5 s, then every 0.5-1 s (reconnect_max, jitter) rather than up to 10 s apart.
    server = await launch(HELLO_APP, args=["-a", "ion.core.process.terminate_timeout=1,"
                                                 "ion.core.messaging.reconnect_max=1"],
                          env={"ION_LOGLEVELS": str(levels)})
    transport = AmqpTransport(amqp_url, reconnect_initial=0.2, reconnect_max=1.0)
    factory = ContainerFactory(broker_url=amqp_url)
    broker_down = False
    stop = [False]
    try:
        client = await factory(sysname=SYSNAME, transport=transport,
                               config={"ion.core.process": {"rpc_timeout": 60}})
        proc = await client_process(client)
        hello = HelloClient(proc)
        content, _ = await proc.rpc_send("hello", "ping", None)
        hello_pid = content["pid"]
        # A call surely in flight at the loss: a long sleep on the service's own pid queue
        # (its shared queue stays free for the stream).
        label = secrets.token_hex(4)
        in_flight = proc.rpc_send(hello_pid, "sleep", {"seconds": 600, "label": label})
        await server.wait_for(rf"sleeping 600 s \[{label}\]")

        outcomes: list[tuple[Any, float]] = []
        stream_done: defer.Deferred[None] = defer.Deferred()
        recovered: defer.Deferred[None] = defer.Deferred()
        restored_at: list[int] = []

        def stream() -> None:
            # One call after the other, each started shortly after the previous one ended.
            if stop[0]:
                stream_done.callback(None)
                return
            started = time.monotonic()

            def ended(result: Any) -> None:
                outcomes.append((result, time.monotonic() - started))
                if restored_at and isinstance(result, str) and not recovered.called:
                    recovered.callback(None)
                reactor.callLater(0.02, stream)

            hello.hello(f"n{len(outcomes)}").addBoth(ended)

        stream()
        heard: dict[str, defer.Deferred[Any]] = {"lost": defer.Deferred(), "restored": defer.Deferred()}

        def listener(event: str, reason: Any) -> None:
            if event in heard and not heard[event].called:
                heard[event].callback(reason)

        transport.add_connection_listener(listener)
        lost, restored = heard["lost"], heard["restored"]
        mark = len(server.lines)
        broker_down = True
        stopping = threads.deferToThread(rabbitmq.stop_app)
        await lost.addTimeout(60, reactor)
        with pytest.raises(ConversationError, match="connection to the broker lost") as info:
            await in_flight  # failed as the loss was noticed, not after its 60 s timeout
        assert not isinstance(info.value, ConversationTimeout)
        await server.wait_for(r"lost the connection to broker at ", after=mark)
        await stopping
        await threads.deferToThread(rabbitmq.start_app)
        await restored.addTimeout(60, reactor)
        broker_down = False
        restored_at.append(len(outcomes))
        await server.wait_for(r"reconnected to broker at .* after \d+ attempt", after=mark)
        await server.wait_for(r"connection to the broker restored", after=mark)
        await recovered.addTimeout(60, reactor)  # the stream goes on after the restart
        assert await hello.hello("after") == "Hello there, after"
        stop[0] = True
        await stream_done
        # Reconnection with backoff: each failed attempt waits longer (0.5 s, 1 s, ... up to reconnect_max),
        # each wait shortened by a random share of up to reconnect_jitter (0.5): never longer.
        log = "\n".join(server.lines[mark:])
        delays = [float(m) for m in re.findall(r"reconnecting to broker at \S+ in ([\d.]+) s", log)]
        assert len(delays) >= 2 and 0.25 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0, log
        assert all(0.5 <= d <= 1.0 for d in delays[1:]), log
        assert server.exit_code is None, server.output  # still up
        failures = [(r.value, secs) for r, secs in outcomes if not isinstance(r, str)]
        assert failures, "some calls of the stream met the outage"
        for exc, secs in failures:
            assert isinstance(exc, ConversationError) and not isinstance(exc, ConversationTimeout), exc
            assert secs < 30, (exc, secs)  # prompt: never a wait for the 60 s timeout
        assert any(isinstance(r, str) for r, _ in outcomes[restored_at[0]:])
    finally:
        stop[0] = True
        if broker_down:
            await threads.deferToThread(rabbitmq.start_app)
        await factory.teardown()
    assert await server.stop() == 0, server.output
    assert "Traceback" not in server.output, server.output
