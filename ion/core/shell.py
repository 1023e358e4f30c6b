# -*- test-case-name: tests.core.test_shell -*-
"""The interactive ``cc`` shell: a Twisted Conch manhole on stdio (DESIGN §7).

Three layers, each usable without the next:

- :class:`ShellHelpers` — the helper functions (``ps()``, ``rpc_send()``,
  ``spawn()``, ...) bound to one container and to a process of the shell's
  own (named ``shell``) that every call goes out from. Tests use it directly.
- :class:`ShellManhole` — a :class:`~twisted.conch.manhole.ColoredManhole`
  with the ``><> `` prompt, input history (kept in a file between sessions),
  tab completion, and lines that *wait*: each line runs as a coroutine in
  which every call that gives a Deferred (or a coroutine) is awaited, so
  ``p = spawn('hello')`` makes ``p`` the pid and ``[rpc_send(...) for ...]``
  a list of replies, while the reactor keeps running. The prompt comes back
  when the line is done; keys typed meanwhile are kept for it; Ctrl-C cancels
  the line. Errors print as one ``Error: ...`` line.
- :class:`StdioShell` — puts the terminal in raw mode and runs the manhole
  on :class:`~twisted.internet.stdio.StandardIO` (on descriptors of its own
  on the terminal, even when stdout is a pipe: ``twistd -n cc | tee log``);
  the container's log lines are written above the prompt, which is redrawn.
  Ctrl-D leaves and calls ``on_exit`` (the ``twistd cc`` service stops the
  container and the reactor).
"""

from __future__ import annotations

import ast
import inspect
import os
import pydoc
import re
import rlcompleter
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.conch import manhole
from twisted.conch.insults import insults
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.core.control import SystemControl
from ion.core.exceptions import IonError
from ion.core.process import Process
from ion.core.service import ServiceProcess
from ion.core.trace import in_flight

__all__ = [
    "Listing",
    "Text",
    "Size",
    "When",
    "ShellHelpers",
    "ShellManhole",
    "ShellInterpreter",
    "StdioShell",
    "make_namespace",
    "default_history_path",
    "completions",
]

_log = Logger()

PROMPTS = (b"><> ", b"... ")
HISTORY_ENV = "ION_SHELL_HISTORY"
HISTORY_LINES = 500


def default_history_path() -> Path | None:
    """``$ION_SHELL_HISTORY`` (empty: no history file), else ``~/.ion_cc_history``."""
    value = os.environ.get(HISTORY_ENV)
    if value is not None:
        return Path(value) if value else None
    try:
        return Path.home() / ".ion_cc_history"
    except RuntimeError:
        return None


# -- what the helpers return ------------------------------------------------------------------
class Text(str):
    """A string the shell prints as is (no quotes)."""

    def __repr__(self) -> str:
        return str(self)


class Listing(list[dict[str, Any]]):
    """Rows (dicts) that the shell prints as an aligned table; still a list of dicts."""

    def __init__(self, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 empty: str = "(none)") -> None:
        super().__init__(dict(row) for row in rows)
        self.columns = list(columns) if columns is not None else (list(self[0]) if self else [])
        self.empty = empty

    def __repr__(self) -> str:
        if not self:
            return self.empty
        cells = [[str(c) for c in self.columns]]
        for row in self:
            cells.append([_cell(row.get(c)) for c in self.columns])
        widths = [max(len(line[i]) for line in cells) for i in range(len(self.columns))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in cells]
        return "\n".join(lines)


class Size(int):
    """A number of bytes that prints in human units (``12.3 MiB``); still an ``int``."""

    def __str__(self) -> str:
        return human_size(int(self))

    __repr__ = __str__


def human_size(n: float) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 KiB``, ``12.3 MiB``, ``2.0 GiB``."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024.0
        if abs(n) < 1024 or unit == "PiB":
            break
    return f"{n:.1f} {unit}"


class When(float):
    """A time (epoch seconds) that prints as local ISO time and its age:
    ``2026-12-06 03:50:12 (5 min ago)``; still a ``float``."""

    def __str__(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(self)))
        return f"{stamp} ({age(time.time() - float(self))})"

    __repr__ = __str__


def age(seconds: float) -> str:
    """How long ago, roughly: ``12 s ago``, ``5 min ago``, ``3 h ago``, ``2 d ago`` (``in 4 s`` ahead)."""
    ahead = seconds < 0
    seconds = abs(seconds)
    if seconds < 90:
        text = f"{int(seconds)} s"
    elif seconds < 90 * 60:
        text = f"{int(seconds // 60)} min"
    elif seconds < 36 * 3600:
        text = f"{int(seconds // 3600)} h"
    else:
        text = f"{int(seconds // 86400)} d"
    return f"in {text}" if ahead else f"{text} ago"


def _cell(value: Any) -> str:
    if isinstance(value, (Size, When)):
        return str(value)
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


