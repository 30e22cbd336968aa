"""A forward proxy that reaches the package indexes and nothing else.

An environment's build (uv, sandboxed under the builder uid) has no network of its own:
its sandbox holds only its loopback, where relay.py forwards each connection to this
proxy's unix socket. The proxy, in the agent, accepts `CONNECT host:port` (HTTPS) and an
absolute-form `GET`/`HEAD http://host:port/...` (a plain-HTTP index) for the host:port
pairs it was given, and answers 403 to anything else. It resolves names itself and
connects only to globally routable addresses (core/addresses.py), unless the operator
named the address itself (an index URL or `env_index_hosts` entry that is an IP
address) or a network it may be in; a metadata endpoint never. docs/environments.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import structlog

from thaw.core.addresses import IPAddress, IPNetwork, admitted, is_metadata

log = structlog.get_logger()

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the host's addresses, as text."""
Connector = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
"""(address, port) -> an open connection there."""

# A request's line and headers together; uv's are a few hundred bytes.
MAX_HEADER_BYTES = 16 * 1024
# Connections served at once (uv opens up to 50 downloads at a time); more wait.
MAX_CONNECTIONS = 64
# A client that sends no complete request within this long is dropped.
HEADER_TIMEOUT_SECONDS = 30.0
# Resolving an index's name, and connecting to it, may take this long each.
CONNECT_TIMEOUT_SECONDS = 30.0
# A tunnel with no byte either way for this long is closed.
IDLE_TIMEOUT_SECONDS = 120.0
# Refusals remembered for the build's failure message and for tests.
KEPT_REFUSALS = 64
_CHUNK = 64 * 1024
_REASONS = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 502: "Bad Gateway"}


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses by the system's resolver (asyncio runs getaddrinfo in its
    executor: off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def open_tcp(address: str, port: int
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(address, port, limit=_CHUNK)


class ProxyRefusal(Exception):
    """A request the proxy answers with an error status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def normal_host(host: str) -> str:
    """A host as compared: lower case, no trailing dot, no IPv6 brackets."""
    return host.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """("host", port) of "host", "host:port", "[v6]" or "[v6]:port"; ValueError if
    malformed."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"malformed host {text!r}")
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text:
        host, port = text, ""  # a bare IPv6 address
    else:
        host, port = text, ""
    number = int(port) if port else default_port
    if not host or not 0 < number < 65536 or any(c in host for c in "/@ \t"):
        raise ValueError(f"malformed host {text!r}")
    return normal_host(host), number


@dataclass(frozen=True)
class Allowance:
    """What the proxy may reach: host:port pairs, and networks their names may resolve
    into besides globally routable addresses."""

    hosts: frozenset[tuple[str, int]] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    def permits(self, host: str, port: int) -> bool:
        return (normal_host(host), port) in self.hosts

    def reaches(self, host: str, ip: IPAddress) -> bool:
        """Whether `ip`, an address of `host`, may be connected to: a named address
        (the host is that very address) or an admitted one; a metadata endpoint never."""
        if is_metadata(ip):
            return False
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(normal_host(host)) == ip:
                return True
        return admitted(ip, self.networks)


@dataclass
class _Tunnel:
    last: float = 0.0
    """Loop time of the latest byte either way."""


class IndexProxy:
    """The proxy, served on a unix socket (`start`), stopped by `close`."""

    def __init__(self, allowance: Allowance, *, resolver: Resolver = system_resolver,
                 connector: Connector = open_tcp, max_connections: int = MAX_CONNECTIONS,
                 header_timeout: float = HEADER_TIMEOUT_SECONDS,
                 idle_timeout: float = IDLE_TIMEOUT_SECONDS) -> None:
        self.allowance = allowance
        self.resolver = resolver
        self.connector = connector
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.refusals: collections.deque[str] = collections.deque(maxlen=KEPT_REFUSALS)
        """The latest refusals, "<status> <target>: <reason>"."""

    async def start(self, path: str) -> None:
        """Listen on the unix socket `path` (the caller sets its owner and mode)."""
        self._server = await asyncio.start_unix_server(self._accept, path,
                                                       limit=MAX_HEADER_BYTES)

    async def close(self) -> None:
        """Stop listening and end every connection (awaited)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async with self._slots:
                await self.serve(reader, writer)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection: its request checked, then tunnelled or refused."""
        target = "?"
        try:
            head = await self._read_head(reader)
            method, target, host, port, forward = parse_request(head)
            if not self.allowance.permits(host, port):
                raise ProxyRefusal(403, "not a configured package index")
            upstream_r, upstream_w = await self._connect(host, port)
        except ProxyRefusal as refusal:
            self._refuse(writer, target, refusal)
            return
        try:
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                upstream_w.write(forward)
            await self._tunnel(reader, writer, upstream_r, upstream_w)
        finally:
            upstream_w.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await upstream_w.wait_closed()

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes:
        try:
            async with asyncio.timeout(self.header_timeout):
                return await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise ProxyRefusal(431, "request headers too large") from None
        except asyncio.IncompleteReadError:
            raise ProxyRefusal(400, "incomplete request") from None
        except TimeoutError:
            raise ProxyRefusal(400, "no complete request in time") from None

    async def _connect(self, host: str, port: int
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                found = await self.resolver(host, port)
        except (OSError, TimeoutError, UnicodeError) as exc:
            raise ProxyRefusal(502, f"cannot resolve the host: {exc}") from None
        addresses = []
        for text in found:
            with contextlib.suppress(ValueError):
                addresses.append(ipaddress.ip_address(text.split("%", 1)[0]))
        usable = [ip for ip in addresses if self.allowance.reaches(host, ip)]
        if not usable:
            raise ProxyRefusal(403, "the host resolves to no address the proxy may reach "
                                    f"({', '.join(map(str, addresses)) or 'none'})")
        last: Exception | None = None
        for ip in usable:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                    return await self.connector(str(ip), port)
            except (OSError, TimeoutError) as exc:
                last = exc
        raise ProxyRefusal(502, f"cannot connect to the index: {last}")

    def _refuse(self, writer: asyncio.StreamWriter, target: str,
                refusal: ProxyRefusal) -> None:
        self.refusals.append(f"{refusal.status} {target}: {refusal.reason}")
        log.warning("package index proxy refused a request", target=target,
                    status=refusal.status, reason=refusal.reason)
        body = (refusal.reason + "\n").encode()
        writer.write(f"HTTP/1.1 {refusal.status} {_REASONS[refusal.status]}\r\n"
                     f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)

    async def _tunnel(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                      upstream_r: asyncio.StreamReader,
                      upstream_w: asyncio.StreamWriter) -> None:
        """Bytes both ways until the index's side ends (a client's end only half-closes),
        or neither side moves for idle_timeout."""
        state = _Tunnel(last=asyncio.get_running_loop().time())
        upward = asyncio.create_task(self._pipe(client_r, upstream_w, state))
        try:
            await self._pipe(upstream_r, client_w, state)
        finally:
            upward.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upward

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    state: _Tunnel) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    data = await source.read(_CHUNK)
            except TimeoutError:
                if loop.time() - state.last < self.idle_timeout:
                    continue  # the other direction moved
                sink.close()
                return
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError, RuntimeError):
                    if sink.can_write_eof():
                        sink.write_eof()
                return
            state.last = loop.time()
            sink.write(data)
            try:
                await sink.drain()
            except OSError:
                return


