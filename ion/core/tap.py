# -*- test-case-name: tests.core.test_tap -*-
"""``twistd cc``: the command line of a capability container (DESIGN §7).

::

    twistd -n cc [options] [FILE.app | FILE.rel | APP ...]
    ion-cc [options] [FILE.app | FILE.rel | APP ...]      # the same, as one command

:class:`Options` parses the options (checks in ``postOptions``, raising
``UsageError``); :func:`makeService` returns a :class:`ContainerService` that
starts a :class:`~ion.core.container.Container`, the given apps, and — when
stdin is a terminal and ``--no-shell`` was not given — the interactive shell.

A start that fails (unreadable app file, unknown module, dependency cycle,
broker refused) prints one ``Error: ...`` line, stops the reactor and exits
non-zero (a sysexits code). SIGTERM stops the container gracefully (processes
in reverse start order) and exits 0; a second SIGTERM kills at once.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure

from ion.core.config import Config, deep_merge, literal, parse_value
from ion.core.exceptions import AppError, ConfigurationError, IonError, TransportError
from ion.core.health import sd_notify
from ion.core.messaging.transport import parse_broker_url, split_broker_urls

__all__ = ["Options", "ContainerService", "makeService", "run_cc", "parse_container_args",
           "ENV_BROKER_USERNAME", "ENV_BROKER_PASSWORD"]

#: Environment variables the broker login may come from (never from the source).
ENV_BROKER_USERNAME = "ION_BROKER_USERNAME"
ENV_BROKER_PASSWORD = "ION_BROKER_PASSWORD"

# sysexits(3) codes for a failed start (os.EX_* where the platform has them).
EX_UNAVAILABLE = getattr(os, "EX_UNAVAILABLE", 69)
EX_SOFTWARE = getattr(os, "EX_SOFTWARE", 70)
EX_CONFIG = getattr(os, "EX_CONFIG", 78)
EX_USAGE = getattr(os, "EX_USAGE", 64)

DEFAULT_BROKER_PORT = 5672
DEFAULT_BROKER_VHOST = "/"
DEFAULT_BROKER_USER = "guest"
DEFAULT_BROKER_PASSWORD = "guest"

#: Container args with a meaning of their own (others are kept in ``container.args``).
_KNOWN_ARGS = ("sysname", "contid")


# -- -a/--args ----------------------------------------------------------------------------------
def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes."""
    parts: list[str] = []
    depth = 0
    quote_char: str | None = None
    current: list[str] = []
    escaped = False
    for ch in text:
        if quote_char is not None:
            current.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote_char:
                quote_char = None
            continue
        if ch in "'\"":
            quote_char = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quote_char is not None or depth != 0:
        raise usage.UsageError(f"-a {text!r}: unbalanced quotes or brackets")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_container_args(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse one ``-a`` value into (container args, config overrides).

    ``text`` is ``k=v,k2=v2`` (each value a Python literal if it parses as
    one, else a string) or a dict literal. A key with a dot is a config
    override: ``ion.core.process.rpc_timeout=5`` sets ``rpc_timeout`` in the
    section of module ``ion.core.process`` (the module is everything before
    the last dot).

    :raises usage.UsageError: for text that is neither form.
    """
    text = text.strip()
    items: dict[str, Any] = {}
    if text.startswith("{"):
        try:
            value = literal(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            raise usage.UsageError(f"-a {text!r} is not a valid dict literal: {exc}") from None
        if not isinstance(value, dict):
            raise usage.UsageError(f"-a {text!r} must be a dict literal or k=v,...")
        items = {str(k): v for k, v in value.items()}
    else:
        for part in _split_top_level(text):
            key, sep, raw = part.partition("=")
            key = key.strip()
            if not sep or not key:
                raise usage.UsageError(f"-a: {part!r} is not key=value (in {text!r})")
            items[key] = parse_value(raw.strip())
    args: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for key, value in items.items():
        if "." in key:
            module, _, name = key.rpartition(".")
            if not module or not name:
                raise usage.UsageError(f"-a: {key!r} is not <module>.<key>")
            overrides = deep_merge(overrides, {module: {name: value}})
        else:
            if not key.isidentifier():
                raise usage.UsageError(f"-a: {key!r} is not a valid argument name")
            args[key] = value
    return args, overrides


def _credentials_from_file(path: str) -> tuple[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise usage.UsageError(f"--broker_credfile {path}: cannot read it ({exc.strerror or exc})") from None
    fields = text.split()
    if len(fields) != 2:
        # Never echo the file: it holds a password.
        raise usage.UsageError(f"--broker_credfile {path} must hold 'user password' (two words), "
                               f"it holds {len(fields)}")
    return fields[0], fields[1]


# -- the options ------------------------------------------------------------------------------------
class Options(usage.Options):
    """The options of ``twistd cc`` (DESIGN §7); positional arguments are app/rel files or app names.

    After parsing: ``broker_url`` (the URL to connect to, password included; the first of
    several), ``broker_urls`` (every URL given, in order; empty when no broker option was
    given: the container then takes ``brokers`` of its config, else memory://),
    ``broker_display`` (the same without the passwords), ``container_args``,
    ``config_overrides`` and ``files``.
    """

    synopsis = "[options] [FILE.app | FILE.rel | APP ...]"
    longdesc = ("Start an ION capability container, start the given apps (and the apps they depend on), "
                "then open the interactive shell when stdin is a terminal. Without broker options the "
                "container uses its embedded broker (memory://). Broker credentials may also come from "
                f"${ENV_BROKER_USERNAME} and ${ENV_BROKER_PASSWORD}. -h is --broker_host: use --help for help.")

    optParameters = [
        ["broker_host", "h", None, "AMQP broker host (selects the AMQP transport)."],
        ["broker_port", "p", None, f"AMQP broker port [default: {DEFAULT_BROKER_PORT}]."],
        ["broker_vhost", "v", None, f"AMQP virtual host [default: {DEFAULT_BROKER_VHOST}]."],
        ["broker_username", None, None, f"Broker login [default: ${ENV_BROKER_USERNAME}, else guest]."],
        ["broker_password", None, None, f"Broker password [default: ${ENV_BROKER_PASSWORD}, else guest]."],
        ["broker_credfile", None, None, "File holding the broker login as 'user password'."],
        ["sysname", "s", None, "System name (same as -a sysname=NAME) [default: the container id]."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["container_args"] = {}
        self["config_overrides"] = {}
        self["files"] = []
        self["no_shell"] = False
        self["broker"] = []
        self["broker_url"] = "memory://"
        self["broker_urls"] = []
        self["broker_display"] = "memory://"

    def opt_broker(self, url: str) -> None:
        """The whole broker URL: memory:// (the default) or amqp://user:pass@host:port/vhost. Give it more than once, or a comma list, for the nodes of one cluster: they are tried in turn when one is down."""
        self["broker"].extend(split_broker_urls(url))

    def opt_args(self, value: str) -> None:
        """Container args: k=v,... or a dict literal (sysname, contid, apparg_<app>=..., module.key=value overrides config). May be repeated."""
        args, overrides = parse_container_args(value)
        self["container_args"].update(args)
        self["config_overrides"] = deep_merge(self["config_overrides"], overrides)

    opt_a = opt_args

    def opt_http(self, value: str) -> None:
        """Open the container's HTTP port (health probes, metrics, the web console at /) on PORT
        (0: any free one), on 127.0.0.1 unless ion.core.http.bind says otherwise."""
        try:
            port = int(value)
        except ValueError:
            raise usage.UsageError(f"--http takes a port number, not {value!r}") from None
        if not 0 <= port <= 65535:
            raise usage.UsageError(f"--http takes a port number (0-65535), not {port}")
        self["config_overrides"] = deep_merge(self["config_overrides"], {"ion.core.http": {"port": port}})

    def opt_no_shell(self) -> None:
        """Never open the interactive shell (daemon and test use)."""
        self["no_shell"] = True

    def opt_version(self) -> None:
        """Display the ioncore and Twisted versions and exit."""
        from importlib.metadata import PackageNotFoundError, version

        from twisted import copyright

        try:
            ion_version = version("ioncore")
        except PackageNotFoundError:  # pragma: no cover - running from a checkout
            ion_version = "unknown (not installed)"
        print(f"ioncore {ion_version}, Twisted {copyright.version}")
        sys.exit(0)

    def parseArgs(self, *files: str) -> None:
        self["files"] = list(files)

    # -- checks --------------------------------------------------------------------------------
    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse; under ``twistd`` a mistake is one ``Error: ...`` line on stderr and exit 64.

        twistd would print its whole usage text (headed ``twistd [options]``) above the
        one line that says what is wrong; standalone (tests, ``Options().parseOptions``)
        the ``UsageError`` is raised as usual.
        """
        self._checking = False
        try:
            super().parseOptions(options)
        except usage.UsageError as exc:
            if not isinstance(getattr(self, "parent", None), usage.Options):
                raise
            hint = "" if self._checking else " (twistd cc --help lists the options)"
            stream = sys.__stderr__ or sys.stderr
            stream.write(f"Error: {exc}{hint}\n")
            stream.flush()
            raise SystemExit(EX_USAGE) from None

    def postOptions(self) -> None:
        self._checking = True
        self._check_sysname()
        self._check_broker()
        self._check_files()
        self._check_logging()
        self._check_pidfile()

    def _check_sysname(self) -> None:
        args = self["container_args"]
        given = self["sysname"]
        from_args = args.get("sysname")
        if given is not None and from_args is not None and str(from_args) != given:
            raise usage.UsageError(f"-s {given} and -a sysname={from_args} disagree; give one")
        sysname = given if given is not None else from_args
        if sysname is not None:
            sysname = str(sysname)
            if not sysname or any(c in sysname for c in " #*/"):
                raise usage.UsageError(f"system name {sysname!r} must be non-empty, without spaces, '#', '*' or '/'")
            args["sysname"] = sysname
            self["sysname"] = sysname
        contid = args.get("contid")
        if contid is not None and (not str(contid) or any(c in str(contid) for c in " #*/")):
            raise usage.UsageError(f"container id {contid!r} must be non-empty, without spaces, '#', '*' or '/'")

    def _explicit_credentials(self) -> tuple[str | None, str | None]:
        user, password = self["broker_username"], self["broker_password"]
        if self["broker_credfile"]:
            if user is not None or password is not None:
                raise usage.UsageError("give --broker_credfile or --broker_username/--broker_password, not both")
            user, password = _credentials_from_file(self["broker_credfile"])
        return user, password

    def _check_broker(self) -> None:
        host, port, vhost = self["broker_host"], self["broker_port"], self["broker_vhost"]
        user, password = self._explicit_credentials()
        urls: list[str] = self["broker"]
        if port is not None:
            try:
                port = int(port)
            except ValueError:
                raise usage.UsageError(f"--broker_port must be a number, not {port!r}") from None
            if not 0 < port < 65536:
                raise usage.UsageError(f"--broker_port {port} is out of range (1-65535)")
        explicit = [name for name, value in (("--broker_host", host), ("--broker_port", port),
                                             ("--broker_vhost", vhost), ("--broker_username", user),
                                             ("--broker_password", password)) if value is not None]
        if urls:
            if host is not None or port is not None or vhost is not None:
                raise usage.UsageError("--broker URL names the host, port and vhost itself; "
                                       "do not also give --broker_host/--broker_port/--broker_vhost")
            full: list[str] = []
            for url in urls:
                try:
                    parsed = parse_broker_url(url)
                except ConfigurationError as exc:
                    raise usage.UsageError(f"--broker: {exc}") from None
                if parsed.scheme == "memory":
                    if len(urls) > 1:
                        raise usage.UsageError("--broker memory:// is a broker of its own; it cannot be one of "
                                               "several --broker addresses")
                    if explicit:
                        raise usage.UsageError(f"{', '.join(explicit)}: only for an AMQP broker, not memory://")
                    self["broker_urls"] = ["memory://"]
                    return
                parts = urlsplit(url)
                if parts.username is not None and (user is not None or password is not None):
                    raise usage.UsageError("give the broker login in the --broker URL or with "
                                           "--broker_username/--broker_password/--broker_credfile, not both")
                if parts.username is None:
                    login, secret = self._login(user, password)
                else:
                    login, secret = parsed.username, parsed.password
                self._set_amqp(parsed.scheme, parsed.host, parsed.port, parsed.vhost, login, secret)
                full.append(self["broker_url"])
            if len(full) > 1:
                first = parse_broker_url(full[0])
                self["broker_url"] = full[0]
                self["broker_host"], self["broker_port"], self["broker_vhost"] = first.host, first.port, first.vhost
                self["broker_username"], self["broker_password"] = first.username, first.password
                self["broker_display"] = ", ".join(str(parse_broker_url(u)) for u in full)
            self["broker_urls"] = full
            return
        if host is None:
            if explicit:
                raise usage.UsageError(f"{', '.join(explicit)}: only with an AMQP broker; give --broker_host "
                                       "(or --broker amqp://...)")
            return
        user, password = self._login(user, password)
        self._set_amqp("amqp", host, port or DEFAULT_BROKER_PORT, vhost or DEFAULT_BROKER_VHOST, user, password)
        self["broker_urls"] = [self["broker_url"]]

    @staticmethod
    def _login(user: str | None, password: str | None) -> tuple[str, str]:
        if user is None:
            user = os.environ.get(ENV_BROKER_USERNAME) or DEFAULT_BROKER_USER
        if password is None:
            password = os.environ.get(ENV_BROKER_PASSWORD) or DEFAULT_BROKER_PASSWORD
        return user, password

    def _set_amqp(self, scheme: str, host: str, port: int, vhost: str, user: str, password: str) -> None:
        if not host or any(c in host for c in "/@ "):
            raise usage.UsageError(f"--broker_host {host!r} is not a host name")
        path = "" if vhost == "/" else quote(vhost, safe="")
        self["broker_url"] = f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{path}"
        self["broker_display"] = str(parse_broker_url(self["broker_url"]))
        self["broker_host"], self["broker_port"], self["broker_vhost"] = host, port, vhost
        self["broker_username"] = user
        self["broker_password"] = password

    def _check_files(self) -> None:
        for name in self["files"]:
            looks_like_path = name.endswith((".app", ".rel")) or "/" in name
            if looks_like_path:
                if not name.endswith((".app", ".rel")):
                    raise usage.UsageError(f"{name}: expected an .app or .rel file (or an app name)")
                if not Path(name).is_file():
                    raise usage.UsageError(f"{name}: no such file")
            elif not name.replace("_", "").replace("-", "").isalnum():
                raise usage.UsageError(f"{name!r} is neither an .app/.rel file nor an app name")

    def _check_logging(self) -> None:
        from ion.core.log import read_levels

        try:
            read_levels()
        except ConfigurationError as exc:
            raise usage.UsageError(str(exc)) from None
        parent = getattr(self, "parent", None)
        if parent is None or not hasattr(parent, "get"):
            return
        # Under twistd: unless the user chose where the log goes, send it to stdout through
        # the per-module level filter (a name: twistd's postOptions imports it).
        if (parent.get("logger") is None and not parent.get("logfile") and not parent.get("syslog")
                and parent.get("nodaemon")):
            parent["logger"] = "ion.core.log.stdout_observer"
        elif parent.get("logger") is None and parent.get("logfile") not in (None, "-") and not parent.get("syslog"):
            # A log file: the same lines (levels, trace ids), in twistd's rotating file.
            from ion.core.log import use_logfile

            parent["logger"] = use_logfile(os.path.abspath(str(parent["logfile"])))


    def _check_pidfile(self) -> None:
        """Under ``twistd -n``, no pid file unless ``--pidfile`` is given.

        twistd's default ``./twistd.pid`` lets only one ``twistd`` run per folder: a second
        container started beside the first (README's two terminals) stopped with "Another
        twistd server is running". A container in the foreground needs none; a daemon
        (without ``-n``) keeps twistd's default, so it can be found and stopped.
        """
        parent = getattr(self, "parent", None)
        if parent is None or not hasattr(parent, "get") or not parent.get("nodaemon"):
            return
        if parent.get("pidfile") == _TWISTD_PIDFILE and not _pidfile_given(sys.argv[1:]):
            parent["pidfile"] = ""


#: twistd's own default pid file.
_TWISTD_PIDFILE = "twistd.pid"


def _pidfile_given(argv: list[str]) -> bool:
    """Whether the twistd options before the ``cc`` sub-command name ``--pidfile`` (or a prefix of it)."""
    for arg in argv:
        if arg == "cc":
            return False
        name = arg.split("=", 1)[0]
        if len(name) >= len("--pid") and "--pidfile".startswith(name):
            return True
    return False


# -- the service ----------------------------------------------------------------------------------------
def _exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, (ConfigurationError, AppError)):
        return EX_CONFIG
    if isinstance(exc, TransportError):
        return EX_UNAVAILABLE
    return EX_SOFTWARE


def _describe(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, IonError) else f"{type(exc).__name__}: {exc}"
    lines = text.strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _exit_now(code: int) -> None:  # pragma: no cover - runs at interpreter exit of a twistd process
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    os._exit(code)


class ContainerService(service.Service):
    """Runs one container for ``twistd cc``: start, apps, shell; stop on shutdown.

    :param options: parsed :class:`Options`.
    :param reactor: the reactor (default: the global one).
    :param broker: an embedded broker to join (tests); default: the container's own.
    :param config: the configuration (default: ``Config.load()``); the command-line overlay is applied.
    :param stdin: decides whether the shell opens (``isatty()``); default ``sys.stdin``.
    :param stderr: where the one ``Error:`` line goes; default the process's real stderr.
    :param exit_on_error: on a failed start, stop the reactor and exit non-zero (twistd); off in tests.
    :param install_signal_handlers: SIGTERM stops the container and exits 0 (twistd); off in tests.
    """

    name = "ion-cc"
    _log = Logger()

    def __init__(self, options: Options | dict[str, Any], *, reactor: Any = None, broker: Any = None,
                 config: Config | None = None, stdin: IO[str] | None = None, stderr: IO[str] | None = None,
                 exit_on_error: bool = True, install_signal_handlers: bool = True,
                 shell_factory: Callable[..., Any] | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.options = options
        self.reactor = reactor
        self.broker = broker
        self.config = config
        self.stdin = stdin
        self.stderr = stderr
        self.exit_on_error = exit_on_error
        self.install_signal_handlers = install_signal_handlers
        self.shell_factory = shell_factory
        self.container: Any = None
        self.shell: Any = None
        self.started: defer.Deferred[Any] | None = None
        self.error: str | None = None
        self.exit_code = 0
        self._stopping = False
        self._sigterm_seen = False
        self._early_term = False

    # -- starting --------------------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        if self.install_signal_handlers:
            # Now, for a SIGTERM that comes while starting; again once the reactor runs,
            # since it installs its own handlers then.
            self._install_sigterm()
            self.reactor.callWhenRunning(self._install_sigterm)
            if self._early_term:  # came before this service started: stop as for any SIGTERM
                self._on_sigterm(signal.SIGTERM, None)
        self.started = defer.ensureDeferred(self._start())
        self.started.addErrback(self._start_failed)

    async def _start(self) -> Any:
        from ion.core.container import Container

        opts = self.options
        config = self.config if self.config is not None else Config.load()
        if opts["config_overrides"]:
            config.set_command_line(opts["config_overrides"])
        args = dict(opts["container_args"])
        _default_audit_path(config, opts)
        # No broker option given: the config's brokers, else memory:// (the container decides).
        urls = opts.get("broker_urls")
        broker_url = opts["broker_url"] if urls is None else (urls or None)
        self.container = Container(
            config=config, broker_url=broker_url, broker=self.broker, sysname=args.get("sysname"),
            contid=str(args["contid"]) if args.get("contid") is not None else None, reactor=self.reactor,
            args=args)
        await self.container.start()
        for name in opts["files"]:
            if self._stopping:
                return self.container
            await self.container.app_manager.start_file(name)
        if self._stopping:
            return self.container
        self._log.info("container {id} ready: system {sysname}, {n} processes, apps: {apps}",
                       id=self.container.id, sysname=self.container.sysname,
                       n=len(self.container.proc_manager.processes),
                       apps=", ".join(self.container.app_manager.running) or "none")
        # systemd (Type=notify): started; the HTTP port's /readyz tells the finer state.
        sd_notify(f"READY=1\nSTATUS=container {self.container.id} of system {self.container.sysname} is up")
        if self._wants_shell():
            await self._open_shell()
        return self.container

    def _wants_shell(self) -> bool:
        if self.options["no_shell"]:
            return False
        stdin = self.stdin if self.stdin is not None else sys.__stdin__
        try:
            return bool(stdin is not None and stdin.isatty())
        except (ValueError, OSError):
            return False

    async def _open_shell(self) -> None:
        from ion.core.shell import ShellHelpers, StdioShell, default_history_path

        helpers = await ShellHelpers.create(self.container)
        banner = (f"ION capability container {self.container.id} (system {self.container.sysname}). "
                  "info() lists the helpers; Ctrl-D stops the container.")
        factory = self.shell_factory or StdioShell
        self.shell = factory(helpers.namespace(), on_exit=self._shell_left, reactor=self.reactor,
                             history_path=default_history_path(), banner=banner)
        self.shell.start()

    def _shell_left(self) -> None:
        self._log.info("shell closed: stopping the container")
        self._stop_reactor()

    def _start_failed(self, failure: Failure) -> None:
        if self._stopping and failure.check(defer.CancelledError):
            return
        exc = failure.value
        assert exc is not None
        self.error = _describe(exc)
        self.exit_code = _exit_code_for(exc)
        if not isinstance(exc, IonError):
            self._log.failure("container start failed", failure, level=LogLevel.debug)
        self._log.error("container start failed: {reason}", reason=self.error)
        stream = self.stderr if self.stderr is not None else sys.__stderr__
        if stream is not None:
            stream.write(f"Error: {self.error}\n")
            stream.flush()
        if self.exit_on_error:
            atexit.register(_exit_now, self.exit_code)
            self.reactor.callWhenRunning(self._stop_reactor)

    def _stop_reactor(self) -> None:
        from twisted.internet.error import ReactorNotRunning

        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    # -- signals ----------------------------------------------------------------------------------------
    def catch_early_sigterm(self) -> None:
        """From now until :meth:`startService`: a SIGTERM is remembered, and the start stops at once.

        twistd makes the service, then logs and sets up the reactor before it starts the
        service; a SIGTERM in between would otherwise kill the process with the default
        action (exit status -15) instead of a clean stop (0).
        """
        if self.install_signal_handlers:
            signal.signal(signal.SIGTERM, self._early_sigterm)

    def _early_sigterm(self, signum: int, frame: Any) -> None:
        self._early_term = True

    def _install_sigterm(self) -> None:
        # The reactor's own handler would make twistd re-raise SIGTERM after the
        # shutdown (exit status -15); a requested stop is a clean exit (0).
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._sigterm_seen:
            # A second signal means kill.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self._sigterm_seen = True
        self.reactor.callFromThread(self._log.info, "Received SIGTERM: stopping the container")
        self.reactor.callFromThread(self._stop_reactor)

    def _claim_sigterm(self) -> None:
        # A SIGTERM can land in the reactor's own handler: between the reactor
        # installing its handlers and ours replacing them, or after something
        # re-installed them. The reactor then records it so that twistd re-raises
        # it at exit (status -15). A requested stop is a clean exit either way, so
        # take the record back (``_exitSignal`` is the reactor's documented
        # ``_ISupportsExitSignalCapturing`` attribute); a second SIGTERM still kills.
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None
            self._sigterm_seen = True
            signal.signal(signal.SIGTERM, self._on_sigterm)

    # -- stopping -------------------------------------------------------------------------------------
    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._stopping = True
        sd_notify("STOPPING=1")
        if self.install_signal_handlers:
            self._claim_sigterm()
        if self.shell is not None:
            self.shell.close()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self.started is not None and not self.started.called:
            self.started.cancel()
        container = self.container
        if container is None or container.is_final:
            return
        try:
            await container.terminate()
        except Exception as exc:
            self._log.error("container {id} did not stop cleanly: {exc}", id=container.id, exc=exc)


def _default_audit_path(config: Config, opts: Any) -> None:
    """The audit file beside twistd's log file (``ion-audit.jsonl``; in the working folder when
    logging to the terminal), unless ``ion.core.audit: path`` is set (or set to None: none)."""
    from ion.core.audit import AuditSettings

    if config.container_get(AuditSettings.SECTION, "path", "unset") != "unset":
        return
    parent = getattr(opts, "parent", None)
    logfile = parent.get("logfile") if isinstance(parent, Mapping) else None
    folder = os.path.dirname(os.path.abspath(logfile)) if logfile and logfile != "-" else os.getcwd()
    config.set_command_line({AuditSettings.SECTION: {"path": os.path.join(folder, "ion-audit.jsonl")}})


def makeService(options: Options) -> ContainerService:
    """The ``twistd cc`` service for parsed ``options``."""
    service = ContainerService(options)
    service.catch_early_sigterm()
    return service


def run_cc(argv: list[str] | None = None) -> None:
    """``ion-cc``: run ``twistd -n cc`` with the given arguments (no pid file, so several can run)."""
    from twisted.scripts.twistd import run

    args = sys.argv[1:] if argv is None else list(argv)
    sys.argv = ["twistd", "-n", "--pidfile=", "cc", *args]
    run()