# -- the helpers ---------------------------------------------------------------------------------
class ShellHelpers:
    """The shell's helper functions, bound to ``container`` and the shell's process ``proc``.

    Helpers that talk to other processes return Deferreds; what they fire
    with is what the shell prints. Use :meth:`create` to spawn the shell
    process and :meth:`namespace` for the names the shell offers.
    """

    #: The helpers the shell offers, in the order ``info()`` lists them.
    HELPERS = ("ps", "ms", "svc", "convs", "trace", "spawn", "send", "rpc_send", "kill", "ping", "nodes", "apps",
               "start_app", "stop_app", "info", "help")

    #: Config section naming modules with more helpers (``helpers: ["ion.services.deploy.shellhelpers"]``).
    CONFIG_SECTION = "ion.core.shell"

    def __init__(self, container: Any, proc: Process) -> None:
        self.container = container
        self.proc = proc
        #: The one control API (:mod:`ion.core.control`): every helper that looks at other
        #: containers or changes the system goes through it, as the ``ion`` command does.
        self.control = SystemControl(proc, caller="the shell")
        self._extra: dict[str, Any] | None = None

    def extra_helpers(self) -> dict[str, Any]:
        """Helpers of the provider modules named in config (``ion.core.shell``: ``helpers``).

        Each module has ``shell_helpers(shell) -> {name: function}``; the core imports
        no service, the config names them. A provider that fails to load is logged and skipped.
        """
        if self._extra is None:
            self._extra = {}
            config: Any = getattr(self.container, "config", None)
            modules = config.get(self.CONFIG_SECTION, "helpers", []) if hasattr(config, "for_module") else []
            for module in modules or []:
                try:
                    import importlib

                    provided = importlib.import_module(str(module)).shell_helpers(self)
                    self._extra.update({str(k): v for k, v in dict(provided).items() if k not in self.HELPERS})
                except Exception as exc:
                    _log.warn("shell helpers of {module} not loaded: {error}", module=module, error=error_line(exc))
        return self._extra

    @classmethod
    @defer.inlineCallbacks
    def create(cls, container: Any, name: str = "shell") -> Any:
        """Spawn the shell's own process in ``container``; fires with the helpers."""
        pid = yield container.spawn(Process, name=name)
        return cls(container, container.proc_manager.get(pid))

    def namespace(self) -> dict[str, Any]:
        """The names the shell offers: every helper, plus ``container``, ``shell`` and Twisted's
        ``defer`` (``defer.gatherResults([...])`` runs calls together)."""
        ns: dict[str, Any] = {name: getattr(self, name) for name in self.HELPERS}
        ns.update(self.extra_helpers())
        ns.update(container=self.container, shell=self, sysname=self.container.sysname, defer=defer)
        return ns

    # -- this container ---------------------------------------------------------------------
    def ps(self, node: str | None = None) -> Any:
        """The processes of this container: pid, name, class, state; ``ps(node)``: of container
        ``node`` (an id or a unique prefix), ``ps('*')``: of every container (fires with the listing)."""
        if node is not None:
            return defer.ensureDeferred(self._remote_ps(None if node == "*" else node))
        rows = [{"pid": p.id, "name": p.proc_name, "class": type(p).__name__, "state": p.state.value,
                 "parent": p.parent.id if p.parent is not None else None}
                for p in list(self.container.proc_manager.processes.values())]
        return Listing(rows, ["pid", "name", "class", "state", "parent"], "(no processes)")

    async def _remote_ps(self, node: str | None) -> Listing:
        rows = await self.control.ps(node)
        columns = ["container", "pid", "name", "class", "state", "parent"]
        if any(row.get("error") for row in rows):
            columns.append("error")
        return Listing(rows, columns, "(no processes)")

    def ms(self) -> Listing:
        """Messaging names of this container: its exchanges and every queue its processes consume."""
        c = self.container
        rows: list[dict[str, Any]] = [
            {"kind": "exchange", "name": c.exchange_name, "exchange": "-", "bindings": "-",
             "pid": None, "process": "system (topic)"},
            {"kind": "exchange", "name": c.events_exchange, "exchange": "-", "bindings": "-",
             "pid": None, "process": "events (topic)"},
        ]
        for proc in list(c.proc_manager.processes.values()):
            for r in proc.receivers:
                rows.append({"kind": "queue", "name": r.name, "exchange": r.exchange or c.exchange_name,
                             "bindings": list(getattr(r, "bindings", [r.name])), "pid": proc.id,
                             "process": proc.proc_name})
        return Listing(rows, ["kind", "name", "exchange", "bindings", "pid", "process"])

    def svc(self) -> Listing:
        """The services running in this container: service name, version, pid, shared queue."""
        rows = [{"service": type(p).service_name, "version": type(p).version, "pid": p.id,
                 "queue": p.service_queue, "state": p.state.value}
                for p in list(self.container.proc_manager.processes.values()) if isinstance(p, ServiceProcess)]
        return Listing(rows, ["service", "version", "pid", "queue", "state"], "(no services)")

    def apps(self) -> Listing:
        """The apps running in this container, in start order, with their processes."""
        rows = []
        for name, running in self.container.app_manager.running.items():
            pids = getattr(running.state, "pids", None)
            rows.append({"app": name, "version": running.definition.version,
                         "pids": list(pids) if pids is not None else None,
                         "description": running.definition.description})
        return Listing(rows, ["app", "version", "pids", "description"], "(no apps)")

    def convs(self) -> Listing:
        """The conversations in flight of this container's processes, oldest first, as the web console
        shows them: conv id, role (initiator or responder), initiator, peer, op, protocol, state,
        age (seconds), trace id."""
        rows = sorted(in_flight(self.container), key=lambda r: -r["age"])
        return Listing(rows, _CONV_COLUMNS, "(no conversations in flight)")

    def trace(self, conv_or_trace_id: str) -> Listing:
        """What *this container* knows of a trace, given a conversation id (``<pid>#<n>``) or a
        trace id (32 hex): its conversations in flight here and those that ended here lately (the
        container keeps the last few hundred), oldest first. Other containers' parts of the same
        trace are not shown: ask their shells, or look the trace id up in the span exporter's
        backend (``ion.core.trace: otlp_endpoint``) or in their log lines (``trace=<id>``)."""
        key = str(conv_or_trace_id).strip()
        live = list(in_flight(self.container))
        ended = list(self.container.recent_conversations)
        trace_id = key.lower() if _TRACE_ID.fullmatch(key.lower()) else None
        if trace_id is None:
            found = [r["trace"] for r in live if r["conv"] == key] + [e.trace for e in ended if e.conv == key]
            trace_id = next((t for t in found if t), None)
            if trace_id is None:
                return Listing([], _TRACE_COLUMNS, f"(no conversation {key} known to this container)")
        now = time.time()
        rows = [{**r, "started": When(now - r["age"]), "in flight": True} for r in live if r["trace"] == trace_id]
        rows += [{"conv": e.conv, "role": e.role, "initiator": e.pid if e.role == "initiator" else e.peer,
                  "peer": e.peer if e.role == "initiator" else e.pid, "op": e.op, "protocol": e.protocol,
                  "state": e.state, "started": When(e.started), "in flight": False, "trace": e.trace}
                 for e in ended if e.trace == trace_id]
        rows.sort(key=lambda r: float(r["started"]))
        return Listing(rows, _TRACE_COLUMNS, f"(trace {trace_id}: nothing of it known to this container)")

    # -- processes anywhere in the system -------------------------------------------------------
    def spawn(self, name_or_module: str, node: str | None = None, spawnargs: Mapping[str, Any] | None = None,
              name: str | None = None) -> defer.Deferred[Any]:
        """Start a process (a dotted module, or a one-process app name) here or in container ``node``; fires with its pid."""
        return defer.ensureDeferred(self._spawn(name_or_module, node, spawnargs, name))

    async def _spawn(self, what: str, node: str | None, spawnargs: Mapping[str, Any] | None,
                     name: str | None) -> Any:
        return Text(await self.control.spawn(what, node=node, name=name, spawnargs=spawnargs))

    def kill(self, pid: str) -> defer.Deferred[Any]:
        """Terminate a process: one of this container (by pid or name), or another container's by pid."""
        return defer.ensureDeferred(self._kill(pid))

    async def _kill(self, pid: str) -> Any:
        done = await self.control.kill(pid)
        if done["done"]:
            return Text(f"terminated {done['pid']} ({done['name']})")
        return Text(f"terminating {done['pid']}")

    # -- messages -----------------------------------------------------------------------------------
    def send(self, to: str, op: str, content: Any = None) -> defer.Deferred[Any]:
        """Send a one-off message (no reply) to a pid or a service name."""
        d = self.proc.send(to, op, content)
        d.addCallback(lambda _: Text(f"sent {op!r} to {self.proc.resolve(to)}"))
        return d

    def rpc_send(self, to: str, op: str, content: Any = None, timeout: float | None = None) -> defer.Deferred[Any]:
        """Call ``op`` at a pid or service name; fires with the reply's content."""
        d = self.proc.rpc_send(to, op, content, timeout=timeout)
        d.addCallback(lambda reply: reply[0])
        return d

    def ping(self, service: str, timeout: float | None = None) -> defer.Deferred[Any]:
        """Ping a service or a pid: who answered, and its state."""
        return defer.ensureDeferred(self.control.ping(service, timeout=timeout))

    def nodes(self) -> defer.Deferred[Any]:
        """The live containers of this system (as this container's agent hears them)."""
        return defer.ensureDeferred(self._nodes())

    async def _nodes(self) -> Listing:
        content = await self.control.nodes()
        rows = [{**row, "started_at": When(row["started_at"])}
                if isinstance(row.get("started_at"), (int, float)) else row for row in content]
        return Listing(rows, ["container", "pids", "started_at", "agent"], "(no containers)")

    # -- apps -----------------------------------------------------------------------------------------
    def start_app(self, name_or_path: str, config: Mapping[str, Any] | None = None,
                  args: Mapping[str, Any] | None = None, mult: int = 1, node: str | None = None) -> defer.Deferred[Any]:
        """Start an app and its dependencies: a name from res/apps (here or in container ``node``, by
        its agent: audited), or a .app/.rel path here (with ``config``, ``args``, ``mult``)."""
        by_name = (str(name_or_path).replace("_", "").replace("-", "").isalnum() and config is None
                   and args is None and mult == 1 and self.control.agent(required=False) is not None)
        if node is not None or by_name:
            d = defer.ensureDeferred(self.control.start_app(str(name_or_path), node=node))
            d.addCallback(lambda a: Text(f"{'started' if a['started'] else 'already running:'} {a['app']}"
                                         + (f" in {a['container']}" if node is not None else "")))
            return d
        if str(name_or_path).endswith(".rel"):
            d = self.container.app_manager.start_rel(name_or_path)
            d.addCallback(lambda names: Text(f"started {', '.join(names)}"))
            return d
        d = self.container.app_manager.start_app(name_or_path, config=config, args=args, mult=mult)
        d.addCallback(lambda name: Text(f"started {name}"))
        return d

    def stop_app(self, name: str, node: str | None = None) -> defer.Deferred[Any]:
        """Stop a running app (its processes in reverse start order), here or in container ``node``
        (by its agent: audited)."""
        if node is None and self.control.agent(required=False) is None:  # a container without an agent
            local = self.container.app_manager.stop_app(name)
            local.addCallback(lambda _: Text(f"stopped {name}"))
            return local
        d = defer.ensureDeferred(self.control.stop_app(name, node=node))
        d.addCallback(lambda a: Text(f"stopped {a['app']}" + (f" in {a['container']}" if node is not None else "")))
        return d

    def help(self, *what: Any) -> Text:
        """help(x): the documentation of x, printed; help(): how to use this shell.

        Python's own ``help`` would open pydoc's pager (or its interactive prompt), which
        reads the terminal itself: with the terminal in raw mode and the reactor blocked in
        it, the whole container froze. This one only renders text and returns it.
        """
        if not what:
            return Text(HELP_TEXT)
        if len(what) > 1:
            raise TypeError(f"help() takes one thing to describe, not {len(what)}")
        (what,) = what
        if isinstance(what, str):
            return Text(_topic_help(what.strip()))
        try:
            return Text(pydoc.render_doc(what, "Help on %s:", renderer=_PLAIN).rstrip())
        except Exception as exc:  # noqa: BLE001 - an object pydoc cannot describe
            return Text(f"No documentation for {what!r}: {error_line(exc)}")

    def info(self) -> Text:
        """This list."""
        lines = [f"ION capability container {self.container.id}, system {self.container.sysname}; "
                 f"shell process {self.proc.id}", ""]
        for name, fn in [(n, getattr(self, n)) for n in self.HELPERS] + list(self.extra_helpers().items()):
            try:
                sig = inspect.signature(fn)
                sig = sig.replace(return_annotation=inspect.Signature.empty, parameters=[
                    p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()])
                signature = str(sig)
            except (TypeError, ValueError):  # pragma: no cover
                signature = "(...)"
            doc = (inspect.getdoc(fn) or "").splitlines()
            lines.append(f"  {name}{signature}")
            lines.append(f"      {doc[0] if doc else ''}")
        lines.append("")
        lines.append("A line waits for the calls in it (Ctrl-C cancels it); _ holds the last result. "
                     "Ctrl-D leaves.")
        return Text("\n".join(lines))


