"""Direct reply-to against an exclusive reply queue on RabbitMQ: a raw pika RPC echo, both ways.

The question: would RabbitMQ's "direct reply-to" (the caller consumes the pseudo-queue
``amq.rabbitmq.reply-to`` with ``auto_ack`` on the channel it publishes on, no reply queue is
declared) shorten a sequential ioncore RPC on RabbitMQ, and so help towards #14's
"sequential >= 3x nameko" target? Before touching ioncore's transport this measures it on the
smallest RPC there is: the "raw pika (Twisted adapter)" row of bench/amqp.py (its server, its
request body and properties, the default exchange for requests and replies, the receivers'
prefetch of the shipped config, ``TCP_NODELAY`` on both sides), run two ways that differ only
in the client's reply path:

* **queue** -- an exclusive server-named reply queue (``queue_declare("")``, consumed with
  ``auto_ack``), ``reply_to`` its name: what bench/amqp.py does;
* **direct** -- ``basic_consume("amq.rabbitmq.reply-to", auto_ack=True)`` on the publishing
  channel, ``reply_to = "amq.rabbitmq.reply-to"``.

The server (a child process: this script again) replies the same way to both, to the exchange
``""`` with the request's ``reply_to`` as routing key. Every round runs both variants, in
alternating order (queue then direct, then direct then queue, ...) so that neither always runs
first; each variant makes ``--calls`` sequential calls and, in the first ``--window-repeat``
rounds, ``--inflight-calls`` calls with ``--window`` (100) in flight, each phase after
``--warmup`` calls and a ``gc.collect()``. Per phase: calls/s, p50/p99 latency, and the CPU
microseconds per call of the client (this process), the server and the broker (Linux ``/proc``),
which move much less than calls/s on a shared machine. The summary gives the median of each
figure over the rounds, direct's difference to queue, and the per-round ratio direct/queue of
calls/s (the two ran back to back, so a slow spell of the machine hits both).

It also checks what a transport using direct reply-to would rely on (pika BlockingConnection, in
a child process): the server sees ``reply_to`` rewritten to ``amq.rabbitmq.reply-to.<token>``;
a reply's ``user_id`` is validated by the broker (a wrong one closes the channel with 406); a
reply published with ``mandatory=True`` comes back as ``Basic.Return`` 312 NO_ROUTE *although
it was delivered*; publishing a request with ``reply_to=amq.rabbitmq.reply-to`` on a channel
that does not consume it is refused with 406. After the rounds, 300 calls of each variant with
the server setting ``user_id`` and ``mandatory=True`` on every reply show the same on the
Twisted adapter. Each check is marked ``ok`` when the broker behaves as just described (as
RabbitMQ 3.10.8 did).

It starts a private RabbitMQ (:mod:`ion.testing.rabbitmq`, about 10 s, on 127.0.0.1) and stops
it at the end. Run from the repository root::

    python bench/direct_reply.py                       # 7 rounds of 3,000 sequential calls
    python bench/direct_reply.py --repeat 1 --calls 300 --inflight-calls 2000 --window-repeat 1
    python bench/direct_reply.py --json direct_reply.json   # and every figure of every round

It is a benchmark, not a test: the exit code is 0 whatever the figures and the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.abspath(__file__)
BENCH = os.path.dirname(HERE)
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)  # ion
sys.path.insert(0, BENCH)  # bench/amqp.py, bench/pika_echo.py

import amqp  # noqa: E402  bench/amqp.py: the default prefetch
import pika_echo as pe  # noqa: E402  bench/pika_echo.py: the echo server and client, rounds, medians, driver
from pika_echo import DIRECT, PHASES, PROCS  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

VARIANTS = ("queue", "direct")
#: Calls of each variant in the Twisted check (server sets user_id and mandatory on its replies).
CHECK_CALLS = 300
#: The --help text's description.
DESCRIPTION = ("RabbitMQ direct reply-to vs an exclusive reply queue for a raw pika (Twisted adapter) RPC echo, "
               "interleaved rounds, on a private RabbitMQ; plus functional checks of direct reply-to.")


# -- server (child process: --server) ---------------------------------------------------------------------
def server(reactor: Any, url: str, prefetch: int, user_id: str | None, mandatory: bool) -> Any:
    """bench/amqp.py's raw pika echo server (``plain``); its replies optionally with ``user_id`` and
    ``mandatory``. Prints the first ``reply_to`` it sees and, on SIGTERM, a ``server stats`` line."""
    def first_request(_method: Any, p: Any) -> None:
        print(f"first reply_to seen by server: {p.reply_to}", flush=True)

    def stats(s: pe.ServerState) -> dict[str, Any]:
        return {"handled": s.handled, "returned": len(s.returned), "reply_codes": sorted(set(s.returned)),
                "channel_open": bool(s.channel.is_open)}

    return pe.echo_server(reactor, url, prefetch, user_id=user_id, mandatory=mandatory, first_request=first_request,
                          stats=stats)


# -- client -----------------------------------------------------------------------------------------------
def bench_one(reactor: Any, url: str, variant: str, args: argparse.Namespace, window: bool,
              broker_pid: int | None, server_flags: list[str] | None = None) -> Any:
    """A server child, then this process's client replying via ``variant``'s path: the sequential phase,
    and the windowed one if ``window``. Fires with {sequential, [window,] server_log, server_stats}."""
    return pe.bench_one(reactor, url, HERE, args, window, broker_pid, server_flags=server_flags or [],
                        direct=variant == "direct", server_log=("first reply_to", "server stats"))


@defer.inlineCallbacks
def run(reactor: Any, url: str, args: argparse.Namespace, broker_pid: int | None, report: dict[str, Any]) -> Any:
    """The interleaved rounds, then the Twisted user_id + mandatory check; fills ``report``."""
    runs, order = yield pe.run_rounds(
        args, list(VARIANTS),
        lambda r: list(VARIANTS if r % 2 == 0 else VARIANTS[::-1]),  # A B, B A, ...: no fixed position bias
        lambda v, window: bench_one(reactor, url, v, args, window=window, broker_pid=broker_pid),
        lambda v: f"{v:6}")
    report.update({"runs": runs, "order": order})
    # the same echo with user_id and mandatory=True set on every reply, a few calls of each variant
    chk = argparse.Namespace(**{**vars(args), "calls": CHECK_CALLS, "warmup": 0})
    user = pe.url_user(url)
    twisted: dict[str, Any] = {}
    for v in VARIANTS:
        res = yield bench_one(reactor, url, v, chk, window=False, broker_pid=broker_pid,
                              server_flags=["--reply-user-id", user, "--reply-mandatory"])
        twisted[v] = {"calls_per_s": res["sequential"]["calls_per_s"], "server_stats": res.get("server_stats"),
                      "server_log": res["server_log"]}
    report["twisted_checks"] = twisted_checks(twisted)
    report["twisted_userid_mandatory_check"] = twisted


def twisted_checks(twisted: dict[str, Any]) -> list[dict[str, Any]]:
    """Outcome of the Twisted user_id + mandatory runs, as check records (see :func:`run_checks`)."""
    out = []
    calls = CHECK_CALLS + 1  # and the first, checked call
    s = twisted["direct"].get("server_stats") or {}
    out.append({"name": f"Twisted, direct: {calls} replies with user_id + mandatory: all answered, all returned "
                        "312, channel open",
                "ok": s.get("handled") == calls and s.get("returned") == calls and s.get("reply_codes") == [312]
                and s.get("channel_open") is True, "detail": json.dumps(s)})
    s = twisted["queue"].get("server_stats") or {}
    out.append({"name": f"Twisted, queue: {calls} replies with user_id + mandatory: none returned, channel open",
                "ok": s.get("handled") == calls and s.get("returned") == 0 and s.get("channel_open") is True,
                "detail": json.dumps(s)})
    return out


# -- functional checks (child process: --check URL) --------------------------------------------------------
def run_checks(url: str) -> list[dict[str, Any]]:
    """What direct reply-to does with user_id, mandatory and a missing consumer (pika BlockingConnection).

    Returns one record per check: ``name``, ``ok`` (True when the broker behaves as the module docstring
    says; None for a check that only records what happens) and ``detail``; each is also printed on stderr.
    """
    import pika
    from pika.exceptions import ChannelClosedByBroker, UnroutableError

    user = pe.url_user(url)
    q = "drt.check"
    results: list[dict[str, Any]] = []

    def report(name: str, ok: bool | None, detail: str = "") -> None:
        results.append({"name": name, "ok": ok, "detail": detail})
        mark = {True: "ok ", False: "NO ", None: " - "}[ok]
        print(f"[{mark}] {name}{': ' + detail if detail else ''}", file=sys.stderr, flush=True)

    def client() -> tuple[Any, Any, list[Any]]:
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        got: list[Any] = []
        ch.basic_consume(DIRECT, lambda c, m, p, b: got.append((p, b)), auto_ack=True)
        return conn, ch, got

    def wait(conn: Any, got: list[Any], n: int = 1, secs: float = 2.0) -> bool:
        end = time.monotonic() + secs
        while len(got) < n and time.monotonic() < end:
            conn.process_data_events(time_limit=0.05)
        return len(got) >= n

    srv = pika.BlockingConnection(pika.URLParameters(url))
    sch = srv.channel()
    sch.queue_declare(q, auto_delete=False)

    def request(ch: Any, cid: str) -> str:
        ch.basic_publish("", q, b"req", pika.BasicProperties(correlation_id=cid, reply_to=DIRECT))
        for _ in range(100):
            m, p, _b = sch.basic_get(q, auto_ack=True)
            if m:
                return str(p.reply_to)
            time.sleep(0.02)
        raise RuntimeError("request not received")

    def fresh_server_channel(confirm: bool = False) -> Any:
        ch = srv.channel()
        if confirm:
            ch.confirm_delivery()
        return ch

    def code(method: Any) -> Any:
        return getattr(method, "reply_code", None)

    # 1. plain direct reply-to, user_id = the connection's user (broker-validated)
    conn, ch, got = client()
    rt = request(ch, "1")
    report("server sees reply_to rewritten to amq.rabbitmq.reply-to.<token>", rt.startswith(DIRECT + "."),
           rt[:60] + "...")
    pub = fresh_server_channel()
    pub.basic_publish("", rt, b"rep", pika.BasicProperties(correlation_id="1", user_id=user))
    ok = wait(conn, got)
    report(f"reply with user_id={user!r} (valid) delivered via direct reply-to",
           ok and got[0][0].user_id == user, f"user_id on delivery = {got[0][0].user_id!r}" if ok else "no reply")

    # 2. a user_id that is not the connection's user: the broker must refuse it (validation on this path)
    pub2 = fresh_server_channel()
    rt = request(ch, "2")
    closed: list[Any] = []
    pub2._impl.add_on_close_callback(lambda c, reason: closed.append(reason))
    try:
        pub2.basic_publish("", rt, b"rep", pika.BasicProperties(correlation_id="2", user_id="somebody-else"))
        srv.process_data_events(time_limit=0.5)
        report("reply with a wrong user_id refused (channel closed, 406)",
               not pub2.is_open and bool(closed) and getattr(closed[0], "reply_code", None) == 406,
               f"channel open: {pub2.is_open}, close reason: {closed}")
    except ChannelClosedByBroker as e:
        report("reply with a wrong user_id refused (channel closed, 406)", e.reply_code == 406, str(e))
    got.clear()
    wait(conn, got, 1, 0.5)
    report("no reply delivered for the wrong user_id", not got)

    # 3. mandatory=True on the reply, on a confirm channel (so a Basic.Return raises UnroutableError)
    got.clear()
    pub3 = fresh_server_channel(confirm=True)
    rt = request(ch, "3")
    name = "mandatory reply (+ user_id, + confirms): returned 312 NO_ROUTE and yet delivered"
    try:
        pub3.basic_publish("", rt, b"rep", pika.BasicProperties(correlation_id="3", user_id=user), mandatory=True)
        ok = wait(conn, got)
        report(name, False, f"not returned; delivered: {ok}")
    except UnroutableError as e:
        ok = wait(conn, got)
        method = e.messages[0].method
        report(name, ok and code(method) == 312, f"delivered: {ok}; {method}")
    except ChannelClosedByBroker as e:
        report(name, False, f"channel closed: {e}")

    # 4. mandatory=True without confirms (as the bench server publishes)
    got.clear()
    pub4 = fresh_server_channel()
    returns: list[Any] = []
    pub4.add_on_return_callback(lambda *a: returns.append(a))
    rt = request(ch, "4")
    pub4.basic_publish("", rt, b"rep", pika.BasicProperties(correlation_id="4"), mandatory=True)
    ok = wait(conn, got)
    srv.process_data_events(time_limit=0.2)
    report("mandatory reply (no confirms): returned 312 NO_ROUTE and yet delivered",
           ok and len(returns) == 1 and code(returns[0][1]) == 312,
           f"delivered: {ok}, returns: {len(returns)} {[r[1] for r in returns]}")

    # 5. caller gone: a mandatory reply to its old reply_to (what happens is recorded, not judged)
    rt = request(ch, "5")
    conn.close()
    time.sleep(0.3)
    pub5 = fresh_server_channel(confirm=True)
    try:
        pub5.basic_publish("", rt, b"rep", pika.BasicProperties(correlation_id="5", user_id=user), mandatory=True)
        report("caller gone, mandatory reply: accepted (confirmed) and not returned", None, "silently dropped")
    except UnroutableError as e:
        report("caller gone, mandatory reply: returned (Basic.Return)", None, f"{e.messages[0].method}")
    except ChannelClosedByBroker as e:
        report("caller gone, mandatory reply: channel closed", None, str(e))

    # 6. caller gone, a non-mandatory reply: no error
    pub6 = fresh_server_channel(confirm=True)
    try:
        pub6.basic_publish("", rt, b"rep", pika.BasicProperties(correlation_id="6"))
        report("caller gone, non-mandatory reply: accepted (confirmed), dropped", True)
    except Exception as e:  # noqa: BLE001
        report("caller gone, non-mandatory reply: accepted (confirmed), dropped", False, repr(e))

    # 7. reply_to=amq.rabbitmq.reply-to on a channel that does not consume it
    name = "request with reply_to=amq.rabbitmq.reply-to, not consuming it first: refused (406)"
    c7 = pika.BlockingConnection(pika.URLParameters(url))
    ch7 = c7.channel()
    try:
        ch7.basic_publish("", q, b"req", pika.BasicProperties(correlation_id="7", reply_to=DIRECT))
        closed7: list[Any] = []
        ch7._impl.add_on_close_callback(lambda c, reason: closed7.append(reason))
        c7.process_data_events(time_limit=0.5)
        report(name, not ch7.is_open and bool(closed7) and getattr(closed7[0], "reply_code", None) == 406,
               str(closed7))
    except ChannelClosedByBroker as e:
        report(name, e.reply_code == 406, str(e))
    if c7.is_open:
        c7.close()

    sch.queue_delete(q)
    srv.close()
    return results


def checks_in_child(url: str) -> tuple[list[dict[str, Any]], str]:
    """:func:`run_checks` in a child process (this script with ``--check URL``): (records, its stderr)."""
    proc = subprocess.run([sys.executable, HERE, "--check", url], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    try:
        records = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        records = [{"name": "functional checks ran", "ok": False,
                    "detail": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}]
    return records, proc.stderr


# -- summary ----------------------------------------------------------------------------------------------
def paired(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per phase: the ratios direct/queue of calls/s and of p50 within each round (both ran back to back)."""
    out: dict[str, Any] = {}
    for ph in PHASES:
        pairs = pe.pairs(runs, "direct", "queue", ph)
        if pairs:
            out[ph] = {"calls_per_s": pe.ratios(pairs, "calls_per_s"), "p50_us": pe.ratios(pairs, "p50_us")}
    return out


