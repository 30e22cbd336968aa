"""Which IP addresses a node may connect to on someone else's behalf.

A connection made for a tenant or a build (a webhook's delivery, an environment's
package download) goes to globally routable addresses only: loopback, private
(RFC 1918, unique-local), link-local, shared (CGNAT), multicast, unspecified, reserved
and documentation ranges are denied, also written as IPv6 (IPv4-mapped,
IPv4-compatible, NAT64, 6to4, Teredo). Cloud metadata endpoints are never reachable,
whatever an operator allows.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance metadata services (AWS, GCP and Azure share 169.254.169.254; AWS's IPv6
# one; ECS task metadata; Alibaba; Oracle's legacy one).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "fd00:ec2::254", "169.254.170.2", "169.254.170.23",
    "100.100.100.200", "192.0.0.192"))
# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64, RFC 6052
# and RFC 8215; IPv4-compatible, RFC 4291 2.5.5.1).
_V4_IN_LAST_32 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"),
                  ipaddress.ip_network("::/96"))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for or tunnels to, if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _V4_IN_LAST_32) and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


def _public(ip: IPAddress) -> bool:
    return ip.is_global and not (ip.is_multicast or ip.is_private or ip.is_loopback
                                 or ip.is_link_local or ip.is_unspecified
                                 or ip.is_reserved)


def forms_of(ip: IPAddress) -> list[IPAddress]:
    """The address and any IPv4 address it carries: each must pass."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if ip.ipv4_mapped is not None:
            return [ip.ipv4_mapped]  # it is that IPv4 address, nothing else
        if inner is not None:
            return [ip, inner]
    return [ip]


def is_denied(ip: IPAddress) -> bool:
    """On the deny list (before any operator allowance is consulted)."""
    return any(form in METADATA_ADDRESSES or not _public(form) for form in forms_of(ip))


def is_metadata(ip: IPAddress) -> bool:
    """A cloud metadata endpoint, in any of its forms: never allowed."""
    return any(form in METADATA_ADDRESSES for form in forms_of(ip))


def admitted(ip: IPAddress, allowed: tuple[IPNetwork, ...] = ()) -> bool:
    """Whether `ip` may be connected to: not denied, or every denied form of it inside
    a network the operator allowed; a metadata endpoint never."""
    if is_metadata(ip):
        return False
    return all(not is_denied(form) or any(form in net for net in allowed)
               for form in forms_of(ip))