_CONV_COLUMNS = ["conv", "role", "initiator", "peer", "op", "protocol", "state", "age", "trace"]
_TRACE_COLUMNS = ["conv", "role", "initiator", "peer", "op", "protocol", "state", "started", "in flight", "trace"]
_TRACE_ID = re.compile(r"[0-9a-f]{32}")


HELP_TEXT = """\
This is the ><> shell of an ION capability container: Python, with helpers.

  info()            the helpers, one line each (ps, svc, spawn, rpc_send, kill, nodes, ...)
  help(x)           the documentation of x: help(rpc_send), help(container), help('for')
  p = spawn('hello')            a line waits for its calls: p is the pid
  rpc_send('hello', 'hello', 'you')

A line runs until the calls in it are answered; the container keeps working
meanwhile, and Ctrl-C cancels the line. _ holds the last result. Tab completes
names; Up and Down walk the history. Ctrl-D leaves the shell and stops the
container."""


def _topic_help(name: str) -> str:
    """help('x'): a keyword or topic of the Python docs, else the object ``x`` names (a module,
    ``os.path.join``), as text; never the interactive help or a pager."""
    if not name:
        return HELP_TEXT
    target = pydoc.Helper.topics.get(name, pydoc.Helper.keywords.get(name))
    for _ in range(5):  # a topic may name another topic (pydoc's own showtopic follows them)
        if not isinstance(target, str):
            break
        target = pydoc.Helper.topics.get(target, pydoc.Helper.keywords.get(target))
    if isinstance(target, tuple) and target:
        try:
            import pydoc_data.topics

            text = pydoc_data.topics.topics.get(target[0])
            if text:
                return str(text).strip()
        except ImportError:  # pragma: no cover
            pass
    try:
        return pydoc.render_doc(name, "Help on %s:", renderer=_PLAIN).rstrip()
    except (ImportError, pydoc.ErrorDuringImport):
        return f"No Python documentation found for {name!r}"


