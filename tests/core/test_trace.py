"""Trace context in every message (issue #16 §5): W3C ``traceparent``/``tracestate`` headers, traces
continued across ops and replies, malformed context replaced, log lines with the trace id, the
shell's ``convs()`` and ``trace()``, and the OpenTelemetry spans with the SDK's in-memory exporter."""

from __future__ import annotations

import io
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from twisted.internet import defer
from twisted.logger import Logger

from ion.core import trace
from ion.core.log import format_event, text_observer
from ion.core.messaging import message as wire
from ion.core.process import Process
from ion.core.service import ServiceProcess
from ion.core.shell import ShellHelpers
from ion.testing import ClockedSystem
from ion.testing.processes import in_forked_child

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class Back(ServiceProcess):
    """The far end: answers with the trace headers of the request it got."""

    service_name = "back"

    def op_echo(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"traceparent": msg["traceparent"], "tracestate": msg.get("tracestate"),
                "current": trace.current_trace_id()}


class Front(ServiceProcess):
    """Calls ``back`` while it handles a request (awaiting: the trace follows the op)."""

    service_name = "front"
    _log = Logger()

    async def op_relay(self, msg: dict[str, Any]) -> dict[str, Any]:
        self._log.info("relaying")
        inner, headers = await self.rpc_send("back", "echo")
        return {"mine": msg["traceparent"], "inner": inner, "inner_reply": headers["traceparent"]}


def _spawn_pair() -> tuple[ClockedSystem, Process]:
    system = ClockedSystem()
    system.spawn(Back)
    system.spawn(Front)
    return system, system.spawn(Process, name="caller")


# -- the format -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    TP,
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-says",  # a later version
])
def test_valid_traceparents_parse(value: str) -> None:
    assert trace.parse(value) == (value[3:35], value[36:52], value[53:55])


@pytest.mark.parametrize("value", [
    None, 42, b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # uppercase
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",  # version 00 with more
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",   # short trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
    "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
    " " + TP,
])
def test_malformed_traceparents_do_not_parse(value: Any) -> None:
    assert trace.parse(value) is None


@pytest.mark.parametrize(("value", "ok"), [
    ("rojo=00f067aa0ba902b7", True),
    ("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", True),
    ("tenant@vendor=x , other=y", True),
    ("", False),
    ("Rojo=1", False),           # keys are lowercase
    ("rojo", False),             # no value
    ("rojo=1,rojo=2", False),    # a key twice
    ("a=" + "x" * 511, False),   # over 512 characters
    (",".join(f"k{i}=v" for i in range(33)), False),  # over 32 members
    (7, False),
])
def test_tracestate_checked(value: Any, ok: bool) -> None:
    assert trace.valid_tracestate(value) is ok


def test_ensure_replaces_what_is_not_a_trace_context() -> None:
    msg: dict[str, Any] = {"traceparent": "garbage", "tracestate": "rojo=1"}
    trace.ensure(msg)
    assert trace.parse(msg["traceparent"]) is not None
    assert "tracestate" not in msg  # (it belonged to the traceparent that was replaced)
    missing: dict[str, Any] = {}
    trace.ensure(missing)
    assert trace.parse(missing["traceparent"]) is not None
    kept = {"traceparent": TP, "tracestate": "rojo=1"}
    trace.ensure(kept)
    assert kept == {"traceparent": TP, "tracestate": "rojo=1"}
    bad_state = {"traceparent": TP, "tracestate": "x" * 600}
    trace.ensure(bad_state)
    assert bad_state == {"traceparent": TP}
    later = {"traceparent": "01-" + TP[3:] + "-more"}
    trace.ensure(later)
    assert later["traceparent"] == "00-" + TP[3:]


def test_ids_are_fresh_and_never_zero() -> None:
    ids = {trace.new_span_id() for _ in range(5000)}
    assert len(ids) == 5000 and all(len(i) == 16 and i != "0" * 16 for i in ids)
    traces = {trace.new_trace_id() for _ in range(5000)}
    assert len(traces) == 5000 and all(len(t) == 32 for t in traces)


def test_a_forked_child_draws_ids_of_its_own() -> None:
    """A forked child's next trace is not the parent's next one (the id pool is drawn anew)."""
    trace.new_span_id()  # the parent's pool is in use
    child = in_forked_child(trace.new_traceparent)
    assert trace.parse(child) is not None
    assert child != trace.new_traceparent()  # the parent's next trace is not the child's


