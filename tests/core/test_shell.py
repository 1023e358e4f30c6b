"""The cc shell: its helpers without a terminal, the manhole driven by keystrokes, and a real pty session."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.conch.insults import insults
from twisted.internet import defer
from twisted.internet.testing import StringTransport

from ion.core.agent import ContainerAgent
from ion.core.exceptions import IonError, ReceivedApplicationError
from ion.core.lifecycle import State
from ion.core.shell import Listing, ShellHelpers, ShellManhole, Text, completions, error_line
from ion.services.hello import HelloService
from tests.core.test_tap import ended_in, spawn_twistd

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[A-Za-z=>]")


async def shell_in(container: Any) -> ShellHelpers:
    helpers = await ShellHelpers.create(container)
    return helpers


@pytest_twisted.async_fixture
async def hello_container(container: Any) -> Any:
    await container.app_manager.start_app("hello")
    return container


# -- the helpers, without a terminal ------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_shell_has_a_process_of_its_own(container: Any) -> None:
    """The helpers make their calls from a process named 'shell' spawned in the container."""
    helpers = await shell_in(container)
    assert helpers.proc.proc_name == "shell" and helpers.proc.state is State.ACTIVE
    assert container.proc_manager.get(helpers.proc.id) is helpers.proc
    ns = helpers.namespace()
    assert set(ShellHelpers.HELPERS) <= set(ns) and ns["container"] is container


@pytest_twisted.ensureDeferred
async def test_rpc_send_fires_with_the_reply_content(hello_container: Any) -> None:
    """rpc_send gives the reply's content, not (content, headers)."""
    helpers = await shell_in(hello_container)
    assert await helpers.rpc_send("hello", "hello", "you there") == {"value": "Hello there, you there"}
    with pytest.raises(ReceivedApplicationError, match="no operation 'nope'"):
        await helpers.rpc_send("hello", "nope")


@pytest_twisted.ensureDeferred
async def test_ps_svc_ms_apps(hello_container: Any) -> None:
    """ps, svc, ms and apps describe this container; they print as tables."""
    helpers = await shell_in(hello_container)
    ps = helpers.ps()
    assert isinstance(ps, Listing)
    assert [(row["name"], row["class"]) for row in ps] == [
        ("agent", "ContainerAgent"), ("hello", "HelloService"), ("shell", "Process")]
    table = repr(ps).splitlines()
    assert table[0].split() == ["pid", "name", "class", "state", "parent"] and len(table) == 4

    svc = helpers.svc()
    assert [(r["service"], r["queue"]) for r in svc] == [("hello", "test.hello")]

    ms = helpers.ms()
    names = {row["name"] for row in ms}
    assert {hello_container.exchange_name, hello_container.events_exchange, "test.hello",
            f"test.agent.{hello_container.id}", helpers.proc.id} <= names
    events_row = next(r for r in ms if r["name"].endswith(".events") and r["kind"] == "queue")
    assert events_row["exchange"] == hello_container.events_exchange and events_row["bindings"] == ["container.#"]

    apps = helpers.apps()
    assert [(r["app"], r["version"]) for r in apps] == [("hello", "0.1")]
    assert len(apps[0]["pids"]) == 1


@pytest_twisted.ensureDeferred
async def test_kill_terminates_a_process(hello_container: Any) -> None:
    """kill(pid) terminates one process (not a restart: the app's supervisor leaves it)."""
    helpers = await shell_in(hello_container)
    pid = next(r["pid"] for r in helpers.ps() if r["name"] == "hello")
    message = await helpers.kill(pid)
    assert isinstance(message, Text) and message == f"terminated {pid} (hello)"
    assert hello_container.proc_manager.get(pid) is None
    with pytest.raises(IonError, match="no process"):
        await helpers.kill(pid)
    with pytest.raises(IonError, match="shell's own process"):
        await helpers.kill(helpers.proc.id)
    with pytest.raises(IonError, match="container agent"):
        await helpers.kill("agent")


