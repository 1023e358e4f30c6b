# -*- test-case-name: tests.hostile.test_fetch -*-
"""Which addresses a fetch requested by message may connect to (DESIGN §10: a security bound).

A deployment that arrives by message may name any HTTP(S) repository, so the
Fetch service must not become a way into the networks it sits in (the cloud
metadata service at ``169.254.169.254``, an admin page on loopback, the hosts
of a private network). :class:`AddressGuard` refuses loopback, private
(RFC 1918, ``fc00::/7``, site-local), link-local (``169.254/16``,
``fe80::/10``), unspecified, multicast, reserved and other non-global
addresses, IPv4 inside IPv6 (mapped, 6to4, Teredo, NAT64) judged as IPv4,
unless the address is in one of the ``allowed_networks`` (config of
``ion.services.fetch``, CIDR strings; default none). It is read from the
container's config only: spawn arguments cannot widen it.

The check is made on the address a host name *resolved to*, at connection
time, by the HTTP agent's endpoints (:class:`GuardedEndpointFactory`): every
connection of the repository, redirects included, is made to an address
checked a moment before, never to a name resolved again later (DNS
rebinding). IP literals go through the same check. A refused address is an
:class:`~ion.services.fetch.errors.AddressNotAllowedError` (403) naming the
address and the config key, raised before any packet is sent to it.

``ion-deploy`` run by a user in process fetches with no guard: the user may
reach whatever they can.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any, Final

from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IResolutionReceiver, IStreamClientEndpoint
from zope.interface import implementer

from ion.core.exceptions import ConfigurationError
from ion.services.fetch.errors import AddressNotAllowedError

__all__ = ["AddressGuard", "GuardedEndpointFactory", "check_url_blocking", "CONFIG_KEY"]

#: The key (in ``ion.services.fetch``) listing the networks a fetch by message may reach anyway.
CONFIG_KEY: Final = "allowed_networks"
_SECTION: Final = "ion.services.fetch"
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo client, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _kind(ip: IPAddress) -> str | None:
    """What makes ``ip`` off limits (``loopback``, ``private``...), or None for a global unicast address."""
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "private (site-local)"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "non-global"
    return None


class AddressGuard:
    """Refuses connections to addresses a fetch by message may not reach (see the module notes).

    :param allowed_networks: CIDR strings (``"10.1.0.0/16"``, ``"::1/128"``) reachable anyway.
    :raises ConfigurationError: naming the key, for a value that is no network.
    """

    def __init__(self, allowed_networks: Iterable[str] = ()) -> None:
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for text in allowed_networks:
            if not isinstance(text, str):
                raise ConfigurationError(f"{_SECTION}: {CONFIG_KEY} must list networks as strings "
                                         f"('10.0.0.0/8'), not {text!r}")
            try:
                networks.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError as exc:
                raise ConfigurationError(f"{_SECTION}: {CONFIG_KEY}: {text!r} is not a network ({exc})") from None
        self.allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(networks)

    @classmethod
    def from_config(cls, value: Any) -> AddressGuard:
        """From the config value of ``allowed_networks`` (None: none)."""
        if value is None:
            return cls(())
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigurationError(f"{_SECTION}: {CONFIG_KEY} must be a list of networks "
                                     f"(['10.0.0.0/8']), not {value!r}")
        return cls(value)

    def describe_allowed(self) -> str:
        return ", ".join(str(n) for n in self.allowed) or "none"

    def refusal(self, address: str) -> str | None:
        """Why ``address`` (an IP literal) may not be reached (``a loopback address``), or None."""
        try:
            ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return "not an IP address"
        # An IPv6 form that carries an IPv4 address (mapped, NAT64, 6to4, Teredo) is judged,
        # and matched against allowed_networks, as the IPv4 address it reaches, and only so:
        # NAT64 of a global address is allowed, NAT64 of 169.254.169.254 is not, whatever
        # network the IPv6 form is in.
        inner = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
        judged: IPAddress = inner if inner is not None else ip
        if any(judged in net for net in self.allowed if judged.version == net.version):
            return None
        kind = _kind(judged)
        if kind is None:
            return None
        return f"a {kind} address" + (f" (IPv4 {judged} inside)" if inner is not None else "")

    def error(self, host: str, address: str, why: str, *, url: str | None = None) -> AddressNotAllowedError:
        """The 403 of a refused connection to ``address`` (that ``host`` resolved to)."""
        what = address if host.strip("[]") == address else f"{host} (resolved to {address})"
        return AddressNotAllowedError(
            f"{what} is {why}: a fetch requested by message may not connect to it (allowed_networks of "
            f"{_SECTION}: {self.describe_allowed()})", url=url, address=address)

    def check(self, host: str, address: str, *, url: str | None = None) -> None:
        """:raises AddressNotAllowedError: if ``address`` may not be reached."""
        why = self.refusal(address)
        if why is not None:
            raise self.error(host, address, why, url=url)


def check_url_blocking(guard: AddressGuard, url: str) -> None:
    """Resolve the host of an HTTP(S) ``url`` now and refuse it if no address it has may be reached.

    Blocking (``getaddrinfo``): run it in a pool. An early answer for a whole request (the Deploy
    service); the bound itself is the check at connection time. A name that does not resolve
    passes (the fetch reports it).

    :raises AddressNotAllowedError: naming the address and the config key.
    """
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme.lower() not in ("http", "https") or not host:
        return
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError, UnicodeError):
        return
    refused: list[tuple[str, str]] = []
    for info in infos:
        address = str(info[4][0])
        why = guard.refusal(address)
        if why is None:
            return
        refused.append((address, why))
    if refused:
        raise guard.error(host, *refused[0], url=url)


# -- the HTTP agent's endpoints ----------------------------------------------------------------------------
@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self) -> None:
        self.addresses: list[Any] = []
        self.done: defer.Deferred[list[Any]] = defer.Deferred()

    def resolutionBegan(self, resolution: Any) -> None:  # noqa: N802 - Twisted's interface
        pass

    def addressResolved(self, address: Any) -> None:  # noqa: N802
        self.addresses.append(address)

    def resolutionComplete(self) -> None:  # noqa: N802
        if not self.done.called:  # (cancelled meanwhile)
            self.done.callback(self.addresses)


@implementer(IStreamClientEndpoint)
class _GuardedEndpoint:
    """Resolves ``host``, keeps the addresses the guard allows, connects to them (one after the other)."""

    def __init__(self, reactor: Any, guard: AddressGuard, host: str, port: int, timeout: float | None) -> None:
        self.reactor = reactor
        self.guard = guard
        self.host = host
        self.port = port
        self.timeout = timeout

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        receiver = _Collect()
        self.reactor.nameResolver.resolveHostName(receiver, self.host, portNumber=self.port)
        resolved = await receiver.done
        allowed: list[Any] = []
        refused: list[tuple[str, str]] = []
        for address in resolved:
            if not isinstance(address, (IPv4Address, IPv6Address)):
                continue
            if any(a.host == address.host for a in allowed) or any(h == address.host for h, _ in refused):
                continue
            why = self.guard.refusal(address.host)
            if why is None:
                allowed.append(address)
            else:
                refused.append((address.host, why))
        if not allowed:
            if refused:
                raise self.guard.error(self.host, *refused[0])
            raise ierror.DNSLookupError(f"no address found for {self.host}")
        last: BaseException | None = None
        timeout = self.timeout or 30
        for address in allowed:  # connected by address: the name is never resolved again
            endpoint: TCP4ClientEndpoint | TCP6ClientEndpoint
            if isinstance(address, IPv6Address):
                endpoint = TCP6ClientEndpoint(self.reactor, address.host, self.port, timeout)
            else:
                endpoint = TCP4ClientEndpoint(self.reactor, address.host, self.port, timeout)
            try:
                return await endpoint.connect(factory)
            except ierror.ConnectError as exc:
                last = exc
        assert last is not None
        raise last


class GuardedEndpointFactory:
    """An ``IAgentEndpointFactory`` whose connections go only where an :class:`AddressGuard` allows
    (``Agent.usingEndpointFactory``): the same endpoints as Twisted's, by address, TLS included."""

    def __init__(self, reactor: Any, guard: AddressGuard, connect_timeout: float | None = None,
                 tls_policy: Any = None) -> None:
        from twisted.web.client import BrowserLikePolicyForHTTPS

        self.reactor = reactor
        self.guard = guard
        self.connect_timeout = connect_timeout
        self.tls_policy = tls_policy or BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> Any:  # noqa: N802 - Twisted's interface
        from twisted.web.error import SchemeNotSupported

        try:
            host = uri.host.decode("ascii") if isinstance(uri.host, bytes) else str(uri.host)
        except UnicodeDecodeError:
            raise ValueError(f"the host of {uri.toBytes()!r} is not ASCII (IDNA-encode it)") from None
        endpoint = _GuardedEndpoint(self.reactor, self.guard, host, uri.port, self.connect_timeout)
        if uri.scheme == b"http":
            return endpoint
        if uri.scheme == b"https":
            return wrapClientTLS(self.tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
        raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