def test_new_traces_made_ahead_are_valid_fresh_and_drawn_again() -> None:
    """The traceparents of new traces, made ahead in a batch: each valid (version 00, flags 00, no zero
    id), none repeated, also past the end of a batch (a new one is drawn); a batch with an all-zero id
    is never used."""
    made = [trace.continue_trace(None) for _ in range(3 * trace._TRACEPARENTS_AHEAD + 7)]
    assert len(set(made)) == len(made)
    assert all(trace.parse(tp) is not None and tp.startswith("00-") and tp.endswith("-00") for tp in made)
    assert len({tp[3:35] for tp in made}) == len(made)  # a new trace id each time
    batch = trace._fresh_traceparents()
    assert len(batch) == trace._TRACEPARENTS_AHEAD * 55
    assert all(trace.parse(batch[at:at + 55]) is not None for at in range(0, len(batch), 55))


def test_a_batch_of_new_traces_with_a_zero_id_is_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    urandom = trace.os.urandom
    draws = [bytes(55 * trace._TRACEPARENTS_AHEAD)]  # all zeros: every id of the batch is zero
    monkeypatch.setattr(trace.os, "urandom", lambda n: draws.pop() if draws else urandom(n))
    batch = trace._fresh_traceparents()
    assert not draws  # the zero batch was drawn, and not used
    assert all(trace.parse(batch[at:at + 55]) is not None for at in range(0, len(batch), 55))


def test_ensure_knows_the_traces_started_here_and_checks_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """A traceparent this process started is taken without the regular expression (it is valid by
    construction); any other is checked in full, unhashable and malformed ones included; the set of
    those started is bounded."""
    started = trace.continue_trace(None)
    checked: list[str] = []
    real = trace._TRACEPARENT_00
    monkeypatch.setattr(trace, "_TRACEPARENT_00", lambda tp: checked.append(tp) or real(tp))
    mine = {"traceparent": started, "tracestate": "rojo=1"}
    trace.ensure(mine)
    assert mine == {"traceparent": started, "tracestate": "rojo=1"} and checked == []
    theirs = {"traceparent": TP}
    trace.ensure(theirs)
    assert theirs == {"traceparent": TP} and checked == [TP]
    for bad in (["not", "hashable"], "00-" + "0" * 32 + "-" + "1" * 16 + "-00", started.upper()):
        msg = {"traceparent": bad, "tracestate": "rojo=1"}
        trace.ensure(msg)
        assert msg["traceparent"] != bad and trace.parse(msg["traceparent"]) and "tracestate" not in msg
    for _ in range(trace._STARTED_MAX + 10):
        trace.continue_trace(None)
    assert 0 < len(trace._started) <= trace._STARTED_MAX


def test_a_forked_child_starts_traces_of_its_own() -> None:
    """A forked child's next new trace (of a message sent outside any op) is not the parent's next one."""
    trace.continue_trace(None)  # the parent's batch is in use
    child = in_forked_child(lambda: trace.continue_trace(None))
    assert trace.parse(child) is not None
    assert child != trace.continue_trace(None)


def test_build_outside_any_op_starts_a_new_trace_each_time() -> None:
    one = wire.build(sender="s", receiver="r", op="op", content=None, conv_id="s#1")
    two = wire.build(sender="s", receiver="r", op="op", content=None, conv_id="s#2")
    assert trace.parse(one["traceparent"]) and trace.parse(two["traceparent"])
    assert one["traceparent"][3:35] != two["traceparent"][3:35]
    assert "tracestate" not in one


def test_build_while_handling_a_message_continues_its_trace() -> None:
    token = trace.current_message.set({"traceparent": TP, "tracestate": "rojo=1"})
    try:
        msg = wire.build(sender="s", receiver="r", op="op", content=None, conv_id="s#1")
    finally:
        trace.current_message.reset(token)
    # No SDK records spans: the parent's traceparent goes on whole (OpenTelemetry's no-op
    # propagation), parent id and flags included.
    assert msg["traceparent"] == TP
    assert msg["tracestate"] == "rojo=1"


# -- in the container ----------------------------------------------------------------------------------------
def test_a_call_chain_keeps_one_trace_id() -> None:
    """caller -> front -> back: every request and reply of the chain carries the caller's trace id."""
    system, caller = _spawn_pair()
    content, reply = system.result(caller.rpc_send("front", "relay"))
    first = content["mine"]
    trace_id = first[3:35]
    assert trace.parse(first)
    assert content["inner"]["traceparent"][3:35] == trace_id
    assert content["inner"]["current"] == trace_id  # the op sees its trace id
    assert content["inner_reply"][3:35] == trace_id
    assert reply["traceparent"][3:35] == trace_id
    # no SDK: no span of any hop to name, so the one traceparent goes through the chain unchanged
    assert {first, content["inner"]["traceparent"], content["inner_reply"], reply["traceparent"]} == {first}


