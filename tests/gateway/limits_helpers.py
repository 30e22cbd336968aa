"""Raw-socket helpers for the gateway's client limits (test_limits*.py): requests
written byte for byte, answers read until the server closes."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from typing import Any

# Hang guard: no answer or close within this long is a failure (never a timing claim).
GUARD_SECONDS = 20.0


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=GUARD_SECONDS)
    sock.settimeout(GUARD_SECONDS)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close)."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data.extend(chunk)
    return bytes(data)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One answer with a Content-Length body: (status, headers, body)."""
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {bytes(data)!r}")
        data.extend(chunk)
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    length = int(headers.get("content-length", "0"))
    body = bytearray(rest)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body.extend(chunk)
    return status, headers, bytes(body[:length])


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def answer_of(raw: bytes) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of the first answer in `raw`."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    length = int(headers.get("content-length", len(body)))
    return status, json.loads(body[:length]) if length else {}


def request_bytes(method: str, path: str, headers: dict[str, str] | list[tuple[str, str]],
                  body: bytes = b"") -> bytes:
    items = headers.items() if isinstance(headers, dict) else headers
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1",
             *(f"{k}: {v}" for k, v in items)]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def send(port: int, raw: bytes) -> tuple[int, dict[str, Any]]:
    """Send `raw` on a new connection; the first answer's status and JSON body."""
    with connect(port) as sock:
        # Refused part way: the answer is already there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        status, _, body = read_answer(sock)
        return status, json.loads(body) if body else {}


def closed_within_guard(sock: socket.socket) -> bytes:
    """What the server sent before closing a connection the client leaves silent."""
    started = time.monotonic()
    data = read_until_closed(sock)
    assert time.monotonic() - started < GUARD_SECONDS, "the server never closed it"
    return data


def filled(path: str) -> str:
    """An OpenAPI path template with every parameter filled in."""
    return re.sub(r"\{[^}]+\}", "x1", path)


def deep_json(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def big_json(size: int) -> bytes:
    return json.dumps({"pad": "x" * size}).encode()