@pytest_twisted.ensureDeferred
async def test_spawn_send_ping_start_and_stop_app(container: Any) -> None:
    """spawn (module or app), send, ping, start_app and stop_app work from the helpers."""
    helpers = await shell_in(container)
    pid = await helpers.spawn("ion.services.hello", spawnargs={"greeting": "Hey"}, name="h1")
    assert isinstance(container.proc_manager.get(pid), HelloService)
    assert await helpers.rpc_send(pid, "hello", "x") == {"value": "Hey, x"}
    pong = await helpers.ping("hello")
    assert pong["pid"] == pid and pong["service"] == "hello"
    assert await helpers.send("hello", "hello", "one-off") == f"sent 'hello' to {container.sysname}.hello"
    assert await helpers.start_app("hello") == "started hello"
    assert "hello" in container.app_manager.running
    assert await helpers.start_app("hello") == "already running: hello"
    assert await helpers.stop_app("hello") == "stopped hello"
    assert "hello" not in container.app_manager.running


@pytest_twisted.ensureDeferred
async def test_apps_by_name_go_through_the_agent_and_are_audited(container_factory: Any, tmp_path: Any) -> None:
    """start_app/stop_app of a name is the agent's control op (the one control path), in the audit trail;
    a .app path (or config, args, mult) starts it here, as before."""
    import json

    container = await container_factory(config={"ion.core.audit": {"path": str(tmp_path / "a.jsonl")}})
    helpers = await shell_in(container)
    assert await helpers.start_app("hello") == "started hello"
    assert await helpers.stop_app("hello") == "stopped hello"
    assert await helpers.start_app("res/apps/hello.app") == "started hello"
    await container.audit.flush()
    assert [json.loads(line)["action"] for line in (tmp_path / "a.jsonl").read_text().splitlines()] == [
        "app.start", "app.stop"]


@pytest_twisted.ensureDeferred
async def test_nodes_and_remote_spawn(container_factory: Any) -> None:
    """nodes() lists both containers of the system; spawn(..., node=) starts the process in the other one."""
    from twisted.internet import reactor

    a = await container_factory()
    b = await container_factory()
    agent = a.proc_manager.get(a.agent_pid)
    assert isinstance(agent, ContainerAgent)
    await agent.wait_for_node(b.id).addTimeout(10, reactor)
    helpers = await shell_in(a)
    nodes = await helpers.nodes()
    assert sorted(n["container"] for n in nodes) == sorted([a.id, b.id])
    assert "container" in repr(nodes).splitlines()[0]
    # ps(node): another container's processes (through its agent); ps('*'): every container's.
    there = await helpers.ps(b.id)
    assert {row["pid"] for row in there} == set(b.proc_manager.processes)
    assert repr(there).splitlines()[0].split()[:2] == ["container", "pid"]
    assert {row["container"] for row in await helpers.ps("*")} == {a.id, b.id}

    pid = await helpers.spawn("ion.services.hello", node=b.id)
    assert pid.startswith(b.id + ".") and isinstance(b.proc_manager.get(pid), HelloService)
    assert await helpers.rpc_send("hello", "hello", "remote") == {"value": "Hello there, remote"}
    # A unique prefix of a container id names it too, and kill reaches another container's process.
    other = await helpers.spawn("hello", node=b.id[:-1] if not a.id.startswith(b.id[:-1]) else b.id)
    assert other in b.proc_manager.processes
    assert await helpers.kill(other) == f"terminating {other}"
    with pytest.raises(ReceivedApplicationError, match="cannot spawn"):
        await helpers.spawn("no_such_module.x", node=b.id)


def test_info_lists_every_helper_with_one_line() -> None:
    """info() names each helper with its signature and one line of help."""
    class FakeContainer:
        id, sysname = "cid", "sys"

    class FakeProc:
        id = "cid.3"

    text = ShellHelpers(FakeContainer(), FakeProc()).info()  # type: ignore[arg-type]
    assert isinstance(text, Text) and repr(text) == str(text)
    for name in ShellHelpers.HELPERS:
        assert re.search(rf"^  {name}\(", text, re.M), name
    assert "rpc_send(to, op, content=None, timeout=None)" in text


def test_listing_and_error_line() -> None:
    """Listings print as aligned tables (or their empty text); errors print as one line."""
    rows = Listing([{"a": 1, "b": None}, {"a": "long value", "b": [1, 2]}], ["a", "b"])
    assert repr(rows).splitlines() == ["a           b", "1           -", "long value  1,2"]
    assert rows == [{"a": 1, "b": None}, {"a": "long value", "b": [1, 2]}]
    assert repr(Listing([], ["a"], "(nothing)")) == "(nothing)"
    assert error_line(IonError("boom\nmore")) == "Error: boom"
    assert error_line(ValueError("bad")) == "Error: ValueError: bad"


