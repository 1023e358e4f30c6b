"""A slow HTTP repository: a folder served on loopback with each file's bytes paced to a rate.

The sample deployment finishes too fast to watch: ``deploy_async`` then
``job_status`` shows FINISHED before anyone can type. Served through this, the
same files take seconds, so the shell shows RUNNING and PARTIAL first::

    python -m ion.testing.slowrepo examples/repo --rate 20

serves ``examples/repo`` on ``http://127.0.0.1:8765/`` (``examples/deployment-http.json``
points there) until Ctrl-C. ``--rate`` takes bytes per second (``20``, ``200k``,
``1.5M``; ``k``/``M`` are 1024 and 1024²), ``--port 0`` picks a free port, ``--host``
another address (loopback by default). The first line on stdout names the URL.

It is ``twisted.web.static.File`` (autoindex pages, ``HEAD``, ``Range`` and
``Content-Length`` as the HTTP repository of ``ion.services.fetch`` uses them),
with the body of every file, whole or a range, written ``rate / 10`` bytes
every tenth of a second per response; listings and ``HEAD`` answers are not
slowed. Not for production: it serves anything under the folder to anyone who
can reach the address.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.web import server, static
from zope.interface import implementer

__all__ = ["SlowFile", "PacedProducer", "parse_rate", "listen", "main", "DEFAULT_PORT"]

#: The port of ``examples/deployment-http.json``.
DEFAULT_PORT = 8765
#: Seconds between two pieces of a paced body.
TICK = 0.1
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)(?:i?B)?(?:/s)?\s*$")


def parse_rate(text: str) -> int:
    """Bytes per second from ``20``, ``200k``, ``1.5M`` (``k`` = 1024, ``M`` = 1024²).

    :raises ValueError: naming the text, for anything else or a rate below 1 byte/s.
    """
    match = _RATE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a rate (bytes per second: 20, 200k, 1.5M)")
    rate = int(float(match.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()])
    if rate < 1:
        raise ValueError(f"{text!r}: the rate must be at least 1 byte per second")
    return rate


@implementer(IPushProducer)
class PacedProducer(static.StaticProducer):
    """Writes ``size`` bytes of a file from ``offset`` to a request, ``rate * TICK`` bytes per tick.

    A push producer: the request's transport pauses it when its buffer is full
    and resumes it when drained; pacing goes on from there.
    """

    def __init__(self, request: Any, fileObject: IO[bytes], offset: int, size: int, rate: int,
                 clock: IReactorTime) -> None:
        super().__init__(request, fileObject)
        self.offset, self.left = offset, size
        self.piece = max(1, round(rate * TICK))
        self.clock = clock
        self.paused = False
        self._call: Any = None

    def start(self) -> None:
        """Begin writing (called by ``static.File.render_GET``)."""
        self.fileObject.seek(self.offset)
        self.request.registerProducer(self, True)
        self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self._call is None and not self.paused and self.request is not None:
            self._call = self.clock.callLater(delay, self._write_piece)

    def _write_piece(self) -> None:
        self._call = None
        if self.request is None:
            return
        data = self.fileObject.read(min(self.piece, self.left)) if self.left > 0 else b""
        if data:
            self.left -= len(data)
            self.request.write(data)
        if self.request is None:
            return  # the connection went during the write
        if not data or self.left <= 0:
            self.request.unregisterProducer()
            self.request.finish()
            self.stopProducing()
            return
        self._schedule(TICK)

    def pauseProducing(self) -> None:
        self.paused = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule(TICK)

    def stopProducing(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        super().stopProducing()


class SlowFile(static.File):
    """``static.File`` whose file bodies are paced to ``rate`` bytes/s (per response)."""

    def __init__(self, path: str, rate: int, clock: IReactorTime | None = None, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.rate = rate
        self.clock = clock

    def createSimilarFile(self, path: str) -> SlowFile:
        similar = SlowFile(path, self.rate, self.clock, defaultType=self.defaultType)
        similar.processors, similar.indexNames = self.processors, self.indexNames[:]
        similar.childNotFound = self.childNotFound
        return similar

    def makeProducer(self, request: Any, fileForReading: IO[bytes]) -> Any:
        producer = super().makeProducer(request, fileForReading)  # sets the status and Content-* headers
        if isinstance(producer, static.SingleRangeStaticProducer):
            return PacedProducer(request, fileForReading, producer.offset, producer.size, self.rate, self.clock)
        if isinstance(producer, static.NoRangeStaticProducer):
            return PacedProducer(request, fileForReading, 0, self.getFileSize(), self.rate, self.clock)
        return producer  # several ranges in one response: not used by the fetcher, served unpaced


def listen(root: str | Path, rate: int, *, port: int = DEFAULT_PORT, host: str = "127.0.0.1",
           reactor: Any = None) -> Any:
    """Serve ``root`` paced to ``rate`` on ``host:port``; the listening port (``.getHost().port``)."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    folder = Path(root)
    if not folder.is_dir():
        raise ValueError(f"{root} is not a folder")
    site = server.Site(SlowFile(str(folder.resolve()), rate, reactor))
    site.noisy = False
    return reactor.listenTCP(port, site, interface=host)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ion.testing.slowrepo ROOT [--rate R] [--port P] [--host H]``: serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m ion.testing.slowrepo",
                                     description="Serve a repository folder over HTTP, each file paced to a rate.")
    parser.add_argument("root", help="the folder to serve (e.g. examples/repo)")
    parser.add_argument("--rate", default="20", help="bytes per second of each file (20, 200k, 1.5M; default 20)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    args = parser.parse_args(argv)
    try:
        rate = parse_rate(args.rate)
    except ValueError as exc:
        parser.error(str(exc))
    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError

    try:
        port = listen(args.root, rate, port=args.port, host=args.host, reactor=reactor)
    except (ValueError, CannotListenError) as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return 1
    address = port.getHost()
    host = f"[{address.host}]" if ":" in address.host else address.host
    print(f"Serving {args.root} on http://{host}:{address.port}/ ({rate} bytes/s per file); Ctrl-C stops",
          flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
