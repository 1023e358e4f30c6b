"""Where a sequential RPC's time goes, hop by hop: socket timestamps in the client and the server.

``bench/amqp.py --hops`` installs :func:`install` in its own process (the client) and, through the
``ION_BENCH_HOPS`` environment variable, in each server child. Every read and write of a Twisted TCP
connection is then recorded with its CLOCK_MONOTONIC time (the same clock in every process of the
machine) and the process's CPU time, and the reactor's wake-up for each ready socket too. A server
writes what it recorded to ``<ION_BENCH_HOPS>/<pid>.json`` when it exits. :func:`split` matches the
events of one sequential phase into calls:

* ``broker_in``: the client's write of a request to the server's read of it (the kernel, the broker,
  the server's wake-up);
* ``server``: the server's read of the request to its write of the reply (all its work per call);
* ``broker_out``: that write to the client's read of the reply;
* ``client``: that read to the client's write of the next request (all its work per call);
* ``server_cpu`` / ``client_cpu``: the CPU each process spent in its span above, its write's ``send`` included;
* ``server_wake``: the server's reactor wake-up for the socket to its read of the data.

Figures are medians over the calls, in microseconds. Only for the bench: the recording costs
a few microseconds per event, the same in every row.
"""

from __future__ import annotations

import atexit
import bisect
import json
import os
import statistics
import time
from typing import Any

#: ``(kind, monotonic ns, process CPU ns)``: kind ``r`` (data read), ``w`` (data written), ``e``
#: (the reactor woke up for a socket).
Event = tuple[str, int, int]

events: list[Event] = []
_installed = False


def install(dump_dir: str | None = None) -> None:
    """Record this process's TCP reads and writes (and reactor wake-ups) in :data:`events`; with
    ``dump_dir``, write them to ``<dump_dir>/<pid>.json`` at exit."""
    global _installed
    if _installed:
        return
    _installed = True
    from twisted.internet import epollreactor, tcp

    mono, cpu, record = time.monotonic_ns, time.process_time_ns, events.append
    write_some, data_received = tcp.Connection.writeSomeData, tcp.Connection._dataReceived
    ready = epollreactor.EPollReactor._doReadOrWrite

    def writeSomeData(self: Any, data: Any) -> Any:
        t = mono()
        written = write_some(self, data)
        record(("w", t, cpu()))
        return written

    def _dataReceived(self: Any, data: bytes) -> Any:
        record(("r", mono(), cpu()))
        return data_received(self, data)

    def _doReadOrWrite(self: Any, selectable: Any, fd: int, event: int) -> Any:
        record(("e", mono(), 0))
        return ready(self, selectable, fd, event)

    tcp.Connection.writeSomeData = writeSomeData  # type: ignore[method-assign]
    tcp.Connection._dataReceived = _dataReceived  # type: ignore[method-assign]
    epollreactor.EPollReactor._doReadOrWrite = _doReadOrWrite  # type: ignore[method-assign]
    if dump_dir:
        def dump() -> None:
            with open(os.path.join(dump_dir, f"{os.getpid()}.json"), "w") as f:
                json.dump(events, f)

        atexit.register(dump)


def install_from_env() -> None:
    """:func:`install` if ``ION_BENCH_HOPS`` names a folder (a server child of ``bench/amqp.py --hops``)."""
    folder = os.environ.get("ION_BENCH_HOPS")
    if folder:
        install(folder)


def load(dump_dir: str, pid: int) -> list[Event]:
    """What the server ``pid`` recorded (empty if it wrote nothing)."""
    try:
        with open(os.path.join(dump_dir, f"{pid}.json")) as f:
            return [tuple(e) for e in json.load(f)]  # type: ignore[misc]
    except (OSError, ValueError):
        return []


def split(client: list[Event], server: list[Event], start: int, end: int) -> dict[str, float] | None:
    """The median hops (µs) of the sequential calls made between ``start`` and ``end`` (monotonic ns):
    see the module notes. None if no call could be matched."""
    client = [e for e in client if start <= e[1] <= end]
    server = [e for e in server if start <= e[1] <= end]
    c_writes = [e for e in client if e[0] == "w"]
    c_reads = [e for e in client if e[0] == "r"]
    cw_t, cr_t = [e[1] for e in c_writes], [e[1] for e in c_reads]
    wakes = [e[1] for e in server if e[0] == "e"]
    s = [e for e in server if e[0] != "e"]
    rows: list[tuple[float, ...]] = []
    for a, b, c in zip(s, s[1:], s[2:], strict=False):  # (each event with the two after it)
        # A request read, its reply written, and the next request read a round trip later.
        if not (a[0] == "r" and b[0] == "w" and c[0] == "r" and c[1] - b[1] > 100_000):
            continue
        i = bisect.bisect_left(cw_t, a[1]) - 1
        j = bisect.bisect_right(cr_t, b[1])
        if i < 0 or j >= len(c_reads):
            continue
        k = bisect.bisect_right(cw_t, cr_t[j])
        if k >= len(c_writes):
            continue
        sent, got, next_sent = c_writes[i], c_reads[j], c_writes[k]
        if next_sent[1] - sent[1] > 20_000_000:  # not one call (a pause of the run): skipped
            continue
        w = bisect.bisect_right(wakes, a[1]) - 1
        rows.append((a[1] - sent[1], b[1] - a[1], got[1] - b[1], next_sent[1] - got[1], next_sent[1] - sent[1],
                     b[2] - a[2], next_sent[2] - got[2], a[1] - wakes[w] if w >= 0 else float("nan")))
    if not rows:
        return None
    names = ("broker_in", "server", "broker_out", "client", "total", "server_cpu", "client_cpu", "server_wake")
    out = {name: statistics.median(r[n] for r in rows) / 1000 for n, name in enumerate(names)}
    out["calls"] = float(len(rows))
    return out
