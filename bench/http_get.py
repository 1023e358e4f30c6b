"""What an HTTP GET of a small file costs, layer by layer: the floor's client, Twisted's, ioncore's.

#17 §5 asks ion-deploy of many small files from HTTP to come within 1.2x of a
floor that fetches them with ``http.client`` in a thread pool. ion-deploy's HTTP
requests go through Twisted's HTTP client on the reactor thread (a persistent
``HTTPConnectionPool``, with cookies, redirects and gzip on top). This benchmark
measures, on one folder of ``--files`` files of 4 KB served on loopback by the
test HTTP server (``python -m ion.testing.servers http``), each client in a
process of its own:

* **http.client** -- the floor's client: ``--jobs`` threads, a keep-alive
  connection each, every file's body read into memory;
* **twisted Agent** -- Twisted's ``Agent`` on a persistent pool of ``--jobs``
  connections, ``--jobs`` requests in flight, ``readBody``: what any
  Twisted-based client pays at the least;
* **ion repository** -- ioncore's ``HTTPRepository``: the folder listed
  (``list_version``), each file downloaded to disk (``download``: the request
  slots, retries and timeouts, the body streamed to a file in a pool thread,
  size and sha256 checked), ``--jobs`` at once; no cache, no placement;
* **ion-deploy** -- the whole command (``unpack: false``, a fresh cache): what
  ``bench/deploy.py``'s small HTTP folder row measures.

For each: the process's wall time, its start-up (imports, up to the first
request), and the CPU microseconds per file of its requests (process CPU, every
thread, from the first request to the last). Rounds are interleaved
(``--repeat``, default 5) and the table gives medians. It is a benchmark, not a
test: it asserts only that every file came back whole.

Run it from the repository root::

    python bench/http_get.py                 # 2,000 files, 8 in flight, 5 rounds
    python bench/http_get.py --files 500 --repeat 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deploy import HTTP_FLOOR_CLIENT  # noqa: E402 - bench/deploy.py's floor client (bench/ is sys.path[0])

from ion.testing.servers import free_port  # noqa: E402

FILE_BYTES = 4096
SUBFOLDERS = 20

# Each client: argv[1] a JSON spec {"url", "paths", "jobs", "size", "dest"}; prints
# {"start_s": to the first request, "get_s": first request to last body, "cpu_s": the same span, all threads}.
PRELUDE = r"""
import json, resource, sys, time
T0 = time.perf_counter()
spec = json.load(open(sys.argv[1]))
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def report(t1, c1, n):
    print(json.dumps({"start_s": t1 - T0, "get_s": time.perf_counter() - t1, "cpu_s": cpu() - c1, "n": n}))
"""

HTTP_CLIENT = PRELUDE + HTTP_FLOOR_CLIENT + r"""
from concurrent.futures import ThreadPoolExecutor
def get(path):
    data = request(path)
    assert len(data) == spec["size"], (path, len(data))
    return len(data)
with ThreadPoolExecutor(spec["jobs"]) as pool:
    t1, c1 = time.perf_counter(), cpu()
    n = len(list(pool.map(get, spec["paths"])))
    report(t1, c1, n)
"""

TWISTED_AGENT = PRELUDE + r"""
from twisted.internet import defer, task
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from urllib.parse import urlsplit
async def main(reactor):
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = spec["jobs"]
    agent = Agent(reactor, pool=pool)
    base = spec["url"].split("/", 3)[:3]
    todo = list(reversed(spec["paths"]))
    async def worker():
        while todo:
            path = todo.pop()
            r = await agent.request(b"GET", ("/".join(base) + path).encode("ascii"))
            body = await readBody(r)
            assert r.code == 200 and len(body) == spec["size"], (path, r.code, len(body))
    t1, c1 = time.perf_counter(), cpu()
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(spec["jobs"])])
    report(t1, c1, len(spec["paths"]))
    await pool.closeCachedConnections()
task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""

