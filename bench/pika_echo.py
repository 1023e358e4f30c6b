"""The raw pika RPC echo that bench/direct_reply.py and bench/exchanges.py both measure, and their common driver.

Both scripts run bench/amqp.py's "raw pika (Twisted adapter)" echo in interleaved rounds of variants on
a private RabbitMQ; they differ in how the variants publish (the reply path; the exchange and the ids)
and in what they report. What they share lives here:

* :func:`props` -- the request and reply properties (bench/amqp.py's ``plain`` pika row, plus
  ``user_id`` and ``message_id`` when asked for);
* :func:`echo_server` -- the echo server (run in a child process: the calling script with
  ``--server``), which prints ``pika echo server ready`` and, on SIGTERM, a ``server stats`` line;
* :func:`bench_one` -- one run: a server child, then this process's client, its sequential phase and
  (if asked) its windowed one, each measured by :func:`phase` (calls/s, p50/p99, CPU µs per call of
  client, server and broker);
* :func:`run_rounds` -- the interleaved rounds, with a progress line (:func:`round_line`) per run;
* :func:`medians`, :func:`pairs`, :func:`ratios` -- the medians over the rounds and the paired
  per-round comparisons;
* :func:`load_line`, :func:`cell`, :func:`phase_title` -- pieces of the summary tables;
* :func:`parser`, :func:`add_options`, :func:`add_tail_options`, :func:`check_options` -- the
  command-line options both take and their checks;
* :func:`run_on_private_broker`, :func:`finish` -- start and stop the private broker around the
  rounds, write the JSON and print the summary.

The measuring loops, the CPU seconds of a pid, the pika connection and consume loop, child processes
and the median are bench/amqp.py's (imported from bench/, as the scripts do).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)  # bench/amqp.py

import amqp  # noqa: E402  bench/amqp.py: measuring loops, CPU of a pid, pika connect, consume loop, spawn
import msgpack  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

QUEUE = amqp.PIKA_QUEUE
PAYLOAD = amqp.PAYLOAD
#: RabbitMQ's direct reply-to pseudo-queue.
DIRECT = "amq.rabbitmq.reply-to"
PHASES = ("sequential", "window")
PROCS = ("client", "server", "broker")
FIGURES = ("calls_per_s", "p50_us", "p99_us")
median = amqp._median


def url_user(url: str) -> str:
    """The user of a broker URL (``guest`` when it names none)."""
    return unquote(urlsplit(url).username or "guest")


def props(cid: str, reply_to: str | None, user_id: str | None = None, message_id: bool = False) -> Any:
    """The properties of bench/amqp.py's ``plain`` pika row, plus ``user_id`` when given and a ``message_id``
    (as its ``design`` row sets it) when asked for."""
    import pika

    return pika.BasicProperties(content_type="application/msgpack", correlation_id=cid, reply_to=reply_to,
                                user_id=user_id, message_id=f"0123456789ab.{cid}" if message_id else None)


# -- server (child process: the script with --server) ------------------------------------------------------
class ServerState:
    """What :func:`echo_server` saw: requests handled, reply codes of returned replies, its channel."""

    def __init__(self) -> None:
        self.handled = 0
        self.returned: list[int] = []
        self.channel: Any = None


@defer.inlineCallbacks
def echo_server(reactor: Any, url: str, prefetch: int, *, exchange: str = "", exchange_type: str | None = None,
                user_id: str | None = None, message_id: bool = False, mandatory: bool = False,
                first_request: Callable[[Any, Any], None] | None = None,
                stats: Callable[[ServerState], dict[str, Any]] | None = None) -> Any:
    """bench/amqp.py's raw pika echo server on :data:`QUEUE`: replies to ``exchange`` (declared as
    ``exchange_type``, the queue bound to it by its name, unless the default one) with the request's
    ``reply_to`` as routing key, with :func:`props` (``user_id``, ``message_id``) and ``mandatory``.
    ``first_request(method, properties)`` is called for the first request; on SIGTERM it prints
    ``server stats`` and the JSON of ``stats(state)``."""
    conn = yield amqp._pika_connect(reactor, url)
    ch = yield conn.channel()
    state = ServerState()
    state.channel = ch
    ch.add_on_return_callback(lambda msg: state.returned.append(msg.method.reply_code))
    if exchange_type:
        yield ch.exchange_declare(exchange=exchange, exchange_type=exchange_type, auto_delete=True)
    yield ch.queue_declare(queue=QUEUE, auto_delete=True)
    if exchange_type:
        yield ch.queue_bind(queue=QUEUE, exchange=exchange, routing_key=QUEUE)
    yield ch.basic_qos(prefetch_count=prefetch)
    queue_obj, _tag = yield ch.basic_consume(queue=QUEUE, auto_ack=False)
    packb, unpackb = msgpack.packb, msgpack.unpackb

    def handle(item: Any) -> None:
        _ch, method, p, body = item
        request = unpackb(body, raw=False)
        if state.handled == 0 and first_request is not None:
            first_request(method, p)
        state.handled += 1
        reply = packb({"value": f"Hello there, {request['content']}"}, use_bin_type=True)
        d = ch.basic_publish(exchange=exchange, routing_key=p.reply_to, body=reply,
                             properties=props(p.correlation_id, None, user_id, message_id), mandatory=mandatory)
        d.addErrback(lambda f: None)
        if ch.is_open:
            ch.basic_ack(delivery_tag=method.delivery_tag)

    amqp._consume_loop(queue_obj, handle)
    print("pika echo server ready", flush=True)

    def bye() -> None:
        if stats is not None:
            print("server stats " + json.dumps(stats(state)), flush=True)
        conn.close()

    reactor.addSystemEventTrigger("before", "shutdown", bye)
    yield defer.Deferred()  # until SIGTERM stops the reactor


# -- client -----------------------------------------------------------------------------------------------
def cpu_ns(pid: int | None) -> float | None:
    """CPU seconds used so far by the live threads of ``pid``, from ``/proc/<pid>/task/*/schedstat``
    (nanosecond resolution); None if unknown."""
    if pid is None:
        return None
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return total / 1e9


def cpu_per_call(before: dict[str, float | None], after: dict[str, float | None], n: int) -> dict[str, Any]:
    """CPU µs per call of each process between two CPU readings (None if unknown)."""
    out: dict[str, Any] = {}
    for k, b in before.items():
        a = after[k]
        out[k] = (a - b) / n * 1e6 if a is not None and b is not None else None
    return out


@defer.inlineCallbacks
def phase(pids: dict[str, int | None], run: Any, n: int, schedstat: bool = False) -> Any:
    """``run()`` (one measured phase of ``n`` calls) after a ``gc.collect()``; its figures and CPU per call:
    ``cpu_us`` from ``/proc/<pid>/stat`` (``amqp.cpu_seconds``), or with ``schedstat`` ``cpu_us`` from
    schedstat (:func:`cpu_ns`), ``cpu_us_ticks`` from ``/proc/<pid>/stat`` and the 1-min load after it."""
    gc.collect()
    b_tick = {k: amqp.cpu_seconds(p) for k, p in pids.items()}
    b_ns = {k: cpu_ns(p) for k, p in pids.items()} if schedstat else {}
    secs, lat = yield run()
    a_ns = {k: cpu_ns(p) for k, p in pids.items()} if schedstat else {}
    a_tick = {k: amqp.cpu_seconds(p) for k, p in pids.items()}
    res = amqp.summarize(n, secs, lat)
    if schedstat:
        res["cpu_us"] = cpu_per_call(b_ns, a_ns, n)
        res["cpu_us_ticks"] = cpu_per_call(b_tick, a_tick, n)
        res["load1"] = os.getloadavg()[0]
    else:
        res["cpu_us"] = cpu_per_call(b_tick, a_tick, n)
    return res


@defer.inlineCallbacks
def bench_one(reactor: Any, url: str, script: str, args: argparse.Namespace, window: bool, broker_pid: int | None,
              *, server_flags: list[str], direct: bool = False, exchange: str = "", bind: bool = False,
              user_id: str | None = None, message_id: bool = False, schedstat: bool = False,
              first_reply: bool = False, server_log: tuple[str, ...] = ()) -> Any:
    """A server child (``script --server --url URL --prefetch N`` and ``server_flags``), then this process's
    client: requests to ``exchange`` with :func:`props` (``user_id``, ``message_id``), replies via direct
    reply-to if ``direct``, else via an exclusive server-named queue (bound to ``exchange`` by its name if
    ``bind``); the sequential phase, and the windowed one if ``window`` (:func:`phase`, ``schedstat``).

    Fires with {[client_first_reply,] sequential, [window,] [server_log,] server_stats}: how the first
    reply arrived (with ``first_reply``), the server's output lines starting with one of ``server_log``
    (when given) and its ``server stats``."""
    srv = amqp.spawn("pika server", sys.executable,
                     [script, "--server", "--url", url, "--prefetch", str(args.prefetch), *server_flags])
    conn = None
    res: dict[str, Any] = {}
    try:
        yield srv.wait_for(b"pika echo server ready")
        conn = yield amqp._pika_connect(reactor, url)
        ch = yield conn.channel()
        if direct:
            reply_q = DIRECT
        else:
            frame = yield ch.queue_declare(queue="", exclusive=True)
            reply_q = frame.method.queue
            if bind:
                yield ch.queue_bind(queue=reply_q, exchange=exchange, routing_key=reply_q)
        queue_obj, _tag = yield ch.basic_consume(queue=reply_q, auto_ack=True)
        pending: dict[str, defer.Deferred[Any]] = {}
        unpackb = msgpack.unpackb
        first: dict[str, Any] = {}

        def handle(item: Any) -> None:
            _ch, method, p, body = item
            if not first:
                first.update(uid=p.user_id, mid=p.message_id, ex=method.exchange)
            d = pending.pop(p.correlation_id, None)
            if d is not None:
                d.callback(unpackb(body, raw=False))

        amqp._consume_loop(queue_obj, handle)
        ids = itertools.count(1)
        body = msgpack.packb({"op": "hello", "content": PAYLOAD}, use_bin_type=True)
        publish = ch.basic_publish

        def call() -> Any:
            cid = str(next(ids))
            d: defer.Deferred[Any] = defer.Deferred()
            pending[cid] = d
            sent = publish(exchange=exchange, routing_key=QUEUE, body=body,
                           properties=props(cid, reply_q, user_id, message_id), mandatory=False)
            sent.addErrback(d.errback)
            return d

        reply = yield call()
        assert reply == {"value": f"Hello there, {PAYLOAD}"}, reply
        if first_reply:
            res["client_first_reply"] = dict(first)
        pids = {"client": os.getpid(), "server": srv.transport.pid, "broker": broker_pid}
        if args.warmup:
            yield amqp.sequential(call, args.warmup)
        res["sequential"] = yield phase(pids, lambda: amqp.sequential(call, args.calls), args.calls, schedstat)
        if window:
            if args.warmup:
                yield amqp.windowed(call, args.warmup, args.window)
            res["window"] = yield phase(pids, lambda: amqp.windowed(call, args.inflight_calls, args.window),
                                        args.inflight_calls, schedstat)
    finally:
        if conn is not None:
            yield conn.close()
        yield srv.stop()
    lines = srv.output.decode(errors="replace").splitlines()
    if server_log:
        res["server_log"] = [line for line in lines if line.startswith(server_log)]
    for line in lines:
        if line.startswith("server stats "):
            res["server_stats"] = json.loads(line[len("server stats "):])
    return res


def round_line(r: int, label: str, res: dict[str, Any]) -> str:
    """One progress line (stderr) for a variant's run in round ``r``; ``label`` names the variant."""
    def fig(x: dict[str, Any], width: int) -> str:
        c = x["cpu_us"]
        cpu = "/".join("?" if c[k] is None else f"{c[k]:.0f}" for k in PROCS)
        return f"{x['calls_per_s']:7.0f}/s p50 {x['p50_us']:{width}.0f} p99 {x['p99_us']:6.0f} cpu c/s/b {cpu}"

    line = f"round {r} {label}: seq {fig(res['sequential'], 5)}"
    if "window" in res:
        line += f" | win {fig(res['window'], 6)}"
    return line + f"  load {os.getloadavg()[0]:.2f}"


@defer.inlineCallbacks
def run_rounds(args: argparse.Namespace, names: list[str], order_of: Callable[[int], list[str]],
               one: Callable[[str, bool], defer.Deferred[dict[str, Any]]], label: Callable[[str], str],
               number: bool = False) -> Any:
    """``args.repeat`` rounds, each running every variant of ``names`` in the order ``order_of(r)`` (``r``
    from 0) with ``one(variant, window)`` (the windowed phase in the first ``args.window_repeat`` rounds),
    each followed by its :func:`round_line`; ``number`` marks each run's ``round``.
    Fires with (runs: per variant, one entry per round; order: (round, variant) as they ran)."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in names}
    order: list[tuple[int, str]] = []
    for r in range(args.repeat):
        for v in order_of(r):
            res = yield one(v, r < args.window_repeat)
            if number:
                res["round"] = r + 1
            print(round_line(r + 1, label(v), res), file=sys.stderr, flush=True)
            order.append((r + 1, v))
            runs[v].append(res)
    return runs, order


# -- summary ----------------------------------------------------------------------------------------------
def pairs(runs: dict[str, list[dict[str, Any]]], x: str, y: str, ph: str) -> list[tuple[dict[str, Any], ...]]:
    """(y's figures, x's figures) of phase ``ph`` in every round that ran it for both."""
    return [(a[ph], b[ph]) for a, b in zip(runs[y], runs[x], strict=True) if ph in a and ph in b]


def ratios(pa: list[tuple[dict[str, Any], ...]], key: str) -> list[float]:
    """x/y of figure ``key`` for each pair of :func:`pairs`."""
    return [b[key] / a[key] for a, b in pa]


def medians(runs: dict[str, list[dict[str, Any]]],
            extra: Callable[[str, str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per variant and phase: the median over the rounds of each figure (and of each CPU reading the runs
    have), how many rounds ran it, and what ``extra(variant, phase)`` adds."""
    out: dict[str, Any] = {}
    for v, vr in runs.items():
        m: dict[str, Any] = {}
        for ph in PHASES:
            rs = [x[ph] for x in vr if ph in x]
            if not rs:
                continue
            m[ph] = {k: median([x[k] for x in rs]) for k in FIGURES}
            for cpu in ("cpu_us", "cpu_us_ticks"):
                if cpu in rs[0]:
                    m[ph][cpu] = {k: median([x[cpu][k] for x in rs]) for k in PROCS}
            m[ph]["n_runs"] = len(rs)
            if extra is not None:
                m[ph].update(extra(v, ph))
        out[v] = m
    return out


def cell(v: float | None, spec: str, width: int) -> str:
    """``v`` formatted with ``spec`` (``?`` if unknown), right-aligned in ``width``."""
    return f"{'?' if v is None else format(v, spec):>{width}}"


def load_line(report: dict[str, Any]) -> str:
    """The summary's line with the load average at the start and at the end."""
    def fmt(la: list[float]) -> str:
        return ", ".join(f"{x:.2f}" for x in la)

    return f"load average (1, 5, 15 min): start {fmt(report['loadavg_start'])}, end {fmt(report['loadavg_end'])}"


def phase_title(ph: str, window: int) -> str:
    """``sequential``, or ``<window> in flight``."""
    return "sequential" if ph == "sequential" else f"{window} in flight"


# -- driver -----------------------------------------------------------------------------------------------
def parser(script: str, description: str, repeat: int, each: str) -> argparse.ArgumentParser:
    """An argument parser for ``python bench/<script's name>`` with the options both scripts take before
    their own (:func:`add_options`)."""
    p = argparse.ArgumentParser(prog=f"python bench/{os.path.basename(script)}", description=description)
    add_options(p, repeat, each)
    return p


def add_options(p: argparse.ArgumentParser, repeat: int, each: str) -> None:
    """The options both scripts take before their own: rounds (default ``repeat``, each running ``each``
    variant), calls, windowed phase, warm-up, prefetch."""
    p.add_argument("--repeat", type=int, default=repeat, help=f"rounds, each running {each} (default {repeat})")
    p.add_argument("--calls", type=int, default=3000, help="sequential calls per variant and round (default 3000)")
    p.add_argument("--inflight-calls", type=int, default=20000,
                   help="calls of the windowed phase per variant and round (default 20000)")
    p.add_argument("--window", type=int, default=100, help="calls kept in flight (default 100)")
    p.add_argument("--window-repeat", type=int, default=3,
                   help="the first N rounds also run the windowed phase (default 3)")
    p.add_argument("--warmup", type=int, default=300, help="warm-up calls before each phase (default 300)")
    p.add_argument("--prefetch", type=int, default=None,
                   help="the server's prefetch (default: ion.core.process prefetch of the shipped config)")


def add_tail_options(p: argparse.ArgumentParser) -> None:
    """The options both scripts take after their own: ``--json`` and the server child's."""
    p.add_argument("--json", metavar="OUT", help="also write every figure of every round to OUT (JSON)")
    p.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)


def check_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``p.error`` on an option :func:`add_options` added out of range."""
    for name in ("repeat", "calls", "inflight_calls", "window"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.window_repeat < 0:
        p.error("--warmup and --window-repeat must be >= 0")
    if args.prefetch is not None and args.prefetch < 1:
        p.error("--prefetch must be at least 1")


def run_on_private_broker(vhost: str, report: dict[str, Any], rounds: Callable[[Any, str, int | None], Any],
                          before: Callable[[str], None] | None = None) -> str:
    """Start a private RabbitMQ (:mod:`ion.testing.rabbitmq`), record its version, pid and URL in ``report``,
    call ``before(url)``, then run ``rounds(reactor, url, broker_pid)`` under ``task.react``; stop the broker
    whatever happens and record the load average at the end. Returns the URL of vhost ``vhost``."""
    from ion.testing.rabbitmq import RabbitMQServer

    print("starting a private RabbitMQ ...", file=sys.stderr, flush=True)
    broker = RabbitMQServer()
    broker.start()
    try:
        url: str = broker.new_vhost_url(vhost)
        broker_pid = amqp.listening_pid(broker.port)
        report["broker_version"] = broker.ctl("version").strip()
        report["broker_pid"] = broker_pid
        report["url"] = amqp._redact(url)
        if before is not None:
            before(url)
        try:
            task.react(lambda reactor: rounds(reactor, url, broker_pid))
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
    finally:
        broker.stop()
    report["loadavg_end"] = list(os.getloadavg())
    return url


def finish(report: dict[str, Any], json_out: str | None, summary: str) -> None:
    """Write ``report`` to ``json_out`` (if given), then print ``summary``."""
    if json_out:
        with open(json_out, "w") as f:
            json.dump(report, f, indent=2)
    print(summary, flush=True)
