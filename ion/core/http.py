# -*- test-case-name: tests.core.test_http -*-
"""The container's HTTP port: health probes, Prometheus metrics and the web console.

Off by default (an embedded one-container system needs none). Turned on by
``ion.core.http: port`` (0: any free port, logged) in the container's own
config, or ``twistd cc --http PORT``; ``bind`` (default ``127.0.0.1``) is
the address it listens on. Both are read from the container's own layers
only: an app cannot open a port.

=============  ==========================================================
``/healthz``   200 while the reactor turns: ``{"alive": true, ...}``
``/readyz``    200 when ready to take work, else 503; the JSON body lists
               the problems (:func:`ion.core.health.readiness`)
``/metrics``   Prometheus text format (:mod:`ion.core.metrics`): the snapshot
               taken on the reactor, the text rendered by
               ``prometheus_client.generate_latest`` in the container's own
               blocking pool
``/``          the web console (:mod:`ion.core.console`): the page, its
               files under ``/static/``, its JSON under ``/api/``
=============  ==========================================================

The console is on with the port unless ``console`` is false. Its actions
need the operator token: ``token``, else one generated at start into
``token_file`` (default ``ion-console-<container id>.token`` in the working
folder, mode 0600, removed at stop).

**Who may talk to the port.** ``/healthz``, ``/readyz`` and ``/metrics`` answer
any ``Host`` (probes and Prometheus use addresses and names of their own).
Everything else (the console, its files and its API) answers only a request
whose ``Host`` is the bound address, ``localhost``, ``127.0.0.1`` or ``[::1]``
(with the port), or one of ``allowed_hosts``; any other gets 421, so a page of
another site whose name resolves to this address (DNS rebinding) reads
nothing. Those responses carry a strict ``Content-Security-Policy``,
``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and
``Referrer-Policy: no-referrer``. A request body is capped at
:data:`MAX_BODY` bytes (413; what is over is never kept). At stop, every
connection still open (keep-alive, an event stream, a request in flight) is
closed, so none outlives the container.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet import defer
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ion.core.config import Settings, setting
from ion.core.exceptions import ConfigurationError
from ion.core.health import liveness, readiness

if TYPE_CHECKING:
    from ion.core.container import Container

__all__ = ["HttpSettings", "HttpPort", "MAX_BODY", "OPEN_PATHS", "SECURITY_HEADERS"]

#: Largest request body accepted, in bytes (413 beyond; the console's actions send a few bytes of JSON).
MAX_BODY = 8 * 1024
#: The first path segments served to any ``Host`` (probes and Prometheus scrape by address).
OPEN_PATHS = frozenset({b"healthz", b"readyz", b"metrics"})
#: The headers of every response but the open paths' (the console: its page, files and API).
SECURITY_HEADERS: dict[bytes, bytes] = {
    b"content-security-policy": b"default-src 'self'; script-src 'self'; object-src 'none'; "
                                b"img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
                                b"form-action 'none'",
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
}


@dataclass(frozen=True)
class HttpSettings(Settings):
    """``ion.core.http``: the container's HTTP port (read from the container's own layers).

    :ivar port: TCP port; None: no HTTP port; 0: any free one.
    :ivar bind: the address to listen on.
    :ivar console: serve the web console at ``/``.
    :ivar token: the console's operator token; None: one is generated at start.
    :ivar token_file: where a generated token is written (None: ``ion-console-<container id>.token``
        in the working folder).
    :ivar allowed_hosts: more ``Host`` values the console answers (``name`` or ``name:port``), besides
        the bound address and the loopback names; e.g. the name of a reverse proxy or an SSH tunnel.
    """

    SECTION: ClassVar[str] = "ion.core.http"

    port: int | None = setting(None, minimum=0)
    bind: str = "127.0.0.1"
    console: bool = True
    token: str | None = None
    token_file: str | None = None
    allowed_hosts: list[str] = field(default_factory=list)


def _json(request: Request, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=1).encode() + b"\n"


class _Health(Resource):
    isLeaf = True

    def __init__(self, container: Container) -> None:
        super().__init__()
        self.container = container

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, liveness(self.container))

    render_HEAD = render_GET


class _Ready(_Health):
    def render_GET(self, request: Request) -> bytes:
        verdict = readiness(self.container)
        return _json(request, 200 if verdict.ready else 503, verdict.to_json(self.container))

    render_HEAD = render_GET


class _Metrics(Resource):
    """Takes the container's snapshot on the reactor thread, then renders the text in the container's
    own blocking pool (never the global reactor's thread pool, which the container does not own or stop)."""

    isLeaf = True

    def __init__(self, container: Container) -> None:
        super().__init__()
        self.container = container

    def render_GET(self, request: Request) -> int:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.container.metrics.snapshot()
        d = self.container.blocking.run(generate_latest, self.container.metrics.registry)

        def write(text: bytes) -> None:
            if request.finished or getattr(request, "_disconnected", False):
                return
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            request.setHeader(b"cache-control", b"no-store")
            request.write(text)
            request.finish()

        def failed(failure: Failure) -> None:
            self.container.http._log.failure("/metrics failed", failure)
            if not (request.finished or getattr(request, "_disconnected", False)):
                request.setResponseCode(503)
                request.write(b"metrics unavailable\n")
                request.finish()

        d.addCallback(write).addErrback(failed)
        return NOT_DONE_YET

    render_HEAD = render_GET


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> IResource:
        from twisted.web.pages import notFound

        return notFound()


class _Refused(Resource):
    """A plain-text error answer (421 wrong ``Host``, 413 body too large)."""

    isLeaf = True

    def __init__(self, code: int, text: str) -> None:
        super().__init__()
        self.code = code
        self.text = text

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"connection", b"close")
        return self.text.encode() + b"\n"


