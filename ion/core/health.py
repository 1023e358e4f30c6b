# -*- test-case-name: tests.core.test_health -*-
"""Is the container alive, and is it ready to take work? (``/healthz``, ``/readyz``, systemd).

*Alive* means the reactor turns: whoever can ask gets an answer from the
reactor thread itself, so a probe that times out is the verdict. *Ready*
means the container can serve what it runs: it is ACTIVE and not stopping
(a SIGTERM drain makes it unready at once), its connection to the broker is
up, no app has failed, and every process of every running app is ACTIVE.
:func:`readiness` lists what is wrong, in words an operator can act on.

:func:`sd_notify` tells systemd (``Type=notify`` units) when the container
is ready and when it stops, through ``$NOTIFY_SOCKET``; without that variable
it does nothing.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from ion.core.lifecycle import State

if TYPE_CHECKING:
    from ion.core.container import Container

__all__ = ["Readiness", "readiness", "liveness", "sd_notify"]

_log = Logger()


@dataclass(frozen=True)
class Readiness:
    """The verdict of :func:`readiness`: ready when ``problems`` is empty."""

    problems: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.problems

    def to_json(self, container: Container) -> dict[str, Any]:
        return {"ready": self.ready, "container": container.id, "system": container.sysname,
                "problems": list(self.problems)}


def liveness(container: Container) -> dict[str, Any]:
    """What ``/healthz`` answers (always 200: being able to answer is the proof)."""
    started = container.started_at
    return {"alive": True, "container": container.id, "system": container.sysname, "state": container.state.value,
            "uptime": None if started is None else round(container.clock.seconds() - started, 3)}


def readiness(container: Container) -> Readiness:
    """Whether ``container`` can take work now, and if not, why."""
    problems: list[str] = []
    if container.stopping:
        problems.append(f"container {container.id} is stopping")
    elif container.state is not State.ACTIVE:
        problems.append(f"container {container.id} is {container.state.value}, not ACTIVE")
    if not container.exchange_manager.connected:
        problems.append(f"not connected to the broker ({container.exchange_manager.lost_reason or 'connecting'})")
    apps = container.app_manager
    for name, reason in sorted(apps.failed.items()):
        problems.append(f"app {name} failed: {reason}")
    procs = container.proc_manager
    for name, running in apps.running.items():
        for pid in getattr(running.state, "pids", None) or ():
            proc = procs.get(pid)
            if proc is None:
                problems.append(f"app {name}: process {pid} is gone (being restarted?)")
            elif proc.state is not State.ACTIVE:
                problems.append(f"app {name}: process {proc.proc_name} ({pid}) is {proc.state.value}")
    return Readiness(problems)


def sd_notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"STOPPING=1"``) to systemd's ``$NOTIFY_SOCKET``.

    A datagram on a local socket: it never blocks for long. Fires and forgets: a missing
    variable answers False; a socket that cannot be reached is logged, never raised.
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # Linux abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(state.encode(), address)
    except OSError as exc:
        _log.warn("could not tell systemd {state!r} through NOTIFY_SOCKET {address!r}: {exc}",
                  state=state, address=env.get("NOTIFY_SOCKET"), exc=exc)
        return False
    return True
