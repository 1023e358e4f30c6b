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
``/metrics``   Prometheus text format (:mod:`ion.core.metrics`), rendered
               by ``prometheus_client.twisted.MetricsResource``
``/``          the web console (:mod:`ion.core.console`): the page, its
               files under ``/static/``, its JSON under ``/api/``
=============  ==========================================================

The console is on with the port unless ``console`` is false. Its actions
need the operator token: ``token``, else one generated at start into
``token_file`` (default ``ion-console-<container id>.token`` in the working
folder, mode 0600, removed at stop).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from ion.core.config import Settings, setting
from ion.core.exceptions import ConfigurationError
from ion.core.health import liveness, readiness

if TYPE_CHECKING:
    from ion.core.container import Container

__all__ = ["HttpSettings", "HttpPort"]


@dataclass(frozen=True)
class HttpSettings(Settings):
    """``ion.core.http``: the container's HTTP port (read from the container's own layers).

    :ivar port: TCP port; None: no HTTP port; 0: any free one.
    :ivar bind: the address to listen on.
    :ivar console: serve the web console at ``/``.
    :ivar token: the console's operator token; None: one is generated at start.
    :ivar token_file: where a generated token is written (None: ``ion-console-<container id>.token``
        in the working folder).
    """

    SECTION: ClassVar[str] = "ion.core.http"

    port: int | None = setting(None, minimum=0)
    bind: str = "127.0.0.1"
    console: bool = True
    token: str | None = None
    token_file: str | None = None


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
    """Takes the container's snapshot on the reactor thread, then lets ``prometheus_client`` render it."""

    isLeaf = True

    def __init__(self, container: Container) -> None:
        super().__init__()
        from prometheus_client.twisted import MetricsResource

        self.container = container
        self.render_resource = MetricsResource(container.metrics.registry)

    def render(self, request: Request) -> Any:
        self.container.metrics.snapshot()
        return self.render_resource.render(request)


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> IResource:
        from twisted.web.pages import notFound

        return notFound()


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
        site = Site(self.root)
        site.noisy = False
        site.displayTracebacks = False
        try:
            self.listening = self.container.reactor.listenTCP(settings.port, site, interface=settings.bind)
        except CannotListenError as exc:
            await self.console.stop()
            raise ConfigurationError(
                f"{HttpSettings.SECTION}: cannot listen on {settings.bind}:{settings.port}: {exc.socketError}"
            ) from None
        self._log.info("container {id}: HTTP on {url} (/healthz, /readyz, /metrics{console})", id=self.container.id,
                       url=self.url, console=", the console at /" if self.console_on else "")

    def start_console(self) -> defer.Deferred[None]:
        """Spawn the console's process (the container calls this after spawning its agent)."""
        if self.listening is None or not self.console_on:
            return defer.succeed(None)
        return defer.ensureDeferred(self.console.start())

    def stop(self) -> defer.Deferred[None]:
        """Close the console's event streams, stop listening, remove the generated token file."""
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await self.console.stop()
        listening, self.listening = self.listening, None
        if listening is not None:
            await defer.maybeDeferred(listening.stopListening)
