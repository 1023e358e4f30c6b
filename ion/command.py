# PYTHON_ARGCOMPLETE_OK
"""``ion``: look at and change a running system from scripts and a terminal (issue #16 §6).

A non-interactive command that joins a running system as a short-lived
container (``--broker URL -s NAME``, as ``ion-deploy`` takes them), does one
thing through the core's control API (:class:`ion.core.control.SystemControl`)
or a service client, prints the result and leaves::

    ion --broker amqp://... -s mysys nodes
    ion --broker amqp://... -s mysys ps [--node N]
    ion --broker amqp://... -s mysys ping [SERVICE]
    ion --broker amqp://... -s mysys call SERVICE OP [JSON]
    ion --broker amqp://... -s mysys kill PID
    ion --broker amqp://... -s mysys jobs
    ion --broker amqp://... -s mysys job ID [--follow]
    ion --broker amqp://... -s mysys cancel ID
    ion --broker amqp://... -s mysys app start|stop APP [--node N]
    ion --broker amqp://... -s mysys cache verify|reap|prune [--older-than D] [--keep N]
    ion audit [--file ion-audit.jsonl]
    ion --broker amqp://... -s mysys audit --follow
    ion console [--http-url URL] [--open]

``--broker`` and ``-s`` may also come from ``$ION_BROKER_URL`` and
``$ION_SYSNAME``; the options may stand before or after the subcommand.
Every action is a message from the command's own process, so it is
authorized on the broker login of the URL and audited where it runs, exactly
as the same action from the shell.

A new container learns the others from the heartbeats they send at once in
answer to its start: ``nodes``, ``ps`` (of every node), ``ping`` (of every
node) and ``jobs`` wait ``--wait`` seconds (default 1.0) for those answers
before asking. The other subcommands need no list of containers and start no
agent (the system does not see the command come and go).

Output: aligned tables on a terminal (plain lines otherwise), ``--json`` one
JSON object on stdout (``audit --follow --json``: one JSON line per record).
Errors go to stderr as ``Error: ...`` lines.

Exit codes, as ``ion-deploy``'s: 0 done, 1 failed (refused, not found, a
failed job...), 2 usage, 69 the broker cannot be reached (or refused the
login).

Shell completion (argcomplete): ``eval "$(register-python-argcomplete ion)"``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ion.services.deploy.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Output,
    UsageProblem,
    parse_duration,
    whole_number,
)

__all__ = ["main", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_UNAVAILABLE", "DEFAULT_WAIT", "DEFAULT_TIMEOUT",
           "DEFAULT_AUDIT_FILE", "ENV_BROKER_URL", "ENV_SYSNAME"]

#: Seconds to wait for the other containers' answers to the command container's start.
DEFAULT_WAIT = 1.0
#: Seconds each call waits for its answer.
DEFAULT_TIMEOUT = 10.0
#: ``ion audit`` reads this file unless ``--file`` names another (``twistd -n cc``'s default).
DEFAULT_AUDIT_FILE = "ion-audit.jsonl"
#: Seconds between two ``job_status`` polls of ``ion job ID --follow``.
JOB_POLL = 1.0
ENV_BROKER_URL = "ION_BROKER_URL"
ENV_SYSNAME = "ION_SYSNAME"

#: Subcommands that need the list of live containers (an agent in the command's container).
_NEEDS_NODES = {"nodes", "ps", "jobs", "console", "app"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own errors: our format and exit code
        raise UsageProblem([message])


def _common() -> argparse.ArgumentParser:
    """The options every subcommand takes, before or after its name (no defaults: see :func:`_defaults`)."""
    p = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    p.add_argument("--broker", metavar="URL", help=f"the system's broker (amqp://user:password@host/vhost), or a "
                                                   f"comma list of the nodes of its cluster; default ${ENV_BROKER_URL}")
    p.add_argument("-s", "--sysname", metavar="NAME", help=f"the system name the containers were started with "
                                                          f"(twistd cc -s NAME); default ${ENV_SYSNAME}")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout, nothing else there")
    p.add_argument("--timeout", metavar="SECONDS", help=f"how long each call waits for its answer "
                                                        f"(default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--wait", metavar="SECONDS", help=f"settle time: how long to wait for the containers to "
                                                     f"answer this one's start (default {DEFAULT_WAIT:g})")
    p.add_argument("-d", "--debug", action="store_true", help="show tracebacks and debug log lines")
    return p


def _parser() -> argparse.ArgumentParser:
    common = _common()
    p = _Parser(prog="ion", parents=[common],
                description="Look at and change a running ION system: its containers, processes, services, "
                            "deploy jobs and audit trail.",
                epilog="Exit status: 0 done, 1 failed, 2 usage, 69 broker unreachable. Completion: "
                       'eval "$(register-python-argcomplete ion)".')
    sub: Any = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help, description=help)

    c = command("ping", "ping a service or a pid; without one, every container's agent")
    c.add_argument("target", nargs="?", metavar="SERVICE", help="a service name or a pid")
    command("nodes", "the live containers of the system")
    c = command("ps", "the processes of every container, or of one")
    c.add_argument("--node", metavar="N", help="only this container (its id or a unique prefix)")
    c = command("call", "call an op of a service or a pid; prints the reply")
    c.add_argument("target", metavar="SERVICE", help="a service name or a pid")
    c.add_argument("op", metavar="OP")
    c.add_argument("content", nargs="?", metavar="JSON", help="the request's content, as JSON (default null)")
    c = command("kill", "terminate a process (operators only; audited)")
    c.add_argument("pid", metavar="PID")
    command("jobs", "the deploy jobs of every Deploy service instance")
    c = command("job", "one deploy job's status")
    c.add_argument("job", metavar="ID")
    c.add_argument("--follow", action="store_true", help="print its progress until it ends")
    c = command("cancel", "cancel a running deploy job (operators only; audited)")
    c.add_argument("job", metavar="ID")
    c = command("app", "start or stop an app in a container (operators only; audited)")
    c.add_argument("action", choices=("start", "stop"))
    c.add_argument("app", metavar="APP", help="the app's name (from the container's app folders)")
    c.add_argument("--node", metavar="N", help="the container (its id or a unique prefix); default: the only one")
    c = command("cache", "the shared cache: verify, reap or prune it now (operators only; audited)")
    c.add_argument("action", choices=("verify", "reap", "prune"))
    c.add_argument("--older-than", metavar="D", help="prune: entries unused for this long (90s, 30m, 12h, 7d, 2w)")
    c.add_argument("--keep", metavar="N", help="prune: keep the N most recently used versions of each dependency")
    c = command("audit", "the audit trail: a file's records, or the system's live (--follow)")
    c.add_argument("--file", metavar="FILE", help=f"the audit file (default ./{DEFAULT_AUDIT_FILE})")
    c.add_argument("--follow", action="store_true",
                   help="print the system's control.* events as they come, until Ctrl-C (needs --broker)")
    c = command("console", "where the system's web consoles are (--open: open the first in a browser)")
    c.add_argument("--http-url", metavar="URL", help="a console's URL, when not asking the system (no --broker)")
    c.add_argument("--open", action="store_true", help="open the (first) console in the web browser")
    return p


def _number(value: Any, flag: str, default: float, problems: list[str]) -> float:
    if value is None:
        return default
    try:
        n = float(value)
    except ValueError:
        problems.append(f"{flag} takes a number of seconds, not {value!r}")
        return default
    if n < 0:
        problems.append(f"{flag} cannot be negative")
        return default
    return n


def _check(args: argparse.Namespace) -> None:
    """Fill the common options' defaults and check what goes together; :class:`UsageProblem` if not."""
    problems: list[str] = []
    args.broker = getattr(args, "broker", None) or os.environ.get(ENV_BROKER_URL) or None
    args.sysname = getattr(args, "sysname", None) or os.environ.get(ENV_SYSNAME) or None
    args.json = bool(getattr(args, "json", False))
    args.debug = bool(getattr(args, "debug", False))
    args.timeout = _number(getattr(args, "timeout", None), "--timeout", DEFAULT_TIMEOUT, problems)
    args.wait = _number(getattr(args, "wait", None), "--wait", DEFAULT_WAIT, problems)
    if args.timeout == 0:
        problems.append("--timeout must be more than 0")
    if not args.command:
        problems.append("give a command: ping, nodes, ps, call, kill, jobs, job, cancel, app, cache, audit or "
                        "console; --help for help")
        raise UsageProblem(problems)
    needs_broker = args.command not in ("audit", "console") or (args.command == "audit" and args.follow)
    if args.command == "console" and args.broker and not args.http_url:
        needs_broker = True
    if args.command == "cache":
        if args.action != "prune" and (args.older_than is not None or args.keep is not None):
            problems.append("cache: --older-than and --keep go with prune")
        if args.action == "prune" and args.older_than is None and args.keep is None:
            problems.append("cache prune: give --older-than D or --keep N (or both)")
        if args.older_than is not None:
            try:
                args.older_than = parse_duration(args.older_than)
            except ValueError as exc:
                problems.append(f"--older-than: {exc}")
        args.keep = whole_number(args.keep, "--keep", 0, problems)
    if args.command == "audit" and args.follow and args.file:
        problems.append("audit: --file reads a file, --follow the live system: give one")
    if needs_broker:
        if not args.broker:
            problems.append(f"{args.command} needs --broker URL (or ${ENV_BROKER_URL}): the running system's broker")
        elif args.broker.strip().lower().startswith("memory:"):
            problems.append("--broker memory:// would be this command's own embedded broker, with no system on it")
        if args.broker and not args.sysname:
            problems.append(f"--broker needs -s/--sysname (or ${ENV_SYSNAME}): the system name the running "
                            "containers were started with (twistd cc -s NAME)")
    if args.command == "call":
        try:
            args.content = None if args.content is None else json.loads(args.content)
        except json.JSONDecodeError as exc:
            problems.append(f"call: JSON is not valid JSON ({exc}): {args.content!r}")
    if problems:
        raise UsageProblem(problems)