class _Request(Request):
    """A request whose body is kept up to :data:`MAX_BODY` bytes: beyond, the rest is dropped as it
    comes (neither memory nor a temporary file grows) and the site answers 413."""

    too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self._refuse()
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_BODY:
            self._refuse()
        if not self.too_large:
            super().handleContentChunk(data)

    def _refuse(self) -> None:
        """Answer 413 now and close the connection: reading (and dropping) an endless body would keep
        the reactor busy for as long as the client sends."""
        if self.too_large:
            return
        self.too_large = True
        channel = self.channel
        if channel is not None and channel.transport is not None:
            body = json.dumps({"error": f"the request body is over {MAX_BODY} bytes"}).encode() + b"\n"
            channel.transport.write(b"HTTP/1.1 413 Request Entity Too Large\r\ncontent-type: application/json\r\n"
                                    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            channel.transport.loseConnection()


class _Site(Site):
    """The port's site: checks ``Host`` (console and API only), caps bodies, adds the security
    headers, and keeps its open connections so that :meth:`close_connections` ends them at stop."""

    requestFactory = _Request

    def __init__(self, resource: IResource, port: HttpPort) -> None:
        super().__init__(resource)
        self.port = port
        #: The connections open now.
        self.connections: set[Protocol] = set()

    def buildProtocol(self, addr: IAddress | None) -> Any:
        proto = super().buildProtocol(addr)
        if proto is None:
            return None
        self.connections.add(proto)
        lost = proto.connectionLost

        def connection_lost(reason: Failure, proto: Protocol = proto) -> None:
            self.connections.discard(proto)
            lost(reason)

        proto.connectionLost = connection_lost
        return proto

    def getResourceFor(self, request: Request) -> IResource:
        if getattr(request, "too_large", False):
            return _Refused(413, f"request body over {MAX_BODY} bytes")
        first = request.postpath[0] if request.postpath else b""
        if first in OPEN_PATHS:
            return super().getResourceFor(request)
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        host = request.getHeader(b"host")
        if not self.port.host_allowed(host):
            self.port._log.debug("HTTP: {path} refused, Host {host!r} not allowed", path=request.path, host=host)
            return _Refused(421, "this Host is not served here (ion.core.http: allowed_hosts)")
        return super().getResourceFor(request)

    def close_connections(self) -> None:
        """Close every open connection (abort: a keep-alive or a stream must not hold the stop)."""
        for proto in list(self.connections):
            # The site's protocol is a proxy of the HTTP channel, which has the transport.
            transport = getattr(getattr(proto, "_channel", proto), "transport", None)
            if transport is not None:
                transport.abortConnection()
        self.connections.clear()


class HttpPort:
    """Listens on the container's HTTP port while the container runs (see the module notes)."""

    _log = Logger()

    def __init__(self, container: Container) -> None:
        self.container = container
        self.listening: Any = None
        self.root = _Root()
        self.root.putChild(b"healthz", _Health(container))
        self.root.putChild(b"readyz", _Ready(container))
        self.root.putChild(b"metrics", _Metrics(container))
        from ion.core.console import Console

        #: The web console (mounted at start when ``console`` is on).
        self.console = Console(container)
        self.console_on = False
        self.site: _Site | None = None
        self._hosts: frozenset[str] = frozenset()

    @property
    def settings(self) -> HttpSettings:
        config = self.container.config
        return HttpSettings.from_config(lambda key, default: config.container_get(HttpSettings.SECTION, key, default))

    @property
    def port(self) -> int | None:
        """The TCP port listened on (None while closed)."""
        return None if self.listening is None else int(self.listening.getHost().port)

    @property
    def url(self) -> str | None:
        """``http://bind:port`` while listening."""
        if self.listening is None:
            return None
        host = self.listening.getHost()
        address = f"[{host.host}]" if ":" in host.host else host.host
        return f"http://{address}:{host.port}"

    def host_allowed(self, host: bytes | str | None) -> bool:
        """Whether a request with this ``Host`` header may reach the console (see the module notes)."""
        if host is None:
            return False
        text = (host.decode("ascii", errors="replace") if isinstance(host, bytes) else host).strip().lower()
        return text in self._hosts

    def _allowed_hosts(self, settings: HttpSettings) -> frozenset[str]:
        port = self.port
        names = {"localhost", "127.0.0.1", "[::1]"}
        bind = settings.bind.strip().lower()
        if bind not in ("", "0.0.0.0", "::"):
            names.add(f"[{bind}]" if ":" in bind else bind)
        else:  # listening everywhere: the host's name, which the agent announces (socket.gethostname)
            names.add(socket.gethostname().lower())
        hosts = {f"{name}:{port}" for name in names}
        for extra in settings.allowed_hosts:
            extra = extra.strip().lower()
            if extra:
                hosts.add(extra)
                if not extra.endswith("]") and ":" not in extra.rsplit("]", 1)[-1]:
                    hosts.add(f"{extra}:{port}")
        return frozenset(hosts)

    def start(self) -> defer.Deferred[None]:
        """Listen, if configured (the console's token written first); a port that cannot be had
        fails the container's start."""
        return defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        from twisted.internet.error import CannotListenError

        settings = self.settings
        if settings.port is None or self.listening is not None:
            return
        if settings.console and not self.console_on:
            from ion.core.console import api, static

            await self.console.prepare_token(settings.token, settings.token_file)
            index, files = static()
            self.root.putChild(b"", index)
            self.root.putChild(b"static", files)
            self.root.putChild(b"api", api(self.console))
            self.console_on = True
        site = _Site(self.root, self)
        site.noisy = False
        site.displayTracebacks = False
        try:
            self.listening = self.container.reactor.listenTCP(settings.port, site, interface=settings.bind)
        except CannotListenError as exc:
            await self.console.stop()
            raise ConfigurationError(
                f"{HttpSettings.SECTION}: cannot listen on {settings.bind}:{settings.port}: {exc.socketError}"
            ) from None
        self.site = site
        self._hosts = self._allowed_hosts(settings)
        self._log.info("container {id}: HTTP on {url} (/healthz, /readyz, /metrics{console})", id=self.container.id,
                       url=self.url, console=", the console at /" if self.console_on else "")

    def start_console(self) -> defer.Deferred[None]:
        """Spawn the console's process (the container calls this after spawning its agent)."""
        if self.listening is None or not self.console_on:
            return defer.succeed(None)
        return defer.ensureDeferred(self.console.start())

    def stop(self) -> defer.Deferred[None]:
        """Close the console's event streams, stop listening, close every connection still open,
        remove the generated token file."""
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await self.console.stop()
        listening, self.listening = self.listening, None
        site, self.site = self.site, None
        if listening is not None:
            await defer.maybeDeferred(listening.stopListening)
        if site is not None:
            site.close_connections()
