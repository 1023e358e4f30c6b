"""``ion-deploy``: deploy a deployment file's dependencies, in process or through a running system.

``ion-deploy DEPLOYMENT.json`` runs the deployer in this process (DESIGN §8,
"Command line"): a :class:`~ion.services.cache.core.Cache` on the cache root,
a :class:`~ion.services.fetch.core.Fetcher` with the unpack core run locally,
a :class:`~ion.core.threads.BlockingPool` and the
:class:`~ion.services.deploy.core.Deployer`, on the reactor. No broker, no
container. With ``--broker URL`` it goes through the services of a running
system instead (a container joins that broker; the deployment is sent to the
Deploy service with a :class:`~ion.services.deploy.service.DeployClient`).

Umpire's flags keep their meaning: ``-c`` clears the cache first, ``-r``
verifies and repairs it first, ``-d`` shows tracebacks. Also: ``--verify``,
``--verify-used``, ``--prune [--older-than D] [--keep N]``, ``--jobs N``, ``--cache-dir``,
``--json``, ``--version``, ``--partial``. Order of work: clear, repair/verify,
deploy, prune.

A deployment is all or nothing: when an item fails, every item it already
switched in is switched back to its previous version (``rolled back``);
``--partial`` keeps each item placed whatever the others do.

Every entry the deployment uses is checked by size and mtime as it is looked up
(a file written since its entry was published is re-hashed); with
``--verify-used`` (in process) each cached entry it uses is also re-hashed
before it is placed, and a bad one healed: quarantined, under its lock, and
fetched again (issue 17 §3).

A successful deploy records a generation of the deployment file
(:mod:`ion.services.deploy.generations`); ``--generations FILE`` lists the
kept ones and ``--rollback [N] FILE`` puts generation N (default: the
previous one) back in place instead of deploying the file, which is then not
read (it may be broken, or gone).

Exit codes: 0 everything deployed (and every verified entry good), 1 an item
failed (or a bad entry), 2 an unusable deployment file or arguments (or no
such generation), 69
(``EX_UNAVAILABLE``) the broker of ``--broker`` cannot be reached or refused
the login. The ``ion`` command (:mod:`ion.command`) uses the same codes.

Only what the run needs is imported: ``rich`` only for a terminal, boto3
only when an s3 repository is fetched (the repository imports it on use).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = ["main", "package_version", "parse_duration", "whole_number", "run_until_stopped", "start_logging", "EXIT_OK",
           "EXIT_FAILED", "EXIT_USAGE", "EXIT_UNAVAILABLE"]

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: sysexits' EX_UNAVAILABLE, as ``twistd cc`` exits when its broker cannot be reached.
EXIT_UNAVAILABLE = 69

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageProblem(Exception):
    """Arguments that cannot be used: exit 2 with ``Error: ...`` lines."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def parse_duration(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` or ``1h30m``.

    :raises ValueError: naming the text.
    """
    raw = text.strip()
    try:
        value = float(raw)
    except ValueError:
        pos, total = 0, 0.0
        for m in _DURATION.finditer(raw):
            if raw[pos:m.start()].strip():
                break
            total += float(m.group(1)) * _UNITS[m.group(2).lower()]
            pos = m.end()
        else:
            if pos and not raw[pos:].strip():
                return total
        raise ValueError(f"{text!r} is not a duration (seconds, or e.g. 90s, 30m, 12h, 7d, 2w, 1h30m)") from None
    if value < 0:
        raise ValueError(f"{text!r}: a duration cannot be negative")
    return value


#: ``--rollback`` without N.
_PREVIOUS = "previous"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own errors: our format and exit code
        raise UsageProblem([message])


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ion-deploy",
        description="Deploy the dependencies a deployment file (Umpire's JSON) lists: fetch them into the "
                    "shared cache, unpack them, link or copy them into place.",
        epilog="Exit status: 0 all deployed, 1 an item failed (or a bad cache entry), 2 unusable deployment "
               "file or arguments, 69 the broker of --broker unreachable. Cache: --cache-dir, else the 'root' of ion.services.cache in "
               "res/config, else $ION_CACHE_DIR, else ~/.cache/ion/deploy (the Cache service's rule).")
    p.add_argument("deployment", nargs="?", metavar="DEPLOYMENT.json",
                   help="the deployment file (optional with --verify, --prune, -c or -r alone)")
    p.add_argument("-c", "--clear", action="store_true", help="clear the cache first")
    p.add_argument("-r", "--repair", action="store_true",
                   help="verify the cache and repair bad entries first (they are fetched again)")
    p.add_argument("-d", "--debug", action="store_true", help="show tracebacks and debug log lines")
    p.add_argument("--verify", action="store_true", help="verify the cache and report good/bad entries")
    p.add_argument("--verify-used", action="store_true",
                   help="re-hash each cached entry this deployment uses before placing it; a bad one is "
                        "quarantined and fetched again (in process; default: size and mtime checks)")
    p.add_argument("--prune", action="store_true",
                   help="remove cache entries (after deploying): see --older-than and --keep")
    p.add_argument("--older-than", metavar="DURATION",
                   help="with --prune: entries not used for this long (seconds, or 90s, 30m, 12h, 7d, 2w)")
    p.add_argument("--keep", type=str, metavar="N",
                   help="with --prune: keep the N most recently used versions of each dependency")
    p.add_argument("-j", "--jobs", metavar="N", help="dependencies fetched at once (default: config, 8)")
    p.add_argument("--partial", action="store_true",
                   help="keep each item placed even if another fails (default: all or nothing, the items "
                        "already switched in are switched back)")
    p.add_argument("--cache-dir", metavar="DIR", help="the cache root")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout, nothing else there")
    p.add_argument("--generations", action="store_true",
                   help="list the kept generations of DEPLOYMENT.json (each successful deploy records one)")
    p.add_argument("--rollback", nargs="?", const=_PREVIOUS, metavar="N",
                   help="put generation N of DEPLOYMENT.json back in place (default: the previous one), "
                        "instead of deploying the file")
    p.add_argument("--broker", metavar="URL",
                   help="deploy through the services of a running system on this broker (amqp://...; a comma "
                        "list of the nodes of one cluster: tried in turn)")
    p.add_argument("-s", "--sysname", metavar="NAME", help="with --broker (and needed by it): the system name")
    p.add_argument("--version", action="store_true", help="print the version of ioncore and exit")
    return p


def package_version() -> str:
    """The installed ioncore's version (its distribution metadata), or ``unknown`` when it is not installed
    (run from a source folder without ``pip install``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ioncore")
    except PackageNotFoundError:
        return "unknown (not installed)"


def whole_number(value: str | None, flag: str, minimum: int, problems: list[str]) -> int | None:
    """``value`` of the option ``flag`` as an int of at least ``minimum`` (None: not given); a problem
    naming the flag is added to ``problems`` (and None returned) if it is not one."""
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        problems.append(f"{flag} takes a whole number, not {value!r}")
        return None
    if n < minimum:
        problems.append(f"{flag} must be at least {minimum}, not {n}")
        return None
    return n


def _check_args(args: argparse.Namespace) -> None:
    problems: list[str] = []
    args.keep = whole_number(args.keep, "--keep", 0, problems)
    args.jobs = whole_number(args.jobs, "--jobs", 1, problems)
    if args.older_than is not None:
        try:
            args.older_than = parse_duration(args.older_than)
        except ValueError as exc:
            problems.append(f"--older-than: {exc}")
    if args.rollback is not None:
        if args.rollback == _PREVIOUS:
            args.rollback_to = None
        elif args.rollback.strip().isdigit() and int(args.rollback) >= 1:
            args.rollback_to = int(args.rollback)
        elif args.deployment is None and not args.rollback.strip().lstrip("-").isdigit():
            # ``--rollback FILE``: argparse gave the file to the option's optional N.
            args.deployment, args.rollback, args.rollback_to = args.rollback, _PREVIOUS, None
        else:
            problems.append(f"--rollback takes a generation number >= 1, not {args.rollback!r}")
        if args.generations:
            problems.append("--rollback and --generations go one at a time")
    if (args.generations or args.rollback is not None) and not args.deployment:
        problems.append("--generations and --rollback need the DEPLOYMENT.json file whose generations they use")
    if (args.keep is not None or args.older_than is not None) and not args.prune:
        problems.append("--keep and --older-than go with --prune")
    if args.sysname and not args.broker:
        problems.append("-s/--sysname goes with --broker")
    if args.verify_used and not args.deployment:
        problems.append("--verify-used checks the entries a deployment uses: give a DEPLOYMENT.json file")
    if args.verify_used and args.broker:
        problems.append("--verify-used checks entries in this process; with --broker the Cache service's "
                        "periodic verification heals them")
    if args.broker and not args.sysname:
        # A container's system is its own id unless named: none but the one started with -s NAME is reachable.
        problems.append("--broker needs -s/--sysname: the system name the running containers were started with "
                        "(twistd cc -s NAME)")
    if args.broker and args.broker.strip().lower().startswith("memory:"):
        problems.append("--broker memory:// would be this command's own embedded broker, with no Deploy service on "
                        "it: without --broker, ion-deploy deploys in its own process")
    if not args.deployment and not (args.verify or args.prune or args.clear or args.repair):
        problems.append("give a DEPLOYMENT.json file (or --verify, --prune, -c or -r alone); --help for help")
    if problems:
        raise UsageProblem(problems)


# -- output -------------------------------------------------------------------------------------------
class Output:
    """Where progress and results go: rich on a terminal, plain lines otherwise, JSON with ``--json``."""

    def __init__(self, stdout: IO[str], stderr: IO[str], *, as_json: bool) -> None:
        self.stdout, self.stderr, self.as_json = stdout, stderr, as_json
        try:
            self.tty = bool(stdout.isatty()) and not as_json
        except (ValueError, AttributeError):
            self.tty = False
        if self.tty:
            import importlib.util

            # rich draws the bars and the table; without it, the plain lines.
            self.tty = importlib.util.find_spec("rich") is not None
        self._console: Any = None

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.stdout, highlight=False)
        return self._console

    def line(self, text: str = "") -> None:
        """A line of the human-readable output (stdout; none with --json)."""
        if self.as_json:
            return
        print(text, file=self.stdout, flush=True)

    def error(self, text: str) -> None:
        print(f"Error: {text}", file=self.stderr, flush=True)

    def warning(self, text: str) -> None:
        print(f"Warning: {text}", file=self.stderr, flush=True)


