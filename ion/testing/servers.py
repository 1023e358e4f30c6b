# -*- test-case-name: tests.services.fetch.test_servers -*-
"""Repository servers for tests, on loopback: an S3 (moto) and an HTTP autoindex server.

- :class:`MotoServer`: moto's S3 on ``127.0.0.1:<free port>``, in a thread of
  this process (default) or as a ``moto_server`` subprocess; :meth:`MotoServer.env`
  gives the variables that point boto3 at it (``AWS_ENDPOINT_URL_S3``, dummy
  credentials, no config files, no instance metadata lookups), so nothing
  ever reaches a real AWS address. In a thread it counts the TCP connections
  it accepts and the requests it answers (:attr:`MotoServer.connections`,
  :attr:`MotoServer.requests`).
- :class:`HTTPRepositoryServer`: ``twisted.web.static.File`` over a folder
  (autoindex listings, as an HTTP repository serves them) on
  ``127.0.0.1:<free port>``, which also counts requests, can send
  ``Content-MD5`` (right or wrong), and can drop the connection in the middle
  of a file the first N times it is asked for. It counts the TCP connections
  it accepts (:attr:`HTTPRepositoryServer.connections`).
  With ``tls=self_signed_certificate()`` it serves HTTPS with a certificate no
  client trusts.
- :func:`write_tree` lays out files (``{"linux/zlib/1.2/zlib.tgz": b"..."}``)
  under a folder; :meth:`MotoServer.put_tree` does the same into a bucket.

The pytest fixtures over these live in :mod:`ion.testing.pytest_servers`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import socket
import socketserver
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import warnings
import zipfile
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.web import resource, server
from zope.interface import implementer

with warnings.catch_warnings():
    # static.File's class attributes use deprecated error pages; nothing we call.
    warnings.simplefilter("ignore", DeprecationWarning)
    from twisted.web import static

__all__ = ["MotoServer", "HTTPRepositoryServer", "write_tree", "free_port", "self_signed_certificate"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def self_signed_certificate(host: str = "127.0.0.1") -> tuple[bytes, bytes]:
    """A fresh self-signed certificate for ``host`` (an IP address or a name), and its key: PEM
    ``(certificate, key)``, made with ``cryptography`` (no file, no openssl command)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def tgz(members: Mapping[str, bytes]) -> bytes:
    """A tar.gz holding ``members`` (fixed mtimes: the same bytes every time)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zipped(members: Mapping[str, bytes]) -> bytes:
    """A zip holding ``members``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def write_tree(root: str | os.PathLike[str], files: Mapping[str, bytes | str]) -> Path:
    """Write ``{relative path: content}`` under ``root`` (folders made); returns ``root``."""
    root = Path(root)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


