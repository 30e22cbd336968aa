"""Inside a build's sandbox: the package index proxy on the sandbox's own loopback.

    python -I -S relay.py SOCKET PROGRAM [ARG...]

The sandbox has no network but its loopback. This program listens on 127.0.0.1 (a port
the kernel picks), runs PROGRAM with HTTP_PROXY, HTTPS_PROXY and ALL_PROXY naming that
port, forwards each connection to the agent's index proxy at the unix socket SOCKET
(bound into the sandbox; index_proxy.py decides what may be reached) and exits with
PROGRAM's status. It runs under the agent's interpreter isolated (-I -S), so it uses
the standard library only and imports nothing of thaw: the platform's package is not
inside the sandbox.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading

_CHUNK = 64 * 1024
# Exit status when the relay itself cannot start (as the sandbox launcher's own).
EXIT_SETUP_FAILED = 125
_PROXY_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def _copy(source: socket.socket, sink: socket.socket) -> None:
    """Bytes from `source` to `sink` until `source` ends; then `sink` is half-closed."""
    try:
        while True:
            data = source.recv(_CHUNK)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _serve(client: socket.socket, path: str) -> None:
    try:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(path)
    except OSError as exc:
        sys.stderr.write(f"thaw index relay: cannot reach the index proxy: {exc}\n")
        client.close()
        return
    back = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
    back.start()
    _copy(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _accept(listener: socket.socket, path: str) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_serve, args=(client, path), daemon=True).start()


def proxy_environment(environ: dict[str, str], port: int) -> dict[str, str]:
    """`environ` with every proxy variable (both cases) naming the relay, and nothing
    exempted from it."""
    env = dict(environ)
    url = f"http://127.0.0.1:{port}"
    for name in _PROXY_NAMES:
        env[name] = env[name.lower()] = url
    env["NO_PROXY"] = env["no_proxy"] = ""
    return env


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        sys.stderr.write("usage: relay.py SOCKET PROGRAM [ARG...]\n")
        return 2
    path, program = argv[1], argv[2:]
    try:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
    except OSError as exc:
        sys.stderr.write(f"thaw index relay: cannot listen on the loopback: {exc}\n")
        return EXIT_SETUP_FAILED
    port = listener.getsockname()[1]
    threading.Thread(target=_accept, args=(listener, path), daemon=True).start()
    try:
        child = subprocess.Popen(program, env=proxy_environment(dict(os.environ), port))
    except OSError as exc:
        sys.stderr.write(f"thaw index relay: cannot run {program[0]}: {exc}\n")
        return EXIT_SETUP_FAILED
    code = child.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
