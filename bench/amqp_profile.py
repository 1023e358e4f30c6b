"""Where a call's CPU goes on RabbitMQ: cProfile in the client container and in the server.

Starts the hello service in a ``twistd --profile ... cc res/apps/hello.app`` child (cProfile over
its whole run, saved when it stops) and a client container in this process, makes ``--calls``
calls with ``--window`` in flight under cProfile (after 500 unprofiled ones), stops the server and
prints the ``--top`` entries of both profiles by own time, with the Python function calls per call.
cProfile slows Python code about threefold: read the shares and the call counts, not the times.

Run it from the repository root::

    python bench/amqp_profile.py                    # a private RabbitMQ (~10 s to start)
    python bench/amqp_profile.py --url amqp://guest:guest@127.0.0.1:5672/ --calls 20000 --top 30
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = "import sys\nfrom twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
SYSNAME = "profile"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/amqp_profile.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="use this broker instead of starting a private RabbitMQ")
    p.add_argument("--calls", type=int, default=20000, help="profiled calls (default 20000)")
    p.add_argument("--window", type=int, default=100, help="calls kept in flight (default 100)")
    p.add_argument("--top", type=int, default=25, help="entries printed per process (default 25)")
    return p.parse_args(argv)


def profile(url: str, calls: int, window: int, folder: str) -> float:
    """Run the calls; returns the client's wall seconds. The profiles land in ``folder``."""
    from twisted.internet import defer, reactor

    server_prof = os.path.join(folder, "server.prof")
    server = subprocess.Popen(
        [sys.executable, "-c", TWISTD, "-n", "--pidfile=", f"--profile={server_prof}", "--profiler=cprofile",
         "--savestats", "cc", "--no-shell", "--broker", url, "-s", SYSNAME, "res/apps/hello.app"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert server.stdout is not None
    for line in server.stdout:
        if b" ready: system " in line:
            break
    else:
        raise SystemExit("the hello server did not start")
    os.set_blocking(server.stdout.fileno(), False)
    prof = cProfile.Profile()
    result: dict[str, Any] = {}

    @defer.inlineCallbacks
    def run() -> Any:
        from ion.core.container import Container
        from ion.core.process import Process
        from ion.testing import test_config

        container = Container(config=test_config({}), broker_url=url, sysname=SYSNAME, reactor=reactor)
        try:
            yield container.start()
            pid = yield container.spawn(Process, name="profile-client")
            rpc_send = container.proc_manager.get(pid).rpc_send
            for _ in range(500):
                yield rpc_send("hello", "hello", "bench")
            done: defer.Deferred[None] = defer.Deferred()
            counts = {"sent": 0, "answered": 0}

            def send(_: Any = None) -> None:
                if counts["sent"] < calls:
                    counts["sent"] += 1
                    rpc_send("hello", "hello", "bench").addCallback(answered)

            def answered(_: Any) -> None:
                counts["answered"] += 1
                if counts["answered"] == calls:
                    done.callback(None)
                else:
                    send()

            started = time.perf_counter()
            prof.enable()
            for _ in range(min(window, calls)):
                send()
            yield done
            prof.disable()
            result["wall"] = time.perf_counter() - started
        finally:
            yield container.terminate()
            server.send_signal(signal.SIGINT)
            reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    server.wait(60)
    prof.dump_stats(os.path.join(folder, "client.prof"))
    return float(result.get("wall", float("nan")))


def main(argv: list[str] | None = None) -> None:
    from amqp import broker_url  # (bench/amqp.py: this script's folder is on sys.path)

    args = parse_args(argv)
    with broker_url(args.url, "ion-profile") as url, \
            tempfile.TemporaryDirectory(prefix="ion-amqp-profile-") as folder:
        wall = profile(url, args.calls, args.window, folder)
        print(f"{args.calls} calls, {args.window} in flight, {wall:.2f} s under cProfile")
        for side in ("client", "server"):
            stats = pstats.Stats(os.path.join(folder, f"{side}.prof"))
            calls = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
            print(f"\n== {side}: {calls / args.calls:.0f} Python function calls per call")
            stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
