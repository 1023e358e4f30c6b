"""RPC benchmark on RabbitMQ: ioncore, raw pika and nameko side by side on one broker.

Measures, in one run and on the same broker:

* **ioncore** -- a container in this process calls ``hello`` on the hello
  service (:class:`ion.services.hello.HelloService`) that runs in another OS
  process (``twistd -n cc --no-shell --broker URL -s bench res/apps/hello.app``),
  with the shipped settings (publisher confirms on), and again with
  ``ion.core.messaging: publisher_confirms`` off in both containers
  (``--confirms`` chooses). Requests and replies ask for no confirm
  (the reply is the confirmation; except with a quorum service queue); the setting only decides for one-way
  sends and events (the agents' heartbeats), so the two rows differ by little.
  **ioncore, quorum queue** is the shipped row with the service queue a
  quorum queue (``ion.core.messaging: service_queue_type quorum``, system
  ``benchq``): on one node the cost of its Raft log, on a cluster (``--url``
  of a node) also of its replication, and of the confirm its requests ask
  for (a request to a quorum service queue is confirmed: see
  docs/operations.md, "Publisher confirms");
* **raw pika** -- the smallest RPC echo written directly on pika's Twisted
  adapter: a server in another OS process consumes one queue (manual ack,
  the same prefetch window as ioncore's receivers) and publishes each reply
  to the caller's ``reply_to`` queue; the client publishes a msgpack body
  with a ``correlation_id`` and consumes its exclusive reply queue
  (``auto_ack``). Both set ``TCP_NODELAY`` as ioncore's transport does. A
  second row, **raw pika, ioncore's AMQP use**, makes the same calls the way
  ioncore's transport used AMQP until requests and replies went without
  confirms (a topic exchange, publisher confirms on both sides, mandatory
  requests, ``message_id`` and ``user_id`` set); **DESIGN's AMQP use** is
  that without confirms and mandatory: the gap between the pika rows is the
  cost of those AMQP features, between them and ioncore the container's own;
* **nameko 2.14** -- a ``nameko run`` service and a ``ClusterRpcProxy``
  client, each in its own OS process, when a Python that can import nameko
  is found (``--nameko-python``, ``$NAMEKO_PYTHON``, ``/tmp/nameko-venv``,
  else this interpreter); otherwise its row says ``n/a`` and why.

Each client makes ``--calls`` sequential calls (default 2,000) and then
``--inflight-calls`` calls (default 20,000) with a sliding window of
``--window`` (default 100) in flight, after ``--warmup`` calls of each kind:
calls/s and p50/p99 latency per call, and the CPU microseconds per call of
the windowed phase spent by the client process, the server process and the
broker (Linux ``/proc``). On a shared machine calls/s swing with the load;
the CPU figures barely do, and show where a difference comes from. The table ends with each row's ratio to
raw pika (the issue's target: ioncore >= 0.9x raw pika on both figures).

The rows run ``--repeat`` times (default 3), interleaved (every row once, then every row again, ...),
and the table shows the median of each figure over the runs; ``--json`` also gives each run's own
figures (``runs``).

Without ``--url`` it starts a private RabbitMQ (:mod:`ion.testing.rabbitmq`,
about 10 s, on 127.0.0.1) and stops it at the end. Run from the repository root::

    python bench/amqp.py                   # the table (medians of 3 interleaved runs)
    python bench/amqp.py --repeat 1        # one run of each row
    python bench/amqp.py --json            # machine-readable
    python bench/amqp.py --url amqp://guest:guest@127.0.0.1:5672/ --only ioncore,pika

It is a benchmark, not a test: the exit code is 0 whatever the figures,
unless ``--strict`` is given (then 1 when ioncore is under 0.9x raw pika).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version as dist_version
from typing import Any
from urllib.parse import unquote, urlsplit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    # ``python bench/amqp.py``: make the repository root (and so ``ion``) importable.
    sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/hops.py

import hops  # noqa: E402
import msgpack  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from ion.testing.processes import WatchedProcess  # noqa: E402

__all__ = ["main", "parse_args", "percentile", "sequential", "windowed", "median_result", "format_table",
           "RATIO_TARGET", "issue_targets", "broker_url"]

#: ioncore's calls/s over raw pika's, on both figures (the issue's target).
RATIO_TARGET = 0.9
#: The other targets of #14: CPU per call and p99 against raw pika with DESIGN's AMQP use; calls/s
#: against nameko 2.14, sequential and with calls in flight.
CPU_RATIO_TARGET = 1.25
P99_RATIO_TARGET = 1.5
NAMEKO_SEQ_TARGET = 3.0
NAMEKO_WINDOW_TARGET = 10.0

SYSNAME = "bench"
PAYLOAD = "bench"
PIKA_QUEUE = "bench.pika.echo"
PIKA_EXCHANGE = "bench.pika.topic"
#: The server child: twistd, recording its socket times first when ``--hops`` asked (see bench/hops.py).
TWISTD = ("import os, sys\n"
          "if os.environ.get('ION_BENCH_HOPS'):\n"
          "    sys.path.insert(0, 'bench'); import hops; hops.install_from_env()\n"
          "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()")
DEFAULT_NAMEKO_VENV = "/tmp/nameko-venv/bin/python"


# -- measuring ---------------------------------------------------------------------------------------------
def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list (``pct`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(pct / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def summarize(calls: int, seconds: float, latencies: list[float]) -> dict[str, Any]:
    """calls/s and p50/p99 latency (µs) of one phase."""
    lat = sorted(latencies)
    return {"calls": calls, "seconds": seconds, "calls_per_s": calls / seconds if seconds > 0 else float("inf"),
            "p50_us": percentile(lat, 50) * 1e6, "p99_us": percentile(lat, 99) * 1e6}


def sequential(call: Callable[[], defer.Deferred[Any]], n: int) -> defer.Deferred[tuple[float, list[float]]]:
    """``n`` calls one after the other; fires with (elapsed seconds, per-call latencies)."""
    perf = time.perf_counter
    latencies: list[float] = []
    done: defer.Deferred[tuple[float, list[float]]] = defer.Deferred()
    state = {"left": n, "t0": 0.0, "start": perf()}

    def next_call(_: Any = None) -> None:
        if state["left"] == 0:
            done.callback((perf() - state["start"], latencies))
            return
        state["left"] -= 1
        state["t0"] = perf()
        call().addCallbacks(finished, done.errback)

    def finished(_: Any) -> None:
        latencies.append(perf() - state["t0"])
        next_call()

    next_call()
    return done


def windowed(call: Callable[[], defer.Deferred[Any]], n: int,
             window: int) -> defer.Deferred[tuple[float, list[float]]]:
    """``n`` calls keeping ``window`` in flight (a new one starts as soon as one ends)."""
    perf = time.perf_counter
    latencies: list[float] = []
    done: defer.Deferred[tuple[float, list[float]]] = defer.Deferred()
    state = {"issued": 0, "completed": 0, "start": perf()}

    def start_one() -> None:
        state["issued"] += 1
        call().addCallbacks(finished, failed, callbackArgs=(perf(),))

    def finished(_: Any, t0: float) -> None:
        latencies.append(perf() - t0)
        state["completed"] += 1
        if state["completed"] == n:
            done.callback((perf() - state["start"], latencies))
        elif state["issued"] < n:
            start_one()

    def failed(f: Any) -> None:
        if not done.called:
            done.errback(f)

    for _ in range(min(window, n)):
        start_one()
    return done


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds used so far by process ``pid`` (Linux ``/proc``); None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listening_pid(port: int) -> int | None:
    """The id of the local process listening on TCP ``port`` (Linux ``/proc``; None if not visible)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes for fd in fds):
                return int(entry)
        except OSError:
            continue
    return None