def test_completions() -> None:
    """Completion finds names and attributes of the namespace."""
    ns = {"rpc_send": print, "ps": print, "ping": print, "container": object()}
    assert completions(ns, "rpc_") == ["rpc_send("]
    assert set(completions(ns, "p")) >= {"ps(", "ping(", "print("}
    assert [c.rstrip("()") for c in completions(ns, "container.__cl")] == ["container.__class__"]


# -- the manhole, driven by keystrokes ------------------------------------------------------------------
class Terminal:
    """A ShellManhole behind insults.ServerProtocol on a StringTransport."""

    def __init__(self, namespace: dict[str, Any], **kwargs: Any) -> None:
        self.transport = StringTransport()
        self.server = insults.ServerProtocol(ShellManhole, namespace, **kwargs)
        self.server.makeConnection(self.transport)
        self.proto: ShellManhole = self.server.terminalProtocol

    def type(self, keys: bytes) -> None:
        self.server.dataReceived(keys)

    async def run(self, line: str) -> str:
        """Type a line and Enter; wait until the line is done (its calls answered); the new screen text."""
        self.transport.clear()
        self.type(line.encode() + b"\r")
        running = self.proto.interpreter.running
        if running is not None:
            from twisted.internet import reactor

            done: defer.Deferred[None] = defer.Deferred()
            running.addBoth(lambda result: (done.callback(None), result)[1])
            await done.addTimeout(10, reactor)
        return self.text()

    def text(self) -> str:
        return _ANSI.sub(b"", self.transport.value()).decode("utf-8", "replace").replace("\r\n", "\n")


@pytest_twisted.ensureDeferred
async def test_manhole_prints_what_rpc_send_fires_with(hello_container: Any) -> None:
    """Typing rpc_send(...) prints the reply's content when it comes, then the prompt again."""
    helpers = await shell_in(hello_container)
    term = Terminal(helpers.namespace())
    assert term.text().endswith("><> ")
    out = await term.run("rpc_send('hello', 'hello', 'you there')")
    assert "{'value': 'Hello there, you there'}\n" in out
    assert "(" not in out.split("{'value'")[1]  # the content, not (content, headers)
    assert out.rstrip().endswith("><>")
    assert term.proto.namespace["_"] == {"value": "Hello there, you there"}


@pytest_twisted.ensureDeferred
async def test_manhole_ps_info_kill(hello_container: Any) -> None:
    """ps() lists the processes, info() the helpers, kill(pid) terminates one."""
    helpers = await shell_in(hello_container)
    term = Terminal(helpers.namespace())
    out = await term.run("ps()")
    for name in ("agent", "hello", "shell"):
        assert re.search(rf"\.\d+\s+{name}\s", out), out
    out = await term.run("info()")
    assert all(f"  {name}(" in out for name in ShellHelpers.HELPERS)
    pid = next(r["pid"] for r in helpers.ps() if r["name"] == "hello")
    out = await term.run(f"kill({pid!r})")
    assert f"terminated {pid} (hello)" in out
    assert hello_container.proc_manager.get(pid) is None
    out = await term.run("ps()")
    assert " hello " not in out


@pytest_twisted.ensureDeferred
async def test_manhole_errors_are_one_line(hello_container: Any) -> None:
    """A failed call, or an ion error raised at once, prints one 'Error:' line and no traceback."""
    helpers = await shell_in(hello_container)
    term = Terminal(helpers.namespace())
    out = await term.run("rpc_send('hello', 'nope')")
    # An answer that comes later is written over the fresh prompt, which is then redrawn.
    assert [line.removeprefix("><> ") for line in out.splitlines() if "Error" in line] == [
        "Error: 404 UnknownOperation from hello: hello has no operation 'nope'"]
    out = await term.run("kill('no-such-pid')")
    assert "Error: no process 'no-such-pid'" in out and "Traceback" not in out
    out = await term.run("1/0")
    assert "ZeroDivisionError" in out  # plain Python errors keep their traceback


