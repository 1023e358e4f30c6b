"""A private RabbitMQ for tests: its own node, ports, data dir and cookie, all on loopback.

::

    server = RabbitMQServer()
    server.start()                      # ~10 s; raises BrokerUnavailable with the reason
    url = server.new_vhost_url()        # amqp://guest:guest@127.0.0.1:<port>/<fresh vhost>
    server.add_user("alice", "secret", vhost="...")
    login = server.new_user(vhost="...")  # a fresh non-guest user: login.name, .password, .url
    server.stop_app(); server.start_app()   # broker restart, the node stays up
    server.stop()                       # stops the node, removes its directory

The server runs Debian's ``rabbitmq-server`` as a child process (not
``-detached``, so the test session owns it by pid) with a private Erlang
port mapper (``ERL_EPMD_PORT``), distribution ports, ``HOME`` (hence Erlang
cookie), config and plugins files in a temporary directory, so it never
touches a system broker or another test session's. Vhosts and users are made
through the management HTTP API when the plugin is there (milliseconds per
test), else through ``rabbitmqctl`` (about a second each).

:func:`from_environment` honours ``ION_TEST_AMQP_URL`` (reuse
a running broker; ``ION_TEST_AMQP_ADMIN_URL`` optionally names its
management API, ``http://user:pass@host:15672``, for fresh vhosts).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "RabbitMQServer",
    "RabbitMQCluster",
    "ExternalBroker",
    "BrokerLogin",
    "BrokerUnavailable",
    "find_rabbitmq",
    "install_rabbitmq",
    "free_port",
    "from_environment",
]

#: Where Debian keeps the real scripts (``/usr/sbin/rabbitmq-server`` is a
#: wrapper that switches to the ``rabbitmq`` user and its system directories).
_DEBIAN_BIN = Path("/usr/lib/rabbitmq/bin")


class BrokerUnavailable(RuntimeError):
    """Raised when a test broker cannot be found, installed or started; says why."""


def free_port(low: int = 5679, high: int = 30000, *, span: int = 1) -> int:
    """A TCP port on 127.0.0.1 (and the ``span - 1`` after it) that nothing listens on.

    Ports are probed from a random start in ``[low, high)`` so that parallel
    test sessions rarely race for the same one.
    """
    start = low + secrets.randbelow(max(1, high - low))
    for i in range(high - low):
        port = low + (start - low + i) % (high - low)
        if all(_port_free(p) for p in range(port, port + span)):
            return port
    raise BrokerUnavailable(f"no free port between {low} and {high}")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def find_rabbitmq() -> tuple[str, str] | None:
    """Paths of (``rabbitmq-server``, ``rabbitmqctl``), preferring Debian's real scripts."""
    server = _DEBIAN_BIN / "rabbitmq-server"
    ctl = _DEBIAN_BIN / "rabbitmqctl"
    if server.exists() and ctl.exists():
        return str(server), str(ctl)
    found_server, found_ctl = shutil.which("rabbitmq-server"), shutil.which("rabbitmqctl")
    if found_server and found_ctl:
        return found_server, found_ctl
    return None