#: The RabbitMQ (beam.smp) process id, when known: its CPU is reported beside the clients'.
BROKER_PID: int | None = None


@defer.inlineCallbacks
def measure(call: Callable[[], defer.Deferred[Any]], args: argparse.Namespace,
            server_pid: int | None = None) -> Any:
    """Warm up, then the sequential and the windowed phase; fires with {sequential, window, cpu_us}.

    ``cpu_us``: CPU microseconds per call of the windowed phase in this (client) process,
    the server process and the broker. Unlike calls/s, these barely move when other work
    shares the machine, so they show where a difference comes from.
    """
    if args.warmup:
        yield sequential(call, args.warmup)
    gc.collect()
    seq_from = time.monotonic_ns()
    secs, lat = yield sequential(call, args.calls)
    seq = summarize(args.calls, secs, lat)
    seq_window = (seq_from, time.monotonic_ns())
    if args.warmup:
        yield windowed(call, args.warmup, args.window)
    gc.collect()
    pids = {"client": os.getpid(), "server": server_pid, "broker": BROKER_PID}
    before = {k: cpu_seconds(pid) for k, pid in pids.items()}
    secs, lat = yield windowed(call, args.inflight_calls, args.window)
    after = {k: cpu_seconds(pid) for k, pid in pids.items()}
    cpu_us = {k: (after[k] - b) / args.inflight_calls * 1e6 if b is not None and after[k] is not None else None
              for k, b in before.items()}
    return {"sequential": seq, "window": summarize(args.inflight_calls, secs, lat), "cpu_us": cpu_us,
            "seq_window": seq_window}


def add_hops(result: dict[str, Any], server_pid: int | None) -> dict[str, Any]:
    """With ``--hops``: the sequential phase's hops (bench/hops.py) into ``result``, from this process's
    socket times and those the stopped server ``server_pid`` wrote; the window mark goes either way."""
    window = result.pop("seq_window", None)
    folder = os.environ.get("ION_BENCH_HOPS")
    if folder and window and server_pid:
        result["hops"] = hops.split(hops.events, hops.load(folder, server_pid), *window)
    hops.events.clear()
    return result


