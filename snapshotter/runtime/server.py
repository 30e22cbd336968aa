"""HTTP/1.1 over a unix socket: how the node agent reaches an instance.

Routes: `GET /healthz`, `POST /invoke[/<sub/path>]`. Connections are kept alive so the
agent reuses them, and each connection gets a thread (ThreadingHTTPServer), so an
instance serves several invocations at once; the agent enforces max_concurrency.

The request path is hand-rolled on purpose: BaseHTTPRequestHandler parses headers with
the email package (tens of microseconds a request) and writes status line, headers and
body in separate syscalls; the platform's added latency budget is well under 1 ms, so
we read the few headers we need directly and answer with one write.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import socketserver
import stat
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn
from urllib.parse import unquote

from . import calllog
from .bounded import print_exception
from .errors import TENANT_ERROR_HEADER, TENANT_ERROR_VALUE, HTTPError, tenant_error_body
from .events import ExitCode, describe_exception
from .handler import FileReply, InvalidInput, Invoker, Payload, Request, Stream, encode_json
from .trace import call_context, spans_header

# Limits on what a client may send before we give up on the connection; the same
# bounds as http.client uses for responses.
MAX_LINE_BYTES = 65536
# The gateway forwards at most its own limit (100) of a client's headers, plus its own.
MAX_HEADERS = 128
# The method a call was made with, which the gateway and the node send on in this
# header (every hop, this one too, is a POST); the handler never sees it among the
# headers.
METHOD_HEADER = "x-thaw-method"
# The call's id, which the gateway sends on every call: what its lines are marked with.
REQUEST_ID_HEADER = "x-request-id"
# Statuses whose answers have no body (RFC 9110 §6.4.1).
_NO_BODY_STATUSES = frozenset((204, 304))
FILE_CHUNK_BYTES = 1024 * 1024

# Below this a response is sent as one buffer (one syscall); above it, head and body go
# in two writes so a large bytes result is not copied just to prepend the head.
SINGLE_WRITE_MAX_BYTES = 256 * 1024

SSE_CONTENT_TYPE = "text/event-stream"
NDJSON_CONTENT_TYPE = "application/x-ndjson"

_REASONS = {status.value: status.phrase for status in http.HTTPStatus}

# One table from exception to (status, error code); everything not listed is the
# handler's own failure.
_ERROR_TABLE: dict[type[Exception], tuple[int, str]] = {
    InvalidInput: (400, "invalid_argument"),
    MemoryError: (507, "out_of_memory"),
}
_HANDLER_ERROR = (500, "handler_error")
# An HTTPError (errors.py) is answered with its own status and marked as the handler's
# choice, not a failure of the function.
_TENANT_MARK = f"{TENANT_ERROR_HEADER}: {TENANT_ERROR_VALUE}\r\n"

_HEALTHY = encode_json({"status": "ok"})
_SSE_DONE = b"event: done\ndata: {}\n\n"


def is_device_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error for a device allocation (torch.OutOfMemoryError, a
    RuntimeError): what an allocation past the rest of the instance's slice raises.
    Matched by name: the runtime never imports torch itself."""
    return any(cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("torch")
               for cls in type(exc).__mro__)


def error_body(code: str, message: str) -> bytes:
    return encode_json({"error": {"code": code, "message": message}})


class _BadRequest(Exception):
    """The bytes on the wire are not HTTP we accept; the connection is closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UnixHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer bound to a unix socket path."""

    address_family = socket.AF_UNIX
    # Reuse flags are TCP notions; a stale socket file is unlinked instead (below).
    allow_reuse_address = False
    allow_reuse_port = False
    # Connection threads must not keep an instance alive after it is told to stop.
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, path: str, invoker: Invoker) -> None:
        self.invoker = invoker
        _remove_stale_socket(path)
        super().__init__(path, InvokeRequestHandler)  # type: ignore[arg-type]

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up a host name and port, which AF_UNIX lacks.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "localhost"
        self.server_port = 0


def _remove_stale_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