def format_summary(report: dict[str, Any]) -> str:
    """The plain-text summary: medians, direct vs queue, paired ratios, checks, broker, load."""
    lines = [f"Direct reply-to vs exclusive reply queue, raw pika (Twisted adapter) RPC echo; "
             f"RabbitMQ {report['broker_version']}",
             f"{report['args']['repeat']} rounds (order alternating), {report['args']['calls']} sequential calls; "
             f"first {min(report['args']['window_repeat'], report['args']['repeat'])} rounds also "
             f"{report['args']['inflight_calls']} calls with {report['args']['window']} in flight",
             pe.load_line(report)]
    meds, pairs = report["medians"], report["paired_ratios"]
    for ph in PHASES:
        if ph not in meds["queue"] or ph not in meds["direct"]:
            continue
        title = pe.phase_title(ph, report["args"]["window"])
        lines += ["", f"{title} (medians of {meds['queue'][ph]['n_runs']} runs each)",
                  f"{'variant':8}{'calls/s':>9}{'p50 us':>8}{'p99 us':>8}   CPU us/call client server broker total"]
        for v in VARIANTS:
            m = meds[v][ph]
            c = m["cpu_us"]
            cells = "".join(pe.cell(c[k], ".0f", w) for k, w in zip(PROCS, (13, 7, 7), strict=True))
            total = "?" if None in c.values() else f"{sum(c.values()):.0f}"
            lines.append(f"{v:8}{m['calls_per_s']:9.0f}{m['p50_us']:8.0f}{m['p99_us']:8.0f}   {cells}{total:>6}")
        q, d = meds["queue"][ph], meds["direct"][ph]
        rel = ", ".join(f"{label} {100 * (d[k] / q[k] - 1):+.1f}%"
                        for label, k in (("calls/s", "calls_per_s"), ("p50", "p50_us"), ("p99", "p99_us")))
        lines.append(f"direct vs queue (ratio of medians): {rel}")
        rat = sorted(pairs[ph]["calls_per_s"])
        wins = sum(x > 1 for x in rat)
        lines.append(f"paired per-round ratio direct/queue calls/s: median {pe.median(rat):.3f}, "
                     f"min {rat[0]:.3f}, max {rat[-1]:.3f}, direct faster in {wins} of {len(rat)} rounds")
        lines.append(f"paired per-round ratio direct/queue p50: median {pe.median(pairs[ph]['p50_us']):.3f}")
    checks = report["checks"] + report.get("twisted_checks", [])
    judged = [c for c in checks if c["ok"] is not None]
    good = sum(bool(c["ok"]) for c in judged)
    lines += ["", f"functional checks: {good} of {len(judged)} as expected"
                  f"{'' if good == len(judged) else ' (NO: not as expected)'}"]
    for c in checks:
        mark = {True: "ok ", False: "NO ", None: " - "}[c["ok"]]
        detail = c["detail"] if len(c["detail"]) <= 110 else c["detail"][:107] + "..."
        lines.append(f"[{mark}] {c['name']}" + (f"\n        {detail}" if detail else ""))
    return "\n".join(lines)