@pytest_twisted.ensureDeferred
async def test_manhole_tab_completion_and_history(container: Any, tmp_path: Path) -> None:
    """Tab completes names; history is loaded from and saved to the history file; Ctrl-D leaves."""
    history = tmp_path / "history"
    history.write_bytes(b"ps()\n")
    helpers = await shell_in(container)
    left: list[bool] = []
    term = Terminal(helpers.namespace(), history_path=history, on_exit=lambda: left.append(True))
    assert term.proto.historyLines == [b"ps()"]

    term.type(b"rpc_se\t")
    assert b"".join(term.proto.lineBuffer) == b"rpc_send("
    term.type(b"\x15")  # Ctrl-U clears the line
    assert term.proto.lineBuffer == []
    term.transport.clear()
    term.type(b"p\t")  # several matches: listed, the line kept
    assert "ping(" in term.text() and "ps(" in term.text()
    assert b"".join(term.proto.lineBuffer) == b"p"
    term.type(b"\x15")

    await term.run("svc()")
    term.type(b"\x04")  # Ctrl-D on an empty line
    assert left == [True]
    assert history.read_bytes().splitlines() == [b"ps()", b"svc()"]
    term.type(b"\x04")
    assert left == [True]  # once


# -- a real session on a pty --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_twistd_cc_shell_on_a_terminal() -> None:
    """`twistd -n cc res/apps/hello.app` on a terminal opens the shell; Ctrl-D stops it with exit 0."""
    proto = spawn_twistd("res/apps/hello.app", env={"ION_SHELL_HISTORY": ""}, use_pty=True)
    try:
        await proto.wait_for(b"><> ")
        proto.transport.write(b"rpc_send('hello', 'hello', 'you there')\r")
        await proto.wait_for(b"{'value': 'Hello there, you there'}")
        proto.transport.write(b"ps()\r")
        await proto.wait_for(b"HelloService")
        proto.transport.write(b"\x04")
        code = await ended_in(proto)
    except defer.TimeoutError:
        proto.transport.signalProcess("KILL")
        raise AssertionError(proto.output.decode(errors="replace")) from None
    out = proto.output.decode(errors="replace")
    assert code == 0, out
    assert "shell closed: stopping the container" in out and "Traceback" not in out


# -- issue #15: as a user meets it, on a real terminal ---------------------------------------------------------
async def shell_session(*args: str, tee: Path | None = None) -> Any:
    """`twistd -n cc ARGS` (README's commands: no --pidfile) on a pty, once its prompt is there."""
    proto = spawn_twistd(*args, env={"ION_SHELL_HISTORY": ""}, use_pty=True, twistd_args=("-n",), tee=tee)
    try:
        await proto.wait_for(b"><> ")
    except RuntimeError:
        if proto.exit_code is None:
            proto.transport.signalProcess("KILL")
        raise
    return proto


async def leave(proto: Any) -> str:
    """Ctrl-D: the container stops with exit 0; its whole output, ANSI sequences taken out."""
    proto.transport.write(b"\x04")
    try:
        code = await ended_in(proto)
    except defer.TimeoutError:
        proto.transport.signalProcess("KILL")
        raise AssertionError(proto.tail()) from None
    assert code == 0, proto.tail()
    return screen(proto.output)


def screen(raw: bytes) -> str:
    return _ANSI.sub(b"", raw).decode("utf-8", "replace").replace("\r\n", "\n")