def test_calls_outside_any_op_are_different_traces() -> None:
    system, caller = _spawn_pair()
    one = system.result(caller.rpc_send("back", "echo"))[0]["traceparent"]
    two = system.result(caller.rpc_send("back", "echo"))[0]["traceparent"]
    assert one[3:35] != two[3:35]


def test_a_given_traceparent_is_continued_and_its_tracestate_kept() -> None:
    system, caller = _spawn_pair()
    content, reply = system.result(caller.rpc_send("front", "relay",
                                                   headers={"traceparent": TP, "tracestate": "rojo=1"}))
    assert content["mine"] == TP
    assert content["inner"]["traceparent"][3:35] == TRACE
    assert content["inner"]["tracestate"] == "rojo=1"
    assert reply["traceparent"] == TP  # (no SDK: no span of ours to be a new parent)
    assert reply["tracestate"] == "rojo=1"


@pytest.mark.parametrize("bad", ["00-nothex-00f067aa0ba902b7-01", 42, None, ["x"]])
def test_a_malformed_traceparent_starts_a_new_trace_never_an_error(bad: Any) -> None:
    system, caller = _spawn_pair()
    content, reply = system.result(caller.rpc_send("back", "echo",
                                                   headers={"traceparent": bad, "tracestate": "rojo=1"}))
    assert trace.parse(content["traceparent"]) is not None
    assert content["tracestate"] is None
    assert reply["traceparent"][3:35] == content["traceparent"][3:35]


def test_log_lines_carry_the_trace_id() -> None:
    out = io.StringIO()
    observer = text_observer(out)
    log = Logger(observer=observer, namespace="t")
    log.info("outside")
    token = trace.current_message.set({"traceparent": TP})
    try:
        log.info("inside {x}", x=1)
        try:
            raise ValueError("boom")
        except ValueError:
            log.failure("failed")
    finally:
        trace.current_message.reset(token)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("outside")
    assert lines[1].endswith(f"inside 1 trace={TRACE}")
    assert lines[2].endswith(f"failed trace={TRACE}")  # the first line of a traceback's
    assert "ValueError: boom" in out.getvalue()
    assert format_event({"log_format": "x", "log_level": None, "log_time": 0.0}) is not None


def test_a_log_file_carries_the_trace_id_too(tmp_path: Any) -> None:
    """twistd --logfile: the container logs to that (rotating) file through the same lines as on stdout."""
    from ion.core.log import file_observer, use_logfile

    assert use_logfile(str(tmp_path / "cc.log")) == "ion.core.log.file_observer"
    observer = file_observer()
    log = Logger(observer=observer, namespace="ion.test")
    token = trace.current_message.set({"traceparent": TP})
    try:
        log.warn("inside")
    finally:
        trace.current_message.reset(token)
    log.warn("outside")
    lines = (tmp_path / "cc.log").read_text().splitlines()
    assert lines[0].endswith(f"inside trace={TRACE}") and lines[1].endswith("outside")


def test_an_op_logs_with_its_trace_id(log_events: list[dict[str, Any]]) -> None:
    """The observer runs in the op's context: the log line of ``relay`` gets the request's trace id."""
    system, caller = _spawn_pair()
    lines: list[str] = []
    observer = text_observer(io.StringIO())

    def capture(event: dict[str, Any]) -> None:
        if event.get("log_format") == "relaying":
            lines.append(format_event(event) or "")
        observer(event)

    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(capture)
    try:
        system.result(caller.rpc_send("front", "relay", headers={"traceparent": TP}))
    finally:
        globalLogPublisher.removeObserver(capture)
    assert lines and lines[0].rstrip().endswith(f"relaying trace={TRACE}")


# -- the shell -----------------------------------------------------------------------------------------------
class Slow(ServiceProcess):
    service_name = "slow"

    def slc_init(self) -> None:
        self.waiting: defer.Deferred[Any] = defer.Deferred()

    def op_wait(self) -> defer.Deferred[Any]:
        return self.waiting