class InvokeRequestHandler(http.server.BaseHTTPRequestHandler):
    """One connection; handle() loops over keep-alive requests."""

    protocol_version = "HTTP/1.1"
    server: UnixHTTPServer

    def address_string(self) -> str:  # the peer of a unix socket has no address
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        # stderr is the tenant's log; the agent records requests itself.
        pass

    def handle_one_request(self) -> None:
        try:
            self._handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except _BadRequest as exc:
            self.close_connection = True
            with contextlib.suppress(ConnectionError, TimeoutError):
                self._send(exc.status, "application/json", error_body("invalid_request", str(exc)))

    def _handle_one_request(self) -> None:
        line = self.rfile.readline(MAX_LINE_BYTES + 1)
        if not line:
            self.close_connection = True
            return
        if len(line) > MAX_LINE_BYTES:
            raise _BadRequest(414, "request line too long")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise _BadRequest(400, "malformed request line")
        method, target, version = parts
        headers = self._read_headers()
        connection = headers.get("connection", "").lower()
        if version == b"HTTP/1.1":
            self.close_connection = "close" in connection
        else:
            self.close_connection = "keep-alive" not in connection
        self.request_version = version.decode("latin-1")
        body = self._read_body(headers)

        raw_path, _, raw_query = target.partition(b"?")
        if raw_path == b"/invoke" or raw_path.startswith(b"/invoke/"):
            if method != b"POST":
                self._send_error(405, "method_not_allowed", "use POST to invoke")
                return
            verb = headers.pop(METHOD_HEADER, "") or "POST"
            if not verb.isalpha() or not verb.isupper():
                raise _BadRequest(400, "malformed method")
            if verb != "POST" and not self.server.invoker.any_method:
                self._send(405, "application/json", error_body(
                    "method_not_allowed", f"this function's predict() takes POST, not "
                    f"{verb}"), "Allow: POST\r\n")
                return
            request = Request(
                verb,
                unquote(raw_path[7:].decode("latin-1")),
                raw_query.decode("latin-1"),
                headers,
                body,
            )
            with calllog.calling(headers.get(REQUEST_ID_HEADER)):
                self._invoke(request)
        elif raw_path == b"/healthz":
            if method != b"GET":
                self._send_error(405, "method_not_allowed", "use GET for /healthz")
                return
            self._send(200, "application/json", _HEALTHY)
        else:
            self._send_error(404, "not_found", f"no route for {raw_path.decode('latin-1')}")

    def _read_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS):
            line = self.rfile.readline(MAX_LINE_BYTES + 1)
            if line in (b"\r\n", b"\n", b""):
                return headers
            if len(line) > MAX_LINE_BYTES:
                raise _BadRequest(431, "header line too long")
            name, sep, value = line.partition(b":")
            if not sep:
                raise _BadRequest(400, "malformed header line")
            key = name.strip().lower().decode("latin-1")
            text = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        raise _BadRequest(431, "too many headers")

    def _read_body(self, headers: dict[str, str]) -> bytes:
        if headers.get("expect", "").lower() == "100-continue":
            # curl waits for this before sending a body over 1 KiB.
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._read_chunked()
        length_text = headers.get("content-length")
        if not length_text:
            return b""
        try:
            length = int(length_text)
        except ValueError:
            raise _BadRequest(400, "bad Content-Length") from None
        if length < 0:
            raise _BadRequest(400, "bad Content-Length")
        body = self.rfile.read(length)
        if len(body) != length:
            raise ConnectionResetError("client closed mid-body")
        return body

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size_line = self.rfile.readline(MAX_LINE_BYTES + 1)
            try:
                size = int(size_line.split(b";", 1)[0], 16)
            except ValueError:
                raise _BadRequest(400, "bad chunk size") from None
            if size == 0:
                break
            chunks.append(self.rfile.read(size))
            self.rfile.readline(MAX_LINE_BYTES + 1)  # CRLF after the chunk
        while self.rfile.readline(MAX_LINE_BYTES + 1) not in (b"\r\n", b"\n", b""):
            pass  # trailers: none we use
        return b"".join(chunks)

    def _invoke(self, request: Request) -> None:
        started = time.perf_counter()
        carried = ""  # the handler's own spans, when it has any (trace.py)
        try:
            with call_context(request.headers) as spans:
                try:
                    reply = self.server.invoker.invoke(request)
                finally:
                    carried = spans_header(spans)
        except HTTPError as exc:
            retry_after = exc.retry_after_header()
            extra = _TENANT_MARK if retry_after is None else (
                f"{_TENANT_MARK}Retry-After: {retry_after}\r\n")
            extra += carried
            self._send(exc.status, "application/json", encode_json(tenant_error_body(exc)),
                       extra)
            return
        except Exception as exc:
            status, code = next(
                (mapped for kind, mapped in _ERROR_TABLE.items() if isinstance(exc, kind)),
                _HANDLER_ERROR,
            )
            if isinstance(exc, MemoryError) or is_device_out_of_memory(exc):
                self._out_of_memory(exc)
            if status >= 500:
                print_exception()
            self._send(status, "application/json", error_body(code, describe_exception(exc)))
            return
        if isinstance(reply, Payload):
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            timing = f"Server-Timing: run;dur={elapsed_ms:.3f}\r\n{carried}"
            if reply.status == 200 and not reply.headers:
                self._send(200, reply.content_type, reply.body, timing)
                return
            body = b"" if reply.status in _NO_BODY_STATUSES else reply.body
            self._send(reply.status, reply.content_type, body,
                       timing + _own_headers(reply.status, reply.headers))
        elif isinstance(reply, FileReply):
            self._send_file(reply, request.method == "HEAD")
        else:
            if request.method == "HEAD" or reply.status in _NO_BODY_STATUSES:
                # No body goes out: the generator is not run on.
                if reply.close is not None:
                    reply.close()
                reply = Stream(iter(()), None, reply.status, reply.headers,
                               reply.content_type)
            sse = SSE_CONTENT_TYPE in request.headers.get("accept", "")
            self._stream(reply, sse)

    def _out_of_memory(self, exc: Exception) -> NoReturn:
        """Past its memory limit the instance answers 507 and exits: the agent
        replaces it rather than trust a process whose allocations fail. The same
        for its device memory, bounded by the rest of its slice."""
        limit = ("its slice (resources.gpu_memory)" if is_device_out_of_memory(exc)
                 else "its memory limit (resources.memory)")
        message = f"the instance exceeded {limit}: {describe_exception(exc)}"
        print(f"thaw runtime: {message}; exiting", file=sys.stderr)
        try:
            self.close_connection = True
            self._send(507, "application/json", error_body("out_of_memory", message))
            self.wfile.flush()
        finally:
            sys.stderr.flush()
            os._exit(ExitCode.OUT_OF_MEMORY)

    def _send_error(self, status: int, code: str, message: str) -> None:
        self._send(status, "application/json", error_body(code, message))

    def _send(self, status: int, content_type: str, body: bytes, extra_headers: str = "") -> None:
        connection = "Connection: close\r\n" if self.close_connection else ""
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"{extra_headers}{connection}\r\n"
        ).encode("latin-1")
        if len(body) <= SINGLE_WRITE_MAX_BYTES:
            self.wfile.write(head + body)
        else:
            self.wfile.write(head)
            self.wfile.write(body)

    def _send_file(self, reply: FileReply, head_only: bool) -> None:
        """A file's bytes with their length; a file that cannot be read is the
        handler's failure (500, its reason in the tenant's log)."""
        try:
            handle = open(reply.path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            print(f"thaw runtime: the Response's file cannot be read: {exc}",
                  file=sys.stderr)
            self._send_error(500, _HANDLER_ERROR[1],
                             f"the Response's file cannot be read: {exc.strerror}")
            return
        with handle:
            size = 0 if head_only or reply.status in _NO_BODY_STATUSES else (
                os.fstat(handle.fileno()).st_size)
            connection = "Connection: close\r\n" if self.close_connection else ""
            self.wfile.write((
                f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, '')}\r\n"
                f"Content-Type: {reply.content_type}\r\nContent-Length: {size}\r\n"
                f"{_own_headers(reply.status, reply.headers)}{connection}\r\n"
            ).encode("latin-1"))
            while size > 0:
                chunk = handle.read(min(FILE_CHUNK_BYTES, size))
                if not chunk:
                    # The file shrank after its length went out: the answer cannot
                    # be completed, so the connection is cut.
                    self.close_connection = True
                    raise ConnectionAbortedError("the Response's file shrank while sent")
                self.wfile.write(chunk)
                size -= len(chunk)

    def _stream(self, reply: Stream, sse: bool) -> None:
        # HTTP/1.0 has no chunked encoding: such a client reads until we close.
        chunked = self.request_version == "HTTP/1.1"
        if not chunked:
            self.close_connection = True
        raw = reply.content_type is not None
        content_type = reply.content_type or (SSE_CONTENT_TYPE if sse else NDJSON_CONTENT_TYPE)
        head = (f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, '')}\r\n"
                f"Content-Type: {content_type}\r\nCache-Control: no-cache\r\n"
                f"{_own_headers(reply.status, reply.headers)}")
        if chunked:
            head += "Transfer-Encoding: chunked\r\n"
        if self.close_connection:
            head += "Connection: close\r\n"
        write = self._chunk_writer(chunked)
        try:
            self.wfile.write((head + "\r\n").encode("latin-1"))
            try:
                for item in reply.items:
                    if raw:
                        data = raw_chunk(item)
                        if data:
                            write(data)
                        continue
                    data = encode_json(item)
                    write(b"data: " + data + b"\n\n" if sse else data + b"\n")
            except (ConnectionError, TimeoutError):
                raise
            except Exception as exc:
                if raw:
                    # A stream of the handler's own format has no place for an error:
                    # the connection is cut before its end, which the client sees.
                    print_exception()
                    self.close_connection = True
                    if reply.close is not None:
                        reply.close()
                    return
                # Headers are gone; the failure becomes the stream's last item.
                if isinstance(exc, HTTPError):
                    error = encode_json(tenant_error_body(exc))
                else:
                    print_exception()
                    error = error_body(_HANDLER_ERROR[1], describe_exception(exc))
                write(b"event: error\ndata: " + error + b"\n\n" if sse else error + b"\n")
            else:
                if sse:
                    write(_SSE_DONE)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (ConnectionError, TimeoutError):
            # The client went away: stop the generator so its finally blocks run.
            self.close_connection = True
            if reply.close is not None:
                reply.close()

    def _chunk_writer(self, chunked: bool) -> Callable[[bytes], object]:
        wfile = self.wfile
        if not chunked:
            return wfile.write
        return lambda data: wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


