"""The bad inputs of `thaw bench soak`: what a careless or hostile client sends.

Each kind is one small, bounded attempt on a fresh connection, answered by a status:
the HTTP status of the platform's answer, or what the connection did instead
(`closed`: closed with no answer; `no_answer`: nothing within ANSWER_TIMEOUT;
`open`: a slow connection the platform still held when the bench let go of it;
`connect_failed`; `reset`). Sizes are capped far below what would hurt the machine:
the point is that the platform refuses them, not to exhaust it.

Bundles that get past the platform's checks would build: their handler's setup()
raises at once, so an accepted one fails its build cheaply and starts no instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

# A head far over any sane limit (servers take 8-64 KiB) and still tiny for the machine.
OVERSIZED_HEAD_BYTES = 128 * 1024
MANY_HEADERS = 2000
# Nested arrays, deeper than Python's recursion limit (1000) by far.
JSON_DEPTH = 50_000
# A JSON document of a million tiny elements: 2 MiB on the wire.
HUGE_JSON_ELEMENTS = 1_000_000
# What a sparse member claims to hold, and what a gzip bomb unpacks to: large against
# a bundle of a few hundred bytes, small against the disk.
SPARSE_CLAIMED_BYTES = 16 * 1024 * 1024
BOMB_UNPACKED_BYTES = 16 * 1024 * 1024
CONNECT_TIMEOUT = 5.0
# How long an attempt waits for the answer once it has sent everything.
ANSWER_TIMEOUT = 15.0
# How often a slow client sends its next byte.
TRICKLE_INTERVAL = 1.0

FAILING_APP = '''
class Never:
    def setup(self):
        raise RuntimeError("soak: this bundle must never have been accepted")

    def __call__(self, request):
        return b""
'''
GOOD_TOML = 'name = "{name}"\nhandler = "app:Never"\n'


@dataclass(frozen=True)
class Target:
    """Where the bad inputs go: the gateway's port (API), the function origin's port
    (function URLs), a valid API key of the tenant, and a deployed function's name."""

    host: str
    api_port: int
    function_port: int
    key: str
    tenant: str
    function: str
    source: str | None = None
    """The local address bad input comes from (None: any). Another address than the
    valid calls', as an attacker's would be: the per-address bounds (connection cap,
    failed logins) fall on it and not on the valid client."""


Attempt = Callable[[Target], Awaitable[str]]


def _request(method: str, path: str, headers: list[tuple[str, str]],
             body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             *(f"{k}: {v}" for k, v in headers)]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _connect(host: str, port: int, source: str | None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    local = (source, 0) if source else None
    return await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=local),
                                  CONNECT_TIMEOUT)


async def exchange(host: str, port: int, data: bytes, source: str | None = None) -> str:
    """Send `data` on a new connection (from `source`) and return the answer's status."""
    try:
        reader, writer = await _connect(host, port, source)
    except (OSError, TimeoutError):
        return "connect_failed"
    try:
        # A server that refuses a head early may close before it has all of it: its
        # answer can still be read after the write fails.
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            await asyncio.wait_for(writer.drain(), ANSWER_TIMEOUT)
        return await _status(reader)
    except TimeoutError:
        return "no_answer"
    finally:
        await _close(writer)


async def _status(reader: asyncio.StreamReader) -> str:
    try:
        line = await asyncio.wait_for(reader.readline(), ANSWER_TIMEOUT)
    except TimeoutError:
        return "no_answer"
    except (ConnectionError, ValueError):
        return "reset"
    if not line:
        return "closed"
    parts = line.split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return parts[1].decode()
    return "garbled"


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), CONNECT_TIMEOUT)


async def hold_slow(host: str, port: int, first: bytes, trickle: bytes,
                    hold: float, source: str | None = None) -> str:
    """A slow client: `first`, then one byte of `trickle` every TRICKLE_INTERVAL (none
    when empty: a silent client), for at most `hold` seconds. The platform should
    answer (408) or close it before that; `open` when it did neither."""
    try:
        reader, writer = await _connect(host, port, source)
    except (OSError, TimeoutError):
        return "connect_failed"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + hold
    sent = 0
    try:
        if first:
            writer.write(first)
        while (left := deadline - loop.time()) > 0:
            try:
                line = await asyncio.wait_for(reader.readline(),
                                              min(left, TRICKLE_INTERVAL))
            except TimeoutError:
                if trickle:
                    writer.write(trickle[sent % len(trickle):sent % len(trickle) + 1])
                    sent += 1
                continue
            except (ConnectionError, ValueError):
                return "reset"
            if not line:
                return "closed"
            parts = line.split()
            return parts[1].decode() if len(parts) >= 2 and parts[1].isdigit() else "garbled"
        return "open"
    except ConnectionError:
        return "reset"
    finally:
        await _close(writer)