# -- S3 ----------------------------------------------------------------------------------------------
class MotoServer:
    """moto's S3 on loopback.

    :param host: the address to listen on; loopback only.
    :param port: 0 for a free one.
    :param subprocess_mode: run it in a child process (``python -m ion.testing.servers moto
        HOST PORT``; a benchmark's choice: the server then does not share this process's GIL).

    Unlike ``moto_server`` (werkzeug's development server, which closes every connection
    after one response), it keeps connections open (HTTP/1.1), as S3 does: a client's
    connection reuse can be seen, counted and timed.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, subprocess_mode: bool = False) -> None:
        if not host.startswith("127.") and host not in ("localhost", "::1"):
            raise ValueError(f"a test S3 server listens on loopback only, not {host}")
        self.host = host
        self.port = port
        self.subprocess_mode = subprocess_mode
        self._threaded: Any = None
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen[bytes] | None = None
        #: TCP connections accepted so far (thread mode only: a subprocess is not watched).
        self.connections = 0
        #: ``(method, path)`` of every request answered so far (thread mode only), in order;
        #: the path is the raw one (``/bucket/key``, query string left out).
        self.requests: list[tuple[str, str]] = []

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> MotoServer:
        """Start the server (blocks until it answers)."""
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        if self.subprocess_mode:
            self.port = self.port or free_port(self.host)
            self._process = subprocess.Popen(
                [sys.executable, "-m", "ion.testing.servers", "moto", self.host, str(self.port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(f"moto_server exited with {self._process.returncode}")
                try:
                    with socket.create_connection((self.host, self.port), timeout=0.5):
                        return self
                except OSError:
                    time.sleep(0.05)
            self.stop()
            raise RuntimeError(f"moto_server did not listen on {self.endpoint} within 30 s")
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        wsgi = _ThreadedWSGIServer((self.host, self.port), _KeepAliveHandler)
        wsgi.set_app(DomainDispatcherApplication(create_backend_app))
        self._threaded = wsgi
        self.host, self.port = str(wsgi.server_address[0]), int(wsgi.server_address[1])
        self._count(wsgi)
        self._thread = threading.Thread(target=wsgi.serve_forever, name="ion-moto-server", daemon=True)
        self._thread.start()
        return self

    def _count(self, wsgi_server: Any) -> None:
        """Count what the threaded server accepts (one ``process_request`` per connection)
        and the requests its WSGI app answers."""
        accept = wsgi_server.process_request
        app = wsgi_server.get_app()

        def process_request(request: Any, client_address: Any) -> Any:
            self.connections += 1  # (one accepting thread: no race)
            return accept(request, client_address)

        def counted_app(environ: dict[str, Any], start_response: Any) -> Any:
            self.requests.append((str(environ.get("REQUEST_METHOD", "")), str(environ.get("PATH_INFO", ""))))
            return app(environ, start_response)

        wsgi_server.process_request = process_request
        wsgi_server.set_app(counted_app)

    def count(self, method: str | None = None, prefix: str = "") -> int:
        """How many requests (of ``method``, if given) had a path starting with ``prefix``
        (``/<bucket>/``: one bucket's)."""
        return sum(1 for m, p in list(self.requests) if p.startswith(prefix) and (method is None or m == method))

    def stop(self) -> None:
        """Stop the server."""
        if self._threaded is not None:
            self._threaded.shutdown()
            self._threaded.server_close()
            self._threaded = None
            if self._thread is not None:
                self._thread.join()
                self._thread = None
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def env(self, *, credentials: bool = True) -> dict[str, str | None]:
        """Variables that point boto3 at this server and at nothing else (None: unset it).

        ``credentials=False`` leaves boto3 without any credentials at all (anonymous only).
        """
        env: dict[str, str | None] = {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ENDPOINT_URL": None,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": None,
            "AWS_PROFILE": None,
            "AWS_DEFAULT_PROFILE": None,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            # Never ask an instance metadata service (a link-local address) for credentials.
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None,
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": None,
            "AWS_WEB_IDENTITY_TOKEN_FILE": None,
            "AWS_SESSION_TOKEN": None,
            "AWS_SECURITY_TOKEN": None,
            "AWS_ACCESS_KEY_ID": "testing" if credentials else None,
            "AWS_SECRET_ACCESS_KEY": "testing" if credentials else None,
        }
        return env

    def client(self) -> Any:
        """A boto3 S3 client on this server with dummy credentials (to set buckets up)."""
        import boto3

        return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                     region_name="us-east-1").client("s3", endpoint_url=self.endpoint)

    def new_bucket(self, prefix: str = "ion-test") -> str:
        """Create a bucket with a unique name; returns the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def put_tree(self, bucket: str, files: Mapping[str, bytes | str], *, prefix: str = "",
                 acl: str | None = None) -> None:
        """Upload ``{relative key: content}`` under ``prefix`` (``acl="public-read"``: readable anonymously)."""
        client = self.client()
        for rel, content in files.items():
            key = f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel
            extra = {"ACL": acl} if acl else {}
            client.put_object(Bucket=bucket, Key=key, Body=content.encode() if isinstance(content, str) else content,
                              **extra)


class _KeepAliveHandler(WSGIRequestHandler):
    """A WSGI request handler that keeps HTTP/1.1 connections open (werkzeug's server, under
    ``moto_server``, closes every connection after one response).

    The request body is read whole (``Content-Length`` or chunked) before the application
    runs, so nothing it leaves unread can spoil the next request on the connection; a
    response without ``Content-Length`` is sent chunked.
    """

    protocol_version = "HTTP/1.1"
    #: Headers and body go out as separate writes: without TCP_NODELAY, Nagle's algorithm holds
    #: the body until the client's delayed ACK of the headers (40 ms per response on Linux).
    disable_nagle_algorithm = True

    def handle(self) -> None:
        try:
            BaseHTTPRequestHandler.handle(self)  # (wsgiref's own handles one request only)
        except (ConnectionError, TimeoutError):
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _run(self) -> None:
        body = self._body()
        environ = self.get_environ()
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["REQUEST_URI"] = environ["RAW_URI"] = self.path
        environ.update({"wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
                        "wsgi.url_scheme": "http", "wsgi.multithread": True, "wsgi.multiprocess": False,
                        "wsgi.run_once": False})
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            started[:] = [status, headers]
            return lambda data: None  # (no application here writes through it)

        result = self.server.get_app()(environ, start_response)  # type: ignore[attr-defined]
        try:
            status, headers = started
            code, _, phrase = status.partition(" ")
            self.send_response(int(code), phrase)
            names = {k.lower() for k, _ in headers}
            chunked = "content-length" not in names and self.command != "HEAD" and int(code) not in (204, 304)
            for key, value in headers:
                if key.lower() not in ("connection", "transfer-encoding", "server", "date"):
                    self.send_header(key, value)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for data in result:
                if data and self.command != "HEAD":
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        finally:
            if hasattr(result, "close"):
                result.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _run  # noqa: N815


class _ThreadedWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False


# -- HTTP --------------------------------------------------------------------------------------------
class _FaultyRoot(resource.Resource):
    """Serves ``static.File(root)``, with the server's counters and faults applied."""

    isLeaf = True

    def __init__(self, owner: HTTPRepositoryServer) -> None:
        super().__init__()
        self.owner = owner

    def render(self, request: Any) -> Any:
        owner = self.owner
        method = request.method.decode("ascii")
        rel = unquote(request.path.decode("ascii", "replace")).lstrip("/")
        owner.requests.append((method, rel))
        owner.cookies_sent.append((rel, (request.getHeader("cookie") or None)))
        owner._notify()
        path = owner.root / rel
        is_file = bool(rel) and path.is_file()
        if is_file and owner.content_md5 is not None:
            md5 = owner.content_md5.get(rel) if isinstance(owner.content_md5, dict) else None
            if md5 is None and owner.content_md5 is True:
                md5 = base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()
            if md5:
                request.setHeader(b"content-md5", md5.encode())
        for name, value in owner.headers.get(rel, {}).items():
            request.setHeader(name.encode(), value.encode())
        if is_file and method == "GET" and owner.stalls.get(rel, 0) > 0:
            owner.stalls[rel] -= 1
            data = path.read_bytes()
            request.setHeader(b"content-length", str(len(data)).encode())
            request.write(data[: max(1, len(data) // 2)])
            return server.NOT_DONE_YET  # and nothing more, ever: the client must give up
        if is_file and method == "GET" and owner.drops.get(rel, 0) > 0:
            owner.drops[rel] -= 1
            owner.dropped[rel] += 1
            data = path.read_bytes()
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", str(len(data)).encode())
            request.write(data[: max(1, len(data) // 2)])
            # The body is cut: the client sees the connection close before Content-Length bytes.
            # (A transport with a producer registered, the channel here, waits for it before
            # closing: unregister it so the half written is flushed and the connection closed.)
            transport = request.channel.transport
            transport.unregisterProducer()
            transport.loseConnection()
            return server.NOT_DONE_YET
        files = static.File(str(owner.root))
        files.indexNames = []  # autoindex pages only: an index.html is a file like any other
        child = resource.getChildForRequest(files, request)
        return child.render(request)


class _CountingSite(server.Site):
    """A ``Site`` counting the connections it is given (one protocol built per connection)."""

    def __init__(self, root: resource.Resource, owner: HTTPRepositoryServer) -> None:
        super().__init__(root)
        self.owner = owner

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 - Twisted's name
        self.owner.connections += 1
        return super().buildProtocol(addr)


@implementer(IOpenSSLContextFactory)
class _ServerTLS:
    """The server side's OpenSSL context for PEM ``certificate`` and ``key`` (a context factory)."""

    def __init__(self, certificate: bytes, key: bytes) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        from OpenSSL import SSL

        self._context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._context.use_certificate(x509.load_pem_x509_certificate(certificate))
        self._context.use_privatekey(load_pem_private_key(key, None))  # type: ignore[arg-type]

    def getContext(self) -> Any:  # noqa: N802 - Twisted's name
        return self._context


class HTTPRepositoryServer:
    """An HTTP repository over ``root``: ``static.File`` autoindex pages on ``127.0.0.1:<free port>``.

    :ivar requests: ``(method, relative path)`` of every request, in order.
    :ivar drops: ``{relative file path: n}``: the next ``n`` GETs of that file send
        half of it and close the connection (``Content-Length`` announces all of it).
    :ivar dropped: how many GETs were cut so far, per file.
    :ivar stalls: ``{relative file path: n}``: the next ``n`` GETs of that file send half
        of it and then nothing, keeping the connection open.
    :ivar content_md5: ``True``: send the right ``Content-MD5`` with every file; a dict
        ``{relative path: base64 md5}``: send those values (wrong ones, for a test); None: never.
    :ivar headers: ``{relative path: {header: value}}`` added to those responses.
    :ivar cookies_sent: ``(relative path, Cookie header or None)`` of every request, in order.
    :ivar connections: TCP connections accepted so far.
    """

    def __init__(self, root: str | os.PathLike[str], reactor: Any = None, *,
                 tls: tuple[bytes, bytes] | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.root = Path(root)
        self.requests: list[tuple[str, str]] = []
        self.drops: dict[str, int] = {}
        self.dropped: Counter[str] = Counter()
        self.stalls: dict[str, int] = {}
        self._waiters: list[tuple[str, str | None, int, defer.Deferred[None]]] = []
        self.content_md5: bool | dict[str, str] | None = None
        self.headers: dict[str, dict[str, str]] = {}
        self.cookies_sent: list[tuple[str, str | None]] = []
        self._port: Any = None
        self._site: Any = None
        self.connections = 0
        #: ``(certificate, key)`` PEM: serve HTTPS with them (see :func:`self_signed_certificate`).
        self.tls = tls

    @property
    def url(self) -> str:
        """``http(s)://127.0.0.1:<port>`` (the repository URL of ``root``)."""
        assert self._port is not None, "start() first"
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self._port.getHost().port}"

    def start(self, port: int = 0) -> HTTPRepositoryServer:
        """Listen on ``port`` (0: a free one), at once; the reactor serves once it runs."""
        self._site = _CountingSite(_FaultyRoot(self), self)
        self._site.displayTracebacks = False
        self._site.noisy = False
        if self.tls is None:
            self._port = self.reactor.listenTCP(port, self._site, interface="127.0.0.1")
        else:
            self._port = self.reactor.listenSSL(port, self._site, _ServerTLS(*self.tls), interface="127.0.0.1")
        return self

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Stop listening and close open connections."""
        if self._port is not None:
            port, self._port = self._port, None
            yield port.stopListening()

    def wait_for(self, rel: str, method: str | None = None, count: int = 1) -> defer.Deferred[None]:
        """Fires once ``count`` requests named ``rel`` (of ``method``) have arrived."""
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((rel, method, count, d))
        self._notify()
        return d

    def _notify(self) -> None:
        for waiter in list(self._waiters):
            rel, method, count, d = waiter
            if self.count(rel, method) >= count:
                self._waiters.remove(waiter)
                d.callback(None)

    def count(self, rel: str, method: str | None = None) -> int:
        """How many requests named ``rel`` (of ``method``, if given)."""
        return sum(1 for m, r in self.requests if r == rel and (method is None or m == method))


def _main(argv: list[str]) -> int:
    """``python -m ion.testing.servers moto HOST PORT``: serve moto's S3 until killed;
    ``python -m ion.testing.servers http ROOT PORT``: serve ``ROOT`` as an HTTP repository on
    ``127.0.0.1:PORT`` until killed (a benchmark's servers, in processes of their own)."""
    if len(argv) != 3 or argv[0] not in ("moto", "http"):
        print("usage: python -m ion.testing.servers moto HOST PORT | http ROOT PORT", file=sys.stderr)
        return 2
    if argv[0] == "moto":
        MotoServer(argv[1], int(argv[2])).start()
        threading.Event().wait()
        return 0  # pragma: no cover - killed
    from twisted.internet import reactor

    HTTPRepositoryServer(argv[1], reactor).start(int(argv[2]))
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