def raw_chunk(item: Any) -> bytes:
    """One item of a Response's stream on the wire: bytes as they are, str as UTF-8,
    anything else as a JSON line."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str):
        return item.encode()
    return encode_json(item) + b"\n"


def _own_headers(status: int, headers: tuple[tuple[str, str], ...]) -> str:
    """A Response's headers as head lines; an error status it chose is marked as the
    handler's own answer, like an HTTPError."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return lines + _TENANT_MARK if status >= 400 else lines


def bind_server(path: str, invoker: Invoker) -> UnixHTTPServer:
    """Bind and listen, so the caller can announce readiness before serving."""
    return UnixHTTPServer(path, invoker)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit in the main thread, so `finally` blocks (removing
    socket files) run on the agent's polite stop."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)


# The function's `resources.memory` in bytes, beyond what the instance holds once it is
# ready (set by the agent in the instance's environment or spawn request).
MEMORY_LIMIT_ENV = "THAW_MEMORY_LIMIT_BYTES"


def cap_own_memory() -> None:
    """Cap what this instance may allocate from now on: RLIMIT_DATA (private writable
    memory: heap, anonymous and copy-on-write mappings) at what it holds now plus its
    MEMORY_LIMIT_ENV. Past it allocations fail with MemoryError, which the handler
    answers as out of memory. A process may always lower its own limit, whatever uid
    it runs as; the agent needs no privilege over it."""
    import resource

    try:
        extra = int(os.environ.get(MEMORY_LIMIT_ENV, "0"))
        with open("/proc/self/status") as handle:
            data_kb = next(int(line.split()[1]) for line in handle
                           if line.startswith("VmData:"))
    except (OSError, StopIteration, ValueError):
        return
    if extra <= 0:
        return
    limit = data_kb * 1024 + extra
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def serve_until_stopped(server: UnixHTTPServer, announce: Callable[[], object]) -> None:
    """Announce readiness, serve until SIGTERM or SIGINT, then remove the socket file.

    The SIGTERM handler goes in before the announcement: an agent may stop an instance
    the moment it hears "ready"."""
    try:
        exit_on_sigterm()
        cap_own_memory()
        calllog.install()
        announce()
        server.serve_forever(poll_interval=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        with contextlib.suppress(OSError):
            os.unlink(server.server_address)  # type: ignore[arg-type]
        sys.stdout.flush()
        sys.stderr.flush()