# -- child processes -----------------------------------------------------------------------------------
def spawn(name: str, executable: str, argv: list[str], *, cwd: str = REPO,
          env: dict[str, str] | None = None) -> WatchedProcess:
    from twisted.internet import reactor

    child = WatchedProcess(name)
    reactor.spawnProcess(child, executable, [executable, *argv], env={**os.environ, **(env or {})}, path=cwd)
    return child


# -- ioncore ---------------------------------------------------------------------------------------------
@defer.inlineCallbacks
def bench_ioncore(reactor: Any, url: str, args: argparse.Namespace, confirms: bool = True,
                  quorum: bool = False) -> Any:
    """hello service in a twistd child, client container here (``quorum``: its service queue a quorum
    queue, in a system of its own, as a queue cannot be classic and quorum at once)."""
    from ion.core.container import Container
    from ion.core.process import Process
    from ion.testing import test_config

    overlay: dict[str, Any] = {"ion.core.messaging": {"publisher_confirms": confirms}}
    extra = ["-a", f"ion.core.messaging.publisher_confirms={confirms}"]
    sysname = SYSNAME + "q" if quorum else SYSNAME
    if quorum:
        overlay["ion.core.messaging"]["service_queue_type"] = "quorum"
        extra += ["-a", "ion.core.messaging.service_queue_type=quorum"]
    if args.prefetch:
        overlay["ion.core.process"] = {"prefetch": args.prefetch}
        extra += ["-a", f"ion.core.process.prefetch={args.prefetch}"]
    server = spawn("ioncore server", sys.executable,
                   ["-c", TWISTD, "-n", "--pidfile=", "cc", "--no-shell", "--broker", url, "-s", sysname,
                    *extra, "res/apps/hello.app"])
    container = None
    try:
        yield server.wait_for(b" ready: system ")
        container = Container(config=test_config(overlay), broker_url=url, sysname=sysname, reactor=reactor)
        yield container.start()
        pid = yield container.spawn(Process, name="bench-client")
        proc = container.proc_manager.get(pid)
        rpc_send = proc.rpc_send

        def call() -> Any:
            return rpc_send("hello", "hello", PAYLOAD)

        content, _ = yield call()
        assert content == {"value": f"Hello there, {PAYLOAD}"}, content
        server_pid = server.transport.pid
        result = yield measure(call, args, server_pid)
    finally:
        if container is not None:
            yield container.terminate()
        yield server.stop()
    return add_hops(result, server_pid)


# -- raw pika (Twisted adapter) ---------------------------------------------------------------------------
@defer.inlineCallbacks
def _pika_connect(reactor: Any, url: str) -> Any:
    import pika
    from pika.adapters.twisted_connection import TwistedProtocolConnection
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    params = pika.URLParameters(url)
    conn = TwistedProtocolConnection(params)
    yield connectProtocol(TCP4ClientEndpoint(reactor, params.host, params.port), conn)
    yield conn.ready
    conn.transport.setTcpNoDelay(True)  # as pika's other adapters (and ioncore's transport) do
    return conn


def _consume_loop(queue_obj: Any, handle: Callable[[Any], None]) -> None:
    """Hand every message of a pika ClosableDeferredQueue to ``handle``, as it comes
    (a loop over what is already there, then a callback for the next one)."""
    while True:
        d = queue_obj.get()
        if not d.called:
            d.addCallbacks(lambda item: (handle(item), _consume_loop(queue_obj, handle)), lambda f: None)
            return
        box: list[Any] = []
        d.addBoth(box.append)
        if not isinstance(box[0], tuple):
            return  # the queue was closed
        handle(box[0])


#: How the raw pika echo uses AMQP: ``plain`` (default exchange, no confirms); ``design`` (what
#: DESIGN §4-5 make part of the wire contract: the system's topic exchange, message_id and the
#: broker-validated user_id); ``ioncore`` (that, plus publisher confirms and mandatory requests,
#: as ioncore's transport publishes by default).
PIKA_MODES = ("plain", "design", "ioncore")


def _pika_props(cid: str, reply_to: str | None, mode: str, user: str) -> Any:
    import pika

    if mode != "plain":  # what ioncore's transport sets on every message
        return pika.BasicProperties(content_type="application/msgpack", correlation_id=cid, reply_to=reply_to,
                                    message_id=f"0123456789ab.{cid}", user_id=user)
    return pika.BasicProperties(content_type="application/msgpack", correlation_id=cid, reply_to=reply_to)