@defer.inlineCallbacks
def make_namespace(container: Any) -> Any:
    """Spawn the shell's process in ``container``; fires with the shell namespace."""
    helpers = yield ShellHelpers.create(container)
    return helpers.namespace()


# -- the manhole ---------------------------------------------------------------------------------------
def error_line(error: BaseException | Failure) -> str:
    """One line for an error: ``Error: <what went wrong>``."""
    exc = error.value if isinstance(error, Failure) else error
    text = str(exc) if isinstance(exc, IonError) else f"{type(exc).__name__}: {exc}"
    return "Error: " + (text.strip().splitlines()[0] if text.strip() else type(exc).__name__)


#: pydoc's renderer of plain text (no bold by backspaces); not in its type stubs.
_PLAIN: Any = getattr(pydoc, "plaintext", None) or pydoc.TextDoc()

_WAIT = "__ion_wait__"
_SHOW = "__ion_show__"


class _AwaitCalls(ast.NodeTransformer):
    """``f(x)`` → ``await __ion_wait__(f, x)`` wherever ``await`` may stand, and each top-level
    expression statement ``e`` → ``__ion_show__(e)`` (what the prompt shows). ``__ion_wait__``
    calls ``f`` and waits for a Deferred or coroutine it gives, unless ``f`` is a class (making a
    ``Deferred()`` is not waiting for one).

    Bodies of ``def``, ``lambda``, ``class`` and generator expressions (but for their first
    iterable) are left as written: ``await`` cannot stand there (and their calls are made
    later, by whoever calls or consumes them). So are calls inside a list, tuple, set or dict
    written as an argument of another call: ``gatherResults([rpc(1), rpc(2)])`` hands it the
    two Deferreds, the calls run at once, and the line waits for the gathering. The user's
    own ``await f()`` stays one await.
    """

    def visit_Call(self, node: ast.Call) -> ast.AST:  # noqa: N802 - ast's names
        node.func = self.visit(node.func)
        node.args = [arg if isinstance(arg, _LITERALS) else self.visit(arg) for arg in node.args]
        for keyword in node.keywords:
            if not isinstance(keyword.value, _LITERALS):
                keyword.value = self.visit(keyword.value)
        wait = ast.Call(func=ast.Name(id=_WAIT, ctx=ast.Load()), args=[node.func, *node.args],
                        keywords=node.keywords)
        return ast.copy_location(ast.Await(value=ast.copy_location(wait, node)), node)

    def visit_Await(self, node: ast.Await) -> ast.AST:  # noqa: N802
        if isinstance(node.value, ast.Call):  # the user's own ``await f(x)``: f(x) is not wrapped again
            call = node.value
            call.func = self.visit(call.func)
            call.args = [arg if isinstance(arg, _LITERALS) else self.visit(arg) for arg in call.args]
            for keyword in call.keywords:
                if not isinstance(keyword.value, _LITERALS):
                    keyword.value = self.visit(keyword.value)
            return node
        self.generic_visit(node)
        return node

    def _leave(self, node: ast.AST) -> ast.AST:
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = _leave  # noqa: N815

    def visit_GeneratorExp(self, node: ast.GeneratorExp) -> ast.AST:  # noqa: N802
        # Only its first iterable is evaluated here and now (the rest runs as it is consumed).
        node.generators[0].iter = self.visit(node.generators[0].iter)
        return node