# -- driver -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = pe.parser(HERE, DESCRIPTION, 7, "both variants")
    pe.add_tail_options(p)
    p.add_argument("--check", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--reply-user-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--reply-mandatory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    pe.check_options(p, args)
    return args


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv``; a child mode (--server, --check) or the whole benchmark."""
    args = parse_args(argv)
    if args.server:
        task.react(lambda reactor: server(reactor, args.url, args.prefetch, args.reply_user_id,
                                          args.reply_mandatory))
        return
    if args.check:
        print(json.dumps(run_checks(args.check)), flush=True)
        return
    if args.prefetch is None:
        args.prefetch = amqp._default_prefetch()
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()
                                       if k not in ("server", "check", "url", "reply_user_id", "reply_mandatory")},
                              "loadavg_start": list(os.getloadavg())}

    def checks(url: str) -> None:
        report["checks"], log = checks_in_child(url)
        print(log, end="", file=sys.stderr, flush=True)

    pe.run_on_private_broker("drt", report, lambda reactor, url, broker_pid: run(reactor, url, args, broker_pid,
                                                                                 report), before=checks)
    report["medians"] = pe.medians(report["runs"])
    report["paired_ratios"] = paired(report["runs"])
    pe.finish(report, args.json, format_summary(report))


if __name__ == "__main__":
    main()