@defer.inlineCallbacks
def pika_server(reactor: Any, url: str, queue: str, prefetch: int, mode: str = "plain") -> Any:
    """The raw pika echo server (run in a child process by ``--pika-server``), using AMQP as
    ``mode`` says (see :data:`PIKA_MODES`)."""
    conn = yield _pika_connect(reactor, url)
    ch = yield conn.channel()
    exchange = ""
    if mode == "ioncore":
        yield ch.confirm_delivery()
    if mode != "plain":
        exchange = PIKA_EXCHANGE
        yield ch.exchange_declare(exchange=exchange, exchange_type="topic", auto_delete=True)
    yield ch.queue_declare(queue=queue, auto_delete=True)
    if mode != "plain":
        yield ch.queue_bind(queue=queue, exchange=exchange, routing_key=queue)
    yield ch.basic_qos(prefetch_count=prefetch)
    queue_obj, _tag = yield ch.basic_consume(queue=queue, auto_ack=False)
    packb, unpackb = msgpack.packb, msgpack.unpackb
    user = unquote(urlsplit(url).username or "guest")

    def handle(item: Any) -> None:
        _ch, method, props, body = item
        request = unpackb(body, raw=False)
        reply = packb({"value": f"Hello there, {request['content']}"}, use_bin_type=True)
        d = ch.basic_publish(exchange=exchange, routing_key=props.reply_to, body=reply,
                             properties=_pika_props(props.correlation_id, None, mode, user))
        d.addErrback(lambda f: None)
        if ch.is_open:
            ch.basic_ack(delivery_tag=method.delivery_tag)

    _consume_loop(queue_obj, handle)
    print("pika echo server ready", flush=True)
    stopped: defer.Deferred[None] = defer.Deferred()
    reactor.addSystemEventTrigger("before", "shutdown", lambda: conn.close())
    yield stopped  # until SIGTERM stops the reactor


@defer.inlineCallbacks
def bench_pika(reactor: Any, url: str, args: argparse.Namespace, mode: str = "plain") -> Any:
    """Raw pika echo server in a child process, raw pika client here (``auto_ack`` replies),
    both using AMQP as ``mode`` says (see :data:`PIKA_MODES`)."""
    prefetch = args.prefetch or _default_prefetch()
    server = spawn("pika server", sys.executable,
                   [os.path.abspath(__file__), "--pika-server", "--url", url, "--prefetch", str(prefetch),
                    "--pika-mode", mode])
    conn = None
    try:
        yield server.wait_for(b"pika echo server ready")
        conn = yield _pika_connect(reactor, url)
        ch = yield conn.channel()
        exchange = PIKA_EXCHANGE if mode != "plain" else ""
        if mode == "ioncore":
            yield ch.confirm_delivery()
        frame = yield ch.queue_declare(queue="", exclusive=True)
        reply_q = frame.method.queue
        if mode != "plain":
            yield ch.queue_bind(queue=reply_q, exchange=exchange, routing_key=reply_q)
        queue_obj, _tag = yield ch.basic_consume(queue=reply_q, auto_ack=True)
        pending: dict[str, defer.Deferred[Any]] = {}
        unpackb = msgpack.unpackb

        def handle(item: Any) -> None:
            _ch, _method, props, body = item
            d = pending.pop(props.correlation_id, None)
            if d is not None:
                d.callback(unpackb(body, raw=False))

        _consume_loop(queue_obj, handle)
        ids = itertools.count(1)
        body = msgpack.packb({"op": "hello", "content": PAYLOAD}, use_bin_type=True)
        publish = ch.basic_publish
        user = unquote(urlsplit(url).username or "guest")

        def call() -> Any:
            cid = str(next(ids))
            d: defer.Deferred[Any] = defer.Deferred()
            pending[cid] = d
            sent = publish(exchange=exchange, routing_key=PIKA_QUEUE, body=body,
                           properties=_pika_props(cid, reply_q, mode, user), mandatory=mode == "ioncore")
            sent.addErrback(d.errback)
            return d

        reply = yield call()
        assert reply == {"value": f"Hello there, {PAYLOAD}"}, reply
        server_pid = server.transport.pid
        result = yield measure(call, args, server_pid)
    finally:
        if conn is not None:
            yield conn.close()
        yield server.stop()
    return add_hops(result, server_pid)


# -- nameko 2.14 ------------------------------------------------------------------------------------------
NAMEKO_SERVICE = '''
from nameko.rpc import rpc


class Hello:
    name = "hello"

    @rpc
    def hello(self, text):
        return {"value": "Hello there, " + text}
'''

NAMEKO_CLIENT = '''
import eventlet
eventlet.monkey_patch()

import collections, json, math, sys, time
from nameko.standalone.rpc import ClusterRpcProxy

url, calls, inflight, window, warmup = sys.argv[1], *map(int, sys.argv[2:6])
perf = time.perf_counter


def pct(values, p):
    values = sorted(values)
    return values[max(0, min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1))]


def sequential(hello, n):
    lat = []
    start = perf()
    for _ in range(n):
        t0 = perf()
        assert hello("bench") == {"value": "Hello there, bench"}
        lat.append(perf() - t0)
    return perf() - start, lat


def windowed(hello, n, window):
    # call_async keeps `window` requests in flight; replies are taken oldest first.
    lat, flying = [], collections.deque()
    start = perf()
    issued = 0
    while issued < min(window, n):
        flying.append((perf(), hello.call_async("bench")))
        issued += 1
    while flying:
        t0, reply = flying.popleft()
        assert reply.result() == {"value": "Hello there, bench"}
        lat.append(perf() - t0)
        if issued < n:
            flying.append((perf(), hello.call_async("bench")))
            issued += 1
    return perf() - start, lat


def row(n, secs, lat):
    return {"calls": n, "seconds": secs, "calls_per_s": n / secs, "p50_us": pct(lat, 50) * 1e6,
            "p99_us": pct(lat, 99) * 1e6}


with ClusterRpcProxy({"AMQP_URI": url}) as proxy:
    hello = proxy.hello.hello
    if warmup:
        sequential(hello, warmup)
    seq = row(calls, *sequential(hello, calls))
    if warmup:
        windowed(hello, warmup, window)
    win = row(inflight, *windowed(hello, inflight, window))
print("RESULT " + json.dumps({"sequential": seq, "window": win}), flush=True)
'''