def test_shell_convs_and_trace() -> None:
    system = ClockedSystem()
    slow = system.spawn(Slow)
    system.spawn(Back)
    shell = ShellHelpers(system.container, system.spawn(Process, name="shell"))
    assert repr(shell.convs()) == "(no conversations in flight)"
    d = shell.proc.rpc_send("slow", "wait", headers={"traceparent": TP})
    system.advance(0.1)
    rows = shell.convs()
    assert {(r["role"], r["op"], r["trace"]) for r in rows} == {("initiator", "wait", TRACE),
                                                                ("responder", "wait", TRACE)}
    assert "trace" in repr(rows).splitlines()[0]
    conv_id = next(r["conv"] for r in rows if r["role"] == "initiator")
    in_flight = shell.trace(conv_id)
    assert len(in_flight) == 2 and {r["in flight"] for r in in_flight} == {True}
    slow.waiting.callback("done")
    system.result(d)
    system.result(shell.proc.rpc_send("back", "echo", headers={"traceparent": TP}))
    system.result(shell.proc.rpc_send("back", "echo"))  # another trace
    by_trace = shell.trace(TRACE)
    assert sorted((r["role"], r["op"], r["state"]) for r in by_trace) == [
        ("initiator", "echo", "DONE"), ("initiator", "wait", "DONE"),
        ("responder", "echo", "DONE"), ("responder", "wait", "DONE")]
    assert all(r["trace"] == TRACE for r in by_trace)
    assert [(r["conv"], r["role"]) for r in shell.trace(conv_id)] == [(r["conv"], r["role"]) for r in by_trace]
    assert "nothing of it" in repr(shell.trace("f" * 32))
    assert "no conversation" in repr(shell.trace("nobody#1"))
    assert "this container" in (ShellHelpers.trace.__doc__ or "")


def test_the_ring_of_recent_conversations_is_bounded() -> None:
    ring = trace.RecentConversations(size=3)
    for i in range(5):
        ring.add(f"p#{i}", TP, "initiator", "p", "q", "op", "rpc", "DONE", 0.0)
    assert [e.conv for e in ring] == ["p#2", "p#3", "p#4"]
    assert {e.trace for e in ring} == {TRACE}


# -- OpenTelemetry ---------------------------------------------------------------------------------------
def test_no_sdk_no_spans() -> None:
    """With the API's default provider nothing is recorded: the message path skips span work."""
    trace.use_tracer_provider(None)
    assert trace.refresh() is None
    system, caller = _spawn_pair()
    assert trace.state.tracer is None
    content, _ = system.result(caller.rpc_send("front", "relay"))
    assert trace.parse(content["mine"])


def test_sdk_client_and_server_spans(spans: InMemorySpanExporter) -> None:
    system, caller = _spawn_pair()
    assert trace.state.tracer is not None
    content, reply = system.result(caller.rpc_send("front", "relay", headers={"traceparent": TP}))
    finished = spans.get_finished_spans()
    by = {(s.kind, s.attributes["rpc.method"]): s for s in finished}
    assert set(by) == {(SpanKind.CLIENT, "relay"), (SpanKind.SERVER, "relay"),
                       (SpanKind.CLIENT, "echo"), (SpanKind.SERVER, "echo")}
    assert {f"{s.context.trace_id:032x}" for s in finished} == {TRACE}
    client, server = by[(SpanKind.CLIENT, "relay")], by[(SpanKind.SERVER, "relay")]
    inner_client, inner_server = by[(SpanKind.CLIENT, "echo")], by[(SpanKind.SERVER, "echo")]
    # parents: the given traceparent -> client -> server -> inner client -> inner server
    assert client.parent is not None and f"{client.parent.span_id:016x}" == TP[36:52]
    assert server.parent.span_id == client.context.span_id
    assert inner_client.parent.span_id == server.context.span_id
    assert inner_server.parent.span_id == inner_client.context.span_id
    # the messages' traceparents are the spans' contexts
    assert content["mine"] == f"00-{TRACE}-{client.context.span_id:016x}-01"
    assert content["inner"]["traceparent"] == f"00-{TRACE}-{inner_client.context.span_id:016x}-01"
    assert reply["traceparent"] == f"00-{TRACE}-{server.context.span_id:016x}-01"
    attrs = server.attributes
    assert attrs["messaging.system"] == "ion"
    assert attrs["messaging.operation"] == "process"
    assert attrs["messaging.destination.name"] == f"{system.container.sysname}.front"
    assert attrs["messaging.message.conversation_id"] == client.attributes["messaging.message.conversation_id"]
    assert attrs["messaging.message.conversation_id"].startswith(caller.id + "#")
    assert client.attributes["messaging.operation"] == "publish"
    assert server.name == f"relay {system.container.sysname}.front"