def _awaiting_code(source: str, filename: str) -> Any:
    """``source`` (one complete interactive input) compiled as a coroutine body in which every call
    is awaited (see :class:`_AwaitCalls`); None when it holds no call (run it as it is)."""
    tree = ast.parse(source, filename, mode="single")
    if not any(isinstance(node, (ast.Call, ast.Await)) for node in ast.walk(tree)):
        return None
    body = []
    for stmt in tree.body:
        stmt = _AwaitCalls().visit(stmt)
        if isinstance(stmt, ast.Expr):
            show = ast.Call(func=ast.Name(id=_SHOW, ctx=ast.Load()), args=[stmt.value], keywords=[])
            stmt = ast.Expr(value=ast.copy_location(show, stmt))
        body.append(stmt)
    module = ast.fix_missing_locations(ast.Module(body=body, type_ignores=[]))
    return compile(module, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)


#: Arguments written as these literals keep their calls as written (see :class:`_AwaitCalls`).
_LITERALS = (ast.List, ast.Tuple, ast.Set, ast.Dict)


async def _wait(func: Any, /, *args: Any, **kwargs: Any) -> Any:
    """What a call in a shell line gives: ``func(*args, **kwargs)``, its Deferred's or coroutine's
    result; what a class gives as it is (``Deferred()`` is an object to keep, not to wait for)."""
    value = func(*args, **kwargs)
    if isinstance(func, type):
        return value
    if isinstance(value, defer.Deferred) or inspect.iscoroutine(value):
        return await value
    return value