async def until(proto: Any, check: Any, what: str, timeout: float = 20) -> None:
    """Poll the child's output (bounded) until ``check(screen text)`` holds."""
    from twisted.internet import reactor, task

    for _ in range(int(timeout / 0.05)):
        if check(screen(proto.output)):
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{what}: not within {timeout:g} s; output:\n{proto.tail()}")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_help_prints_and_returns_without_freezing_the_container() -> None:
    """help(x) prints x's documentation and the prompt comes back; help() prints a short text
    instead of pydoc's interactive help (which blocked the reactor on the raw terminal)."""
    proto = await shell_session("res/apps/hello.app")
    try:
        proto.transport.write(b"help(rpc_send)\r")
        await proto.wait_for(b"Help on method rpc_send")
        proto.transport.write(b"help()\r")
        await proto.wait_for(b"This is the ><> shell")
        proto.transport.write(b"help('for')\r")
        await proto.wait_for(b'The "for" statement')
        proto.transport.write(b"rpc_send('hello', 'hello', 'after help')\r")  # the reactor still runs
        await proto.wait_for(b"Hello there, after help")
    except RuntimeError as exc:
        proto.transport.signalProcess("KILL")
        raise AssertionError(str(exc)) from None
    out = await leave(proto)
    assert "help>" not in out and "Traceback" not in out


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_shell_with_stdout_piped_through_tee(tmp_path: Path) -> None:
    """`twistd -n cc res/apps/hello.app | tee log` (stdin a terminal, stdout a pipe) opens the
    shell instead of failing with (25, 'Inappropriate ioctl for device'); the log reaches the file."""
    log = tmp_path / "log"
    proto = await shell_session("res/apps/hello.app", tee=log)
    try:
        proto.transport.write(b"rpc_send('hello', 'hello', 'piped')\r")
        await proto.wait_for(b"Hello there, piped")
    except RuntimeError as exc:
        proto.transport.signalProcess("KILL")
        raise AssertionError(str(exc)) from None
    out = await leave(proto)
    assert "Inappropriate ioctl" not in out and "Traceback" not in out, out
    assert "ready: system" in log.read_text()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_line_gets_the_results_of_its_calls(tmp_path: Path) -> None:
    """`p = spawn('hello')` makes p the pid (kill(p) works); a list comprehension of rpc_send
    gives the replies, not Deferreds; nodes() shows a local time and an age; Tab shows what
    it completed; a log line is written above the prompt, which is redrawn with the typed text."""
    proto = await shell_session("res/apps/hello.app")
    try:
        proto.transport.write(b"p = spawn('hello')\r")
        proto.transport.write(b"kill(p)\r")  # typed before the first line is done: kept for it
        await proto.wait_for(b"terminated ")
        proto.transport.write(b"[rpc_send('hello', 'hello', str(i))['value'] for i in range(3)]\r")
        await proto.wait_for(b"['Hello there, 0', 'Hello there, 1', 'Hello there, 2']")
        proto.transport.write(b"nodes()\r")
        await until(proto, lambda text: re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+ s ago\)", text),
                    "nodes() with a local time and an age")

        proto.transport.write(b"rpc_se\t")
        await until(proto, lambda text: text.rstrip().endswith("><> rpc_send("), "Tab completion shown")
        proto.transport.write(b"\x15")  # Ctrl-U

        flag = tmp_path / "now"
        proto.transport.write(
            f"import os; from twisted.internet import task, reactor; from twisted.logger import Logger; "
            f"lc = task.LoopingCall(lambda: os.path.exists({str(flag)!r}) and (lc.stop(), "
            f"Logger(namespace='ion.core.shell').warn('LOG{{n}}LINE', n=42))); "
            f"reactor.callLater(0, lc.start, 0.05)\r".encode())
        proto.transport.write(b"x = 1234567")
        await until(proto, lambda text: text.rstrip().endswith("><> x = 1234567"), "the typed text")
        flag.touch()
        await until(proto, lambda text: "LOG42LINE" in text and "><> x = 1234567" in text.split("LOG42LINE")[-1],
                    "the prompt and the typed text redrawn below the log line")
        proto.transport.write(b"\x15")
    except RuntimeError as exc:
        proto.transport.signalProcess("KILL")
        raise AssertionError(str(exc)) from None
    out = await leave(proto)
    assert "Deferred" not in out and "Traceback" not in out, out
    log_line = next(line for line in out.splitlines() if "LOG42LINE" in line)
    assert "x = 1234567" not in log_line, log_line  # not in the middle of the prompt's line


def test_sizes_and_times_print_for_people() -> None:
    """Sizes print in binary units, times as local ISO time with their age; they stay numbers."""
    import time

    from ion.core.shell import Size, When, human_size

    assert [human_size(n) for n in (0, 1023, 1536, 12.3 * 2**20, 2 * 2**30)] == [
        "0 B", "1023 B", "1.5 KiB", "12.3 MiB", "2.0 GiB"]
    size = Size(12_900_000)
    assert size == 12_900_000 and repr(size) == "12.3 MiB"
    started = When(time.time() - 300)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(5 min ago\)", str(started))
    table = repr(Listing([{"size": size, "when": started}], ["size", "when"]))
    assert "12.3 MiB" in table and "min ago" in table