# -- output -------------------------------------------------------------------------------------------------
def plain(value: Any) -> Any:
    """``value`` as JSON can hold it: protobuf messages as dicts, bytes as text, tuples as lists."""
    if hasattr(value, "DESCRIPTOR") and hasattr(value, "ListFields"):
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(value, preserving_proto_field_name=True)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _table(out: Output, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], empty: str) -> None:
    from ion.core.shell import Listing

    out.line(repr(Listing(rows, columns, empty)))


def _when(rows: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    """Rows with their epoch-seconds fields as :class:`~ion.core.shell.When` (for the table only)."""
    from ion.core.shell import When

    return [{**row, **{k: When(row[k]) for k in keys if isinstance(row.get(k), (int, float))}} for row in rows]


def _record_line(record: Mapping[str, Any]) -> str:
    """One audit record on one line: ``time user action target: result code [error]``."""
    error = f" ({record['error']})" if record.get("error") else ""
    return (f"{record.get('time', '-')}  {record.get('user')!s:<10} {record.get('action', '-')} on "
            f"{record.get('target', '-')} in {record.get('container', '-')}: {record.get('result', '-')} "
            f"{record.get('code', '-')}{error}")


# -- the subcommands ---------------------------------------------------------------------------------------------
class Run:
    """One run of a subcommand against a started container: ``control`` is its control API."""

    def __init__(self, args: argparse.Namespace, out: Output, result: dict[str, Any], control: Any) -> None:
        self.args, self.out, self.result, self.control = args, out, result, control

    async def nodes(self) -> int:
        rows = await self.control.discover(self.args.wait)
        self.result["nodes"] = rows
        _table(self.out, _when(rows, "started_at"), ["container", "pids", "started_at", "agent"], "(no containers)")
        return EXIT_OK

    async def console(self) -> int:
        """The consoles the system's containers announce."""
        nodes = await self.control.discover(self.args.wait)
        rows = [{"container": n["container"], "console": n["console"]} for n in nodes if n.get("console")]
        return _show_consoles(self.args, self.out, self.result, rows)

    async def ps(self) -> int:
        if self.args.node is None:
            await self.control.discover(self.args.wait)
        rows = await self.control.ps(self.args.node)
        self.result["processes"] = rows
        columns = ["container", "pid", "name", "class", "state", "parent"]
        errors = [row for row in rows if row.get("error")]
        if errors:
            columns.append("error")
        _table(self.out, rows, columns, "(no processes)")
        return EXIT_FAILED if errors else EXIT_OK

    async def ping(self) -> int:
        clock = self.control.proc.clock
        if self.args.target:
            start = clock.seconds()
            pong = await self.control.ping(self.args.target, timeout=self.args.timeout)
            pong["ms"] = round((clock.seconds() - start) * 1000, 1)
            self.result["pong"] = pong
            self.out.line(f"{pong.get('name')} {pong.get('pid')}: {pong.get('state')} ({pong['ms']:.1f} ms)")
            return EXIT_OK
        from twisted.internet import defer

        from ion.core.control import ControlError

        nodes = await self.control.discover(self.args.wait)

        async def one(node: Mapping[str, Any]) -> dict[str, Any]:
            start = clock.seconds()
            row: dict[str, Any] = {"container": node["container"], "agent": node.get("agent")}
            try:
                pong = await self.control.ping(str(node["agent"]), timeout=self.args.timeout)
                row.update(pid=pong.get("pid"), state=pong.get("state"),
                           ms=round((clock.seconds() - start) * 1000, 1), error=None)
            except Exception as exc:  # noqa: BLE001 - reported per container
                row.update(pid=None, state=None, ms=None, error=_error_text(exc))
            return row

        rows = list(await defer.gatherResults([defer.ensureDeferred(one(n)) for n in nodes], consumeErrors=True))
        self.result["pongs"] = rows
        _table(self.out, rows, ["container", "pid", "state", "ms", "error"], "(no containers)")
        if not rows:
            raise ControlError(f"no container of system {self.args.sysname} answered within {self.args.wait:g} s "
                               f"(--wait)")
        return EXIT_FAILED if any(r["error"] for r in rows) else EXIT_OK

    async def call(self) -> int:
        content = await self.control.call(self.args.target, self.args.op, self.args.content,
                                          timeout=self.args.timeout)
        self.result["result"] = plain(content)
        self.out.line(json.dumps(self.result["result"], indent=2, ensure_ascii=False, default=str))
        return EXIT_OK

    async def kill(self) -> int:
        done = await self.control.kill(self.args.pid)
        self.result["killed"] = done
        self.out.line(f"terminated {done['pid']}" if done["done"] else f"terminating {done['pid']}")
        return EXIT_OK

    async def cancel(self) -> int:
        answer = plain(await self.control.cancel_job(self.args.job))
        self.result["cancel"] = answer
        self.out.line(f"job {answer.get('job')}: " + ("cancelled" if answer.get("cancelled") else "not running"
                                                      + (f" ({answer['error']})" if answer.get("error") else "")))
        return EXIT_OK if answer.get("cancelled") else EXIT_FAILED

    async def app(self) -> int:
        from ion.core.control import ControlError

        node = self.args.node
        if node is None:
            nodes = [n["container"] for n in await self.control.discover(self.args.wait)]
            if len(nodes) != 1:
                raise ControlError(f"name the container with --node: the system has {len(nodes)} "
                                   f"({', '.join(nodes) or 'none'})")
            node = nodes[0]
        act = self.control.start_app if self.args.action == "start" else self.control.stop_app
        answer = plain(await act(self.args.app, node=node))
        self.result["app"] = answer
        verb = {"start": ("started", "already running"), "stop": ("stopped", "stopped")}[self.args.action]
        done = answer.get("started", answer.get("stopped"))
        self.out.line(f"app {answer.get('app')} in {answer.get('container')}: {verb[0] if done else verb[1]}")
        return EXIT_OK

    async def cache(self) -> int:
        action = self.args.action
        if action == "verify":
            report = plain(await self.control.verify_cache(timeout=max(self.args.timeout, 3600.0)))
            outcomes = report.get("outcomes") or []
            bad = [o for o in outcomes if o.get("state") == "bad"]
            self.out.line(f"verified {len(outcomes)} entries: {len(outcomes) - len(bad)} good, {len(bad)} bad")
        elif action == "reap":
            report = plain(await self.control.reap_cache(timeout=max(self.args.timeout, 3600.0)))
            removed = (report.get("pruned") or {}).get("removed") or []
            self.out.line(f"reaped by {report.get('reaper')}: {len(removed)} of {report.get('entries')} entries "
                          f"removed")
        else:
            report = plain(await self.control.prune_cache(self.args.older_than, self.args.keep,
                                                          timeout=max(self.args.timeout, 600.0)))
            self.out.line(f"pruned: {len(report.get('removed') or [])} entries removed, "
                          f"{len(report.get('busy') or [])} in use left")
        self.result["cache"] = report
        return EXIT_OK

    async def jobs(self) -> int:
        from ion.core.control import ControlError
        from ion.core.exceptions import ReceivedError
        from ion.services.deploy.service import DeployClient

        await self.control.discover(self.args.wait)
        instances = [row["pid"] for row in await self.control.ps() if row.get("class") == "DeployService"]
        proc = self.control.proc
        rows: list[dict[str, Any]] = []
        for pid in instances or [None]:
            try:
                jobs = plain(await DeployClient(proc, pid).jobs()) or []
            except ReceivedError as exc:
                if pid is None and exc.response_code == 404:
                    raise ControlError(f"no Deploy service runs in system {self.args.sysname}") from None
                raise
            rows.extend({"instance": pid or "deploy", **job} for job in jobs)
        self.result["jobs"] = rows
        _table(self.out, _when(rows, "created", "ended"), ["job", "state", "total", "created", "ended", "error"],
               "(no jobs)")
        return EXIT_OK

    async def job(self) -> int:
        from twisted.internet import task

        from ion.core.jobs import JobStatus
        from ion.services.deploy.service import DeployClient

        client = DeployClient(self.control.proc)
        shown: set[str] = set()
        last_state = None
        while True:
            record = plain(await client.job_status(self.args.job))
            self.result["job"] = record
            running = record.get("status") in (JobStatus.RUNNING, JobStatus.PARTIAL)
            if self.args.follow:
                results = record.get("results") or {}
                for part in sorted(set(results) - shown):
                    shown.add(part)
                    self.out.line(f"{part}: {_part_state(results[part])}")
                if record.get("state") != last_state:
                    last_state = record.get("state")
                    self.out.line(_job_line(record))
            if not (self.args.follow and running):
                break
            await task.deferLater(self.control.proc.clock, JOB_POLL, lambda: None)
        if not self.args.follow:
            self.out.line(_job_line(record))
            for part, outcome in sorted((record.get("results") or {}).items()):
                self.out.line(f"  {part}: {_part_state(outcome)}")
        failed = record.get("status") in (JobStatus.LOST_IN_SPACE, JobStatus.REMOTE_ERROR) or any(
            _part_state(r) == "failed" for r in (record.get("results") or {}).values())
        return EXIT_FAILED if failed else EXIT_OK

    async def audit(self) -> int:
        from twisted.internet import defer

        def show(record: dict[str, Any]) -> None:
            if self.args.json:
                print(json.dumps(plain(record), ensure_ascii=False, default=str), file=self.out.stdout, flush=True)
            else:
                self.out.line(_record_line(record))

        self.result["streamed"] = True
        listener = await self.control.follow_audit(show)
        if not self.args.json:
            print(f"Following the audit trail of system {self.args.sysname} (Ctrl-C to stop)", file=self.out.stderr,
                  flush=True)
        try:
            await defer.Deferred()  # until cancelled (Ctrl-C, SIGTERM)
        finally:
            await self.control.container.proc_manager.terminate_process(listener.id)
        return EXIT_OK


def _part_state(outcome: Any) -> str:
    return str(outcome.get("state") or "-") if isinstance(outcome, Mapping) else str(outcome)


def _job_line(record: Mapping[str, Any]) -> str:
    done = len(record.get("results") or {})
    total = record.get("total")
    parts = f", {done} of {total} parts done" if total is not None else f", {done} parts done"
    error = f": {record['error']}" if record.get("error") else ""
    takeovers = [t for t in record.get("takeovers") or () if isinstance(t, Mapping)]
    if takeovers:  # the containers that died running it, and the one running it now
        last = takeovers[-1]
        parts += (f", taken over {len(takeovers)} time(s), last from container "
                  f"{(last.get('from') or {}).get('container')} by {(last.get('by') or {}).get('container')}")
    return f"job {record.get('job')}: {record.get('state')}{parts}{error}"


def _error_text(exc: BaseException) -> str:
    from ion.core.exceptions import IonError

    text = str(exc) if isinstance(exc, IonError) and str(exc) else f"{type(exc).__name__}: {exc}"
    lines = text.strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _read_audit(args: argparse.Namespace, out: Output, result: dict[str, Any]) -> int:
    """``ion audit``: the records of an audit file (JSON lines), oldest first."""
    path = Path(args.file or DEFAULT_AUDIT_FILE).expanduser()
    result["file"] = str(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise UsageProblem([f"no audit file {path} (--file; twistd cc writes one beside its log, or to "
                            f"./{DEFAULT_AUDIT_FILE} in the foreground)"]) from None
    except OSError as exc:
        out.error(f"cannot read {path}: {exc.strerror or exc}")
        result["errors"] = [f"cannot read {path}"]
        return EXIT_FAILED
    records, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    result["records"] = records
    if bad:
        out.warning(f"{path}: {bad} lines that are not audit records were skipped")
        result["skipped"] = bad
    _table(out, records, ["time", "user", "action", "target", "container", "result", "code", "error"],
           f"(no records in {path})")
    return EXIT_OK


def _console(args: argparse.Namespace, out: Output, result: dict[str, Any]) -> int:
    """``ion console`` without ``--broker``: the console of the container this folder's config opens
    (its ``ion.core.http: port``), or ``--http-url``."""
    url = args.http_url
    if not url:
        from ion.core.config import Config
        from ion.core.http import HttpSettings

        try:
            port = Config.load().settings(HttpSettings).port
        except Exception:  # noqa: BLE001 - a broken config: no URL known
            port = None
        url = f"http://127.0.0.1:{port}/" if port else None
    if not url:
        message = ("no console known: give --broker URL -s NAME (the system's containers say where theirs are), "
                   "or --http-url URL; a container serves one when started with --http PORT")
        out.error(message)
        result["errors"] = [message]
        return EXIT_FAILED
    return _show_consoles(args, out, result, [{"container": None, "console": url}])


def _show_consoles(args: argparse.Namespace, out: Output, result: dict[str, Any],
                   rows: list[dict[str, Any]]) -> int:
    result["consoles"] = rows
    _table(out, rows, ["container", "console"], "(no container of the system serves a console: start one with "
                                                "twistd cc --http PORT)")
    if not rows:
        return EXIT_FAILED
    if args.open:
        import webbrowser

        webbrowser.open(rows[0]["console"])
    return EXIT_OK


def _start_logging(out: Output, debug: bool) -> None:
    """Log lines to stderr: every one from debug level with ``--debug``, else errors only (one line
    each). What went wrong with the run is its own ``Error:`` line; the command container's
    lifecycle warnings (its start failing on an unreachable broker) would only repeat it."""
    from twisted.logger import LogLevel

    from ion.core.container import Container
    from ion.services.deploy.cli import start_logging

    def failed_start(event: dict[str, Any]) -> bool:
        return isinstance(event.get("obj"), Container) and "entered ERROR" in str(event.get("log_format"))

    start_logging(out, debug, least=LogLevel.error, skip=failed_start,
                  line=lambda text: print(f"Log: {text}", file=out.stderr, flush=True))


def _container_config(needs_agent: bool) -> Any:
    """The command container's config: the shipped and local config, without an HTTP port or an audit file of
    its own (it is a client), with an agent only when the subcommand needs the list of containers."""
    from ion.core.config import Config

    return Config.load(command_line={"ion.core.container": {"agent": needs_agent},
                                     "ion.core.http": {"port": None}, "ion.core.audit": {"path": None}})


async def _run(reactor: Any, args: argparse.Namespace, out: Output, result: dict[str, Any]) -> int:
    from ion.core.container import Container, default_container_id
    from ion.core.control import SystemControl
    from ion.core.process import Process

    needs_agent = args.command in _NEEDS_NODES or (args.command == "ping" and not args.target)
    from ion.core.messaging.transport import redacted_url, split_broker_urls

    brokers = split_broker_urls(args.broker)
    container = Container(config=_container_config(needs_agent), broker_url=brokers, sysname=args.sysname,
                          contid=f"ion-{default_container_id()}", reactor=reactor)
    result["broker"] = ",".join(redacted_url(url) for url in brokers)
    result["sysname"] = args.sysname
    await container.start()  # TransportError when the broker cannot be reached: exit 69
    try:
        pid = await container.spawn(Process, name="ion")
        proc = container.proc_manager.get(pid)
        assert proc is not None
        control = SystemControl(proc, client=True, timeout=args.timeout, caller="the ion command")
        run = Run(args, out, result, control)
        handler: Callable[[], Any] = getattr(run, args.command)
        return int(await handler())
    finally:
        await container.terminate()


def main(argv: Sequence[str] | None = None, *, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """Run ``ion``; returns the exit status (see the module notes)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    arguments = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in arguments
    out = Output(stdout, stderr, as_json=as_json)
    result: dict[str, Any] = {"ok": False}

    def finish(code: int) -> int:
        result["ok"] = code == EXIT_OK
        if as_json and not result.pop("streamed", False):
            print(json.dumps(plain(result), indent=2, ensure_ascii=False, default=str), file=stdout, flush=True)
        return code

    parser = _parser()
    try:
        import argcomplete
    except ImportError:  # pragma: no cover - declared, but completion is a convenience
        pass
    else:
        argcomplete.autocomplete(parser)
    try:
        args = parser.parse_args(arguments)
        _check(args)
        result["command"] = args.command
    except UsageProblem as exc:
        for problem in exc.problems:
            out.error(problem)
        result["errors"] = list(exc.problems)
        return finish(EXIT_USAGE)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)

    if args.command == "console" and not (args.broker and not args.http_url):
        return finish(_console(args, out, result))
    if args.command == "audit" and not args.follow:
        try:
            return finish(_read_audit(args, out, result))
        except UsageProblem as exc:
            for problem in exc.problems:
                out.error(problem)
            result["errors"] = list(exc.problems)
            return finish(EXIT_FAILED)

    _start_logging(out, args.debug)
    code = [EXIT_FAILED]
    from twisted.internet import defer, task

    from ion.core.exceptions import TransportError

    async def run(reactor: Any) -> None:
        from ion.services.deploy.cli import run_until_stopped

        try:
            # Ctrl-C or SIGTERM cancels the run and lets it leave cleanly (its container terminated).
            code[0] = await run_until_stopped(reactor, _run(reactor, args, out, result))
        except defer.CancelledError:
            # Following (audit --follow, job --follow) ends this way; anything else was interrupted.
            following = getattr(args, "follow", False)
            code[0] = EXIT_OK if following and args.command == "audit" else EXIT_FAILED
            if code[0] != EXIT_OK:
                out.error("interrupted")
                result["errors"] = ["interrupted"]
        except TransportError as exc:  # the broker cannot be reached, or refused the login
            text = _error_text(exc)
            out.error(text)
            result["errors"] = [text]
            code[0] = EXIT_UNAVAILABLE
        except Exception as exc:
            if args.debug:
                import traceback

                traceback.print_exc(file=stderr)
            text = _error_text(exc)
            out.error(text)
            result["errors"] = [text]
            response_code = getattr(exc, "response_code", None)
            if isinstance(response_code, int):
                result["code"] = response_code
            code[0] = EXIT_FAILED

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit:
        pass
    return finish(code[0])


if __name__ == "__main__":
    sys.exit(main())