def install_rabbitmq() -> None:
    """``apt-get install -y rabbitmq-server`` (with ``apt-get update`` if the first try fails).

    :raises BrokerUnavailable: when not root, without apt-get, or when the install fails.
    """
    if find_rabbitmq():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BrokerUnavailable("rabbitmq-server is not installed (install it with "
                                "`apt-get install -y rabbitmq-server` as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "rabbitmq-server"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BrokerUnavailable(f"apt-get install rabbitmq-server failed: {proc.stderr.strip()[-500:]}")
    if not find_rabbitmq():
        raise BrokerUnavailable("rabbitmq-server was installed but its scripts are not found")


@dataclass(frozen=True)
class BrokerLogin:
    """A broker user made for a test, with all rights on ``vhost``."""

    name: str
    password: str
    host: str
    port: int
    vhost: str

    @property
    def url(self) -> str:
        """``amqp://name:password@host:port/vhost`` (URL-quoted)."""
        q = urllib.parse.quote
        vh = "" if self.vhost == "/" else q(self.vhost, safe="")
        return f"amqp://{q(self.name, safe='')}:{q(self.password, safe='')}@{self.host}:{self.port}/{vh}"


class _Admin:
    """Vhosts and users: through the management HTTP API, or ``rabbitmqctl``."""

    host = "127.0.0.1"
    port = 5672
    admin_user = "guest"
    admin_password = "guest"
    management_url: str | None = None

    def ctl(self, *args: str, timeout: float = 60) -> str:  # pragma: no cover - overridden
        raise BrokerUnavailable("this broker is not managed by the test session (no rabbitmqctl)")

    def _api(self, method: str, path: str, body: Any = None) -> Any:
        assert self.management_url
        parts = urllib.parse.urlsplit(self.management_url)
        user = urllib.parse.unquote(parts.username or self.admin_user)
        password = urllib.parse.unquote(parts.password or self.admin_password)
        base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    @staticmethod
    def _q(name: str) -> str:
        return urllib.parse.quote(name, safe="")

    def add_vhost(self, name: str) -> None:
        """Create vhost ``name`` and give the admin user all rights on it."""
        if self.management_url:
            self._api("PUT", f"/api/vhosts/{self._q(name)}", {})
        else:
            self.ctl("add_vhost", name)
        self.set_permissions(self.admin_user, name)

    def delete_vhost(self, name: str) -> None:
        """Delete vhost ``name`` with everything in it (no error if gone)."""
        try:
            if self.management_url:
                self._api("DELETE", f"/api/vhosts/{self._q(name)}")
            else:
                self.ctl("delete_vhost", name)
        except (urllib.error.HTTPError, BrokerUnavailable):
            pass

    def add_user(self, name: str, password: str, *, vhost: str | None = None, tags: str = "") -> None:
        """Create (or update) a broker user; with ``vhost``, give it all rights there."""
        if self.management_url:
            self._api("PUT", f"/api/users/{self._q(name)}", {"password": password, "tags": tags})
        else:
            try:
                self.ctl("add_user", name, password)
            except BrokerUnavailable as exc:
                if "already exists" not in str(exc):
                    raise
                self.ctl("change_password", name, password)
            if tags:
                self.ctl("set_user_tags", name, tags)
        if vhost is not None:
            self.set_permissions(name, vhost)

    def new_user(self, vhost: str, prefix: str = "ion-user") -> BrokerLogin:
        """Create a user with a random name and password and all rights on ``vhost``."""
        login = BrokerLogin(f"{prefix}-{secrets.token_hex(4)}", secrets.token_urlsafe(12), self.host, self.port,
                            vhost)
        self.add_user(login.name, login.password, vhost=vhost)
        return login

    def delete_user(self, name: str) -> None:
        """Delete a broker user (no error if gone)."""
        try:
            if self.management_url:
                self._api("DELETE", f"/api/users/{self._q(name)}")
            else:
                self.ctl("delete_user", name)
        except (urllib.error.HTTPError, BrokerUnavailable):
            pass

    def set_permissions(self, user: str, vhost: str, configure: str = ".*", write: str = ".*",
                        read: str = ".*") -> None:
        """Give ``user`` the given configure/write/read patterns on ``vhost``."""
        if self.management_url:
            self._api("PUT", f"/api/permissions/{self._q(vhost)}/{self._q(user)}",
                      {"configure": configure, "write": write, "read": read})
        else:
            self.ctl("set_permissions", "-p", vhost, user, configure, write, read)

    def url(self, vhost: str = "/", user: str | None = None, password: str | None = None) -> str:
        """``amqp://user:pass@host:port/vhost`` (vhost and credentials URL-quoted)."""
        user = user or self.admin_user
        password = self.admin_password if password is None else password
        vh = "" if vhost == "/" else self._q(vhost)
        return f"amqp://{self._q(user)}:{self._q(password)}@{self.host}:{self.port}/{vh}"

    def new_vhost_url(self, prefix: str = "ion-test") -> str:
        """Create a fresh vhost and return the admin's URL for it."""
        name = f"{prefix}-{secrets.token_hex(4)}"
        self.add_vhost(name)
        return self.url(name)


class ExternalBroker(_Admin):
    """A broker the test session did not start (``ION_TEST_AMQP_URL``).

    Without a management URL it cannot make vhosts: :meth:`new_vhost_url`
    then returns the given URL itself, and tests rely on unique names.
    """

    managed = False

    def __init__(self, url: str, management_url: str | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        self.given_url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 5672
        self.admin_user = urllib.parse.unquote(parts.username or "guest")
        self.admin_password = urllib.parse.unquote(parts.password or "guest")
        self.management_url = management_url

    def new_vhost_url(self, prefix: str = "ion-test") -> str:
        if self.management_url:
            return super().new_vhost_url(prefix)
        return self.given_url

    def delete_vhost(self, name: str) -> None:
        if self.management_url:
            super().delete_vhost(name)

    def stop(self) -> None:
        """Nothing to stop: the broker is not ours."""


class RabbitMQServer(_Admin):
    """One private RabbitMQ node, started and stopped by the test session.

    :param port: AMQP port (default: a free one from 5679 up).
    :param base_dir: where data, logs, config and cookie go (default: a new temp dir,
        removed by :meth:`stop`).
    :param management: enable the management plugin for fast vhost/user admin.
    """

    managed = True

    def __init__(self, *, port: int | None = None, base_dir: str | None = None,
                 management: bool = True, nodename: str | None = None, home: str | None = None,
                 epmd_port: int | None = None) -> None:
        found = find_rabbitmq()
        if found is None:
            raise BrokerUnavailable("rabbitmq-server is not installed (apt-get install -y rabbitmq-server)")
        self.server_bin, self.ctl_bin = found
        self.port = port or free_port(5679, 15000)
        self.nodename = nodename or f"ion-test-{os.getpid()}-{secrets.token_hex(2)}@localhost"
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="ion-rabbitmq-"))
        #: HOME of the node and its rabbitmqctl calls, hence its Erlang cookie (a cluster's nodes share one).
        self.home = Path(home) if home else self.base_dir
        #: A cluster's nodes share one port mapper, which the cluster ends (not each node).
        self._own_epmd = epmd_port is None
        if epmd_port is not None:
            self.epmd_port = epmd_port
        self.want_management = management and self._plugin_available("rabbitmq_management")
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._ports_chosen = False

    def __repr__(self) -> str:
        return f"<RabbitMQServer {self.nodename} amqp://127.0.0.1:{self.port}>"

    def _plugin_available(self, name: str) -> bool:
        plugins = Path(os.path.realpath(self.server_bin)).parent.parent / "plugins"
        return any(p.name.startswith(name + "-") for p in plugins.glob(name + "-*")) if plugins.is_dir() else False

    def _choose_ports(self) -> None:
        if self._ports_chosen:
            return
        # epmd, node distribution (+ the CLI's range at dist + 1 .. dist + 10) and management.
        if self._own_epmd:
            self.epmd_port = free_port(20000, 40000)
        self.dist_port = free_port(40000, 55000, span=11)
        self.management_port = free_port(15000, 20000) if self.want_management else None
        self._ports_chosen = True

    @property
    def env(self) -> dict[str, str]:
        """The environment every ``rabbitmq-server``/``rabbitmqctl`` call of this node gets."""
        base = self.base_dir
        loopback = "-kernel inet_dist_use_interface {127,0,0,1}"
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(self.home),  # hence a private ~/.erlang.cookie
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(self.dist_port + 1),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(self.dist_port + 10),
            "RABBITMQ_CTL_ERL_ARGS": loopback,
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": loopback,
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "RABBITMQ_ALLOW_INPUT": "",
        }

    def _write_config(self) -> None:
        base = self.base_dir
        for sub in ("mnesia", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            f"listeners.tcp.1 = 127.0.0.1:{self.port}",
            # Test machines have little disk and memory: never block publishers for it.
            "disk_free_limit.absolute = 1MB",
            "vm_memory_high_watermark.relative = 0.9",
            "log.console = false",
            "log.file.level = warning",
        ]
        if self.management_port:
            lines += [f"management.tcp.port = {self.management_port}", "management.tcp.ip = 127.0.0.1"]
        (base / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        (base / "advanced.config").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("# private test node: everything comes from the environment\n")
        plugins = "[rabbitmq_management]." if self.management_port else "[]."
        (base / "enabled_plugins").write_text(plugins + "\n")

    # -- running ---------------------------------------------------------------------
    def start(self, timeout: float = 90) -> None:
        """Start the node and wait until it accepts AMQP connections.

        :raises BrokerUnavailable: with the tail of the node's output if it does not come up.
        """
        self.launch()
        self.wait_started(time.monotonic() + timeout)

    def launch(self) -> None:
        """Start the node's process and return at once (:meth:`wait_started` waits for it)."""
        self._choose_ports()
        self._write_config()
        if self._log_file is None:
            self._log_file = open(self.base_dir / "server.out", "ab")
        self.process = subprocess.Popen(
            [self.server_bin], env=self.env, cwd=str(self.base_dir), stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_started(self, deadline: float) -> None:
        """Wait until the launched node accepts AMQP connections (``deadline``: ``time.monotonic()``).

        :raises BrokerUnavailable: with the tail of the node's output if it exits or does not come up.
        """
        assert self.process is not None, "launch() first"
        timeout = deadline - time.monotonic()
        # `await_startup` fails at once if the node is not up yet: poll `status` first.
        while True:
            if self.process.poll() is not None:
                raise BrokerUnavailable(f"rabbitmq-server exited with {self.process.returncode}:\n"
                                        f"{self._output_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerUnavailable(f"rabbitmq-server did not answer within {timeout:g} s:\n"
                                        f"{self._output_tail()}")
            if self._run_ctl(["-q", "status"], timeout=30).returncode == 0:
                break
            time.sleep(0.5)
        self.ctl("await_startup", timeout=max(5.0, deadline - time.monotonic()))
        if self.management_port:
            self.management_url = f"http://127.0.0.1:{self.management_port}"
            self._wait_management(deadline)

    def _wait_management(self, deadline: float) -> None:
        while True:
            try:
                self._api("GET", "/api/overview")
                return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.management_url = None  # fall back to rabbitmqctl
                    return
                time.sleep(0.2)

    def _output_tail(self, n: int = 3000) -> str:
        try:
            text = (self.base_dir / "server.out").read_text(errors="replace")
        except OSError:
            text = ""
        return text[-n:]

    def _run_ctl(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([self.ctl_bin, "-n", self.nodename, *args], env=self.env,
                                  cwd=str(self.base_dir), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, 124, "", f"timed out after {timeout:g} s")

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl -n <node> ARGS``; its output.

        :raises BrokerUnavailable: if it fails, with its error output.
        """
        proc = self._run_ctl(list(args), timeout)
        if proc.returncode != 0:
            raise BrokerUnavailable(f"rabbitmqctl {' '.join(args)} failed ({proc.returncode}): "
                                    f"{(proc.stderr or proc.stdout).strip()}")
        return proc.stdout

    def stop_app(self) -> None:
        """Stop the RabbitMQ application (every connection is closed); the node stays up."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        """Start the RabbitMQ application again after :meth:`stop_app`."""
        self.ctl("start_app")
        self.ctl("await_startup")

    def stop(self) -> None:
        """Stop the node, its private epmd, and remove its directory (when we made it)."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            self._run_ctl(["stop"], timeout=60)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.process = None
        if self._ports_chosen and self._own_epmd:
            # The node started a private epmd on its own port: end that one, and only that one.
            epmd = shutil.which("epmd") or self._erts_epmd()
            if epmd:
                subprocess.run([epmd, "-port", str(self.epmd_port), "-kill"], env=self.env,
                               capture_output=True, timeout=30)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    @staticmethod
    def _erts_epmd() -> str | None:
        for candidate in sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd")):
            return str(candidate)
        return None


def from_environment() -> ExternalBroker | None:
    """The broker named by ``ION_TEST_AMQP_URL``, if set."""
    url = os.environ.get("ION_TEST_AMQP_URL")
    if not url:
        return None
    return ExternalBroker(url, os.environ.get("ION_TEST_AMQP_ADMIN_URL") or None)


class _ClusterNode(RabbitMQServer):
    """One node of a :class:`RabbitMQCluster`: shared HOME (cookie) and port mapper, no management."""

    def wait_started(self, deadline: float) -> None:
        # Cheaper than polling `rabbitmqctl status` (an Erlang VM each time): wait until the node
        # has registered with the port mapper (`await_startup` fails at once before that).
        assert self.process is not None, "launch() first"
        short = self.nodename.split("@", 1)[0]
        epmd = shutil.which("epmd") or self._erts_epmd() or "epmd"
        while True:
            if self.process.poll() is not None:
                raise BrokerUnavailable(f"{self.nodename} exited with {self.process.returncode}:\n"
                                        f"{self._output_tail()}")
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"{self.nodename} did not register with epmd in time:\n"
                                        f"{self._output_tail()}")
            names = subprocess.run([epmd, "-port", str(self.epmd_port), "-names"], capture_output=True,
                                   text=True, timeout=30).stdout
            if f"name {short} at port" in names:
                break
            time.sleep(0.2)
        self.ctl("await_startup", timeout=max(5.0, deadline - time.monotonic()))

    def beam_pid(self) -> int:
        """The OS pid of the node's Erlang VM (``rabbitmq-server`` is a script that stays its parent):
        from the pid file the node writes at start, else asked of the node."""
        try:
            return int((self.base_dir / "rabbitmq.pid").read_text().strip())
        except (OSError, ValueError):
            return int(self.ctl("eval", "list_to_integer(os:getpid()).", timeout=30).strip())


class RabbitMQCluster(_Admin):
    """A cluster of ``size`` private RabbitMQ nodes on 127.0.0.1, started and stopped by the test session.

    ::

        cluster = RabbitMQCluster()         # 3 nodes
        cluster.start()                     # launched together, then joined to node 0 (12-25 s)
        urls = cluster.urls(vhost)          # one amqp:// URL per node, in node order
        cluster.kill_node(1)                # kill -9 of node 1's Erlang VM
        cluster.restart_node(1)             # the same node again, with its data: it rejoins
        cluster.stop()

    Every node is a :class:`RabbitMQServer` (own AMQP and distribution ports, data and log
    folders) with one HOME, hence one Erlang cookie, and one port mapper for all, so the nodes
    (and every ``rabbitmqctl`` call) find and trust each other. Vhosts and users are made with
    ``rabbitmqctl`` on a running node (no management plugin: it would slow every node's start).
    """

    managed = True

    def __init__(self, size: int = 3, *, base_dir: str | None = None) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="ion-rabbitmq-cluster-"))
        home = self.base_dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20))
            cookie.chmod(0o400)
        self.epmd_port = free_port(20000, 40000)
        tag = f"{os.getpid()}-{secrets.token_hex(2)}"
        self.nodes: list[_ClusterNode] = []
        ports: set[int] = set()
        for i in range(size):
            port = free_port(5679, 15000)
            while port in ports:
                port = free_port(5679, 15000)
            ports.add(port)
            node_dir = self.base_dir / f"node{i}"
            node_dir.mkdir(exist_ok=True)
            self.nodes.append(_ClusterNode(port=port, base_dir=str(node_dir), management=False,
                                           nodename=f"ion-c{i}-{tag}@localhost", home=str(home),
                                           epmd_port=self.epmd_port))
        self.port = self.nodes[0].port
        self._beam_pids: dict[int, int] = {}
        #: Seconds the last :meth:`start` took (launch until the cluster is formed).
        self.start_seconds: float | None = None

    def __repr__(self) -> str:
        return f"<RabbitMQCluster {', '.join(str(n.port) for n in self.nodes)}>"

    @property
    def ports(self) -> list[int]:
        """The AMQP port of each node, in node order."""
        return [n.port for n in self.nodes]

    def urls(self, vhost: str = "/", user: str | None = None, password: str | None = None) -> list[str]:
        """One ``amqp://`` URL per node (same vhost and login), in node order."""
        return [self.node_url(i, vhost, user, password) for i in range(len(self.nodes))]

    def node_url(self, i: int, vhost: str = "/", user: str | None = None, password: str | None = None) -> str:
        """The URL of node ``i``."""
        url = self.url(vhost, user, password)
        return url.replace(f"@{self.host}:{self.port}/", f"@{self.host}:{self.nodes[i].port}/", 1)

    def running(self, i: int) -> bool:
        """True if node ``i``'s process is alive (started and not killed or stopped)."""
        proc = self.nodes[i].process
        return proc is not None and proc.poll() is None

    # -- running -----------------------------------------------------------------------------------
    def start(self, timeout: float = 120) -> None:
        """Launch every node at once, wait for them, and join nodes 1.. to node 0.

        :raises BrokerUnavailable: with the reason (and the node's output) if it cannot be formed.
        """
        began = time.monotonic()
        deadline = began + timeout
        try:
            for node in self.nodes:
                node.launch()
            for node in self.nodes:
                node.wait_started(deadline)
            first = self.nodes[0].nodename
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", first)
                node.ctl("start_app")  # returns once the app runs again
            for i, node in enumerate(self.nodes):
                self._beam_pids[i] = node.beam_pid()
        except BrokerUnavailable:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl ARGS`` on the first running node."""
        for i, node in enumerate(self.nodes):
            if self.running(i):
                return node.ctl(*args, timeout=timeout)
        raise BrokerUnavailable("no node of the cluster is running")

    def kill_node(self, i: int) -> None:
        """``kill -9`` node ``i``'s Erlang VM (no clean shutdown: its connections just drop)."""
        node = self.nodes[i]
        pid = self._beam_pids.pop(i, None) or node.beam_pid()
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        if node.process is not None:
            try:
                node.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=10)

    def restart_node(self, i: int, timeout: float = 90) -> None:
        """Start node ``i`` again with its data; it rejoins the cluster."""
        node = self.nodes[i]
        node.launch()
        node.wait_started(time.monotonic() + timeout)
        self._beam_pids[i] = node.beam_pid()

    def ensure_running(self) -> None:
        """Restart every node that is not running (after a test killed one)."""
        for i in range(len(self.nodes)):
            if not self.running(i):
                self.restart_node(i)

    def cluster_nodes(self) -> list[str]:
        """The running nodes of the cluster, as a running node sees them."""
        out = self.ctl("eval", "rabbit_nodes:all_running().")
        return sorted(n.strip().strip("'") for n in out.strip().strip("[]").split(",") if n.strip())

    def stop(self) -> None:
        """Stop every node, the shared port mapper, and remove the cluster's directory (when we made it)."""
        for node in reversed(self.nodes):
            node.stop()
        epmd = shutil.which("epmd") or RabbitMQServer._erts_epmd()
        if epmd:
            env = {**os.environ, "ERL_EPMD_PORT": str(self.epmd_port), "ERL_EPMD_ADDRESS": "127.0.0.1"}
            subprocess.run([epmd, "-port", str(self.epmd_port), "-kill"], env=env, capture_output=True,
                           timeout=30)
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
