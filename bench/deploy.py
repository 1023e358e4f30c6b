"""Deployer benchmark: ``ion-deploy`` against one moto S3 server on loopback.

Measures, in one run, and prints side by side (issue 5, "Speed and memory"):

* **cold** -- ``--deps`` (20) dependencies of ``--size-mb`` (20) MB tgz each
  (random, incompressible content, in 1 MB files), deployed into empty
  folders with an empty cache:

  - ``ion-deploy`` as a subprocess
    (``python -m ion.services.deploy.cli DEPLOY.json --cache-dir C --jobs 8 --json``);
  - the **floor**: a plain script (subprocess too) doing the same with boto3
    ``download_file`` and ``tarfile`` extraction (``filter='data'``) in a
    ``ThreadPoolExecutor(jobs)``, no cache; run twice, with one GET per object
    and with boto3's default ranged GETs, and the faster counts;
  - **Umpire** 0.6.5 (``MaestroOps`` 0.8.8) from a venv of its own
    (``--umpire-venv``, made on first use with ``python -m venv`` and pip),
    cache in ``UMPIRE_ROOT_DIR``. ``n/a`` with the reason when it cannot run.

  Target: ion-deploy <= 1.15x the floor.
* **warm** -- ``--warm-deps`` (200) small linked dependencies, deployed once
  (not timed), then again (all cached and placed): whole ``ion-deploy``
  process wall time, median of ``--repeat`` runs (target <= 0.6 s), and
  Umpire on the same file (target: ion >= 3x faster).
* **tc1** -- Umpire's tc1 layout: one ``--size-mb`` tgz linked into two
  folders and copied into a third, vs the same dependency deployed once
  (both cold). Target: no extra time (<= 1.15x the single deployment; the
  copy of the content into the third folder is real work).
* **big** -- one ``--big-mb`` (1024) MB file with ``unpack: false``:
  ion-deploy's throughput (size / (process wall - wall of the same process
  fetching a 1 KB file), i.e. net of start-up) vs boto3's ``download_file``
  alone (one GET, timed around the call; target >= 0.8x; boto3's default
  ranged GETs are pathologically slow on moto, ``--boto3-multipart`` adds
  them as a note), and the ion-deploy
  process's peak RSS growth over that 1 KB run (``VmHWM`` of
  ``/proc/<pid>/status``, polled every 5 ms while it runs; target <= 64 MB).
* **small** (#17 §5) -- many small files, cold, from S3 (the moto server)
  and from HTTP (``python -m ion.testing.servers http``, twisted.web autoindex
  pages, a subprocess too), ``unpack: false``: ``--small-files`` (2000)
  items of one 4 KB file each, and one item whose version folder holds that
  many 4 KB files (in 20 sub-folders). Whole ``ion-deploy --jobs N``
  process vs a **floor** script (subprocess) doing the same listings and
  GETs in a ``ThreadPoolExecutor(jobs)``: boto3 (one client,
  ``max_pool_connections=jobs``, ``list_objects_v2`` + ``get_object``) for
  S3, ``http.client`` keep-alive connections (one per thread; the index
  page's links followed) for HTTP. Target: <= 1.2x the floor, each.
  Beside it, in the notes, a **durable floor**: the same script taking each
  item through the file steps of ion's cache and placement with plain ``os``
  calls (lock file, staging folder, sha256, rename into the entry, ``.entry``,
  three fsyncs, the record and the links at the destination; see
  ``SMALL_FLOOR_SCRIPT``): the least any cache with those guarantees does.
  ``--only small`` runs just these rows.
* **rpc** -- the cold deployment in this process: the in-process path of
  ``ion-deploy`` (``cli._run_local``: Cache, Fetcher, Deployer on the reactor)
  vs a Container on the embedded broker running ``deploy.app`` and a
  ``DeployClient.deploy`` of the same file (target: <= 10 % more).

Each cold measurement gets a fresh cache and fresh destinations. The moto
server runs as a subprocess (``MotoServer(subprocess_mode=True)``) so it
does not share a GIL with anything measured. Everything lives under a temp
folder removed at the end (``--keep-tmp`` to keep it). Times come from
:func:`time.perf_counter`. Exit 0 whatever the figures unless ``--strict``.

Run it from the repository root::

    python bench/deploy.py                              # full size (~2.5 min, ~3 GB of temp files)
    python bench/deploy.py --deps 4 --size-mb 5 --warm-deps 50 --big-mb 128 --skip-umpire
    python bench/deploy.py --help
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from ion.testing.servers import MotoServer, free_port  # noqa: E402

__all__ = ["main", "parse_args"]

COLD_RATIO_TARGET = 1.15
WARM_TARGET_S = 0.6
WARM_UMPIRE_FACTOR = 3.0
TC1_RATIO_TARGET = 1.15
BIG_RATIO_TARGET = 0.8
BIG_RSS_TARGET_MB = 64.0
SMALL_RATIO_TARGET = 1.2
SMALL_FILE_BYTES = 4096
SMALL_FOLDERS = 20
RPC_OVERHEAD_TARGET = 0.10

#: The measures, in the order they run (``--only`` picks some).
MEASURES = ("cold", "warm", "tc1", "big", "small", "rpc")
UMPIRE_PACKAGES = ("umpire==0.6.5", "MaestroOps==0.8.8")
MB = 1 << 20

# The floor: boto3 download_file + tarfile extraction, ThreadPoolExecutor(jobs). Also used (no unpack)
# for "boto3 download_file alone". Prints {"download_s": seconds spent in download_file calls (wall of
# the whole batch), "total_s": ...} on stdout.
FLOOR_SCRIPT = r"""
import json, os, sys, tarfile, time
from concurrent.futures import ThreadPoolExecutor
t0 = time.perf_counter()
import boto3
spec = json.load(open(sys.argv[1]))
from boto3.s3.transfer import TransferConfig
client = boto3.session.Session().client("s3")
# "single": one GET per object (download_file with the multipart threshold above every size);
# "default": boto3's defaults (ranged GETs of 8 MB, 10 threads per file).
config = TransferConfig(multipart_threshold=1 << 62) if spec["mode"] == "single" else TransferConfig()
def one(task):
    os.makedirs(os.path.dirname(task["tmp"]), exist_ok=True)
    client.download_file(task["bucket"], task["key"], task["tmp"], Config=config)
    if spec["unpack"]:
        os.makedirs(task["dest"], exist_ok=True)
        with tarfile.open(task["tmp"]) as tar:
            tar.extractall(task["dest"], filter="data")
        os.remove(task["tmp"])