class ShellInterpreter(manhole.ManholeInterpreter):
    """Runs each line as a coroutine that awaits its calls (:attr:`running` while it does);
    shows a Deferred that is not awaited when it fires; ion errors as one line.
    """

    def __init__(self, handler: Any, locals: dict[str, Any] | None = None,  # noqa: A002 - manhole's name
                 filename: str = "<console>") -> None:
        super().__init__(handler, locals, filename)
        # Top-level ``await`` of the user's own is accepted too.
        self.compile.compiler.flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        self.locals[_WAIT] = _wait
        self.locals[_SHOW] = self.displayhook
        #: The line being run (it fires when the line is done), or None.
        self.running: defer.Deferred[None] | None = None

    def runsource(self, source: str, filename: str = "<console>", symbol: str = "single") -> bool:
        try:
            plain = self.compile(source, filename, symbol)
        except (OverflowError, SyntaxError, ValueError):
            self.showsyntaxerror(filename)
            return False
        if plain is None:
            return True  # more input needed
        try:
            code = _awaiting_code(source, filename)
        except SyntaxError:
            code = None  # a form the rewrite cannot take: run the line as written
        if code is None:
            self.runcode(plain)
            return False
        try:
            with self.monkeyPatcher:
                result = eval(code, self.locals)  # noqa: S307 - the shell runs what its user types
        except SystemExit:
            raise
        except BaseException:
            self._show_error(*sys.exc_info())
            return False
        if inspect.iscoroutine(result):
            running = defer.Deferred.fromCoroutine(self._stepped(result))
            running.addErrback(self._failed)
            if not running.called:
                self.running = running
                running.addBoth(self._done)
        return False

    def _stepped(self, coro: Any) -> Any:
        """Drive ``coro`` as a generator, each step with the shell's stdout and display hooks
        in place (a ``print`` after an await goes to the shell, not to the log)."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                with self.monkeyPatcher:
                    if error is not None:
                        thrown, error = error, None
                        yielded = coro.throw(thrown)
                    else:
                        yielded = coro.send(value)
            except StopIteration as stop:
                return stop.value
            try:
                value = yield yielded
            except BaseException as exc:  # a cancel (Ctrl-C), or the awaited Deferred's failure
                error = exc

    def _done(self, result: Any) -> Any:
        self.running = None
        return result

    def _failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):
            self.write("KeyboardInterrupt\n")
            return
        self._show_error(failure.type, failure.value, failure.getTracebackObject())

    def _show_error(self, kind: Any, value: BaseException | None, tb: Any) -> None:
        if isinstance(value, IonError):
            self.write(error_line(value) + "\n")
            return
        while tb is not None and tb.tb_frame.f_code.co_filename != self.filename:
            tb = tb.tb_next  # from the user's line on: not the shell's own frames
        self.write("".join(traceback.format_exception(kind, value, tb)))

    def displayhook(self, obj: Any) -> None:
        if obj is None:
            return
        self.locals["_"] = obj
        if not isinstance(obj, defer.Deferred):
            self.write(repr(obj) + "\n")
            return
        # Fired already: print now, in line. Later: print above a redrawn prompt.
        fired_later = [False]

        def show(result: Any) -> None:
            self.locals["_"] = result
            if result is not None:
                self.write(repr(result), fired_later[0])

        def failed(failure: Failure) -> None:
            self.locals["_"] = failure.value
            self.write(error_line(failure), fired_later[0])

        obj.addCallbacks(show, failed)
        fired_later[0] = True

    def excepthook(self, excType: Any, excValue: BaseException, excTraceback: Any) -> None:
        if isinstance(excValue, IonError):
            self.write(error_line(excValue) + "\n")
            return
        super().excepthook(excType, excValue, excTraceback)


_WORD = re.compile(r"[A-Za-z_][\w.]*$")


def completions(namespace: dict[str, Any], text: str) -> list[str]:
    """What ``text`` (a name or ``obj.attr`` prefix) completes to in ``namespace``."""
    completer = rlcompleter.Completer(namespace)
    found: list[str] = []
    for state in range(500):
        try:
            match = completer.complete(text, state)
        except Exception:
            break
        if match is None:
            break
        if match not in found:
            found.append(match)
    return found


class ShellManhole(manhole.ColoredManhole):
    """The cc shell's line editor and interpreter.

    :param namespace: the names the shell offers (see :meth:`ShellHelpers.namespace`).
    :param history_path: file to load input history from and save it to (``None``: none).
    :param on_exit: called once when the user leaves (Ctrl-D on an empty line, Ctrl-\\).
    :param banner: printed above the first prompt.
    """

    ps = PROMPTS
    interpreter: ShellInterpreter

    def __init__(self, namespace: dict[str, Any] | None = None, *, history_path: Path | None = None,
                 on_exit: Callable[[], Any] | None = None, banner: str = "") -> None:
        super().__init__(namespace)
        self.history_path = history_path
        self.on_exit = on_exit
        self.banner = banner
        self.left = False
        self._in_line = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.interpreter = ShellInterpreter(self, self.namespace)
        self.keyHandlers[b"\x15"] = self.handle_KILL_LINE  # Ctrl-U
        #: Keys typed while a line runs: handled once it is done (as a terminal keeps them).
        self.typed_ahead: list[tuple[Any, Any]] = []
        self._load_history()

    # -- lines that wait -------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether a line is running (no prompt is shown until it is done)."""
        if self._in_line:
            return True
        interpreter = getattr(self, "interpreter", None)
        return interpreter is not None and interpreter.running is not None

    def lineReceived(self, line: bytes) -> None:
        self._in_line = True  # its first steps run now: a log line they make needs no prompt redrawn
        try:
            more = self.interpreter.push(line)
        finally:
            self._in_line = False
        self.pn = bool(more)
        running = self.interpreter.running
        if running is None:
            self._prompt()
            return
        running.addBoth(self._line_done)

    def _line_done(self, _: Any) -> None:
        if self.left:
            return
        self._prompt()
        typed, self.typed_ahead = self.typed_ahead, []
        for i, (key, modifier) in enumerate(typed):
            self.keystrokeReceived(key, modifier)
            if self.busy:  # Enter started another line: the rest waits for that one
                self.typed_ahead = typed[i + 1:] + self.typed_ahead
                return

    def _prompt(self) -> None:
        if self._needsNewline():
            self.terminal.nextLine()
        self.terminal.write(self.ps[self.pn])

    def keystrokeReceived(self, keyID: Any, modifier: Any) -> None:  # noqa: N803 - Twisted's names
        if self.busy:
            if keyID == manhole.CTRL_C:
                running = self.interpreter.running
                if running is not None:
                    running.cancel()
                return
            self.typed_ahead.append((keyID, modifier))
            return
        super().keystrokeReceived(keyID, modifier)

    # -- output above the prompt -------------------------------------------------------------------
    def addOutput(self, data: Any, isAsync: Any = None) -> None:  # noqa: N803 - Twisted's name
        if isAsync and not self.busy:
            self.write_above(data)
            return
        self.terminal.write(data)

    def write_above(self, text: str | bytes) -> None:
        """Write ``text`` (a log line, a late result) where the prompt is, then redraw the prompt
        and what was being typed below it. While a line runs there is no prompt: just write it."""
        data = text.encode("utf-8", "replace") if isinstance(text, str) else text
        if self.busy or self.left:
            self.terminal.write(data)
            return
        self.terminal.write(b"\r")
        self.terminal.eraseToLineEnd()
        self.terminal.write(data)
        if self._needsNewline():
            self.terminal.nextLine()
        self.redraw_input()

    def redraw_input(self) -> None:
        """Draw the prompt and the line buffer again on the cursor's line (colored when it can
        be), the cursor where it was in the line."""
        self.terminal.write(b"\r")
        self.terminal.eraseToLineEnd()
        line = b"".join(self.lineBuffer)
        try:
            shown = manhole.lastColorizedLine(self.getSource()) if line.strip() else line
        except Exception:  # an incomplete token (an open string): plain
            shown = line
        self.terminal.write(self.ps[self.pn] + shown)
        back = len(self.lineBuffer) - self.lineBufferIndex
        if back:
            self.terminal.cursorBackward(back)

    def handle_KILL_LINE(self) -> None:
        """Ctrl-U: drop what was typed on this line."""
        self.handle_HOME()
        self.terminal.eraseToLineEnd()
        self.lineBuffer = []
        self.lineBufferIndex = 0

    def initializeScreen(self) -> None:
        # No terminal reset: keep what is on the screen (the container's log).
        if self.banner:
            self.terminal.write(self.banner.replace("\n", "\r\n") + "\r\n")
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    # -- leaving ------------------------------------------------------------------------------
    def handle_QUIT(self) -> None:
        # Not terminal.loseConnection(): that resets (clears) the screen and closes stdout,
        # which the container's log still writes to while it stops.
        self.terminal.write(b"\r\n")
        self.leave()

    def connectionLost(self, reason: Any) -> None:
        self.leave()

    def leave(self) -> None:
        """Save the history and tell ``on_exit`` (once)."""
        if self.left:
            return
        self.left = True
        self._save_history()
        if self.on_exit is not None:
            try:
                self.on_exit()
            except Exception:
                _log.failure("shell: on_exit failed")

    # -- history ---------------------------------------------------------------------------------
    def _load_history(self) -> None:
        if self.history_path is None:
            return
        try:
            lines = self.history_path.read_bytes().splitlines()
        except OSError:
            return
        self.historyLines.extend(line for line in lines[-HISTORY_LINES:] if line.strip())
        self.historyPosition = len(self.historyLines)

    def _save_history(self) -> None:
        if self.history_path is None or not getattr(self, "historyLines", None):
            return
        try:
            self.history_path.write_bytes(b"\n".join(self.historyLines[-HISTORY_LINES:]) + b"\n")
        except OSError as exc:
            _log.warn("shell: could not save the history to {path}: {exc}", path=self.history_path, exc=exc)

    # -- tab completion ---------------------------------------------------------------------------
    def handle_TAB(self) -> None:
        before = b"".join(self.lineBuffer[:self.lineBufferIndex]).decode("utf-8", "replace")
        match = _WORD.search(before)
        if match is None:
            super().handle_TAB()  # indentation
            return
        word = match.group(0)
        found = completions(self.namespace or {}, word)
        if not found:
            self.terminal.write(b"\a")
            return
        common = os.path.commonprefix(found)
        if len(common) > len(word):
            # Into the buffer, then the whole line drawn again: ColoredManhole draws only the
            # last of several characters when it cannot color the line ("rpc_send(" is an open
            # bracket), which showed "rpc_s(" for a buffer holding "rpc_send(".
            for ch in common[len(word):].encode("utf-8"):
                self.characterReceived(bytes([ch]), True)
            self.redraw_input()
            return
        if len(found) > 1:
            self.terminal.nextLine()
            self.terminal.write("  ".join(sorted(found)).encode("utf-8"))
            self.terminal.nextLine()
            self.drawInputLine()
            back = len(self.lineBuffer) - self.lineBufferIndex
            if back:
                self.terminal.cursorBackward(back)