def parse_request(head: bytes) -> tuple[str, str, str, int, bytes]:
    """(method, target, host, port, the request to forward for a plain-HTTP GET) of a
    request's head; ProxyRefusal 400 if malformed, 405 for anything but CONNECT or an
    absolute http:// GET/HEAD."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyRefusal(400, "the request is not ASCII") from None
    line, _, rest = text.partition("\r\n")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ProxyRefusal(400, "malformed request line")
    method, target, version = parts
    if method == "CONNECT":
        try:
            host, port = split_host_port(target, -1)
        except ValueError:
            raise ProxyRefusal(400, "CONNECT needs host:port") from None
        return method, target, host, port, b""
    if method not in ("GET", "HEAD"):
        raise ProxyRefusal(405, f"method {method[:16]} is not proxied")
    url = urlsplit(target)
    if url.scheme != "http" or not url.netloc or "@" in url.netloc:
        raise ProxyRefusal(405, "only CONNECT and absolute http:// GET are proxied")
    try:
        host, port = split_host_port(url.netloc, 80)
    except ValueError:
        raise ProxyRefusal(400, "malformed host") from None
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    headers = [h for h in rest.split("\r\n") if h and not h.lower().startswith(
        ("proxy-", "connection:", "keep-alive:"))]
    # One request per connection: the client's next one may be for another host.
    forward = "\r\n".join([f"{method} {path} {version}", *headers, "Connection: close",
                           "", ""])
    return method, target, host, port, forward.encode("ascii")


def allowance_of(index_urls: Iterable[str], extra_hosts: Iterable[str] = ()) -> Allowance:
    """The host:port pairs of the index URLs (http and https ones; local ones need none)
    and the operator's extra entries: "host", "host:port" (443 unless said) or a network
    ("10.0.0.0/8") the index hosts' names may resolve into. ValueError names a bad entry."""
    hosts: set[tuple[str, int]] = set()
    networks: list[IPNetwork] = []
    for url in index_urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            continue
        default = 443 if parts.scheme == "https" else 80
        hosts.add((normal_host(parts.hostname), parts.port or default))
        if normal_host(parts.hostname) == "pypi.org":
            # PyPI's pages link to its files host, which PyPI documents as fixed.
            hosts.add(("files.pythonhosted.org", 443))
    for entry in extra_hosts:
        entry = entry.strip()
        if not entry:
            continue
        if "/" in entry:
            networks.append(ipaddress.ip_network(entry, strict=False))
        else:
            hosts.add(split_host_port(entry, 443))
    return Allowance(hosts=frozenset(hosts), networks=tuple(networks))
