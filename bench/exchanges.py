"""What the exchange type (default / topic / direct), ``user_id`` and ``message_id`` cost a raw pika RPC echo.

The question (#14): ioncore's system exchange ``ion.<sysname>`` is a *topic* exchange (DESIGN §5,
docs/wire.md), yet every request, reply and one-way send on it is routed by an exact receiver
name -- no pattern is ever bound there. What does the topic routing cost the broker against a
*direct* exchange (and against the default exchange ``""``), and is it worth moving RPC traffic to
a direct exchange? And what do the two properties DESIGN makes part of the wire contract,
``user_id`` (validated by the broker) and ``message_id``, add on top?

Before touching ioncore's transport this measures it on the smallest RPC there is: the "raw pika
(Twisted adapter)" rows of bench/amqp.py (its server, its request body and properties, an exclusive
server-named reply queue consumed with ``auto_ack``, the receivers' prefetch of the shipped config,
``TCP_NODELAY`` on both sides), with requests AND replies published the same way per variant:

====  ==========================  =========  ============
var   exchange                    user_id    message_id
====  ==========================  =========  ============
A     default ``""``              -          -
B     topic                       -          -
C     direct                      -          -
D     topic                       yes        yes          (bench/amqp.py's "DESIGN's AMQP use")
E     direct                      yes        yes
F     default ``""``              yes        yes
G     default ``""``              yes        -
H     default ``""``              -          yes
====  ==========================  =========  ============

A topic or direct exchange is declared by the server (a child process: this script again, one per
run) with the request queue bound to it by its name, and the client binds its reply queue the same
way; the routing key is always the receiver's queue name.

Every round runs every variant, the order rotated by one each round and reversed every other round
(so that no variant always runs first or after the same one); each variant makes ``--calls``
sequential calls and, in the first ``--window-repeat`` rounds, ``--inflight-calls`` calls with
``--window`` (100) in flight, each phase after ``--warmup`` calls and a ``gc.collect()``. Per phase:
calls/s, p50/p99 latency, and the CPU microseconds per call of the client (this process), the server
and the broker, read from ``/proc/<pid>/task/*/schedstat`` (nanoseconds, the live threads) and, as
bench/amqp.py does, from ``/proc/<pid>/stat`` (clock ticks; the "ticks" column). CPU moves much less
than calls/s on a shared machine, and the broker's CPU per call is what the exchange type changes.
The summary gives the median of each figure over the rounds, each variant against A within the same
round, and a table of paired contrasts (topic vs default, direct vs default, topic vs direct, the two
ids on each exchange, DESIGN's use vs plain): the median, min and max over the rounds of the
per-round difference (the two variants ran in the same round, so a slow spell of the machine hits
both). It also checks, from the first request and reply of every run, that the messages went through
the variant's exchange and carried ``user_id`` / ``message_id`` as the variant says.

It starts a private RabbitMQ (:mod:`ion.testing.rabbitmq`, about 10 s, on 127.0.0.1) and stops it at
the end. Run from the repository root::

    python bench/exchanges.py                          # 9 rounds of 3,000 sequential calls per variant
    python bench/exchanges.py --repeat 1 --calls 300 --inflight-calls 2000 --window-repeat 1
    python bench/exchanges.py --variants ABC           # only default, topic and direct
    python bench/exchanges.py --json exchanges.json    # and every figure of every round

It is a benchmark, not a test: the exit code is 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
from typing import Any
from urllib.parse import unquote, urlsplit

HERE = os.path.abspath(__file__)
BENCH = os.path.dirname(HERE)
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)  # ion
sys.path.insert(0, BENCH)  # bench/amqp.py

import amqp  # noqa: E402  bench/amqp.py: measuring loops, CPU of a pid, pika connect, consume loop, spawn
import msgpack  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

QUEUE = amqp.PIKA_QUEUE
PAYLOAD = amqp.PAYLOAD
#: exchange kind -> (exchange name, type to declare; None: the default exchange, nothing to declare)
EXCHANGES: dict[str, tuple[str, str | None]] = {
    "default": ("", None), "topic": ("exch.topic", "topic"), "direct": ("exch.direct", "direct")}
#: variant -> (exchange kind, user_id set, message_id set), on requests and replies alike
VARIANTS: dict[str, tuple[str, bool, bool]] = {
    "A": ("default", False, False),
    "B": ("topic", False, False),
    "C": ("direct", False, False),
    "D": ("topic", True, True),
    "E": ("direct", True, True),
    "F": ("default", True, True),
    "G": ("default", True, False),
    "H": ("default", False, True),
}
PHASES = ("sequential", "window")
PROCS = ("client", "server", "broker")
#: (label, x, y): the paired per-round differences x - y
CONTRASTS = (
    ("topic vs default (B-A)", "B", "A"),
    ("topic vs default, +uid+mid (D-F)", "D", "F"),
    ("direct vs default (C-A)", "C", "A"),
    ("direct vs default, +uid+mid (E-F)", "E", "F"),
    ("topic vs direct (B-C)", "B", "C"),
    ("topic vs direct, +uid+mid (D-E)", "D", "E"),
    ("uid+mid on default (F-A)", "F", "A"),
    ("uid+mid on topic (D-B)", "D", "B"),
    ("uid+mid on direct (E-C)", "E", "C"),
    ("uid alone on default (G-A)", "G", "A"),
    ("mid alone on default (H-A)", "H", "A"),
    ("DESIGN vs plain (D-A)", "D", "A"),
)


def describe(variant: str) -> str:
    """``topic+uid+mid`` and the like."""
    kind, uid, mid = VARIANTS[variant]
    return kind + ("+uid" if uid else "") + ("+mid" if mid else "")


def props(cid: str, reply_to: str | None, uid: bool, mid: bool, user: str) -> Any:
    """The properties of bench/amqp.py's pika rows: ``plain``'s, plus ``message_id`` and ``user_id`` as
    its ``design`` row sets them, each when asked for."""
    import pika

    kw: dict[str, Any] = {"content_type": "application/msgpack", "correlation_id": cid, "reply_to": reply_to}
    if mid:
        kw["message_id"] = f"0123456789ab.{cid}"
    if uid:
        kw["user_id"] = user
    return pika.BasicProperties(**kw)


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


# -- server (child process: --server) ---------------------------------------------------------------------
@defer.inlineCallbacks
def server(reactor: Any, url: str, prefetch: int, variant: str) -> Any:
    """bench/amqp.py's raw pika echo server, publishing its replies as ``variant`` says. On SIGTERM it
    prints a ``server stats`` line: the requests handled and how the first one arrived."""
    kind, uid, mid = VARIANTS[variant]
    exchange, etype = EXCHANGES[kind]
    user = unquote(urlsplit(url).username or "guest")
    conn = yield amqp._pika_connect(reactor, url)
    ch = yield conn.channel()
    if etype:
        yield ch.exchange_declare(exchange=exchange, exchange_type=etype, auto_delete=True)
    yield ch.queue_declare(queue=QUEUE, auto_delete=True)
    if etype:
        yield ch.queue_bind(queue=QUEUE, exchange=exchange, routing_key=QUEUE)
    yield ch.basic_qos(prefetch_count=prefetch)
    queue_obj, _tag = yield ch.basic_consume(queue=QUEUE, auto_ack=False)
    packb, unpackb = msgpack.packb, msgpack.unpackb
    seen: dict[str, Any] = {"n": 0, "uid": None, "mid": None, "ex": None}

    def handle(item: Any) -> None:
        _ch, method, p, body = item
        request = unpackb(body, raw=False)
        if seen["n"] == 0:
            seen.update(uid=p.user_id, mid=p.message_id, ex=method.exchange)
        seen["n"] += 1
        reply = packb({"value": f"Hello there, {request['content']}"}, use_bin_type=True)
        d = ch.basic_publish(exchange=exchange, routing_key=p.reply_to, body=reply,
                             properties=props(p.correlation_id, None, uid, mid, user))
        d.addErrback(lambda f: None)
        if ch.is_open:
            ch.basic_ack(delivery_tag=method.delivery_tag)

    amqp._consume_loop(queue_obj, handle)
    print("pika echo server ready", flush=True)

    def bye() -> None:
        print("server stats " + json.dumps(seen), flush=True)
        conn.close()

    reactor.addSystemEventTrigger("before", "shutdown", bye)
    yield defer.Deferred()  # until SIGTERM stops the reactor


# -- client -----------------------------------------------------------------------------------------------
def cpu_per_call(before: dict[str, float | None], after: dict[str, float | None], n: int) -> dict[str, Any]:
    """CPU µs per call of each process between two CPU readings (None if unknown)."""
    out: dict[str, Any] = {}
    for k, b in before.items():
        a = after[k]
        out[k] = (a - b) / n * 1e6 if a is not None and b is not None else None
    return out


@defer.inlineCallbacks
def phase(pids: dict[str, int | None], run: Any, n: int) -> Any:
    """``run()`` (one measured phase of ``n`` calls) after a ``gc.collect()``; its figures, CPU per call
    (``cpu_us`` from schedstat, ``cpu_us_ticks`` from ``/proc/<pid>/stat``) and the 1-min load after it."""
    gc.collect()
    b_tick = {k: amqp.cpu_seconds(p) for k, p in pids.items()}
    b_ns = {k: cpu_ns(p) for k, p in pids.items()}
    secs, lat = yield run()
    a_ns = {k: cpu_ns(p) for k, p in pids.items()}
    a_tick = {k: amqp.cpu_seconds(p) for k, p in pids.items()}
    res = amqp.summarize(n, secs, lat)
    res["cpu_us"] = cpu_per_call(b_ns, a_ns, n)
    res["cpu_us_ticks"] = cpu_per_call(b_tick, a_tick, n)
    res["load1"] = os.getloadavg()[0]
    return res


@defer.inlineCallbacks
def bench_one(reactor: Any, url: str, variant: str, args: argparse.Namespace, window: bool,
              broker_pid: int | None) -> Any:
    """A server child, then this process's client, both publishing as ``variant`` says: the sequential
    phase, and the windowed one if ``window``. Fires with {sequential, [window,] client_first_reply,
    server_stats}."""
    kind, uid, mid = VARIANTS[variant]
    exchange, etype = EXCHANGES[kind]
    user = unquote(urlsplit(url).username or "guest")
    srv = amqp.spawn("pika server", sys.executable,
                     [HERE, "--server", "--url", url, "--prefetch", str(args.prefetch), "--variant", variant])
    conn = None
    res: dict[str, Any] = {}
    try:
        yield srv.wait_for(b"pika echo server ready")
        conn = yield amqp._pika_connect(reactor, url)
        ch = yield conn.channel()
        frame = yield ch.queue_declare(queue="", exclusive=True)
        reply_q = frame.method.queue
        if etype:
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
                           properties=props(cid, reply_q, uid, mid, user), mandatory=False)
            sent.addErrback(d.errback)
            return d

        reply = yield call()
        assert reply == {"value": f"Hello there, {PAYLOAD}"}, reply
        res["client_first_reply"] = dict(first)
        pids = {"client": os.getpid(), "server": srv.transport.pid, "broker": broker_pid}
        if args.warmup:
            yield amqp.sequential(call, args.warmup)
        res["sequential"] = yield phase(pids, lambda: amqp.sequential(call, args.calls), args.calls)
        if window:
            if args.warmup:
                yield amqp.windowed(call, args.warmup, args.window)
            res["window"] = yield phase(pids, lambda: amqp.windowed(call, args.inflight_calls, args.window),
                                        args.inflight_calls)
    finally:
        if conn is not None:
            yield conn.close()
        yield srv.stop()
    for line in srv.output.decode(errors="replace").splitlines():
        if line.startswith("server stats "):
            res["server_stats"] = json.loads(line[len("server stats "):])
    return res


def round_line(r: int, variant: str, res: dict[str, Any]) -> str:
    """One progress line (stderr) for a variant's run in round ``r``."""
    def fig(x: dict[str, Any], width: int) -> str:
        c = x["cpu_us"]
        cpu = "/".join("?" if c[k] is None else f"{c[k]:.0f}" for k in PROCS)
        return f"{x['calls_per_s']:7.0f}/s p50 {x['p50_us']:{width}.0f} p99 {x['p99_us']:6.0f} cpu c/s/b {cpu}"

    line = f"round {r} {variant} {describe(variant):15}: seq {fig(res['sequential'], 5)}"
    if "window" in res:
        line += f" | win {fig(res['window'], 6)}"
    return line + f"  load {os.getloadavg()[0]:.2f}"


