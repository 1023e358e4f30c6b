# -*- test-case-name: tests.core.test_security -*-
"""Who may do what in a system (DESIGN §10).

**Identity** is the broker-validated login of a message: its ``broker-user``,
which the receiving transport sets from the AMQP ``user_id`` property
(RabbitMQ checks it against the publishing connection) and never takes from
the body. Headers a caller writes (``user-id``, ``sender``) are claims and
are never grounds for a decision here.

**Control operations** change the system rather than use it: spawning a
process through an agent, terminating a process, cancelling a deploy job,
cache verify, repair, reap, prune and clear, and the ops only the system's
own services use on its cache (lock, publish, staging; unpacking into it).
They are allowed only to the system's *operators*: the container's own
broker user (the system itself: other containers, their shells, their
elected reaper) plus the broker users listed in ``ion.core.security:
operators``. An op is made a control operation by :func:`control` (looked up
along the class's MRO, so an override keeps it); the process checks the
caller before the op runs, so no op can forget to. A refusal is a 403
(:class:`UnauthorizedError`) and one warning line naming the broker user,
the action and the target (repeats counted, one line per interval).

**Security bounds** are settings that limit what a process may touch
(allowed roots, size limits, allowed networks). They come from the
container's own configuration (``ion.config``, ``ionlocal.config``, the
command line); an app's ``config`` and a process's spawnargs may only
*narrow* them (:meth:`ion.core.process.Process.bounded_config`), and one
that would widen a bound fails the spawn with a :class:`ConfigurationError`
naming the setting. The operator list itself is read from the container's
layers only.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from twisted.logger import Logger

from ion.core.exceptions import ApplicationError, ConfigurationError
from ion.core.log import LogLimiter

if TYPE_CHECKING:
    from ion.core.container import Container

__all__ = [
    "SECTION",
    "UnauthorizedError",
    "control",
    "control_action",
    "audit_action",
    "operators",
    "authorize",
    "is_operator",
    "Narrow",
    "narrow_roots",
    "narrow_root",
    "narrow_limit",
    "narrow_subset",
    "narrow_networks",
]

#: The config section of this module's settings.
SECTION = "ion.core.security"

_log = Logger()

F = TypeVar("F", bound=Callable[..., Any])

#: The attribute :func:`control` sets on an op.
_CONTROL_ATTR = "__ion_control__"

#: The attribute :func:`ion.core.audit.audited` sets on an op.
AUDITED_ATTR = "__ion_audited__"


class UnauthorizedError(ApplicationError):
    """The caller's broker user may not do this (403)."""

    code = 403


#: The attribute :func:`control` sets on an op it is told not to audit.
_UNAUDITED_ATTR = "__ion_control_unaudited__"


def control(action: str, *, audited: bool = True) -> Callable[[F], F]:
    """Mark an ``op_*`` method as the control operation ``action`` (e.g. ``"process.terminate"``):
    only the system's operators may call it (see the module notes).

    :param audited: record each call in the audit trail (:mod:`ion.core.audit`); False for the
        mechanics the system's own services run for every fetch (cache locks, staging, unpack).
    """

    def mark(op: F) -> F:
        setattr(op, _CONTROL_ATTR, action)
        if not audited:
            setattr(op, _UNAUDITED_ATTR, True)
        return op

    return mark


def control_action(cls: type, op: str) -> str | None:
    """The control action the op ``op_<op>`` of ``cls`` was marked with by :func:`control`, or None.

    Looked up along the class's MRO: an override in a subclass that forgot the mark stays
    a control operation. (A process looks it up once per class and op, see ``_op_entry`` of
    :mod:`ion.core.process`.)
    """
    return cast("str | None", _mark(cls, op, _CONTROL_ATTR))


def _mark(cls: type, op: str, attr: str) -> Any:
    """The value ``attr`` has on the first ``op_<op>`` along ``cls``'s MRO that has it, or None."""
    name = "op_" + op
    return next((getattr(klass.__dict__[name], attr) for klass in cls.__mro__
                 if name in klass.__dict__ and hasattr(klass.__dict__[name], attr)), None)


def audit_action(cls: type, op: str) -> str | None:
    """The action under which a call of ``op_<op>`` of ``cls`` is audited, or None: its control
    action unless marked ``audited=False``, else the action of :func:`ion.core.audit.audited`."""
    action = control_action(cls, op)
    if action is None:
        return cast("str | None", _mark(cls, op, AUDITED_ATTR))
    return None if _mark(cls, op, _UNAUDITED_ATTR) else action


def operators(container: Container) -> frozenset[str]:
    """The broker users that may run control operations in ``container``'s system.

    The container's own broker user always is one; ``ion.core.security: operators``
    adds more. Read from the container's own config layers only: an app cannot
    make itself an operator.
    """
    configured = container.config.container_get(SECTION, "operators", None)
    if configured is None:
        configured = []
    if isinstance(configured, str) or not isinstance(configured, (list, tuple, set, frozenset)) or not all(
            isinstance(u, str) and u for u in configured):
        raise ConfigurationError(f"{SECTION}: operators must be a list of broker user names, not {configured!r}")
    own = getattr(container.transport, "user", None)
    return frozenset(configured) | ({own} if isinstance(own, str) and own else frozenset())


