"""Periodic cache verification benchmark: MB/s re-hashed, and its effect on a concurrent cold deploy.

Measures, in one run (issue 6, "periodic integrity verification"):

* **verify MB/s** -- one :class:`~ion.services.cache.verify.CacheVerifier`
  round over a cache of ``--deps`` (8) entries of ``--size-mb`` (64) MB
  (random, incompressible, in 4 MB files), in this process on the real
  reactor with a :class:`~ion.core.threads.BlockingPool` (8 threads, as a
  container has), ``--workers`` (2) entries at once: without a bandwidth cap,
  and with ``--cap-mb`` (100) MB/s, where the measured rate must stay at or
  under the cap. Median of ``--repeat`` (3) rounds each.
* **cold deploy** -- ``--deploy-deps`` (8) dependencies of
  ``--deploy-size-mb`` (16) MB from a ``file:`` repository, deployed by
  ``ion-deploy`` (``python -m ion.services.deploy.cli DEPLOY.json --cache-dir
  D --json``, a subprocess) into a fresh cache and fresh destinations on the
  same filesystem: alone, then while verify rounds run back to back over the
  first cache (uncapped, then capped). Median of ``--repeat`` runs each; the
  slowdown is the ratio to the time alone.

The files were just written, so they are most likely in the page cache: the
uncapped rate is the hashing rate (sha256 on the pool threads, competing for
the CPUs with the deploy) more than the disk's. Everything lives under a temp
folder removed at the end (``--keep-tmp`` to keep it). Wall times come from
:func:`time.perf_counter`.

Run it from the repository root::

    python bench/verify.py                  # ~1 min, ~1 GB of temp files
    python bench/verify.py --deps 4 --size-mb 16 --deploy-deps 4 --deploy-size-mb 8 --repeat 1   # a quick one
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from twisted.internet import defer, task, threads  # noqa: E402

from ion.core.threads import BlockingPool  # noqa: E402
from ion.services.cache.core import Cache  # noqa: E402
from ion.services.cache.verify import CacheVerifier, VerifyConfig  # noqa: E402

__all__ = ["main", "parse_args"]

MB = 1_000_000
FILE = 4 * 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deps", type=int, default=8, help="entries in the verified cache (8)")
    p.add_argument("--size-mb", type=int, default=64, help="MB per verified entry (64)")
    p.add_argument("--deploy-deps", type=int, default=8, help="dependencies of the cold deploy (8)")
    p.add_argument("--deploy-size-mb", type=int, default=16, help="MB per deployed dependency (16)")
    p.add_argument("--workers", type=int, default=2, help="verify_workers (2)")
    p.add_argument("--cap-mb", type=float, default=100.0, help="verify_bandwidth of the capped runs, MB/s (100)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measure, the median counts (3)")
    p.add_argument("--json", action="store_true", help="the figures as one JSON document")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp folder")
    return p.parse_args(argv)


def make_repo(repo: Path, prefix: str, deps: int, size: int) -> list[str]:
    """``deps`` dependencies ``<prefix><i>`` 1.0 of ``size`` random bytes each, in 4 MB files."""
    names = []
    for i in range(deps):
        name = f"{prefix}{i}"
        folder = repo / "noarch" / name / "1.0"
        folder.mkdir(parents=True)
        left, n = size, 0
        while left > 0:
            (folder / f"part{n}.bin").write_bytes(os.urandom(min(FILE, left)))
            left -= FILE
            n += 1
        names.append(name)
    return names


def deployment(path: Path, repo: Path, names: list[str], dest: Path) -> Path:
    items = [{"name": n, "version": "1.0", "platform": "noarch", "destination": str(dest / n), "unpack": False}
             for n in names]
    path.write_text(json.dumps([{"url": repo.as_uri(), "items": items}]))
    return path


def ion_deploy(file: Path, cache_dir: Path) -> float:
    """Wall seconds of one ``ion-deploy`` process (fails loudly if the deployment does)."""
    cmd = [sys.executable, "-m", "ion.services.deploy.cli", str(file), "--cache-dir", str(cache_dir), "--json"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"ion-deploy failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return wall


async def verify_round(cache: Cache, workers: int, cap: float | None) -> tuple[float, int]:
    """Wall seconds and bytes of one round over ``cache``."""
    verifier = CacheVerifier(cache, VerifyConfig(interval=None, workers=workers, bandwidth=cap),
                             state_path=cache.root.parent / "verify-state.json")
    start = time.perf_counter()
    report = await verifier.run_round()
    wall = time.perf_counter() - start
    bad = [o for o in report.outcomes if o.outcome != "good"]
    if bad:
        raise SystemExit(f"verify found {len(bad)} entries not good: {bad[0]}")
    return wall, report.bytes_hashed


async def deploy_under_verify(cache: Cache, workers: int, cap: float | None, file: Path, cache_dir: Path) -> float:
    """Cold deploy wall seconds while verify rounds run back to back (cap None: no verify at all)."""
    running = True

    async def rounds() -> None:
        while running:
            await verify_round(cache, workers, cap)

    loop = defer.Deferred.fromCoroutine(rounds())
    try:
        return await threads.deferToThread(ion_deploy, file, cache_dir)
    finally:
        running = False
        await loop


async def run(reactor: Any, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    repo = tmp / "repo"
    verified = make_repo(repo, "verified", args.deps, args.size_mb * MB)
    cold = make_repo(repo, "cold", args.deploy_deps, args.deploy_size_mb * MB)
    cache_dir = tmp / "cache"
    ion_deploy(deployment(tmp / "populate.json", repo, verified, tmp / "populated"), cache_dir)
    pool = BlockingPool(reactor, maxthreads=8)
    cache = Cache(cache_dir, host_id="bench", clock=reactor, pool=pool)
    cap = args.cap_mb * MB if args.cap_mb > 0 else None
    figures: dict[str, Any] = {"verified_mb": args.deps * args.size_mb, "workers": args.workers,
                               "cap_mb_s": args.cap_mb, "deploy_mb": args.deploy_deps * args.deploy_size_mb}
    for label, limit in (("uncapped", None), ("capped", cap)):
        rates = []
        for _ in range(args.repeat):
            wall, nbytes = await verify_round(cache, args.workers, limit)
            rates.append(nbytes / wall / MB)
        figures[f"verify_{label}_mb_s"] = statistics.median(rates)
    counter = 0

    async def cold_deploy(verify: str) -> float:
        nonlocal counter
        walls = []
        for _ in range(args.repeat):
            counter += 1
            file = deployment(tmp / f"cold{counter}.json", repo, cold, tmp / f"dest{counter}")
            target = tmp / f"cold-cache{counter}"
            if verify == "none":
                walls.append(await threads.deferToThread(ion_deploy, file, target))
            else:
                walls.append(await deploy_under_verify(cache, args.workers, None if verify == "uncapped" else cap,
                                                       file, target))
            shutil.rmtree(target, ignore_errors=True)
            shutil.rmtree(tmp / f"dest{counter}", ignore_errors=True)
        return statistics.median(walls)

    for verify in ("none", "uncapped", "capped"):
        figures[f"deploy_{verify}_s"] = await cold_deploy(verify)
    await pool.stop()
    return figures


def table(f: dict[str, Any]) -> str:
    alone = f["deploy_none_s"]
    rows = [
        ("measure", "value", "note"),
        (f"verify round, {f['verified_mb']} MB, {f['workers']} workers, no cap",
         f"{f['verify_uncapped_mb_s']:.0f} MB/s", "re-hashed per wall second (page cache warm)"),
        (f"verify round, cap {f['cap_mb_s']:g} MB/s", f"{f['verify_capped_mb_s']:.0f} MB/s",
         "PASS (<= cap)" if f["verify_capped_mb_s"] <= f["cap_mb_s"] * 1.02 else "MISS (over the cap)"),
        (f"cold deploy {f['deploy_mb']} MB, alone", f"{alone:.2f} s", ""),
        ("cold deploy, verify uncapped alongside", f"{f['deploy_uncapped_s']:.2f} s",
         f"{f['deploy_uncapped_s'] / alone:.2f}x alone"),
        (f"cold deploy, verify capped {f['cap_mb_s']:g} MB/s alongside", f"{f['deploy_capped_s']:.2f} s",
         f"{f['deploy_capped_s'] / alone:.2f}x alone"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ion-bench-verify-"))
    figures: dict[str, Any] = {}

    async def go(reactor: Any) -> None:
        figures.update(await run(reactor, args, tmp))

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(go(reactor)))
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(figures, indent=1) if args.json else table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