async def _send(t: Target, port: int, data: bytes) -> str:
    return await exchange(t.host, port, data, t.source)


def _auth(t: Target) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {t.key}")]


def _fn_path(t: Target) -> str:
    return f"/fn/{t.tenant}/{t.function}"


def _json_headers(t: Target) -> list[tuple[str, str]]:
    return [*_auth(t), ("Content-Type", "application/json")]


async def header_oversized(t: Target) -> str:
    headers = [*_auth(t), ("X-Pad", "a" * OVERSIZED_HEAD_BYTES)]
    return await _send(t, t.function_port, _request("POST", _fn_path(t), headers,
                                                            b"{}"))


async def headers_many(t: Target) -> str:
    headers = [*_auth(t), *((f"X-N{i}", "1") for i in range(MANY_HEADERS))]
    return await _send(t, t.function_port, _request("POST", _fn_path(t), headers,
                                                            b"{}"))


async def request_line_oversized(t: Target) -> str:
    path = f"{_fn_path(t)}?q={'a' * OVERSIZED_HEAD_BYTES}"
    return await _send(t, t.function_port, _request("POST", path, _auth(t), b"{}"))


def _json_routes(t: Target) -> list[tuple[str, str]]:
    """Routes of the gateway that read a JSON body (every one should bound it)."""
    return [("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"),
            ("PATCH", f"/v1/functions/{t.function}"),
            ("POST", f"/v1/functions/{t.function}/rollback"), ("POST", "/v1/keys"),
            ("PUT", f"/v1/tenants/{t.tenant}/quota")]


class _RouteCycle:
    """Each JSON attempt goes to the next route, so a soak covers them all."""

    def __init__(self) -> None:
        self.turn = 0

    def next(self, t: Target) -> tuple[str, str]:
        routes = _json_routes(t)
        self.turn += 1
        return routes[self.turn % len(routes)]


_DEEP = b"[" * JSON_DEPTH + b"]" * JSON_DEPTH
_HUGE = b"[" + b"0," * (HUGE_JSON_ELEMENTS - 1) + b"0]"
_deep_routes = _RouteCycle()
_huge_routes = _RouteCycle()


async def json_deep(t: Target) -> str:
    method, path = _deep_routes.next(t)
    return await _send(t, t.api_port, _request(method, path, _json_headers(t), _DEEP))


async def json_huge(t: Target) -> str:
    method, path = _huge_routes.next(t)
    return await _send(t, t.api_port, _request(method, path, _json_headers(t), _HUGE))


def _webhook(url: str) -> Attempt:
    async def attempt(t: Target) -> str:
        headers = [*_json_headers(t), ("X-Thaw-Webhook", url.format(port=t.api_port))]
        return await _send(t, t.function_port,
                              _request("POST", _fn_path(t), headers, b'{"soak": true}'))
    return attempt


def _key(value: str | None) -> Attempt:
    async def attempt(t: Target) -> str:
        headers = [] if value is None else [("Authorization", value)]
        return await _send(t, t.function_port,
                              _request("POST", _fn_path(t), headers, b"{}"))
    return attempt


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _bundle(toml: str | None,
            extra: Callable[[tarfile.TarFile], None] | None = None,
            fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tar:
        if toml is not None:
            _member(tar, "thaw.toml", toml.encode())
        _member(tar, "app.py", FAILING_APP.encode())
        if extra is not None:
            extra(tar)
    return buf.getvalue()


def _sparse(tar: tarfile.TarFile) -> None:
    # PAX sparse 1.0: the member's data starts with its map (one 1-byte region at the
    # end of a SPARSE_CLAIMED_BYTES file); unpacked, it is that large with nothing in it.
    realmap = f"1\n{SPARSE_CLAIMED_BYTES - 1}\n1\n".encode().ljust(512, b"\0")
    info = tarfile.TarInfo("GNUSparseFile.0/hole.bin")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.name": "hole.bin",
                        "GNU.sparse.realsize": str(SPARSE_CLAIMED_BYTES)}
    data = realmap + b"x"
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _bomb(tar: tarfile.TarFile) -> None:
    _member(tar, "zeros.bin", bytes(BOMB_UNPACKED_BYTES))