t1 = time.perf_counter()
with ThreadPoolExecutor(spec["jobs"]) as pool:
    list(pool.map(one, spec["tasks"]))
t2 = time.perf_counter()
print(json.dumps({"download_s": t2 - t1, "total_s": t2 - t0}))
"""


# The floors' HTTP client, a child script's part: ``request(path)``, the body of a 200 from
# ``spec["url"]``'s server, on one keep-alive ``http.client`` connection per thread. (bench/http_get.py
# measures this very client beside Twisted's and ioncore's.)
HTTP_FLOOR_CLIENT = r"""
import http.client, threading
from urllib.parse import urlsplit
base = urlsplit(spec["url"])
local = threading.local()
def request(path):
    conn = getattr(local, "conn", None)
    if conn is None:
        conn = local.conn = http.client.HTTPConnection(base.hostname, base.port)
    conn.request("GET", path)
    r = conn.getresponse()
    data = r.read()
    assert r.status == 200, (path, r.status)
    return data
"""

# The small-files floors: the same listings and GETs as ion-deploy, in a ThreadPoolExecutor(jobs), the
# files written under each item's destination. S3: boto3, one client with a pool of jobs connections;
# HTTP: http.client, one keep-alive connection per thread. Prints {"total_s": ...}.
# With "cache" in the spec (the *durable* floor), each item goes through the file steps of ion's cache and
# placement instead, with plain os calls: a lock file, a staging folder, the files written there and
# hashed (sha256), the folder renamed into its entry, a `.entry` written by temporary file and rename, three
# fsyncs (the entry's parent folder, `.entry`, the entry folder: what a publish fsyncs; file contents
# are not, as ion's default), the lock removed; then at the destination a records folder, a record
# written by temporary file and rename, and a symlink per top-level name switched in by rename. No
# checks, no reads back, no Python layer of ion's: what any cache with those guarantees must do.
SMALL_FLOOR_SCRIPT = r"""
import hashlib, json, os, re, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote, urljoin, urlsplit
t0 = time.perf_counter()
spec = json.load(open(sys.argv[1]))
jobs = spec["jobs"]
""" + HTTP_FLOOR_CLIENT + r"""
if spec["kind"] == "s3":
    import boto3
    from botocore.config import Config
    client = boto3.session.Session().client("s3", config=Config(max_pool_connections=jobs))
    def listing(prefix):
        keys, token = [], None
        while True:
            kw = {"Bucket": spec["bucket"], "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            page = client.list_objects_v2(**kw)
            keys += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return [(k, prefix + k) for k in keys]
            token = page["NextContinuationToken"]
    def get(source, dest):
        data = client.get_object(Bucket=spec["bucket"], Key=source)["Body"].read()
        with open(dest, "wb") as f:
            f.write(data)
        return data
else:
    def listing(prefix, rel=""):
        folder = base.path.rstrip("/") + "/" + prefix + rel
        files = []
        for href in re.findall(r'href="([^"?#]+)"', request(folder).decode()):
            path = urlsplit(urljoin(folder, href)).path
            if not path.startswith(folder) or len(path) <= len(folder):
                continue
            name = unquote(path[len(folder):])
            if name.endswith("/"):
                files += listing(prefix, rel + name)
            elif "/" not in name:
                files.append((rel + name, path))
        return files
    def get(source, dest):
        data = request(source)
        with open(dest, "wb") as f:
            f.write(data)
        return data
cache = spec.get("cache")
def fetch_to(rel, source, root):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = get(source, path)
    return rel, len(data), hashlib.sha256(data).hexdigest()
def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
def durable(prefix, dest, fetch_all):
    parent = os.path.join(cache, prefix.strip("/").replace("/", "_"))
    os.makedirs(parent, exist_ok=True)
    lock = os.path.join(parent, "1.0.lock")
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"holder %d %.3f" % (os.getpid(), time.time()))
    os.close(fd)
    staging = os.path.join(cache, ".staging", os.urandom(8).hex())
    os.mkdir(staging)
    files = fetch_all(staging)
    entry = os.path.join(parent, "1.0")
    os.rename(staging, entry)
    fsync_dir(parent)
    with open(os.path.join(entry, ".entry.tmp"), "w") as f:
        f.write("\n".join(f"[file {rel}]\nsize = {size}\nsha256 = {digest}\n" for rel, size, digest in files))
        f.flush()
        os.fsync(f.fileno())
    os.rename(os.path.join(entry, ".entry.tmp"), os.path.join(entry, ".entry"))
    fsync_dir(entry)
    os.unlink(lock)
    records = os.path.join(dest, ".ion-deploy")
    os.makedirs(records)
    names = sorted({rel.split("/")[0] for rel, _, _ in files})
    with open(os.path.join(records, ".record.tmp"), "w") as f:
        f.write(json.dumps({"entry": entry, "names": names, "version": "1.0"}))
    os.rename(os.path.join(records, ".record.tmp"), os.path.join(records, "linux.record.json"))
    for name in names:
        os.symlink(os.path.join(entry, name), os.path.join(dest, f".{name}.new"))
        os.rename(os.path.join(dest, f".{name}.new"), os.path.join(dest, name))