class StdioShell:
    """The shell on this process's terminal (stdin/stdout), in raw mode while it runs.

    :param namespace: the names the shell offers.
    :param on_exit: called when the user leaves the shell.
    """

    def __init__(self, namespace: dict[str, Any], *, on_exit: Callable[[], Any], reactor: Any = None,
                 history_path: Path | None = None, banner: str = "", stdin_fd: int = 0,
                 stdout_fd: int = 1) -> None:
        self.namespace = namespace
        self.on_exit = on_exit
        self.reactor = reactor
        self.history_path = history_path
        self.banner = banner
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self._saved: list[Any] | None = None
        self._console_set = False
        self.protocol: insults.ServerProtocol | None = None
        self.stdio: Any = None

    def start(self) -> None:
        """Put the terminal in raw mode and start reading keystrokes."""
        import termios
        import tty

        from twisted.internet import stdio

        from ion.core.log import set_console

        self._saved = termios.tcgetattr(self.stdin_fd)
        tty.setraw(self.stdin_fd, termios.TCSANOW)
        # Raw mode also stops "\n" → "\r\n" on output; the log still writes plain lines. The
        # settings are the terminal's (stdin's), whatever stdout is: with stdout a pipe
        # (`twistd -n cc | tee log`) there is no terminal to ask there (ENOTTY).
        out = termios.tcgetattr(self.stdin_fd)
        out[1] = out[1] | termios.OPOST | termios.ONLCR
        termios.tcsetattr(self.stdin_fd, termios.TCSANOW, out)
        self.protocol = insults.ServerProtocol(ShellManhole, self.namespace, history_path=self.history_path,
                                               on_exit=self._left, banner=self.banner)
        read_fd, write_fd, same_terminal = self._private_fds()
        self.stdio = stdio.StandardIO(self.protocol, stdin=read_fd, stdout=write_fd,  # type: ignore[call-arg]
                                      reactor=self.reactor)
        if same_terminal:  # the log's lines go above the prompt, which is redrawn
            self._console_set = True
            set_console(self._log_line)

    def _log_line(self, text: str) -> None:
        proto = self.protocol.terminalProtocol if self.protocol is not None else None
        if not isinstance(proto, ShellManhole) or proto.left:
            raise RuntimeError("the shell is gone")  # the log writes the line to stdout itself
        proto.write_above(text)

    def _private_fds(self) -> tuple[int, int, bool]:
        """Descriptors of the shell's own on the terminal (read, write), and whether stdout is
        that terminal too.

        StandardIO makes its descriptors non-blocking, and fds 0-2 of a terminal
        usually share one open file: using them would make the log's writes to
        stdout non-blocking too (failing whenever the terminal is slow). The shell
        writes to stdin's terminal even when stdout is a pipe or a file (``| tee log``):
        the prompt and the echo of what is typed belong on the screen, not in the log.
        """
        try:
            path = os.ttyname(self.stdin_fd)
        except OSError:
            return self.stdin_fd, self.stdout_fd, False
        try:
            same = os.ttyname(self.stdout_fd) == path
        except OSError:
            same = False
        try:
            read_fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
            write_fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
        except OSError:
            return self.stdin_fd, self.stdout_fd, same
        return read_fd, write_fd, same

    def _left(self) -> None:
        self.restore()
        self.on_exit()

    def restore(self) -> None:
        """Give the terminal back its settings (idempotent)."""
        if self._console_set:
            from ion.core.log import set_console

            self._console_set = False
            set_console(None)
        saved, self._saved = self._saved, None
        if saved is None:
            return
        import termios

        try:
            termios.tcsetattr(self.stdin_fd, termios.TCSANOW, saved)
        except (OSError, termios.error):  # pragma: no cover - terminal gone
            pass
        if self.stdio is not None:
            self.stdio.stopReading()

    def close(self) -> None:
        """Stop the shell without calling ``on_exit`` (the container is stopping anyway)."""
        proto = self.protocol.terminalProtocol if self.protocol is not None else None
        if isinstance(proto, ShellManhole) and not proto.left:
            proto.on_exit = None
            proto.leave()
        self.restore()
        try:
            sys.stdout.flush()
        except Exception:  # pragma: no cover
            pass