def _symlink_out(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("escape")
    info.type = tarfile.SYMTYPE
    info.linkname = "../../../../../../../../etc/passwd"
    tar.addfile(info)


def _fifo(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("pipe")
    info.type = tarfile.FIFOTYPE
    tar.addfile(info)


def _toml_dir(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("thaw.toml")
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def _bad_toml(name: str, body: str) -> str:
    return GOOD_TOML.format(name=name) + body


def bundles() -> dict[str, bytes]:
    """Each malformed bundle (or bad thaw.toml), made once: kind -> tarball."""
    def good(kind: str) -> str:
        return GOOD_TOML.format(name=f"soak-{kind.replace('_', '-')}")
    return {
        "bundle_sparse": _bundle(good("bundle_sparse"), _sparse, tarfile.PAX_FORMAT),
        "bundle_gzip_bomb": _bundle(good("bundle_gzip_bomb"), _bomb),
        "bundle_symlink_out": _bundle(good("bundle_symlink_out"), _symlink_out),
        "bundle_special_file": _bundle(good("bundle_special_file"), _fifo),
        "bundle_toml_is_dir": _bundle(None, _toml_dir),
        "toml_name_newline": _bundle('name = "soak-newline\\n"\nhandler = "app:Never"\n'),
        "toml_timeout_nan": _bundle(_bad_toml("soak-nan", "[scaling]\ntimeout = nan\n")),
        "toml_window_inf": _bundle(_bad_toml("soak-inf",
                                                  "[scaling]\nscaledown_window = inf\n")),
        "toml_min_instances": _bundle(_bad_toml(
            "soak-many", "[scaling]\nmin_instances = 1000\nmax_instances = 1000\n")),
        "toml_gpu_memory": _bundle(_bad_toml("soak-gpu",
                                                  '[resources]\ngpu_memory = "1000TiB"\n')),
        "toml_memory": _bundle(_bad_toml("soak-mem", '[resources]\nmemory = "1000TiB"\n')),
    }


def deploy(bundle: bytes) -> Attempt:
    async def attempt(t: Target) -> str:
        headers = [*_auth(t), ("Content-Type", "application/gzip")]
        return await _send(t, t.api_port,
                              _request("POST", "/v1/functions", headers, bundle))
    return attempt


def quick_kinds() -> dict[str, Attempt]:
    """The bad inputs answered at once, mixed among the valid calls."""
    return {
        "header_oversized": header_oversized,
        "headers_many": headers_many,
        "request_line_oversized": request_line_oversized,
        "json_deep": json_deep,
        "json_huge": json_huge,
        "webhook_loopback": _webhook("http://127.0.0.1:{port}/v1/functions"),
        "webhook_metadata": _webhook("http://169.254.169.254/latest/meta-data/"),
        "webhook_private": _webhook("http://10.0.0.1/hook"),
        "webhook_ipv6_loopback": _webhook("http://[::1]:22/"),
        "key_wrong": _key("Bearer thaw_soak_not_a_key_0123456789"),
        "key_missing": _key(None),
        "key_oversized": _key("Bearer " + "k" * 8192),
    }


def slow_kinds(hold: float) -> dict[str, Attempt]:
    """Slow and silent clients (slowloris), each held at most `hold` seconds: on the
    function origin, and a silent one on the gateway's own port."""
    async def silent(t: Target) -> str:
        return await hold_slow(t.host, t.function_port, b"", b"", hold, t.source)

    async def silent_api(t: Target) -> str:
        return await hold_slow(t.host, t.api_port, b"", b"", hold, t.source)

    async def slow_head(t: Target) -> str:
        first = f"POST {_fn_path(t)} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
        return await hold_slow(t.host, t.function_port, first, b"X-Slow: abcdefghij", hold,
                               t.source)

    async def slow_body(t: Target) -> str:
        first = _request("POST", _fn_path(t), _auth(t)).replace(
            b"Content-Length: 0", b"Content-Length: 4096")
        return await hold_slow(t.host, t.function_port, first, b"0", hold, t.source)

    return {"slow_silent": silent, "slow_silent_api": silent_api, "slow_head": slow_head,
            "slow_body": slow_body}