def is_operator(container: Container, broker_user: object) -> bool:
    """True if ``broker_user`` (a message's ``broker-user``) is one of the system's operators."""
    return isinstance(broker_user, str) and broker_user in operators(container)


def authorize(container: Container, msg: Mapping[str, Any], action: str, target: str, *,
              limiter: LogLimiter | None = None) -> None:
    """Let ``msg`` run the control operation ``action`` on ``target``, or refuse it.

    :param limiter: counts repeated refusals of one broker user and action (one line per
        interval, see :class:`~ion.core.log.LogLimiter`) instead of a line each.
    :raises UnauthorizedError: (403) if the message's ``broker-user`` is not an operator;
        the refusal is logged once, with the broker user, the action and the target.
    """
    user = msg.get("broker-user")
    if is_operator(container, user):
        return
    fmt = ("refused {action} on {target} to broker user {user!r} (claims user-id {claimed!r}, sender "
           "{sender!r}): not an operator of system {sysname}")
    fields = {"action": action, "target": target, "user": user, "claimed": msg.get("user-id"),
              "sender": msg.get("sender"), "sysname": container.sysname}
    if limiter is not None:
        limiter.warn(_log, ("refused", action, str(user)), fmt, **fields)
    else:
        _log.warn(fmt, **fields)
    raise UnauthorizedError(f"{action} on {target} is a control operation; broker user {user!r} is not an "
                            f"operator of system {container.sysname} (config {SECTION}: operators)")


# -- narrowing of security bounds ----------------------------------------------------------------
#: ``narrow(current, requested, what)`` -> the narrowed value, or ConfigurationError if wider.
Narrow = Callable[[Any, Any, str], Any]


def _real(path: str) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))


def _list_of_str(value: Any, what: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(f"{what} must be a list of strings, not {value!r}")
    return list(value)


def narrow_roots(current: Any, requested: Any, what: str) -> list[str]:
    """Folders: each requested root must lie under one of the current roots (symlinks resolved)."""
    have = [_real(r) for r in _list_of_str(current, what)]
    wanted = _list_of_str(requested, what)
    wider = [r for r in wanted if not any(_real(r).is_relative_to(h) for h in have)]
    if wider:
        raise ConfigurationError(
            f"{what}: {wider[0]!r} is not under the container's roots ({', '.join(map(str, have)) or 'none'}); "
            f"a security setting may only be narrowed")
    return wanted


def narrow_root(current: Any, requested: Any, what: str) -> str:
    """One folder: the requested one must be the current one or lie inside it (symlinks resolved)."""
    for value in (current, requested):
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"{what} must be a folder (a string), not {value!r}")
    if not _real(requested).is_relative_to(_real(current)):
        raise ConfigurationError(f"{what}: {requested!r} is not inside the container's {current!r}; "
                                 f"a security setting may only be narrowed")
    return str(requested)


def narrow_limit(current: Any, requested: Any, what: str) -> Any:
    """A number: the requested one may be smaller, never larger (``None`` as current means no limit)."""
    if isinstance(requested, bool) or not isinstance(requested, (int, float)):
        raise ConfigurationError(f"{what} must be a number, not {requested!r}")
    if current is not None and requested > current:
        raise ConfigurationError(f"{what}: {requested!r} is more than the container's {current!r}; "
                                 f"a security setting may only be narrowed")
    return requested


def narrow_subset(current: Any, requested: Any, what: str) -> list[str]:
    """Names: each requested one must be among the current ones."""
    have = set(_list_of_str(current, what))
    wanted = _list_of_str(requested, what)
    extra = [w for w in wanted if w not in have]
    if extra:
        raise ConfigurationError(f"{what}: {extra[0]!r} is not in the container's list; "
                                 f"a security setting may only be narrowed")
    return wanted


def narrow_networks(current: Any, requested: Any, what: str) -> list[str]:
    """Networks (CIDR strings): each requested one must be inside one of the current ones."""

    def nets(values: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        try:
            return [ipaddress.ip_network(v, strict=False) for v in values]
        except ValueError as exc:
            raise ConfigurationError(f"{what}: {exc}") from None

    have = nets(_list_of_str(current, what))
    wanted_text = _list_of_str(requested, what)
    for text, net in zip(wanted_text, nets(wanted_text), strict=True):
        if not any(net.version == h.version and net.subnet_of(h) for h in have):  # type: ignore[arg-type]
            raise ConfigurationError(f"{what}: {text!r} is not inside the container's networks; "
                                     f"a security setting may only be narrowed")
    return wanted_text