class Progress:
    """Per-item progress: a rich bar per dependency on a terminal, a few plain lines otherwise."""

    def __init__(self, out: Output, items: Sequence[Any]) -> None:
        self.out = out
        self.items = list(items)
        self.index = {id(item): n for n, item in enumerate(self.items, 1)}
        self.bytes: dict[int, dict[str, tuple[int, int | None]]] = {}
        #: Per item: [bytes done, sum of the known totals, files of unknown total], kept up to date
        #: file by file (summing every file at each event is quadratic: a folder of 2,000 files).
        self.sums: dict[int, list[int]] = {}
        self.announced: set[tuple[int, str]] = set()
        self.bar: Any = None
        self.tasks: dict[int, Any] = {}
        if out.tty:
            from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                    TransferSpeedColumn(), TextColumn("{task.fields[state]}"),
                                    console=out.console, transient=False)
            for item in self.items:
                self.tasks[id(item)] = self.bar.add_task(f"{item.name} {item.version}", total=None,
                                                         state="waiting")

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, item: Any, phase: str, info: Mapping[str, Any]) -> None:
        key = id(item)
        if phase == "bytes":
            files = self.bytes.setdefault(key, {})
            sums = self.sums.setdefault(key, [0, 0, 0])
            fname = str(info.get("file") or "")
            new = (int(info.get("done") or 0), info.get("total"))
            old = files.get(fname)
            files[fname] = new
            for entry, sign in ((old, -1), (new, 1)):
                if entry is not None:
                    sums[0] += sign * entry[0]
                    if entry[1] is None:
                        sums[2] += sign
                    else:
                        sums[1] += sign * int(entry[1])
            done = sums[0]
            total = sums[1] if sums[2] == 0 else None
            if self.bar is not None:
                self.bar.update(self.tasks[key], completed=done, total=total, state="downloading")
            elif (key, fname) not in self.announced and self.out.as_json is False:
                self.announced.add((key, fname))
                size = f" ({total} bytes)" if total is not None and len(files) == 1 else ""
                self.out.line(f"{item.label}: downloading {fname}{size}")
        elif phase == "fetch":
            step = str(info.get("step") or "")
            if self.bar is not None and step:
                self.bar.update(self.tasks[key], state=step)
        elif phase == "place":
            if self.bar is not None:
                self.bar.update(self.tasks[key], state="placing")
        elif phase in ("done", "failed", "rolled back"):
            state = str(info.get("state") or phase)
            already = bool(info.get("already"))
            text = phase if phase != "done" else ("already deployed" if already else state)
            if self.bar is not None:
                task = self.tasks[key]
                total = self.bar.tasks[task].total if task < len(self.bar.tasks) else None
                self.bar.update(task, total=total or 1, completed=total or 1, state=text)
            else:
                n = self.index.get(key, 0)
                self.out.line(f"[{n}/{len(self.items)}] {item.label}: {text}")