def one(task):
    prefix, dest = task
    if cache:
        return durable(prefix, dest, lambda root: [fetch_to(rel, source, root) for rel, source in listing(prefix)])
    for rel, source in listing(prefix):
        fetch_to(rel, source, dest)
def folder(prefix, dest, pool):
    files = listing(prefix)
    if cache:
        durable(prefix, dest, lambda root: list(pool.map(lambda f: fetch_to(*f, root), files)))
    else:
        list(pool.map(lambda f: fetch_to(*f, dest), files))
    return len(files)
if cache:
    os.makedirs(os.path.join(cache, ".staging"))
with ThreadPoolExecutor(jobs) as pool:
    if spec["folder"]:
        n = folder(*spec["tasks"][0], pool)
    else:
        list(pool.map(one, spec["tasks"]))
        n = len(spec["tasks"])
print(json.dumps({"total_s": time.perf_counter() - t0, "n": n}))
"""


# -- helpers ----------------------------------------------------------------------------------------------
def run_child(cmd: list[str], env: dict[str, str], cwd: Path | None = None,
              timeout: float = 3600) -> dict[str, Any]:
    """Run ``cmd``; wall time, exit code, stdout/stderr and the child's own peak RSS (``os.wait4``).

    The page cache's dirty data is written out first (not timed): every run starts with
    the disk idle, not flushing the gigabytes the previous runs wrote.
    """
    os.sync()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        hwm_kb = 0
        status_file = f"/proc/{proc.pid}/status"
        while True:
            try:
                # VmHWM: the peak RSS of the process's own memory (ru_maxrss is not: on Linux it
                # starts from the parent's peak, which exec() carries over).
                with open(status_file) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            hwm_kb = max(hwm_kb, int(line.split()[1]))
                            break
            except (OSError, ValueError):
                pass
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"wall": wall, "rc": proc.returncode, "out": out.read().decode("utf-8", "replace"),
                "err": err.read().decode("utf-8", "replace"), "maxrss_mb": hwm_kb / 1024.0,
                "cpu": usage.ru_utime + usage.ru_stime}


def child_env(moto: MotoServer, pycache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for k, v in moto.env().items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    # Bytecode cached as in an installed package (without touching the repository's folders).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def make_tgz(name: str, size: int, seed: int) -> bytes:
    """A tgz of ``name/`` holding ``size`` bytes of random data in files of up to 1 MB, plus two small ones."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w") as tar:
        def add(rel: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(f"{name}/{rel}")
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))

        add("README", f"{name} {seed}\n".encode())
        add("bin/tool", b"#!/bin/sh\necho tool\n", 0o755)
        left, n = size, 0
        while left > 0:
            chunk = min(MB, left)
            add(f"data/part{n:04d}.bin", os.urandom(chunk))
            left -= chunk
            n += 1
    return buf.getvalue()


def deployment_file(path: Path, url: str, items: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps([{"url": url, "items": items}], indent=1))
    return path