def find_nameko_python(given: str | None) -> tuple[str | None, str]:
    """A Python that imports nameko 2.14, and why not if there is none."""
    candidates = [given] if given else [
        c for c in (os.environ.get("NAMEKO_PYTHON"), DEFAULT_NAMEKO_VENV, sys.executable) if c]
    reasons = []
    for python in dict.fromkeys(candidates):
        if not shutil.which(python) and not os.path.exists(python):
            reasons.append(f"{python}: not found")
            continue
        try:
            out = subprocess.run(
                [python, "-c", "import eventlet, nameko, importlib.metadata as m; print(m.version('nameko'))"],
                capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            reasons.append(f"{python}: {exc}")
            continue
        if out.returncode == 0:
            found = out.stdout.strip()
            if found.startswith("2.14"):
                return python, found
            reasons.append(f"{python}: nameko {found}, not 2.14")
        else:
            last = (out.stderr.strip().splitlines() or ["?"])[-1]
            reasons.append(f"{python}: {last}")
    hint = ("python -m venv /tmp/nameko-venv && /tmp/nameko-venv/bin/pip install nameko==2.14.1, "
            "or --nameko-python PATH")
    return None, f"nameko 2.14 is not importable ({'; '.join(reasons) or 'no candidate'}); {hint}"


@defer.inlineCallbacks
def bench_nameko(reactor: Any, url: str, args: argparse.Namespace, python: str) -> Any:
    """``nameko run`` service and a ClusterRpcProxy client, each in its own process."""
    workdir = tempfile.mkdtemp(prefix="ion-bench-nameko-")
    with open(os.path.join(workdir, "ion_bench_hello.py"), "w") as f:
        f.write(textwrap.dedent(NAMEKO_SERVICE))
    with open(os.path.join(workdir, "ion_bench_client.py"), "w") as f:
        f.write(textwrap.dedent(NAMEKO_CLIENT))
    env = {"PYTHONWARNINGS": "ignore"}
    server = spawn("nameko service", python, ["-m", "nameko", "run", "--broker", url, "ion_bench_hello"],
                   cwd=workdir, env=env)
    client = None
    try:
        yield server.wait_for(b"starting services: hello")
        client = spawn("nameko client", python,
                       ["ion_bench_client.py", url, str(args.calls), str(args.inflight_calls), str(args.window),
                        str(args.warmup)], cwd=workdir, env=env)
        code = yield client.ended
        text = client.output.decode(errors="replace")
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        if code != 0 or not lines:
            raise RuntimeError(f"the nameko client failed ({code}):\n{client.tail()}")
        return json.loads(lines[-1][len("RESULT "):])
    finally:
        if client is not None and client.exit_code is None:
            yield client.stop()
        yield server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# -- driver --------------------------------------------------------------------------------------------
def _default_prefetch() -> int:
    from ion.testing import test_config

    return int(test_config().get("ion.core.process", "prefetch", 1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/amqp.py",
        description="RPC on RabbitMQ, side by side on one broker: ioncore (hello service in another "
                    "container process), a raw pika Twisted-adapter echo, and nameko 2.14 when available.")
    p.add_argument("--url", help="use this broker (amqp://user:pass@host:port/vhost) instead of starting a "
                                 "private RabbitMQ")
    p.add_argument("--calls", type=int, default=2_000, help="sequential calls per client (default 2000)")
    p.add_argument("--inflight-calls", type=int, default=20_000,
                   help="calls of the windowed phase per client (default 20000)")
    p.add_argument("--window", type=int, default=100, help="calls kept in flight (default 100)")
    p.add_argument("--warmup", type=int, default=200, help="warm-up calls before each phase (default 200)")
    p.add_argument("--prefetch", type=int, default=None,
                   help="receiver prefetch window for ioncore and the raw pika server "
                        "(default: ion.core.process prefetch of the shipped config)")
    p.add_argument("--confirms", choices=("on", "off", "both"), default="both",
                   help="ioncore with publisher confirms on (the shipped setting), off, or both rows "
                        "(default both; the target is checked on the shipped setting)")
    p.add_argument("--only", default="ioncore,pika,nameko",
                   help="comma-separated subset of ioncore,pika,nameko (default: all three)")
    p.add_argument("--nameko-python", help="a Python that can import nameko 2.14 (default: $NAMEKO_PYTHON, "
                                           f"{DEFAULT_NAMEKO_VENV}, else this one)")
    p.add_argument("--repeat", type=int, default=3,
                   help="run every row N times, interleaved, and report the median of each figure "
                        "(default 3)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    p.add_argument("--hops", action="store_true",
                   help="also split each sequential call into its hops (client, broker, server) from socket "
                        "times recorded in the client and the servers (bench/hops.py; ioncore and raw pika rows)")
    p.add_argument("--strict", action="store_true", help="exit 1 if ioncore is under 0.9x raw pika")
    p.add_argument("--pika-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pika-mode", choices=PIKA_MODES, default="plain", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("calls", "inflight_calls", "window", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.prefetch is not None and args.prefetch < 1:
        p.error("--prefetch must be at least 1")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - {"ioncore", "pika", "nameko"}
    if unknown:
        p.error(f"--only: unknown {', '.join(sorted(unknown))}")
    return args


def _median(values: list[Any]) -> Any:
    """The median of the numbers in ``values`` (None when there are none)."""
    nums = sorted(v for v in values if isinstance(v, (int, float)) and not math.isnan(v))
    if not nums:
        return None
    mid = len(nums) // 2
    return nums[mid] if len(nums) % 2 else (nums[mid - 1] + nums[mid]) / 2


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row's result from its repeated runs: the median of each figure (calls/s, p50, p99 of
    each phase, CPU µs per call of each process), taken separately. A row that failed in every
    run is ``{"na": ...}`` (the last reason); runs that failed are left out, and counted."""
    good = [r for r in runs if "na" not in r]
    if not good:
        return runs[-1] if runs else {"na": "not run"}
    out: dict[str, Any] = {"runs": len(good)}
    if len(good) < len(runs):
        out["failed_runs"] = len(runs) - len(good)
    for phase in ("sequential", "window"):
        keys = good[0][phase].keys()
        out[phase] = {k: _median([r[phase].get(k) for r in good]) for k in keys}
    if any("cpu_us" in r for r in good):
        out["cpu_us"] = {k: _median([(r.get("cpu_us") or {}).get(k) for r in good])
                         for k in ("client", "server", "broker")}
    if any(r.get("hops") for r in good):
        keys = next(r["hops"] for r in good if r.get("hops")).keys()
        out["hops"] = {k: _median([(r.get("hops") or {}).get(k) for r in good]) for k in keys}
    for key in ("version",):
        if key in good[0]:
            out[key] = good[0][key]
    return out


@defer.inlineCallbacks
def run(reactor: Any, args: argparse.Namespace, url: str) -> Any:
    """Every selected client on ``url``, ``args.repeat`` times interleaved (row A, B, C, A, B, C,
    ...: a slow spell of the shared machine hits every row alike, not one); fires with the report
    dict, whose ``results`` are the medians of the runs and ``runs`` each run's own figures."""
    runs = ["ioncore"] if args.confirms == "on" else ["ioncore-noconfirm"] if args.confirms == "off" else [
        "ioncore", "ioncore-noconfirm"]
    runs.append("ioncore-quorum")
    names = [n for n in [*runs, "pika", "pika-design", "pika-like", "nameko"] if n.split("-")[0] in args.only]
    per_run: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    nameko: tuple[str | None, str] | None = None
    for round_no in range(1, args.repeat + 1):
        if args.repeat > 1:
            print(f"round {round_no} of {args.repeat} ...", file=sys.stderr, flush=True)
        for name in names:
            try:
                if name.startswith("ioncore"):
                    res = yield bench_ioncore(reactor, url, args, confirms=name != "ioncore-noconfirm",
                                              quorum=name == "ioncore-quorum")
                elif name.startswith("pika"):
                    mode = {"pika": "plain", "pika-design": "design", "pika-like": "ioncore"}[name]
                    res = yield bench_pika(reactor, url, args, mode=mode)
                else:
                    if nameko is None:
                        nameko = find_nameko_python(args.nameko_python)
                    python, why = nameko
                    if python is None:
                        res = {"na": why}
                    else:
                        res = yield bench_nameko(reactor, url, args, python)
                        res["version"] = why
            except Exception as exc:
                res = {"na": f"failed: {exc}"}
            per_run[name].append(res)
    results = {name: median_result(rs) for name, rs in per_run.items()}
    ratios: dict[str, Any] = {}
    base = results.get("pika")
    if base and "na" not in base:
        for name, res in results.items():
            if "na" in res:
                continue
            ratios[name] = {phase: res[phase]["calls_per_s"] / base[phase]["calls_per_s"]
                            for phase in ("sequential", "window")}
    return {
        "environment": {
            "python": platform.python_version(), "twisted": dist_version("twisted"),
            "pika": dist_version("pika"), "msgpack": ".".join(map(str, msgpack.version)),
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "broker": _redact(url),
        },
        "args": {k: v for k, v in vars(args).items() if k not in ("pika_server", "url")},
        "results": results,
        "runs": per_run,
        "ratio_to_raw_pika": ratios,
    }


def _redact(url: str) -> str:
    parts = urlsplit(url)
    vhost = unquote(parts.path.lstrip("/")) or "/"
    return f"{parts.scheme}://{unquote(parts.username or 'guest')}@{parts.hostname}:{parts.port} vhost {vhost}"


def _cell(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


WIDTH = 159


def _cpu_cells(cpu: dict[str, Any] | None) -> str:
    cpu = cpu or {}
    return f"{_cell(cpu.get('client'), '.0f'):>14}{_cell(cpu.get('server'), '.0f'):>7}{_cell(cpu.get('broker'), '.0f'):>7}" \
        + (f"{'=' + format(sum(cpu.values()), '.0f'):>6}" if cpu and all(v is not None for v in cpu.values()) else "")


def format_table(report: dict[str, Any]) -> str:
    """The report as the plain-text table ``python bench/amqp.py`` prints."""
    env, args = report["environment"], report["args"]
    labels = {"ioncore": "ioncore", "ioncore-noconfirm": "ioncore, confirms off",
              "ioncore-quorum": "ioncore, quorum queue", "pika": "raw pika (Twisted adapter)",
              "pika-design": "raw pika, DESIGN's AMQP use", "pika-like": "raw pika, ioncore's AMQP use",
              "nameko": "nameko 2.14"}
    lines = [
        f"RPC on RabbitMQ ({env['broker']}): client and server in separate OS processes",
        f"Python {env['python']}, Twisted {env['twisted']}, pika {env['pika']}, msgpack {env['msgpack']}, "
        f"{env['cpus']} CPUs",
        f"sequential: {args['calls']} calls; window: {args['inflight_calls']} calls, {args['window']} in flight"
        + (f"; median of {args.get('repeat', 1)} interleaved runs" if args.get("repeat", 1) > 1 else ""),
        "",
        f"{'client':<28}{'seq calls/s':>12}{'p50 us':>9}{'p99 us':>9}   "
        f"{'window calls/s':>14}{'p50 us':>9}{'p99 us':>9}   {'vs raw pika (seq / window)':>26}"
        f"   {'CPU us/call: client server broker':>34}",
        "-" * WIDTH,
    ]
    for name in ("ioncore", "ioncore-noconfirm", "ioncore-quorum", "pika", "pika-design", "pika-like", "nameko"):
        res = report["results"].get(name)
        if res is None:
            continue
        if "na" in res:
            lines.append(f"{labels[name]:<28}{'n/a':>12}   {res['na']}")
            continue
        s, w = res["sequential"], res["window"]
        ratio = report["ratio_to_raw_pika"].get(name)
        ratio_text = f"{ratio['sequential']:.2f}x / {ratio['window']:.2f}x" if ratio else "-"
        lines.append(
            f"{labels[name]:<28}{s['calls_per_s']:>12,.0f}{_cell(s['p50_us'], '.0f'):>9}{_cell(s['p99_us'], '.0f'):>9}"
            f"   {w['calls_per_s']:>14,.0f}{_cell(w['p50_us'], '.0f'):>9}{_cell(w['p99_us'], '.0f'):>9}"
            f"   {ratio_text:>26}   {_cpu_cells(res.get('cpu_us'))}"
            + (f"   ({res['failed_runs']} run(s) failed)" if res.get("failed_runs") else ""))
    lines.append("-" * WIDTH)
    if "pika-design" in report["results"]:
        lines.append("raw pika, DESIGN's AMQP use: the system's topic exchange, message_id + broker-validated "
                     "user_id (DESIGN 4-5)")
    if "pika-like" in report["results"]:
        lines.append("raw pika, ioncore's AMQP use: that, plus publisher confirms and mandatory requests "
                     "(ioncore's requests and replies now go without confirms)")
    with_hops = [n for n in labels if (report["results"].get(n) or {}).get("hops")]
    if with_hops:
        lines += ["", "sequential call, hop by hop (bench/hops.py; medians, us): broker in = client's write of the "
                  "request to the server's read, broker out = server's write of the reply to the client's read",
                  f"{'client':<28}{'broker in':>10}{'server':>8}{'broker out':>11}{'client':>8}{'total':>8}"
                  f"   {'CPU server':>10}{'CPU client':>11}{'server wake':>12}{'calls':>7}"]
        for name in with_hops:
            h = report["results"][name]["hops"]
            lines.append(f"{labels[name]:<28}{h['broker_in']:>10.0f}{h['server']:>8.0f}{h['broker_out']:>11.0f}"
                         f"{h['client']:>8.0f}{h['total']:>8.0f}   {h['server_cpu']:>10.0f}{h['client_cpu']:>11.0f}"
                         f"{_cell(h['server_wake'], '.0f'):>12}{h['calls']:>7.0f}")
    ion = report["ratio_to_raw_pika"].get("ioncore")
    if ion:
        ok = all(v >= RATIO_TARGET for v in ion.values())
        lines.append(f"target ioncore >= {RATIO_TARGET}x raw pika on both figures: "
                     f"{ion['sequential']:.2f}x / {ion['window']:.2f}x   {'PASS' if ok else 'MISS'}")
    targets = issue_targets(report["results"])
    if targets:
        lines += ["", "targets of #14 (ioncore with its shipped settings):"]
        lines += [f"  {what:<58}{got:>16}   {'PASS' if ok else 'MISS'}" for what, got, ok in targets]
        floor = nameko_floor(report["results"])
        if floor:
            lines.append(f"  (the raw pika echo itself, no container, in the same run: {floor} nameko)")
    return "\n".join(lines)


def nameko_floor(results: dict[str, Any]) -> str | None:
    """The bare pika echo's ratio to nameko, sequential / in flight: what the broker's round trip
    allows a client with no container at all, beside the nameko targets."""
    pika, nameko = results.get("pika"), results.get("nameko")
    if not pika or not nameko or "na" in pika or "na" in nameko:
        return None
    seq, window = (pika[p]["calls_per_s"] / nameko[p]["calls_per_s"] for p in ("sequential", "window"))
    return f"{seq:.1f}x / {window:.1f}x"


def issue_targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The targets of issue #14 that ``results`` has the rows for: (what, figure, met). Against "raw
    pika, DESIGN's AMQP use": calls/s >= 0.9x on both phases, CPU per call of client and server
    <= 1.25x, p99 with calls in flight <= 1.5x; against nameko: >= 3x sequential, >= 10x in flight."""
    ion = results.get("ioncore")
    if not ion or "na" in ion:
        return []
    rows: list[tuple[str, str, bool]] = []
    design = results.get("pika-design")
    if design and "na" not in design:
        for phase in ("sequential", "window"):
            r = ion[phase]["calls_per_s"] / design[phase]["calls_per_s"]
            rows.append((f"{phase} calls/s >= {RATIO_TARGET}x raw pika, DESIGN's use", f"{r:.2f}x", r >= RATIO_TARGET))
        for side in ("client", "server"):
            mine, theirs = (ion.get("cpu_us") or {}).get(side), (design.get("cpu_us") or {}).get(side)
            if mine and theirs:
                r = mine / theirs
                rows.append((f"CPU per call, {side} <= {CPU_RATIO_TARGET}x raw pika, DESIGN's use",
                             f"{mine:.0f}/{theirs:.0f} {r:.2f}x", r <= CPU_RATIO_TARGET))
        r = ion["window"]["p99_us"] / design["window"]["p99_us"]
        rows.append((f"p99 in flight <= {P99_RATIO_TARGET}x raw pika, DESIGN's use", f"{r:.2f}x",
                     r <= P99_RATIO_TARGET))
    nameko = results.get("nameko")
    if nameko and "na" not in nameko:
        for phase, target in (("sequential", NAMEKO_SEQ_TARGET), ("window", NAMEKO_WINDOW_TARGET)):
            r = ion[phase]["calls_per_s"] / nameko[phase]["calls_per_s"]
            rows.append((f"{phase} calls/s >= {target:g}x nameko", f"{r:.1f}x", r >= target))
    return rows


@contextlib.contextmanager
def broker_url(url: str | None, vhost: str) -> Iterator[str]:
    """``url``; None: a new vhost ``vhost`` of a private RabbitMQ started now, stopped on leaving."""
    if url is not None:
        yield url
        return
    from ion.testing.rabbitmq import RabbitMQServer

    print("starting a private RabbitMQ ...", file=sys.stderr, flush=True)
    server = RabbitMQServer()
    server.start()
    try:
        yield server.new_vhost_url(vhost)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv``, start a broker unless ``--url``, run, print; exits the process."""
    global BROKER_PID
    args = parse_args(argv)
    if args.pika_server:
        hops.install_from_env()
        task.react(lambda reactor: pika_server(reactor, args.url, PIKA_QUEUE, args.prefetch or 1,
                                               args.pika_mode))
        return
    hop_dir = None
    if args.hops:
        hop_dir = os.environ["ION_BENCH_HOPS"] = tempfile.mkdtemp(prefix="ion-bench-hops-")
        hops.install()  # this process: the clients
    report: dict[str, Any] = {}
    try:
        with broker_url(args.url, "ion-bench") as url:
            BROKER_PID = listening_pid(urlsplit(url).port or 5672)

            def _main(reactor: Any) -> Any:
                # SIGINT/SIGTERM end the run (leaving the with stops the broker).
                d = run(reactor, args, url)
                d.addCallback(report.update)
                return d

            try:
                task.react(_main)
            except SystemExit as exc:
                if exc.code not in (0, None):
                    raise
    finally:
        if hop_dir is not None:
            shutil.rmtree(hop_dir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    sys.stdout.flush()
    ion = report.get("ratio_to_raw_pika", {}).get("ioncore")
    if args.strict and (not ion or any(v < RATIO_TARGET for v in ion.values())):
        raise SystemExit(1)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
