"""Where a webhook may be delivered: its URL's host resolved and every address checked
against a deny list, at submission and again before each delivery attempt.

Refused: loopback, private (RFC 1918, unique-local), link-local, shared (CGNAT),
multicast, unspecified, reserved and documentation ranges (whatever is not globally
routable), the same addresses written as IPv6 (IPv4-mapped, IPv4-compatible, NAT64,
6to4, Teredo), and cloud metadata endpoints. The operator's allow-list
(webhook_allow: host names and networks) lets some of these through, never a
metadata endpoint.

A delivery connects to the very address that was checked (the `Target`): the host
name is not resolved a second time, so a name that answers a public address at the
check and a private one a moment later (DNS rebinding) cannot steer the connection.
Every refusal says only "not allowed": not which rule, not whether the name resolved.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from yarl import URL

from thaw.core.addresses import (
    METADATA_ADDRESSES,
    IPAddress,
    IPNetwork,
    forms_of,
    is_denied,
)
from thaw.core.errors import InvalidArgument
from thaw.gateway.request import WEBHOOK_HEADER

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the addresses the host resolves to, as text."""

# A name that does not resolve within this long is refused (as "not allowed").
RESOLVE_TIMEOUT_SECONDS = 5.0
NOT_ALLOWED = "the webhook URL is not allowed"


class WebhookNotAllowed(InvalidArgument):
    """The webhook's host is on the deny list (or could not be resolved)."""

    code = "webhook_not_allowed"

    def __init__(self) -> None:
        super().__init__(NOT_ALLOWED, field=WEBHOOK_HEADER)


@dataclass(frozen=True)
class Target:
    """A webhook URL checked: where to connect (`address`, the checked one) and what
    to name there (`host` for the Host header and TLS)."""

    url: str
    scheme: str
    host: str
    port: int
    address: str

    @property
    def connect_url(self) -> URL:
        """The URL with the checked address in place of the host name."""
        return URL(self.url).with_host(self.address).with_fragment(None)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses by the system's resolver (off the event loop: asyncio
    runs getaddrinfo in its executor)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class WebhookPolicy:
    """The operator's allow-list, parsed (entries as core/config_fields.py
    `webhook_allow_entry` normalises them)."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def of(cls, entries: Iterable[str]) -> WebhookPolicy:
        hosts, networks = set(), []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def admits(self, host: str, ip: IPAddress) -> bool:
        forms = forms_of(ip)
        if any(form in METADATA_ADDRESSES for form in forms):
            return False
        if host.lower().rstrip(".") in self.hosts:
            return True
        return all(not is_denied(form) or any(form in net for net in self.networks)
                   for form in forms)


def _parse(url: str) -> tuple[str, str, int]:
    """(scheme, host as sent on the wire: IDNA, no brackets, port)."""
    try:
        parsed = URL(url)
        host, port, scheme = parsed.raw_host, parsed.port, parsed.scheme
    except (ValueError, UnicodeError):
        raise WebhookNotAllowed() from None
    if not host or scheme not in ("http", "https") or port is None:
        raise WebhookNotAllowed()
    return scheme, host.lower(), port


class WebhookGuard:
    """Checks webhook URLs against the deny list and the operator's allow-list."""

    def __init__(self, allow: Sequence[str] = (), resolver: Resolver = system_resolver
                 ) -> None:
        self.policy = WebhookPolicy.of(allow)
        self.resolver = resolver

    async def check(self, url: str) -> Target:
        """The address to deliver `url` to; WebhookNotAllowed unless every address
        its host resolves to may be reached."""
        scheme, host, port = _parse(url)
        try:
            addresses: list[IPAddress] = [ipaddress.ip_address(host)]
        except ValueError:
            addresses = await self._resolve(host, port)
        if not addresses or not all(self.policy.admits(host, ip) for ip in addresses):
            raise WebhookNotAllowed()
        return Target(url=url, scheme=scheme, host=host, port=port,
                      address=str(addresses[0]))

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
                found = await self.resolver(host, port)
            # An interface scope (fe80::1%eth0) is no part of the address checked.
            return [ipaddress.ip_address(a.split("%", 1)[0]) for a in found]
        except (OSError, TimeoutError, ValueError, UnicodeError):
            raise WebhookNotAllowed() from None