ION_REPOSITORY = PRELUDE + r"""
import os
from twisted.internet import defer, task
from ion.core.threads import BlockingPool
from ion.services.fetch.repository import FetchConfig, repository_for
async def main(reactor):
    pool = BlockingPool(reactor, maxthreads=spec["jobs"])
    repo = repository_for(spec["url"], pool, reactor, FetchConfig(max_connections=spec["jobs"]))
    t1, c1 = time.perf_counter(), cpu()
    files = await repo.list_version("linux", "smallfolder", "1.0", describe=False)
    todo = list(reversed(files))
    async def worker():
        while todo:
            remote = todo.pop()
            got = await repo.download(remote, os.path.join(spec["dest"], remote.path))
            assert got.size == spec["size"], (remote.path, got.size)
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(spec["jobs"])])
    report(t1, c1, len(files))
    await repo.close()
    await pool.stop()
task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""

CLIENTS = {"http.client": HTTP_CLIENT, "twisted Agent": TWISTED_AGENT, "ion repository": ION_REPOSITORY}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_client(name: str, spec_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """One client's run in its own process: its report, its wall time and its CPU."""
    c0, t0 = _children_cpu(), time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CLIENTS[name], str(spec_path)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed ({p.returncode}): {p.stderr[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return {**out, "wall": wall, "cpu": cpu}


def run_ion_deploy(url: str, dest: Path, env: dict[str, str]) -> dict[str, Any]:
    """ion-deploy of the folder, whole: wall and CPU of the process."""
    deployment = dest / "deploy.json"
    deployment.write_text(json.dumps([{"url": url, "items": [{
        "name": "smallfolder", "version": "1.0", "platform": "linux", "unpack": False,
        "destination": str(dest / "dest")}]}]))
    c0, t0 = _children_cpu(), time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ion.services.deploy.cli", str(deployment),
                        "--cache-dir", str(dest / "cache"), "--jobs", str(json.loads(env["BENCH_JOBS"])), "--json"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if p.returncode != 0:
        raise RuntimeError(f"ion-deploy failed ({p.returncode}): {p.stderr[-2000:]} {p.stdout[-2000:]}")
    return {"wall": wall, "cpu": cpu}


def make_tree(www: Path, files: int) -> list[str]:
    """The folder ``linux/smallfolder/1.0/`` of ``files`` files under ``www/repo``; their URL paths."""
    paths = []
    for i in range(files):
        rel = f"linux/smallfolder/1.0/d{i % SUBFOLDERS:02d}/f{i:05d}.bin"
        target = www / "repo" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(os.urandom(FILE_BYTES))
        paths.append(f"/repo/{rel}")
    return paths


def wait_for_port(port: int, server: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the HTTP repository server did not start") from None
            time.sleep(0.05)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/http_get.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--files", type=int, default=2000, help="files of 4 KB in the folder (default 2000)")
    p.add_argument("--jobs", type=int, default=8, help="requests in flight, connections (default 8)")
    p.add_argument("--repeat", type=int, default=5, help="interleaved rounds, medians (default 5)")
    p.add_argument("--skip-deploy", action="store_true", help="no ion-deploy row")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON after the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ion-http-get-"))
    pycache = tmp / "pycache"
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(pycache), "BENCH_JOBS": str(args.jobs)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # start-up as a user's installed copy has it (bytecode cached)
    port = free_port()
    url = f"http://127.0.0.1:{port}/repo"
    paths = make_tree(tmp / "www", args.files)
    server = subprocess.Popen([sys.executable, "-m", "ion.testing.servers", "http", str(tmp / "www"), str(port)],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in [*CLIENTS, "ion-deploy"]}
    try:
        wait_for_port(port, server)
        names = list(CLIENTS) + ([] if args.skip_deploy else ["ion-deploy"])
        for round_ in range(args.repeat + 1):  # round 0 warms the bytecode cache and the page cache
            for name in names:
                run = tmp / f"run-{round_}-{name.replace(' ', '-')}"
                run.mkdir()
                spec = run / "spec.json"
                spec.write_text(json.dumps({"url": url, "paths": paths, "jobs": args.jobs, "size": FILE_BYTES,
                                             "dest": str(run / "dest")}))
                os.sync()
                if name == "ion-deploy":
                    r = run_ion_deploy(url, run, env)
                else:
                    r = run_client(name, spec, env)
                    if r["n"] != args.files:
                        raise RuntimeError(f"{name}: {r['n']} files, expected {args.files}")
                if round_:
                    rows[name].append(r)
                # (The runs' files are removed at the end, not here: on ext4 the inodes a removal frees
                # slow down the file creations of the next ~30 s, whichever client came next.)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    base = median([r["get_s"] for r in rows["http.client"]])
    print(f"# {args.files} files of {FILE_BYTES} bytes in one folder, {args.jobs} in flight, HTTP on loopback; "
          f"medians of {args.repeat} interleaved rounds")
    header = (f"{'client':<16} {'process wall s':>14} {'start-up s':>10} {'requests s':>10} {'files/s':>9} "
              f"{'CPU us/file':>11} {'requests vs http.client':>24}")
    print(header)
    print("-" * len(header))
    for name, runs in rows.items():
        if not runs:
            continue
        wall = median([r["wall"] for r in runs])
        if name == "ion-deploy":
            print(f"{name:<16} {wall:>14.2f} {'-':>10} {'-':>10} {args.files / wall:>9,.0f} "
                  f"{median([r['cpu'] for r in runs]) / args.files * 1e6:>11.0f} {'(whole process)':>24}")
            continue
        get_s = median([r["get_s"] for r in runs])
        print(f"{name:<16} {wall:>14.2f} {median([r['start_s'] for r in runs]):>10.3f} {get_s:>10.3f} "
              f"{args.files / get_s:>9,.0f} {median([r['cpu_s'] for r in runs]) / args.files * 1e6:>11.0f} "
              f"{get_s / base:>23.2f}x")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