def _note(row: Mapping[str, Any]) -> str:
    if row.get("state") in _NOT_DEPLOYED:
        return str(row.get("reason") or row.get("state"))
    return "Already deployed" if row.get("already") else ""


def _summary(out: Output, rows: list[dict[str, Any]]) -> None:
    if out.as_json or not rows:
        return
    headers = ("item", "version", "state", "destination", "note")
    cells = [(f"{r['platform']}/{r['name']}", r["version"], r["state"], r["destination"], _note(r)) for r in rows]
    if out.tty:
        from rich.table import Table

        table = Table(title="Deployment")
        for h in headers:
            table.add_column(h, overflow="fold")
        styles = {"failed": "red", "rolled back": "yellow", "downloaded": "green", "updated": "green", "cached": ""}
        for c, r in zip(cells, rows, strict=True):
            table.add_row(*c, style=styles.get(r["state"], ""))
        out.console.print(table)
    else:
        widths = [max(len(h), *(len(str(c[i]).splitlines()[0] if str(c[i]) else "") for c in cells))
                  for i, h in enumerate(headers[:-1])]
        out.line("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False)) + "  " + headers[-1])
        for c in cells:
            note = str(c[-1]).replace("\n", "; ")
            out.line("  ".join(str(v).ljust(w) for v, w in zip(c, widths, strict=False)) + "  " + note)
    failed = sum(1 for r in rows if r["state"] in ("failed", "cancelled"))
    rolled = sum(1 for r in rows if r["state"] == "rolled back")
    if failed or rolled:
        line = f"{len(rows) - failed - rolled} of {len(rows)} items deployed; {failed} failed"
        if rolled:
            line += f"; {rolled} rolled back (all or nothing: their previous versions are in place)"
        out.line(line)
    elif all(r.get("already") and r["state"] == "cached" for r in rows):
        out.line(f"Already deployed: all {len(rows)} items")
    else:
        out.line(f"All {len(rows)} items deployed")


#: The states of an item that is not in place in its new version.
_NOT_DEPLOYED = ("failed", "cancelled", "rolled back")

#: Threads of ion-deploy's pool for the cache's and the placements' file work (lookups, staging
#: folders, publish, placement, commit): short jobs of a few system calls each, every one of which
#: hands the GIL over. Run in the --jobs threads of the transfers, 8 threads fought for the GIL with
#: the reactor: 1,000 one-file HTTP items made ~240 context switches per item, ~100 with these
#: apart in 2 threads, and took ~12 % less CPU (bench/README.md, session 8). Transfers (boto3,
#: the HTTP sinks), extraction and hashing stay in the --jobs pool. (Each pool has one thread more
#: for its short calls: cache lookups here, a small file come whole from HTTP in the --jobs pool.)
FILES_THREADS = 2


def _rows(items: Sequence[Any], results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for item, wire in zip(items, results, strict=True):
        row = dict(wire)
        row.update(name=item.name, version=item.version, platform=item.platform)
        rows.append(row)
    return rows


def _report_entries(out: Output, what: str, reports: list[Any]) -> None:
    for r in reports:
        key = r["key"] if isinstance(r, Mapping) else r.key.to_wire()
        status = r["status"] if isinstance(r, Mapping) else r.status
        problems = r["problems"] if isinstance(r, Mapping) else r.problems
        action = r.get("action") if isinstance(r, Mapping) else r.action
        url = r.get("url") if isinstance(r, Mapping) else r.url
        # Where it came from: on a shared cache one version of a dependency may come from several
        # repositories. The version folder's URL (its .entry), else the repository's cache folder.
        label = str(url).rstrip("/") if url else f"{key.get('platform')}/{key.get('name')}/{key.get('version')} in {key.get('repo_id')}"
        label += "" if key.get("unpack", True) else " (packed)"
        detail = "; ".join(f"{f}: {p}" for f, p in sorted(problems.items())) if problems else ""
        out.line(f"{what}: {label}: {status}" + (f" ({detail})" if detail else "")
                 + (f" -> {action}" if action and action != "kept" else ""))
    bad = sum(1 for r in reports if (r["status"] if isinstance(r, Mapping) else r.status) != "good")
    out.line(f"{what}: {len(reports)} entries, {len(reports) - bad} good, {bad} bad")


def _wire(obj: Any) -> Any:
    return obj.to_wire() if hasattr(obj, "to_wire") else obj


def _wire_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows of item results that carry only their label (``platform/name/version``)."""
    rows = []
    for wire in results:
        row = dict(wire)
        platform, _, rest = str(wire.get("item", "")).partition("/")
        name, _, version = rest.rpartition("/")
        row.update(name=name, version=version, platform=platform)
        rows.append(row)
    return rows


def _when(seconds: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _show_generations(out: Output, listing: Mapping[str, Any]) -> None:
    """The kept generations (newest first, as ``op_generations`` answers), each with its items."""
    gens = listing.get("generations") or []
    where = f"{listing.get('file')} (host {listing.get('host')})"
    if not gens:
        out.line(f"No generation of {where} is recorded")
        return
    out.line(f"Generations of {where}, newest first (keeping {listing.get('keep')}):")
    for n, g in enumerate(gens):
        notes = ["current"] if n == 0 else []
        if g.get("rollback_of") is not None:
            notes.append(f"rollback to {g['rollback_of']}")
        digest = str(g.get("file_sha256") or "")[:12] or "-"
        out.line(f"  {g.get('generation')}  {_when(float(g.get('time') or 0))}  by {g.get('caller') or '?'} "
                 f"via {g.get('via')}  file sha256 {digest}" + (f"  ({', '.join(notes)})" if notes else ""))
        for item in g.get("items") or []:
            out.line(f"      {item.get('platform')}/{item.get('name')} {item.get('version')} -> "
                     f"{item.get('destination')}")


def _rolled_back(out: Output, answer: Mapping[str, Any], result: dict[str, Any], rows: list[dict[str, Any]]) -> bool:
    """Show and record a rollback's outcome; True if every item is in place."""
    result["rollback"] = {"to": answer.get("rollback_of"), "generation": answer.get("generation")}
    result["items"] = rows
    _summary(out, rows)
    ok = all(r["state"] not in ("failed", "cancelled") for r in rows)
    left = list(answer.get("left") or [])
    if left:
        result["rollback"]["left"] = left
        out.line(f"Left in place (generation {answer.get('rollback_of')} lacks them): {'; '.join(left)}")
    if ok:
        out.line(f"Rolled back to generation {answer.get('rollback_of')}: now generation {answer.get('generation')}")
    else:
        out.line(f"Rollback to generation {answer.get('rollback_of')} incomplete: no generation recorded")
    return ok


# -- the run --------------------------------------------------------------------------------------------
def _config() -> Any:
    from ion.core.config import Config

    return Config.load()


def _max_deployment_bytes() -> int:
    """``max_deployment_bytes`` of ``ion.services.deploy`` (default 64 MiB): the largest file read."""
    from ion.services.deploy.spec import DEFAULT_MAX_DEPLOYMENT_BYTES, MAX_BYTES_KEY

    value = _config().get("ion.services.deploy", MAX_BYTES_KEY, DEFAULT_MAX_DEPLOYMENT_BYTES)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageProblem([f"config: {MAX_BYTES_KEY} of ion.services.deploy must be a whole number of bytes "
                            f">= 1, not {value!r}"])
    return value


def _cache_root(args: argparse.Namespace, config: Any) -> Path:
    """``--cache-dir``, else the cache of the Cache service run with this config (one rule for both)."""
    from ion.services.cache.core import configured_root

    if args.cache_dir:
        return Path(args.cache_dir).expanduser()
    return configured_root(config)


async def _maintain_local(cache: Any, args: argparse.Namespace, out: Output, result: dict[str, Any]) -> bool:
    """``-c``, ``-r``, ``--verify`` on a local cache; False if a bad entry is left."""
    ok = True
    if args.clear:
        report = await cache.clear()
        result["clear"] = report.to_wire()
        out.line(f"Cleared the cache {cache.root}: {len(report.removed)} entries removed"
                 + (f", {len(report.busy)} in use left" if report.busy else ""))
    if args.repair:
        reports = await cache.repair()
        result["repair"] = [r.to_wire() for r in reports]
        _report_entries(out, "repair", reports)
        ok = ok and all(r.good or r.action in ("quarantined", "removed") for r in reports)
    elif args.verify:
        reports = await cache.verify()
        result["verify"] = [r.to_wire() for r in reports]
        _report_entries(out, "verify", reports)
        ok = ok and all(r.good for r in reports)
    return ok


async def _run_local(reactor: Any, args: argparse.Namespace, deployment: Any, out: Output,
                     result: dict[str, Any]) -> int:
    from ion.core.settings import ContainerSettings
    from ion.core.threads import BlockingPool
    from ion.services.cache.core import CacheSettings
    from ion.services.deploy.settings import DeploySettings

    config = _config()
    root = _cache_root(args, config)
    result["cache"] = str(root)
    jobs = args.jobs or config.settings(DeploySettings).max_parallel
    pool = BlockingPool(reactor, maxthreads=max(config.settings(ContainerSettings).max_threads, jobs))
    # The cache's and the placements' file work in a pool of its own (see FILES_THREADS); transfers,
    # extraction and hashing of what is fetched stay in ``pool``, --jobs of them at once.
    files = BlockingPool(reactor, maxthreads=FILES_THREADS, name="ion-files")
    cache = config.settings(CacheSettings).open(root, clock=reactor, pool=files)
    fetcher = None
    try:
        # What deployers of this host that died (killed mid-download) left in staging.
        await cache.cleanup_staging()
        ok = await _maintain_local(cache, args, out, result)
        if deployment is not None:
            from ion.services.deploy.core import Deployer
            from ion.services.fetch.core import Fetcher, local_unpack
            from ion.services.fetch.repository import FetchConfig
            from ion.services.unpack.core import Limits

            limits = Limits.from_config(config.for_module("ion.services.unpack"))
            # --jobs requests in flight per repository, so at most that many connections to it.
            fetch_config = replace(FetchConfig.from_config(config.for_module("ion.services.fetch")),
                                   max_connections=jobs)
            fetcher = Fetcher(cache, local_unpack(pool, limits), pool=pool, reactor=reactor, config=fetch_config)
            healed: list[dict[str, Any]] = []
            deployer = Deployer(_fetch_function(fetcher, cache if args.verify_used else None, healed, out), files,
                                max_parallel=jobs, cache_root=cache.root)
            with Progress(out, deployment.items) as progress:
                results = await deployer.deploy(deployment, progress=progress, partial=args.partial)
            if args.verify_used:
                result["healed"] = healed
            rows = _rows(deployment.items, [r.to_wire() for r in results])
            result["items"] = rows
            _summary(out, rows)
            ok = ok and all(r.ok for r in results)
            result["generation"] = await _record_local(cache, pool, config, deployment, results)
        elif args.generations or args.rollback is not None:
            ok = await _generations_local(reactor, cache, pool, config, jobs, args, out, result) and ok
        if args.prune:
            report = await cache.prune(older_than=args.older_than, keep=args.keep)
            result["prune"] = report.to_wire()
            out.line(f"Pruned the cache {root}: {len(report.removed)} entries removed "
                     f"({report.bytes_freed} bytes)" + (f", {len(report.busy)} in use left" if report.busy else ""))
    finally:
        if fetcher is not None:
            await fetcher.close()
        await cache.close()
        pool.stop()
        files.stop()
    return EXIT_OK if ok else EXIT_FAILED


async def _record_local(cache: Any, pool: Any, config: Any, deployment: Any, results: Any) -> int | None:
    """Record the generation of a successful deploy of a file (the one hook after it); its number."""
    from ion.services.deploy import generations as gen
    from ion.services.deploy.settings import DeploySettings

    if deployment.file is None:
        return None
    store = gen.GenerationStore(cache.root, pool, config.settings(DeploySettings).keep_generations)
    recorded = await gen.record_generation(store, gen.DeploymentFile(deployment.file, cache.host_id), deployment,
                                           results, caller=gen.os_user(), via="ion-deploy")
    return recorded.number if recorded is not None else None


async def _generations_local(reactor: Any, cache: Any, pool: Any, config: Any, jobs: int, args: argparse.Namespace,
                             out: Output, result: dict[str, Any]) -> bool:
    """``--generations`` or ``--rollback [N]`` in process; False if an item of a rollback failed."""
    from twisted.internet import defer

    from ion.services.deploy import generations as gen
    from ion.services.deploy.core import Deployer
    from ion.services.deploy.settings import DeploySettings
    from ion.services.fetch.core import Fetcher, local_unpack
    from ion.services.unpack.core import Limits

    store = gen.GenerationStore(cache.root, pool, config.settings(DeploySettings).keep_generations)
    file = await pool.run(gen.DeploymentFile.of, args.deployment, cache.host_id)  # (realpath: off the reactor)
    if args.generations:
        history = await store.history(file)
        listing = {**file.to_wire(), "keep": store.keep,
                   "generations": [g.to_wire() for g in reversed(history.generations)]}
        result["generations"] = listing["generations"]
        _show_generations(out, listing)
        return True
    fetcher = Fetcher(cache, local_unpack(pool, Limits.from_config(config.for_module("ion.services.unpack"))),
                      pool=pool, reactor=reactor, config=config.for_module("ion.services.fetch"))
    deployer = Deployer(_fetch_function(fetcher), cache.pool, max_parallel=jobs, cache_root=cache.root)  # (files)

    async def deploy(deployment: Any) -> Any:
        with Progress(out, deployment.items) as progress:
            return await deployer.deploy(deployment, progress=progress)

    out.line(f"Rolling back {file.path} to "
             + (f"generation {args.rollback_to}" if args.rollback_to else "the previous generation"))
    try:
        done = await gen.rollback(store, file, args.rollback_to, lambda d: defer.ensureDeferred(deploy(d)),
                                  caller=gen.os_user(), via="ion-deploy")
    finally:
        await fetcher.close()
    rows = _rows(done.deployment.items, [r.to_wire() for r in done.results])
    return _rolled_back(out, done.to_wire(), result, rows)


def _fetch_function(fetcher: Any, verify_cache: Any = None, healed: list[dict[str, Any]] | None = None,
                    out: Output | None = None) -> Any:
    """The Deployer's fetch function over an in-process :class:`Fetcher`; with ``verify_cache`` (the
    :class:`Cache`, ``--verify-used``) a cached entry is re-hashed first and healed if bad (each
    healed entry appended to ``healed``)."""

    def fetch(item: Any, progress: Any) -> Any:
        def on_progress(p: Any) -> None:
            if p.phase == "downloading":
                progress("bytes", {"file": p.file, "done": p.done, "total": p.total})
            elif p.phase != "done":
                progress("fetch", {"step": p.phase, "file": p.file})

        async def run() -> dict[str, Any]:
            r = await fetcher.fetch(item, on_progress)
            if verify_cache is not None and r.state == "cached":
                progress("fetch", {"step": "verifying"})
                bad = await _quarantine_if_bad(verify_cache, r.key, r.path)
                if bad is not None:  # quarantined, or republished meanwhile: look it up (or fetch it) again
                    quarantined = bad.action == "quarantined"
                    if quarantined and out is not None:
                        problems = "; ".join(f"{f}: {p}" for f, p in sorted(bad.problems.items()))
                        out.warning(f"{item.label}: cache entry {r.path} was bad ({problems}): quarantined, "
                                    "fetching it again")
                    r = await fetcher.fetch(item, on_progress)
                    if quarantined and healed is not None:
                        healed.append({"item": item.label, "entry": str(r.path), "problems": dict(bad.problems),
                                       "moved_to": str(bad.moved_to) if bad.moved_to else None,
                                       "state": r.state})
            return {"state": r.state, "path": str(r.path), "names": r.info.content_names(),
                    "stamp": r.info.content_digest()}

        from twisted.internet import defer

        return defer.ensureDeferred(run())

    return fetch


async def _quarantine_if_bad(cache: Any, key: Any, path: Path) -> Any:
    """``--verify-used``: re-hash the entry ``key`` at ``path``; None if it is good. If bad, check it again
    under its lock (a republish may have replaced it meanwhile) and quarantine it (``action``
    ``quarantined``). Its :class:`EntryReport`: the caller looks it up (or fetches it) again."""
    report = await cache.verify_entry(key, path)
    if report.status != "bad":
        return None
    lock = await cache.lock(key)
    try:
        report = await cache.verify_entry(key, path)
        if report.status != "bad":
            return report
        report.moved_to = await cache.quarantine(key, path, report.problems, log_prefix="ion-deploy --verify-used: ")
        report.action = "quarantined"
        return report
    finally:
        await cache.unlock(lock)


async def _run_broker(reactor: Any, args: argparse.Namespace, deployment: Any, out: Output,
                      result: dict[str, Any]) -> int:
    from ion.core.container import Container
    from ion.core.exceptions import ReceivedApplicationError
    from ion.core.messaging.transport import redacted_url, split_broker_urls
    from ion.core.process import Process

    brokers = split_broker_urls(args.broker)
    container = Container(config=_config(), broker_url=brokers, sysname=args.sysname, reactor=reactor)
    result["broker"] = ",".join(redacted_url(url) for url in brokers)  # (never the password)
    await container.start()
    try:
        pid = await container.spawn(Process, name="ion-deploy")
        proc = container.proc_manager.get(pid)
        assert proc is not None
        ok = True
        if args.clear or args.repair or args.verify:
            from ion.services.cache.service import CacheClient

            cache = CacheClient(proc)
            if args.clear:
                report = await cache.clear()
                result["clear"] = _wire(report)
                out.line(f"Cleared the cache: {len(_wire(report).get('removed', []))} entries removed")
            if args.repair or args.verify:
                reports = [_wire(r) for r in await (cache.repair() if args.repair else cache.verify())]
                what = "repair" if args.repair else "verify"
                result[what] = reports
                _report_entries(out, what, reports)
                ok = all(r["status"] == "good" or (args.repair and r.get("action") in ("quarantined", "removed"))
                         for r in reports)
        if args.generations or args.rollback is not None:
            from ion.services.deploy.service import DeployClient

            client = DeployClient(proc)
            file = await client.deployment_file(args.deployment)
            try:
                if args.generations:
                    listing = await client.generations(file)
                    result["generations"] = listing["generations"]
                    _show_generations(out, listing)
                else:
                    out.line(f"Rolling back {file.path} through the deploy service of {args.broker}")
                    answer = await client.rollback(file, args.rollback_to)
                    ok = _rolled_back(out, answer, result, _wire_rows(answer["items"])) and ok
            except ReceivedApplicationError as exc:
                if exc.response_code not in (400, 404):
                    raise
                from ion.services.deploy.generations import GenerationError

                raise GenerationError(str(exc.message), exc.response_code) from None
        elif deployment is not None:
            out.line(f"Deploying {deployment.source} through the deploy service of {args.broker}")
            answers = await _deploy_through_service(container, proc, deployment, out, partial=args.partial)
            rows = _rows(deployment.items, answers)
            result["items"] = rows
            _summary(out, rows)
            ok = ok and all(r["state"] not in _NOT_DEPLOYED for r in rows)
        if args.prune:
            from ion.services.cache.service import CacheClient

            report = _wire(await CacheClient(proc).prune(older_than=args.older_than, keep=args.keep))
            result["prune"] = report
            out.line(f"Pruned the cache: {len(report.get('removed', []))} entries removed")
        return EXIT_OK if ok else EXIT_FAILED
    finally:
        await container.terminate()


async def _deploy_through_service(container: Any, proc: Any, deployment: Any, out: Output, *,
                                  partial: bool = False) -> list[dict[str, Any]]:
    """Deploy as an async job of the Deploy service, showing its progress events; every item's result.

    An async job rather than one long call: the job's progress events name it (so this run shows
    its own), and a deployment longer than any call timeout is still followed to its end.
    """
    from ion.core.jobs import JobStatus
    from ion.services.deploy.service import DeployClient, JobProgressListener

    client = DeployClient(proc)
    with Progress(out, deployment.items) as progress:
        pid = await container.spawn(JobProgressListener, {"items": deployment.items, "progress": progress},
                                    name="ion-deploy-progress")
        listener = container.proc_manager.get(pid)
        try:
            job = await client.deploy_async(deployment, partial=partial)
            listener.job = job
            while True:
                record = await client.job_status(job)
                if record["status"] not in (JobStatus.RUNNING, JobStatus.PARTIAL):
                    break
                await listener.changed(1.0)
        finally:
            await container.proc_manager.terminate_process(pid)
    results = {r.get("position"): r for r in (record.get("results") or {}).values() if isinstance(r, Mapping)}
    answers = []
    for item in deployment.items:
        found = results.get(item.position)
        if found is None:
            why = record.get("error") or f"the job ended {record.get('state')} without this item"
            found = {"item": item.label, "position": item.position, "state": "failed", "already": False,
                     "reason": str(why), "destination": str(item.destination)}
        answers.append(dict(found))
    return answers


async def run_until_stopped(reactor: Any, work: Coroutine[Any, Any, T],
                            on_interrupt: Callable[[], None] | None = None) -> T:
    """Await ``work`` under ``reactor``; a shutdown meanwhile (Ctrl-C, SIGTERM) cancels it (after
    ``on_interrupt()``) and lets its cleanup finish (locks released, staging discarded, a container
    terminated) before the reactor stops. Raises ``CancelledError`` when it was interrupted.
    ``ion-deploy`` and ``ion`` both run this way."""
    from twisted.internet import defer

    running = defer.ensureDeferred(work)
    finished: defer.Deferred[None] = defer.Deferred()

    def ended(outcome: Any) -> Any:
        finished.callback(None)
        return outcome

    running.addBoth(ended)

    def interrupted() -> defer.Deferred[None]:
        if not running.called:
            if on_interrupt is not None:
                on_interrupt()
            running.cancel()
        return finished

    trigger = reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    try:
        return await running
    finally:
        try:
            reactor.removeSystemEventTrigger(trigger)
        except (ValueError, KeyError):
            pass


def start_logging(out: Output, debug: bool, *, least: Any = None, line: Callable[[str], None] | None = None,
                  skip: Callable[[dict[str, Any]], bool] | None = None) -> None:
    """Log lines of a command to its stderr: every one from debug level with ``--debug``, else from
    ``least`` on (default: warnings), the first line of each, printed by ``line`` (default:
    ``out.warning``); ``skip(event)`` leaves an event out (one the run's own error line repeats).
    ``ion-deploy`` and ``ion`` both log this way."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        formatEvent,
        globalLogBeginner,
        textFileLogObserver,
    )

    if debug:
        observer: Any = textFileLogObserver(out.stderr)
        level = LogLevel.debug
    else:
        show = line or out.warning

        def observer(event: dict[str, Any]) -> None:
            if skip is not None and skip(event):
                return
            text = formatEvent(event)
            if text:
                show(text.splitlines()[0])

        level = least if least is not None else LogLevel.warn
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observer, [LogLevelFilterPredicate(level)])],
                                     redirectStandardIO=False)


def main(argv: Sequence[str] | None = None, *, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """Run ``ion-deploy``; returns the exit status (see the module notes)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    as_json = bool(argv is not None and "--json" in argv) or (argv is None and "--json" in sys.argv[1:])
    out = Output(stdout, stderr, as_json=as_json)
    result: dict[str, Any] = {"ok": False}

    def usage_failed(problems: Sequence[str]) -> int:
        for problem in problems:
            out.error(problem)
        if as_json:
            result["errors"] = list(problems)
            print(json.dumps(result, indent=2), file=stdout, flush=True)
        return EXIT_USAGE

    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.version:
            if as_json:
                print(json.dumps({"ok": True, "version": package_version()}, indent=2), file=stdout, flush=True)
            else:
                print(f"ion-deploy (ioncore) {package_version()}", file=stdout, flush=True)
            return EXIT_OK
        _check_args(args)
    except UsageProblem as exc:
        return usage_failed(exc.problems)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)

    deployment = None
    if args.deployment and (args.generations or args.rollback is not None):
        result["source"] = args.deployment  # its generations are used; the file itself is not read
    elif args.deployment:
        from ion.services.deploy.spec import DeploymentError, load_deployment

        try:
            limit = _max_deployment_bytes()
        except UsageProblem as exc:
            return usage_failed(exc.problems)
        try:
            deployment = load_deployment(args.deployment, max_bytes=limit)
        except DeploymentError as exc:
            if args.debug:
                import traceback

                traceback.print_exc(file=stderr)
            return usage_failed(exc.problems or [str(exc)])
        result["source"] = deployment.source
        for warning in deployment.warnings:
            out.warning(warning)

    start_logging(out, args.debug)
    code = [EXIT_FAILED]
    from twisted.internet import defer, task

    from ion.services.deploy.generations import GenerationError

    async def run(reactor: Any) -> None:
        runner = _run_broker if args.broker else _run_local
        try:
            code[0] = await run_until_stopped(reactor, runner(reactor, args, deployment, out, result),
                                              lambda: out.error("interrupted: cancelling, releasing locks"))
        except defer.CancelledError:
            code[0] = EXIT_FAILED
            result["errors"] = ["interrupted"]
        except GenerationError as exc:  # no such generation: the arguments named none that is kept
            out.error(str(exc))
            result["errors"] = [str(exc)]
            code[0] = EXIT_USAGE
        except Exception as exc:
            from ion.core.exceptions import IonError, TransportError

            if args.debug:
                import traceback

                traceback.print_exc(file=stderr)
            text = str(exc) if isinstance(exc, IonError) and str(exc) else f"{type(exc).__name__}: {exc}"
            out.error(text)
            result["errors"] = [text]
            code[0] = EXIT_UNAVAILABLE if isinstance(exc, TransportError) else EXIT_FAILED

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit:
        pass
    result["ok"] = code[0] == EXIT_OK
    if as_json:
        print(json.dumps(result, indent=2, default=str), file=stdout, flush=True)
    return code[0]


if __name__ == "__main__":
    sys.exit(main())
