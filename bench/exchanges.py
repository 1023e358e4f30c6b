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
import os
import statistics
import sys
from typing import Any

HERE = os.path.abspath(__file__)
BENCH = os.path.dirname(HERE)
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)  # ion
sys.path.insert(0, BENCH)  # bench/amqp.py, bench/pika_echo.py

import amqp  # noqa: E402  bench/amqp.py: the default prefetch
import pika_echo as pe  # noqa: E402  bench/pika_echo.py: the echo server and client, rounds, medians, driver
from pika_echo import PHASES, PROCS  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

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
#: The --help text's description.
DESCRIPTION = ("Default vs topic vs direct exchange, with and without user_id and message_id, for a raw pika "
               "(Twisted adapter) RPC echo, interleaved rounds, on a private RabbitMQ.")


def describe(variant: str) -> str:
    """``topic+uid+mid`` and the like."""
    kind, uid, mid = VARIANTS[variant]
    return kind + ("+uid" if uid else "") + ("+mid" if mid else "")


# -- server (child process: --server) ---------------------------------------------------------------------
def server(reactor: Any, url: str, prefetch: int, variant: str) -> Any:
    """bench/amqp.py's raw pika echo server, publishing its replies as ``variant`` says. On SIGTERM it
    prints a ``server stats`` line: the requests handled and how the first one arrived."""
    kind, uid, mid = VARIANTS[variant]
    exchange, etype = EXCHANGES[kind]
    first: dict[str, Any] = {"uid": None, "mid": None, "ex": None}

    def first_request(method: Any, p: Any) -> None:
        first.update(uid=p.user_id, mid=p.message_id, ex=method.exchange)

    return pe.echo_server(reactor, url, prefetch, exchange=exchange, exchange_type=etype,
                          user_id=pe.url_user(url) if uid else None, message_id=mid, first_request=first_request,
                          stats=lambda s: {"n": s.handled, **first})


# -- client -----------------------------------------------------------------------------------------------
def bench_one(reactor: Any, url: str, variant: str, args: argparse.Namespace, window: bool,
              broker_pid: int | None) -> Any:
    """A server child, then this process's client, both publishing as ``variant`` says: the sequential
    phase, and the windowed one if ``window``. Fires with {client_first_reply, sequential, [window,]
    server_stats}."""
    kind, uid, mid = VARIANTS[variant]
    exchange, etype = EXCHANGES[kind]
    return pe.bench_one(reactor, url, HERE, args, window, broker_pid, server_flags=["--variant", variant],
                        exchange=exchange, bind=etype is not None, user_id=pe.url_user(url) if uid else None,
                        message_id=mid, schedstat=True, first_reply=True)


def rotation(names: list[str], r: int) -> list[str]:
    """The order of round ``r`` (from 0): ``names`` rotated by ``r``, reversed in odd rounds."""
    k = r % len(names)
    rot = names[k:] + names[:k]
    return rot[::-1] if r % 2 else rot


@defer.inlineCallbacks
def run(reactor: Any, url: str, args: argparse.Namespace, broker_pid: int | None, report: dict[str, Any]) -> Any:
    """The interleaved rounds; fills ``report`` with ``runs`` (per variant, one entry per round) and ``order``."""
    names = list(args.variants)
    runs, order = yield pe.run_rounds(
        args, names, lambda r: rotation(names, r),
        lambda v, window: bench_one(reactor, url, v, args, window=window, broker_pid=broker_pid),
        lambda v: f"{v} {describe(v):15}", number=True)
    report.update(runs=runs, order=order)


# -- summary ----------------------------------------------------------------------------------------------
def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant and phase: the median over the rounds of each figure, and how many rounds ran it;
    and the medians of the per-round comparisons with the first variant (``vs_ref``)."""
    ref = next(iter(runs))

    def vs_ref(v: str, ph: str) -> dict[str, Any]:
        pa = pe.pairs(runs, v, ref, ph)
        return {"vs_ref": {
            "ref": ref,
            "calls_per_s_ratio": pe.median(pe.ratios(pa, "calls_per_s")),
            "p50_ratio": pe.median(pe.ratios(pa, "p50_us")),
            "p50_diff_us": pe.median([b["p50_us"] - a["p50_us"] for a, b in pa]),
            "broker_cpu_diff_us": pe.median([_diff(b["cpu_us"]["broker"], a["cpu_us"]["broker"]) for a, b in pa]),
        }}

    return pe.medians(runs, vs_ref)


def contrasts(runs: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Per phase, the :data:`CONTRASTS` whose two variants ran: the per-round differences x - y of broker
    CPU, client + server CPU and p50 (µs), and the ratio x/y of calls/s."""
    out: dict[str, list[dict[str, Any]]] = {}
    for ph in PHASES:
        rows = []
        for label, x, y in CONTRASTS:
            if x not in runs or y not in runs:
                continue
            pa = pe.pairs(runs, x, y, ph)
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
                "calls_per_s_ratio": pe.ratios(pa, "calls_per_s"),
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
             pe.load_line(report)]
    meds = report["medians"]
    for ph in PHASES:
        if not all(ph in meds[v] for v in names):
            continue
        title = pe.phase_title(ph, a["window"])
        lines += ["", f"{title}: medians of {meds[ref][ph]['n_runs']} runs each; CPU from schedstat "
                      f"(ticks: broker's from /proc stat); vs {ref}: median of the per-round ratio or difference",
                  f"{'':43}{'CPU us/call':^28}   {'vs ' + ref + ', per round':^30}".rstrip(),
                  f"{'var':4}{'':15}{'calls/s':>8}{'p50 us':>8}{'p99 us':>8}  {'client':>7}{'server':>7}"
                  f"{'broker':>7}{'ticks':>7}   {'calls/s':>7}{'p50':>7}{'p50 us':>8}{'broker':>8}"]
        for v in names:
            m = meds[v][ph]
            c, r = m["cpu_us"], m["vs_ref"]
            lines.append(f"{v:4}{describe(v):15}{m['calls_per_s']:8.0f}{m['p50_us']:8.0f}{m['p99_us']:8.0f}  "
                         + "".join(pe.cell(c[k], ".1f", 7) for k in PROCS)
                         + pe.cell(m["cpu_us_ticks"]["broker"], ".1f", 7) + "   "
                         + pe.cell(r["calls_per_s_ratio"], ".3f", 7) + pe.cell(r["p50_ratio"], ".3f", 7)
                         + pe.cell(r["p50_diff_us"], "+.0f", 8) + pe.cell(r["broker_cpu_diff_us"], "+.1f", 8))
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
    p = pe.parser(HERE, DESCRIPTION, 9, "every variant")
    p.add_argument("--variants", default="".join(VARIANTS),
                   help="the variants to run, in this order; the first is the reference of the 'vs' columns "
                        "(default ABCDEFGH)")
    pe.add_tail_options(p)
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    pe.check_options(p, args)
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
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k not in ("server", "url", "variant")},
                              "variants": {v: dict(zip(("exchange", "user_id", "message_id"), VARIANTS[v],
                                                       strict=True)) for v in args.variants},
                              "loadavg_start": list(os.getloadavg())}
    url = pe.run_on_private_broker("exch", report, lambda reactor, url, broker_pid: run(reactor, url, args,
                                                                                       broker_pid, report))
    report["medians"] = medians(report["runs"])
    report["contrasts"] = contrasts(report["runs"])
    report["wire_checks"] = wire_checks(report["runs"], pe.url_user(url))
    pe.finish(report, args.json, format_summary(report))

if __name__ == "__main__":
    main()