def test_helpers_help_is_text_and_never_a_pager() -> None:
    """help(x) returns the rendered text; help() a short guide; an unknown name says so."""
    class FakeContainer:
        id, sysname = "cid", "sys"

    class FakeProc:
        id = "cid.3"

    helpers = ShellHelpers(FakeContainer(), FakeProc())  # type: ignore[arg-type]
    assert "Call ``op`` at a pid or service name" in helpers.help(helpers.rpc_send)
    assert "info()" in helpers.help() and "Ctrl-C" in helpers.help()
    assert helpers.help("no_such_module_x") == "No Python documentation found for 'no_such_module_x'"
    assert helpers.namespace()["help"] == helpers.help


def test_a_waiting_line_keeps_typed_keys_and_ctrl_c_cancels_it() -> None:
    """While a line waits, keys typed are kept (not echoed over the wait) and run after it; Ctrl-C
    cancels the waiting call (its Deferred is cancelled) and the prompt comes back."""
    pending: defer.Deferred[Any] = defer.Deferred()
    cancelled: list[bool] = []
    pending.addErrback(lambda f: cancelled.append(bool(f.check(defer.CancelledError))) or f)
    later: defer.Deferred[Any] = defer.Deferred()
    term = Terminal({"never": lambda: pending, "later": lambda: later})

    term.type(b"x = later()\r")
    assert term.proto.busy
    term.type(b"x + 1\r")  # typed ahead
    assert "x + 1" not in term.text()
    later.callback(41)
    assert not term.proto.busy and term.proto.namespace["x"] == 41
    assert "\n42\n" in term.text() and term.text().rstrip().endswith("><>")

    term.transport.clear()
    term.type(b"never()\r")
    assert term.proto.busy
    term.type(b"\x03")  # Ctrl-C
    assert cancelled == [True] and not term.proto.busy
    assert "KeyboardInterrupt" in term.text() and term.text().rstrip().endswith("><>")


def test_calls_in_a_written_list_run_at_once_and_a_class_is_not_waited_for() -> None:
    """``gatherResults([a(), b()])`` gets the two Deferreds (both calls made at once) and the line waits
    for the gathering; ``d = Deferred()`` keeps the new Deferred instead of waiting for it forever;
    a call given straight as an argument is still waited for (``twice(five())``)."""
    first: defer.Deferred[Any] = defer.Deferred()
    second: defer.Deferred[Any] = defer.Deferred()
    made: list[str] = []

    def call(name: str, d: defer.Deferred[Any]) -> Any:
        made.append(name)
        return d

    ready: defer.Deferred[Any] = defer.Deferred()
    ready.callback(5)
    term = Terminal({"a": lambda: call("a", first), "b": lambda: call("b", second), "defer": defer,
                     "five": lambda: ready, "twice": lambda n: 2 * n})
    term.type(b"defer.gatherResults([a(), b()])\r")
    assert made == ["a", "b"] and term.proto.busy  # both calls made; the line waits for both
    second.callback(2)
    first.callback(1)
    assert not term.proto.busy and "\n[1, 2]\n" in term.text()
    term.transport.clear()
    term.type(b"d = defer.Deferred(); type(d).__name__\r")
    assert not term.proto.busy and "\n'Deferred'\n" in term.text()
    term.transport.clear()
    term.type(b"twice(five())\r")
    assert "\n10\n" in term.text()


def test_what_a_line_may_hold() -> None:
    """Lines with the user's own await, a def, a lambda, a generator expression and plain
    statements run as written; only calls outside those bodies are awaited."""
    ready: defer.Deferred[Any] = defer.Deferred()
    ready.callback(5)
    term = Terminal({"five": lambda: ready, "make": lambda: defer.succeed([1, 2])})
    for line, shown in [("await five()", "5"), ("five() + 1", "6"), ("sum(x for x in make())", "3"),
                        ("f = lambda: five()", None), ("type(f()).__name__", "'int'"),
                        ("len([y for y in make()])", "2"), ("z = 1; z", "1")]:
        term.transport.clear()
        term.type(line.encode() + b"\r")
        assert not term.proto.busy, line
        out = term.text()
        assert "Error" not in out and "Traceback" not in out, (line, out)
        if shown is not None:
            assert f"\n{shown}\n" in out, (line, out)
    term.type(b"def g():\r    return five()\r\r")
    term.transport.clear()
    term.type(b"g()\r")
    assert "\n5\n" in term.text()