def item(name: str, dest: Path, **extra: Any) -> dict[str, Any]:
    return {"name": name, "version": "1.0", "platform": "linux", "destination": str(dest), **extra}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, moto: MotoServer) -> None:
        self.args, self.tmp, self.moto = args, tmp, moto
        self.bucket = moto.new_bucket("ion-bench")
        self.url = f"s3://{self.bucket}/repo"
        self.client = moto.client()
        self.env = child_env(moto, tmp / "pycache")
        # Compile ion's modules once (as an installed package has them), before anything is timed.
        run_child([sys.executable, "-c", "import ion.services.deploy.cli, ion.services.deploy.core, "
                   "ion.services.fetch.core, ion.services.fetch.repository, ion.services.unpack.core, "
                   "ion.services.cache.core, ion.core.threads, ion.core.config"], self.env, cwd=ROOT)
        self.counter = 0
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.umpire: str | None = None
        self.umpire_reason = "skipped (--skip-umpire)"

    def fresh(self, what: str) -> Path:
        self.counter += 1
        path = self.tmp / "runs" / f"{self.counter:03d}-{what}"
        path.mkdir(parents=True)
        return path

    def key(self, name: str, filename: str) -> str:
        return f"repo/linux/{name}/1.0/{filename}"

    def put(self, name: str, filename: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(name, filename), Body=data)

    # -- the programs -----------------------------------------------------------------------------------
    def ion_deploy(self, deployment: Path, cache: Path) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "ion.services.deploy.cli", str(deployment), "--cache-dir", str(cache),
               "--jobs", str(self.args.jobs), "--json"]
        r = run_child(cmd, self.env, cwd=ROOT)
        if r["rc"] != 0:
            raise RuntimeError(f"ion-deploy failed ({r['rc']}): {r['err'][-2000:]} {r['out'][-2000:]}")
        result = json.loads(r["out"])
        r["states"] = sorted({i["state"] for i in result.get("items", [])})
        return r

    def floor(self, tasks: list[dict[str, Any]], unpack: bool, mode: str = "single") -> dict[str, Any]:
        spec = self.fresh("floor-spec") / "spec.json"
        spec.write_text(json.dumps({"jobs": self.args.jobs, "unpack": unpack, "tasks": tasks, "mode": mode}))
        r = run_child([sys.executable, "-c", FLOOR_SCRIPT, str(spec)], self.env, cwd=self.tmp)
        if r["rc"] != 0:
            raise RuntimeError(f"floor script failed: {r['err'][-2000:]}")
        r.update(json.loads(r["out"].strip().splitlines()[-1]))
        return r

    def run_umpire(self, deployment: Path, root: Path) -> dict[str, Any]:
        assert self.umpire is not None
        env = dict(self.env, UMPIRE_ROOT_DIR=str(root))
        env.pop("PYTHONPATH", None)
        r = run_child([self.umpire, str(deployment)], env, cwd=deployment.parent)
        if r["rc"] != 0:
            raise RuntimeError(f"umpire exited {r['rc']}: {(r['err'] or r['out'])[-800:]}")
        return r

    def setup_umpire(self) -> None:
        if self.args.skip_umpire:
            return
        venv = Path(self.args.umpire_venv)
        exe = venv / "bin" / "umpire"
        t0 = time.monotonic()
        try:
            if not exe.exists():
                print(f"# making {venv} with {' '.join(UMPIRE_PACKAGES)} (first use)", file=sys.stderr)
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True,
                               timeout=300)
                subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *UMPIRE_PACKAGES], check=True,
                               capture_output=True, timeout=600)
            if not exe.exists():
                raise RuntimeError(f"no {exe} after pip install")
        except (subprocess.SubprocessError, OSError, RuntimeError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            self.umpire_reason = f"could not install Umpire ({time.monotonic() - t0:.0f} s): {exc} " \
                                 f"{detail.decode(errors='replace')[-300:] if isinstance(detail, bytes) else ''}"
            return
        self.umpire = str(exe)
        self.umpire_reason = ""

    def umpire_try(self, what: str, fn: Any) -> Any:
        """Run an Umpire measurement; None (and the reason noted) if Umpire is missing or fails."""
        if self.umpire is None:
            return None
        try:
            return fn()
        except Exception as exc:  # Umpire's failures are data, not a reason to stop
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            self.notes.append(f"Umpire {what}: n/a ({reason[:300]})")
            return None

    def row(self, name: str, ion: str, ref: str, umpire: str, ratio: str, target: str, ok: bool | None) -> None:
        self.rows.append({"measure": name, "ion-deploy": ion, "floor/ref": ref, "umpire": umpire,
                          "ratio": ratio, "target": target,
                          "result": "-" if ok is None else ("PASS" if ok else "MISS")})

    def umpire_cell(self, seconds: float | None) -> str:
        if seconds is not None:
            return f"{seconds:.2f} s"
        return "n/a"

    # -- measurements -----------------------------------------------------------------------------------
    def cold(self) -> None:
        a = self.args
        names = [f"dep{n:02d}" for n in range(a.deps)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
            blobs = list(pool.map(lambda n: make_tgz(n[1], int(a.size_mb * MB), n[0]), enumerate(names)))
        for name, blob in zip(names, blobs, strict=True):
            self.put(name, f"{name}.tgz", blob)
        total = sum(len(b) for b in blobs)
        del blobs
        print(f"# cold: {a.deps} x {a.size_mb} MB tgz uploaded ({total / MB:.0f} MB, "
              f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr)

        floor_runs: dict[str, list[float]] = {"single": [], "default": []}
        ion_runs, ump_runs = [], []
        for _ in range(a.repeat_cold):
            for mode in ("single", "default"):
                run = self.fresh(f"cold-floor-{mode}")
                tasks = [{"bucket": self.bucket, "key": self.key(n, f"{n}.tgz"),
                          "tmp": str(run / "dl" / f"{n}.tgz"), "dest": str(run / "dest" / n)} for n in names]
                floor_runs[mode].append(self.floor(tasks, unpack=True, mode=mode)["wall"])
                shutil.rmtree(run)

            run = self.fresh("cold-ion")
            spec = deployment_file(run / "deploy.json", self.url, [item(n, run / "dest" / n) for n in names])
            r = self.ion_deploy(spec, run / "cache")
            assert r["states"] == ["downloaded"], r["states"]
            ion_runs.append(r["wall"])
            self.check_tree(run / "dest" / names[0] / names[0], a.size_mb)
            shutil.rmtree(run)

            def ump() -> float:
                run = self.fresh("cold-umpire")
                spec = deployment_file(run / "deploy.json", self.url, [item(n, run / "dest" / n) for n in names])
                return float(self.run_umpire(spec, run / "uroot")["wall"])

            u = self.umpire_try("cold", ump)
            if u is not None:
                ump_runs.append(u)
        single_s, default_s = median(floor_runs["single"]), median(floor_runs["default"])
        floor_s, ion_s = min(single_s, default_s), median(ion_runs)
        self.notes.append(f"cold floor: download_file one GET per object {single_s:.2f} s, with boto3's default "
                          f"ranged GETs (8 MB parts, 10 threads per file) {default_s:.2f} s; the floor is the faster")
        ump_s = median(ump_runs) if ump_runs else None
        self.cold_spec_names = names
        ratio = ion_s / floor_s
        self.row(f"cold {a.deps}x{a.size_mb:g}MB tgz, jobs {a.jobs}", f"{ion_s:.2f} s", f"{floor_s:.2f} s",
                 self.umpire_cell(ump_s) + (f" ({ump_s / floor_s:.2f}x)" if ump_s else ""),
                 f"{ratio:.2f}x floor", f"<= {COLD_RATIO_TARGET}x floor", ratio <= COLD_RATIO_TARGET)
        self.figures["cold"] = {"ion_s": ion_runs, "floor_s": floor_runs, "umpire_s": ump_runs}

    def check_tree(self, top: Path, size_mb: float) -> None:
        got = sum(f.stat().st_size for f in top.rglob("*.bin"))
        if got != int(size_mb * MB):
            raise RuntimeError(f"{top}: {got} bytes of data deployed, expected {int(size_mb * MB)}")

    def warm(self) -> None:
        a = self.args
        names = [f"small{n:03d}" for n in range(a.warm_deps)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda n: self.put(n, f"{n}.tgz", make_tgz(n, 4096, 0)), names))
        run = self.fresh("warm-ion")
        spec = deployment_file(run / "deploy.json", self.url, [item(n, run / "dest" / n) for n in names])
        first = self.ion_deploy(spec, run / "cache")
        runs = []
        for _ in range(a.repeat):
            r = self.ion_deploy(spec, run / "cache")
            assert r["states"] == ["cached"], r["states"]
            runs.append(r["wall"])
        ion_s = median(runs)

        def ump() -> list[float]:
            run = self.fresh("warm-umpire")
            spec = deployment_file(run / "deploy.json", self.url, [item(n, run / "dest" / n) for n in names])
            self.run_umpire(spec, run / "uroot")
            return [float(self.run_umpire(spec, run / "uroot")["wall"]) for _ in range(max(1, min(a.repeat, 3)))]

        u = self.umpire_try("warm", ump)
        ump_s = median(u) if u else None
        ok = ion_s <= WARM_TARGET_S and (ump_s is None or ump_s / ion_s >= WARM_UMPIRE_FACTOR)
        self.row(f"warm {a.warm_deps} linked, whole process", f"{ion_s:.3f} s", f"(cold {first['wall']:.2f} s)",
                 self.umpire_cell(ump_s), f"umpire/ion {ump_s / ion_s:.1f}x" if ump_s else "-",
                 f"<= {WARM_TARGET_S} s, >= {WARM_UMPIRE_FACTOR:g}x umpire", ok)
        self.figures["warm"] = {"ion_s": runs, "ion_first_s": first["wall"], "umpire_s": u or []}

    def tc1(self) -> None:
        a = self.args
        self.put("shared", "shared.tgz", make_tgz("shared", int(a.size_mb * MB), 99))
        once_runs, tc1_runs = [], []
        for _ in range(a.repeat_cold):
            run = self.fresh("tc1-once")
            spec = deployment_file(run / "deploy.json", self.url, [item("shared", run / "a")])
            once_runs.append(self.ion_deploy(spec, run / "cache")["wall"])
            run = self.fresh("tc1-three")
            spec = deployment_file(run / "deploy.json", self.url, [
                item("shared", run / "a"), item("shared", run / "b"), item("shared", run / "c", link=False)])
            tc1_runs.append(self.ion_deploy(spec, run / "cache")["wall"])
            self.check_tree(run / "c" / "shared", a.size_mb)
        once_s, tc1_s = median(once_runs), median(tc1_runs)

        def ump() -> tuple[float, float]:
            run = self.fresh("tc1-umpire-once")
            spec = deployment_file(run / "deploy.json", self.url, [item("shared", run / "a")])
            u_once = float(self.run_umpire(spec, run / "uroot")["wall"])
            run = self.fresh("tc1-umpire-three")
            spec = deployment_file(run / "deploy.json", self.url, [
                item("shared", run / "a"), item("shared", run / "b"), item("shared", run / "c", link=False)])
            return u_once, float(self.run_umpire(spec, run / "uroot")["wall"])

        u = self.umpire_try("tc1", ump)
        ratio = tc1_s / once_s
        self.row("tc1: 1 tgz x3 items (2 link, 1 copy)", f"{tc1_s:.2f} s", f"(once {once_s:.2f} s)",
                 f"{u[1]:.2f} s (once {u[0]:.2f} s)" if u else "n/a", f"{ratio:.2f}x once",
                 f"<= {TC1_RATIO_TARGET}x once", ratio <= TC1_RATIO_TARGET)
        self.figures["tc1"] = {"once_s": once_runs, "tc1_s": tc1_runs, "umpire": list(u) if u else None}

    def big(self) -> None:
        a = self.args
        size = int(a.big_mb * MB)
        src = self.tmp / "big.bin"
        with open(src, "wb") as f:
            left = size
            while left:
                n = min(8 * MB, left)
                f.write(os.urandom(n))
                left -= n
        self.client.upload_file(str(src), self.bucket, self.key("big", "big.bin"))
        src.unlink()
        self.put("tiny", "tiny.bin", os.urandom(1024))
        base_runs, ion_runs, ion_rss, base_rss, boto_runs = [], [], [], [], []
        for _ in range(a.repeat_cold):
            run = self.fresh("big-tiny")
            spec = deployment_file(run / "deploy.json", self.url, [item("tiny", run / "dest", unpack=False)])
            r = self.ion_deploy(spec, run / "cache")
            base_runs.append(r["wall"])
            base_rss.append(r["maxrss_mb"])
            run = self.fresh("big-ion")
            spec = deployment_file(run / "deploy.json", self.url, [item("big", run / "dest", unpack=False)])
            r = self.ion_deploy(spec, run / "cache")
            ion_runs.append(r["wall"])
            ion_rss.append(r["maxrss_mb"])
            if (run / "dest" / "big.bin").stat().st_size != size:
                raise RuntimeError("big.bin: wrong size deployed")
            shutil.rmtree(run)
            run = self.fresh("big-boto3")
            b = self.floor([{"bucket": self.bucket, "key": self.key("big", "big.bin"),
                             "tmp": str(run / "big.bin"), "dest": ""}], unpack=False)
            boto_runs.append(b["download_s"])
            shutil.rmtree(run)
        if a.boto3_multipart:
            run = self.fresh("big-boto3-default")
            b = self.floor([{"bucket": self.bucket, "key": self.key("big", "big.bin"),
                             "tmp": str(run / "big.bin"), "dest": ""}], unpack=False, mode="default")
            shutil.rmtree(run)
            self.notes.append(f"big: boto3 download_file with its default ranged GETs: {b['download_s']:.2f} s "
                              f"({a.big_mb / b['download_s']:.0f} MB/s)")
            self.figures["big_boto3_default_s"] = b["download_s"]
        base_s, ion_s, boto_s = median(base_runs), median(ion_runs), median(boto_runs)
        ion_net = ion_s - base_s
        boto_mbs = a.big_mb / boto_s
        if ion_net < 0.1:  # lost in the noise of two process start-ups: no figure
            self.row(f"big {a.big_mb:g} MB, unpack false: MB/s", "n/a (too small)", f"{boto_mbs:.0f} MB/s", "-",
                     "-", f">= {BIG_RATIO_TARGET}x boto3", None)
        else:
            ion_mbs = a.big_mb / ion_net
            ratio = ion_mbs / boto_mbs
            self.row(f"big {a.big_mb:g} MB, unpack false: MB/s", f"{ion_mbs:.0f} MB/s", f"{boto_mbs:.0f} MB/s",
                     "-", f"{ratio:.2f}x boto3", f">= {BIG_RATIO_TARGET}x boto3", ratio >= BIG_RATIO_TARGET)
        growth = max(ion_rss) - median(base_rss)
        self.row(f"big {a.big_mb:g} MB: peak RSS growth", f"{growth:.1f} MB",
                 f"(1 KB run {median(base_rss):.0f} MB)", "-", f"peak {max(ion_rss):.0f} MB",
                 f"<= {BIG_RSS_TARGET_MB:g} MB", growth <= BIG_RSS_TARGET_MB)
        self.notes.append(f"big: ion-deploy process {ion_s:.2f} s, the same process fetching 1 KB {base_s:.2f} s "
                          f"(subtracted: start-up, listing, publish); boto3 download_file call (one GET) "
                          f"{boto_s:.2f} s")
        self.figures["big"] = {"ion_s": ion_runs, "tiny_s": base_runs, "boto3_download_s": boto_runs,
                               "ion_maxrss_mb": ion_rss, "tiny_maxrss_mb": base_rss}

    def small(self) -> None:
        """Many small files, cold, from S3 and from HTTP: ``--small-files`` one-file items, and one
        version folder of that many files; ion-deploy vs the floor, interleaved, medians."""
        a = self.args
        n = a.small_files
        www = self.tmp / "www" / "repo"
        names = [f"sf{i:05d}" for i in range(n)]
        files: dict[str, bytes] = {f"linux/{name}/1.0/{name}.bin": os.urandom(SMALL_FILE_BYTES) for name in names}
        files.update({f"linux/smallfolder/1.0/d{i % SMALL_FOLDERS:02d}/f{i:05d}.bin": os.urandom(SMALL_FILE_BYTES)
                      for i in range(n)})
        t0 = time.perf_counter()
        for rel, data in files.items():
            (www / rel).parent.mkdir(parents=True, exist_ok=True)
            (www / rel).write_bytes(data)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kv: self.client.put_object(Bucket=self.bucket, Key=f"repo/{kv[0]}", Body=kv[1]),
                          files.items()))
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "ion.testing.servers", "http", str(www.parent), str(port)],
                                  env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done: list[Path] = []  # the runs' folders, removed at the end (see below)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("the HTTP repository server did not start") from None
                    time.sleep(0.05)
            print(f"# small: {len(files)} files of {SMALL_FILE_BYTES} bytes uploaded and served "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
            urls = {"s3": self.url, "http": f"http://127.0.0.1:{port}/repo"}
            shapes = {"items": names, "folder": ["smallfolder"]}
            runs: dict[str, dict[str, list[float]]] = {
                f"{k} {s}": {"ion": [], "floor": [], "durable": [], "ion_cpu": [], "floor_cpu": [],
                             "durable_cpu": []} for k in urls for s in shapes}
            for _ in range(a.repeat_cold):
                for kind, url in urls.items():
                    for shape, items in shapes.items():
                        key = f"{kind} {shape}"
                        for floor in ("floor", "durable"):
                            run = self.fresh(f"small-{kind}-{shape}-{floor}")
                            tasks = [[f"linux/{name}/1.0/", str(run / "dest" / name)] for name in items]
                            if kind == "s3":
                                tasks = [[f"repo/{prefix}", dest] for prefix, dest in tasks]
                            spec = run / "spec.json"
                            spec.write_text(json.dumps({
                                "kind": kind, "jobs": a.jobs, "bucket": self.bucket, "url": url,
                                "folder": shape == "folder", "tasks": tasks,
                                "cache": str(run / "cache") if floor == "durable" else None}))
                            r = run_child([sys.executable, "-c", SMALL_FLOOR_SCRIPT, str(spec)], self.env,
                                          cwd=self.tmp)
                            if r["rc"] != 0:
                                raise RuntimeError(f"small {floor} floor ({key}) failed: {r['err'][-2000:]}")
                            runs[key][floor].append(r["wall"])
                            runs[key][f"{floor}_cpu"].append(r["cpu"])
                            done.append(run)
                        run = self.fresh(f"small-{kind}-{shape}-ion")
                        deployment = deployment_file(run / "deploy.json", url, [
                            item(name, run / "dest" / name, unpack=False) for name in items])
                        r = self.ion_deploy(deployment, run / "cache")
                        assert r["states"] == ["downloaded"], r["states"]
                        runs[key]["ion"].append(r["wall"])
                        runs[key]["ion_cpu"].append(r["cpu"])
                        got = sum(len([f for f in fs if f.endswith(".bin")])
                                  for _, _, fs in os.walk(run / "dest", followlinks=True))
                        if got != n:
                            raise RuntimeError(f"small {key}: {got} files deployed, expected {n}")
                        done.append(run)
        finally:
            server.terminate()
            server.wait()
            # Removed at the end, not between runs: on ext4 without a journal the thousands of inodes
            # a run's removal frees make every file created in the next ~30 s walk past them
            # (``recently_deleted``), whichever run came next (a sync does not end it).
            for run in done:
                shutil.rmtree(run, ignore_errors=True)
        for key, r in runs.items():
            kind, shape = key.split()
            ion_s, floor_s = median(r["ion"]), median(r["floor"])
            what = f"{n} items x 4 KB" if shape == "items" else f"1 folder of {n} x 4 KB"
            client = "boto3" if kind == "s3" else "http.client"
            ratio = ion_s / floor_s
            self.row(f"small {kind}: {what}, jobs {a.jobs}", f"{ion_s:.2f} s", f"{floor_s:.2f} s ({client})", "-",
                     f"{ratio:.2f}x floor", f"<= {SMALL_RATIO_TARGET}x floor", ratio <= SMALL_RATIO_TARGET)
            self.notes.append(f"small {kind} {shape}: CPU (user+sys) of the process: ion-deploy "
                              f"{median(r['ion_cpu']):.2f} s, floor {median(r['floor_cpu']):.2f} s; durable floor "
                              f"{median(r['durable']):.2f} s wall = {median(r['durable']) / floor_s:.2f}x the floor "
                              f"(ion-deploy {ion_s / median(r['durable']):.2f}x it), "
                              f"{median(r['durable_cpu']):.2f} s CPU")
        self.figures["small"] = runs

    def rpc(self) -> None:
        """In-process Deployer vs deploy.app over the embedded broker, on one reactor, in this process."""
        a = self.args
        for k, v in self.moto.env().items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        names = self.cold_spec_names
        results: dict[str, list[float]] = {"inproc": [], "rpc": []}
        from twisted.internet import defer, reactor

        async def measure() -> None:
            from ion.services.deploy import cli
            from ion.services.deploy.service import DeployClient
            from ion.services.deploy.spec import load_deployment
            from ion.testing import ContainerFactory, client_process

            for _ in range(a.repeat_cold):
                run = self.fresh("rpc-inproc")
                spec = load_deployment(deployment_file(run / "deploy.json", self.url,
                                                       [item(n, run / "dest" / n) for n in names]))
                # ion-deploy's own options, as its command line would give them (every default included).
                ns = cli._parser().parse_args([str(run / "deploy.json"), "--cache-dir", str(run / "cache"),
                                               "--jobs", str(a.jobs), "--json"])
                cli._check_args(ns)
                out = cli.Output(open(os.devnull, "w"), sys.stderr, as_json=True)
                result: dict[str, Any] = {}
                t0 = time.perf_counter()
                code = await cli._run_local(reactor, ns, spec, out, result)
                results["inproc"].append(time.perf_counter() - t0)
                assert code == 0, result

                run = self.fresh("rpc-service")
                spec = load_deployment(deployment_file(run / "deploy.json", self.url,
                                                       [item(n, run / "dest" / n) for n in names]))
                cache_root = run / "cache"
                config = {"ion.services.cache": {"root": str(cache_root)},
                          "ion.services.unpack": {"allowed_roots": [str(cache_root)]},
                          "ion.services.deploy": {"allowed_destinations": [str(run)],
                                                  "max_parallel": a.jobs}}
                factory = ContainerFactory(reactor=reactor)
                try:
                    container = await factory(config=config)
                    await container.app_manager.start_app("deploy")
                    proc = await client_process(container)
                    t0 = time.perf_counter()
                    answer = await DeployClient(proc).deploy(spec, timeout=3600)
                    results["rpc"].append(time.perf_counter() - t0)
                    assert answer["ok"], answer
                finally:
                    await factory.teardown()

        failure: list[Any] = []

        def go() -> None:
            d = defer.ensureDeferred(measure())
            d.addErrback(failure.append)
            d.addBoth(lambda _: reactor.stop())

        reactor.callWhenRunning(go)
        reactor.run()
        if failure:
            self.notes.append(f"rpc: failed: {failure[0].getErrorMessage()}")
            self.row("cold over RPC (deploy.app) vs in process", "n/a", "n/a", "-", "-",
                     f"<= +{RPC_OVERHEAD_TARGET:.0%}", None)
            return
        ip, rp = median(results["inproc"]), median(results["rpc"])
        extra = rp / ip - 1
        self.row(f"cold {a.deps}x{a.size_mb:g}MB: deploy.app RPC", f"{rp:.2f} s", f"(in process {ip:.2f} s)", "-",
                 f"{extra:+.1%}", f"<= +{RPC_OVERHEAD_TARGET:.0%}", extra <= RPC_OVERHEAD_TARGET)
        self.figures["rpc"] = {"inproc_s": results["inproc"], "rpc_s": results["rpc"]}

    def run(self) -> None:
        self.figures: dict[str, Any] = {}
        a = self.args
        only = set(a.only.split(",")) if a.only else set(MEASURES)
        if only & {"cold", "warm", "tc1"}:
            self.setup_umpire()
        if "cold" in only or "rpc" in only:
            self.cold()  # (rpc deploys the cold row's dependencies)
        if "warm" in only:
            self.warm()
        if "tc1" in only:
            self.tc1()
        if a.big_mb > 0 and "big" in only:
            self.big()
        if "small" in only and a.small_files > 0:
            self.small()
        if self.umpire is None and only & {"cold", "warm", "tc1"}:
            self.notes.insert(0, f"Umpire: n/a ({self.umpire_reason})")
        if a.skip_rpc:
            self.notes.append("rpc: skipped (--skip-rpc)")
        elif "rpc" in only:
            self.rpc()  # last: it runs the reactor, which cannot be restarted


def format_table(rows: list[dict[str, Any]]) -> str:
    headers = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(r[h]).ljust(w) for h, w in zip(headers, widths, strict=True)))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/deploy.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Targets are those of issue 5 ('Speed and memory'). Exit 0 unless --strict.")
    p.add_argument("--deps", type=int, default=20, help="cold: dependencies (default 20)")
    p.add_argument("--size-mb", type=float, default=20, help="cold and tc1: MB of data per tgz (default 20)")
    p.add_argument("--jobs", type=int, default=8, help="parallel fetches, ion-deploy and floor (default 8)")
    p.add_argument("--warm-deps", type=int, default=200, help="warm: small linked dependencies (default 200)")
    p.add_argument("--big-mb", type=float, default=1024, help="big: file size in MB (default 1024; 0 skips)")
    p.add_argument("--small-files", type=int, default=2000,
                   help="small: items of one 4 KB file, and files of the one folder (default 2000; 0 skips)")
    p.add_argument("--only", metavar="M[,M...]",
                   help=f"run only these measures, of {', '.join(MEASURES)} (default: all; rpc needs cold's)")
    p.add_argument("--repeat", type=int, default=3, help="warm: timed runs, median (default 3)")
    p.add_argument("--repeat-cold", type=int, default=2,
                   help="cold, tc1, big, small, rpc: runs, median (default 2)")
    p.add_argument("--boto3-multipart", action="store_true",
                   help="big: also time download_file with boto3's default ranged GETs (slow on moto)")
    p.add_argument("--skip-umpire", action="store_true", help="no Umpire column")
    p.add_argument("--skip-rpc", action="store_true", help="no deploy.app-over-RPC row")
    p.add_argument("--umpire-venv", default=os.environ.get("UMPIRE_VENV", "/tmp/umpire-venv"),
                   help="Umpire's venv, made on first use (default /tmp/umpire-venv)")
    p.add_argument("--tmp", help="parent of the temp folder (default: the system's)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp folder")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON after the table")
    p.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unknown = set(args.only.split(",")) - set(MEASURES) if args.only else set()
    if unknown:
        print(f"bench/deploy.py: --only: unknown measure(s) {', '.join(sorted(unknown))} "
              f"(of {', '.join(MEASURES)})", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="ion-bench-deploy-", dir=args.tmp))
    moto = MotoServer(subprocess_mode=True).start()
    t0 = time.perf_counter()
    try:
        bench = Bench(args, tmp, moto)
        bench.run()
    finally:
        moto.stop()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"ion-deploy benchmark: one moto S3 server (subprocess) on {moto.endpoint}; "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"{time.perf_counter() - t0:.0f} s")
    print(format_table(bench.rows))
    for note in bench.notes:
        print(f"* {note}")
    if args.json:
        print(json.dumps({"rows": bench.rows, "figures": bench.figures, "notes": bench.notes}, indent=1))
    missed = [r for r in bench.rows if r["result"] == "MISS"]
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