def rotation(names: list[str], r: int) -> list[str]:
    """The order of round ``r`` (from 0): ``names`` rotated by ``r``, reversed in odd rounds."""
    k = r % len(names)
    rot = names[k:] + names[:k]
    return rot[::-1] if r % 2 else rot


@defer.inlineCallbacks
def run(reactor: Any, url: str, args: argparse.Namespace, broker_pid: int | None, report: dict[str, Any]) -> Any:
    """The interleaved rounds; fills ``report`` with ``runs`` (per variant, one entry per round) and ``order``."""
    names = list(args.variants)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in names}
    order: list[tuple[int, str]] = []
    for r in range(args.repeat):
        for v in rotation(names, r):
            res = yield bench_one(reactor, url, v, args, window=r < args.window_repeat, broker_pid=broker_pid)
            res["round"] = r + 1
            print(round_line(r + 1, v, res), file=sys.stderr, flush=True)
            order.append((r + 1, v))
            runs[v].append(res)
    report.update(runs=runs, order=order)


# -- summary ----------------------------------------------------------------------------------------------
def _median(values: list[Any]) -> float | None:
    nums = [v for v in values if v is not None]
    return statistics.median(nums) if nums else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _pairs(runs: dict[str, list[dict[str, Any]]], x: str, y: str, ph: str) -> list[tuple[dict[str, Any], ...]]:
    """(y's figures, x's figures) of phase ``ph`` in every round that ran it for both."""
    return [(a[ph], b[ph]) for a, b in zip(runs[y], runs[x], strict=True) if ph in a and ph in b]


def medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant and phase: the median over the rounds of each figure, and how many rounds ran it;
    and the medians of the per-round comparisons with the first variant (``vs_ref``)."""
    names = list(runs)
    ref = names[0]
    out: dict[str, Any] = {}
    for v in names:
        m: dict[str, Any] = {}
        for ph in PHASES:
            rs = [x[ph] for x in runs[v] if ph in x]
            if not rs:
                continue
            m[ph] = {k: _median([x[k] for x in rs]) for k in ("calls_per_s", "p50_us", "p99_us")}
            m[ph]["cpu_us"] = {k: _median([x["cpu_us"][k] for x in rs]) for k in PROCS}
            m[ph]["cpu_us_ticks"] = {k: _median([x["cpu_us_ticks"][k] for x in rs]) for k in PROCS}
            m[ph]["n_runs"] = len(rs)
            pa = _pairs(runs, v, ref, ph)
            m[ph]["vs_ref"] = {
                "ref": ref,
                "calls_per_s_ratio": _median([b["calls_per_s"] / a["calls_per_s"] for a, b in pa]),
                "p50_ratio": _median([b["p50_us"] / a["p50_us"] for a, b in pa]),
                "p50_diff_us": _median([b["p50_us"] - a["p50_us"] for a, b in pa]),
                "broker_cpu_diff_us": _median([_diff(b["cpu_us"]["broker"], a["cpu_us"]["broker"]) for a, b in pa]),
            }
        out[v] = m
    return out


def contrasts(runs: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Per phase, the :data:`CONTRASTS` whose two variants ran: the per-round differences x - y of broker
    CPU, client + server CPU and p50 (µs), and the ratio x/y of calls/s."""
    out: dict[str, list[dict[str, Any]]] = {}
    for ph in PHASES:
        rows = []
        for label, x, y in CONTRASTS:
            if x not in runs or y not in runs:
                continue
            pa = _pairs(runs, x, y, ph)
            if not pa:
                continue
            rows.append({
                "contrast": label, "x": x, "y": y, "n": len(pa),
                "broker_cpu_us": [_diff(b["cpu_us"]["broker"], a["cpu_us"]["broker"]) for a, b in pa],
                "client_server_cpu_us": [
                    None if None in (a["cpu_us"]["client"], a["cpu_us"]["server"], b["cpu_us"]["client"],
                                     b["cpu_us"]["server"])
                    else (b["cpu_us"]["client"] + b["cpu_us"]["server"])
                    - (a["cpu_us"]["client"] + a["cpu_us"]["server"]) for a, b in pa],
                "p50_us": [b["p50_us"] - a["p50_us"] for a, b in pa],
                "calls_per_s_ratio": [b["calls_per_s"] / a["calls_per_s"] for a, b in pa],
            })
        if rows:
            out[ph] = rows
    return out