def test_sdk_spans_whatever_the_callers_sampled_flag_says(spans: InMemorySpanExporter) -> None:
    """A request whose traceparent says "not sampled" (-00: what a container without an SDK, the ion
    command or a plain client writes) is recorded all the same: a caller's flag decides nothing."""
    system, caller = _spawn_pair()
    system.result(caller.rpc_send("front", "relay", headers={"traceparent": TP[:-2] + "00"}))
    finished = spans.get_finished_spans()
    assert len(finished) == 4 and {f"{s.context.trace_id:032x}" for s in finished} == {TRACE}


def test_sdk_span_of_a_failed_call(spans: InMemorySpanExporter) -> None:
    system = ClockedSystem()
    system.spawn(Back)
    caller = system.spawn(Process, name="caller")
    d = caller.rpc_send("back", "nosuchop")
    with pytest.raises(Exception):  # noqa: B017 - the 404 of an unknown op
        system.result(d)
    kinds = {s.kind: s for s in spans.get_finished_spans()}
    assert kinds[SpanKind.CLIENT].attributes["ion.response_code"] == 404
    assert kinds[SpanKind.SERVER].attributes["ion.response_code"] == 404


def test_sdk_roots_are_new_traces(spans: InMemorySpanExporter) -> None:
    system, caller = _spawn_pair()
    system.result(caller.rpc_send("back", "echo"))
    system.result(caller.rpc_send("back", "echo"))
    clients = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert len({s.context.trace_id for s in clients}) == 2
    assert all(s.parent is None for s in clients)


EXPORT_SCRIPT = r'''
import http.server, sys, threading
from ion.core import trace
from ion.core.process import Process
from ion.core.settings import TraceSettings
from ion.testing import ClockedSystem
from ion.testing.processes import in_forked_child
from tests.core.test_trace import Back

bodies = []

class Collector(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        bodies.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", 0), Collector)
threading.Thread(target=server.serve_forever, daemon=True).start()
endpoint = f"http://127.0.0.1:{server.server_port}/v1/traces"
system = ClockedSystem(config={"ion.core.trace": {"otlp_endpoint": endpoint, "service_name": "ion-export-test"}})
assert trace.state.tracer is not None, "no tracer"
system.spawn(Back)
caller = system.spawn(Process, name="caller")
system.result(caller.rpc_send("back", "echo", headers={"traceparent": sys.argv[1]}))
assert trace.state.configured.force_flush(10_000)
server.shutdown()
body = b"".join(b for _, b in bodies)
print(bodies[0][0] if bodies else None, b"ion-export-test" in body, bytes.fromhex(sys.argv[1][3:35]) in body,
      body.count(b"rabbitmq"), b"echo" in body)
'''


def test_spans_are_exported_to_the_otlp_endpoint_of_the_config(tmp_path: Any) -> None:
    """``ion.core.trace: otlp_endpoint``: a TracerProvider with a batch processor and the OTLP/HTTP exporter,
    set up at container start; the spans reach the collector (a loopback HTTP server) with the service
    name and the trace id. In a child interpreter: the global provider can be set once per process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, TP], capture_output=True, text=True, env=env,
                          cwd=str(root), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["/v1/traces", "True", "True", "0", "True"], done.stdout + done.stderr


def test_an_endpoint_without_the_sdk_is_ignored_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_exporter(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("opentelemetry.exporter"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_exporter)
    warned: list[str] = []

    class Log:
        def warn(self, fmt: str, **kw: Any) -> None:
            warned.append(fmt.format(**kw))

        def info(self, fmt: str, **kw: Any) -> None:  # pragma: no cover - not reached
            raise AssertionError(fmt)

    from ion.core.settings import TraceSettings

    assert trace.configure(TraceSettings(otlp_endpoint="http://127.0.0.1:9/v1/traces"), "s", Log()) is None
    assert warned and "ignored" in warned[0] and "ioncore[otel]" in warned[0]


def test_a_generic_conversation_keeps_its_trace_outside_any_op() -> None:
    """Messages of a generic conversation sent from outside an op (its handler, a timer) go on with the
    conversation's trace, not a new one each."""
    system = ClockedSystem()
    back = system.spawn(Back)
    seen: list[str] = []
    original = back._dispatch

    def spy(msg: dict[str, Any], receiver: Any = None) -> Any:
        seen.append(msg["traceparent"])
        return original(msg, receiver)

    back._dispatch = spy  # type: ignore[method-assign]
    caller = system.spawn(Process, name="caller")
    conv = caller.converse(back.id, "echo", "first")
    system.advance(0.1)
    conv.send("echo", "second")
    system.advance(0.1)
    conv.end()
    system.advance(0.1)
    assert len(seen) >= 2 and {tp[3:35] for tp in seen} == {conv.traceparent[3:35]}  # type: ignore[index]