def wire_checks(runs: dict[str, list[dict[str, Any]]], user: str) -> dict[str, list[str]]:
    """Per variant, what was wrong with how the first request (seen by the server) and the first reply
    (seen by the client) of each run arrived: exchange, user_id, message_id. Empty lists: all as set."""
    out: dict[str, list[str]] = {}
    for v, rs in runs.items():
        kind, uid, mid = VARIANTS[v]
        want = {"ex": EXCHANGES[kind][0], "uid": user if uid else None}
        problems = []
        for res in rs:
            for who, seen in (("request", res.get("server_stats")), ("reply", res.get("client_first_reply"))):
                if not seen:
                    problems.append(f"round {res['round']}: {who}: nothing recorded")
                    continue
                bad = [f"{k}={seen.get(k)!r}" for k in ("ex", "uid") if seen.get(k) != want[k]]
                if (seen.get("mid") is not None) != mid:
                    bad.append(f"mid={seen.get('mid')!r}")
                if bad:
                    problems.append(f"round {res['round']}: {who}: " + ", ".join(bad))
        out[v] = problems
    return out


def _load(la: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in la)


def _cell(v: float | None, spec: str, width: int) -> str:
    return f"{'?' if v is None else format(v, spec):>{width}}"


def _spread(values: list[float | None], spec: str) -> str:
    """``median [min..max]`` of the known values."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return "?"
    return f"{format(statistics.median(vals), spec)} [{format(vals[0], spec)}..{format(vals[-1], spec)}]"


def format_summary(report: dict[str, Any]) -> str:
    """The plain-text summary: variants, medians with the comparison to the first variant, paired contrasts,
    wire checks, broker, load."""
    a = report["args"]
    names = list(report["runs"])
    ref = names[0]
    lines = [f"Exchange type, user_id and message_id on a raw pika (Twisted adapter) RPC echo; "
             f"RabbitMQ {report['broker_version']}",
             "variants (requests and replies alike): " + "; ".join(f"{v}={describe(v)}" for v in names),
             f"{a['repeat']} rounds (order rotated), {a['calls']} sequential calls; first "
             f"{min(a['window_repeat'], a['repeat'])} rounds also {a['inflight_calls']} calls with {a['window']} "
             f"in flight; prefetch {a['prefetch']}",
             f"load average (1, 5, 15 min): start {_load(report['loadavg_start'])}, "
             f"end {_load(report['loadavg_end'])}"]
    meds = report["medians"]
    for ph in PHASES:
        if not all(ph in meds[v] for v in names):
            continue
        title = "sequential" if ph == "sequential" else f"{a['window']} in flight"
        lines += ["", f"{title}: medians of {meds[ref][ph]['n_runs']} runs each; CPU from schedstat "
                      f"(ticks: broker's from /proc stat); vs {ref}: median of the per-round ratio or difference",
                  f"{'':43}{'CPU us/call':^28}   {'vs ' + ref + ', per round':^30}".rstrip(),
                  f"{'var':4}{'':15}{'calls/s':>8}{'p50 us':>8}{'p99 us':>8}  {'client':>7}{'server':>7}"
                  f"{'broker':>7}{'ticks':>7}   {'calls/s':>7}{'p50':>7}{'p50 us':>8}{'broker':>8}"]
        for v in names:
            m = meds[v][ph]
            c, r = m["cpu_us"], m["vs_ref"]
            lines.append(f"{v:4}{describe(v):15}{m['calls_per_s']:8.0f}{m['p50_us']:8.0f}{m['p99_us']:8.0f}  "
                         + "".join(_cell(c[k], ".1f", 7) for k in PROCS)
                         + _cell(m["cpu_us_ticks"]["broker"], ".1f", 7) + "   "
                         + _cell(r["calls_per_s_ratio"], ".3f", 7) + _cell(r["p50_ratio"], ".3f", 7)
                         + _cell(r["p50_diff_us"], "+.0f", 8) + _cell(r["broker_cpu_diff_us"], "+.1f", 8))
        rows = report["contrasts"].get(ph)
        if rows:
            lines += ["", f"paired contrasts ({title}): median [min..max] over the rounds of the per-round "
                          "difference x - y (calls/s: ratio x/y)",
                      f"{'contrast':35}{'broker us/call':>26}{'client+server us':>24}{'p50 us':>24}"
                      f"{'calls/s ratio':>25}"]
            for row in rows:
                wins = sum(d is not None and d > 0 for d in row["broker_cpu_us"])
                lines.append(f"{row['contrast']:35}{_spread(row['broker_cpu_us'], '+.1f'):>26}"
                             f"{_spread(row['client_server_cpu_us'], '+.1f'):>24}{_spread(row['p50_us'], '+.0f'):>24}"
                             f"{_spread(row['calls_per_s_ratio'], '.3f'):>25}  n={row['n']}, "
                             f"broker more in {wins}")
    bad = {v: p for v, p in report["wire_checks"].items() if p}
    lines.append("")
    if not bad:
        lines.append("wire check: ok (the first request and reply of every run came through the variant's "
                     "exchange, with user_id and message_id as set)")
    else:
        lines.append("wire check: NO (a variant did not publish as it says)")
        for v, problems in bad.items():
            lines += [f"  {v} {describe(v)}: {p}" for p in problems[:5]]
    return "\n".join(lines)


# -- driver -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/exchanges.py",
        description="Default vs topic vs direct exchange, with and without user_id and message_id, for a raw "
                    "pika (Twisted adapter) RPC echo, interleaved rounds, on a private RabbitMQ.")
    p.add_argument("--repeat", type=int, default=9, help="rounds, each running every variant (default 9)")
    p.add_argument("--calls", type=int, default=3000, help="sequential calls per variant and round (default 3000)")
    p.add_argument("--inflight-calls", type=int, default=20000,
                   help="calls of the windowed phase per variant and round (default 20000)")
    p.add_argument("--window", type=int, default=100, help="calls kept in flight (default 100)")
    p.add_argument("--window-repeat", type=int, default=3,
                   help="the first N rounds also run the windowed phase (default 3)")
    p.add_argument("--warmup", type=int, default=300, help="warm-up calls before each phase (default 300)")
    p.add_argument("--prefetch", type=int, default=None,
                   help="the server's prefetch (default: ion.core.process prefetch of the shipped config)")
    p.add_argument("--variants", default="".join(VARIANTS),
                   help="the variants to run, in this order; the first is the reference of the 'vs' columns "
                        "(default ABCDEFGH)")
    p.add_argument("--json", metavar="OUT", help="also write every figure of every round to OUT (JSON)")
    p.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("repeat", "calls", "inflight_calls", "window"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.window_repeat < 0:
        p.error("--warmup and --window-repeat must be >= 0")
    if args.prefetch is not None and args.prefetch < 1:
        p.error("--prefetch must be at least 1")
    args.variants = args.variants.upper()
    if not args.variants or any(v not in VARIANTS for v in args.variants) or len(set(args.variants)) != len(
            args.variants):
        p.error(f"--variants: distinct letters among {''.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv``; the server child (--server) or the whole benchmark."""
    args = parse_args(argv)
    if args.server:
        task.react(lambda reactor: server(reactor, args.url, args.prefetch, args.variant))
        return
    if args.prefetch is None:
        args.prefetch = amqp._default_prefetch()
    from ion.testing.rabbitmq import RabbitMQServer

    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k not in ("server", "url", "variant")},
                              "variants": {v: dict(zip(("exchange", "user_id", "message_id"), VARIANTS[v],
                                                       strict=True)) for v in args.variants},
                              "loadavg_start": list(os.getloadavg())}
    print("starting a private RabbitMQ ...", file=sys.stderr, flush=True)
    broker = RabbitMQServer()
    broker.start()
    try:
        url = broker.new_vhost_url("exch")
        broker_pid = amqp.listening_pid(broker.port)
        report["broker_version"] = broker.ctl("version").strip()
        report["broker_pid"] = broker_pid
        report["url"] = amqp._redact(url)
        try:
            task.react(lambda reactor: run(reactor, url, args, broker_pid, report))
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
    finally:
        broker.stop()
    report["loadavg_end"] = list(os.getloadavg())
    report["medians"] = medians(report["runs"])
    report["contrasts"] = contrasts(report["runs"])
    report["wire_checks"] = wire_checks(report["runs"], unquote(urlsplit(url).username or "guest"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(format_summary(report), flush=True)


if __name__ == "__main__":
    main()
