"""A sandboxed node tool behind the package index proxy: uv resolves and installs from
an index given as a URL (a simple index on 127.0.0.1, the operator's choice of address),
and from the same sandbox nothing else can be reached: not the node's loopback, not
the outside, not another host through the proxy."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.wheels import write_wheel
from thaw.platform.environments import Dependencies, node_python
from thaw.platform.environments_build import Environments, EnvSettings, uv_program
from thaw.platform.process import ProcessRuntime
from thaw.platform.runtime import ToolRun
from thaw.platform.sandbox.index_access import index_access, relayed
from thaw.platform.sandbox.index_proxy import allowance_of
from thaw.platform.sandbox.plan import SandboxSettings

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0, reason="kernel sandboxes need root")]

BUILDER = 199_999


def simple_index(root: Path) -> Path:
    """A PEP 503 index of two tiny wheels: simple/<name>/index.html linking to files/."""
    files = root / "files"
    for name, version, module in (("thawtiny", "1.0", "thawtiny.py"),
                                  ("thawother", "2.0", "thawother.py")):
        wheel = write_wheel(files, name, version, {module: f'VALUE = "{name}"\n'})
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        page = root / "simple" / name
        page.mkdir(parents=True)
        (page / "index.html").write_text(
            f'<html><body><a href="../../files/{wheel.name}#sha256={digest}">'
            f"{wheel.name}</a></body></html>\n")
    return root


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def index_port(tmp_path: Path) -> Iterator[int]:
    """The index served over plain HTTP on the node's loopback."""
    root = simple_index(tmp_path / "index")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def builder_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, BUILDER, BUILDER)
    return path


PROBE = r'''
import json, os, socket
results = {}
def attempt(name, address):
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect(address)
        results[name] = "connected"
    except OSError as exc:
        results[name] = type(exc).__name__
    finally:
        s.close()
attempt("node_index_port", ("127.0.0.1", INDEX_PORT))
attempt("outside", ("1.1.1.1", 80))
proxy = os.environ["HTTPS_PROXY"].rsplit(":", 1)
for name, target in (("other_host", "example.com:443"), ("index", "127.0.0.1:INDEX_PORT"),
                     ("node_port_22", "127.0.0.1:22")):
    s = socket.create_connection(("127.0.0.1", int(proxy[1])), timeout=10)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    results[name] = s.recv(64).split(b"\r\n")[0].decode()
    s.close()
print("RESULTS " + json.dumps(results))
'''


async def test_uv_reaches_a_url_index_through_the_proxy_and_nothing_else(
        tmp_path: Path, index_port: int) -> None:
    tmp_path.chmod(0o755)
    url = f"http://127.0.0.1:{index_port}/simple"
    allowance = allowance_of([url])
    work = builder_folder(tmp_path / "work")
    cache = builder_folder(tmp_path / "cache")
    (work / "requirements.in").write_text("thawtiny\n")
    runtime = ProcessRuntime(sandbox=SandboxSettings())
    uv = uv_program()
    tool = ToolRun(
        argv=(uv, "pip", "compile", str(work / "requirements.in"), "-o",
              str(work / "lock.txt"), "--index-url", url, "--no-config", "--quiet"),
        uid=BUILDER, writable=(str(work), str(cache)),
        read_only=(os.path.dirname(os.path.realpath(uv)),),
        env={"UV_CACHE_DIR": str(cache), "HOME": "/tmp", "UV_NO_PROGRESS": "1"},
        workdir=str(work), timeout=300)
    async with index_access(tool, allowance) as (proxied, proxy):
        assert proxied.network == "none"
        # The socket's folder: the builder's alone (the agent is root).
        held = os.stat(os.path.dirname(proxied.argv[4]))
        assert (held.st_uid, held.st_mode & 0o777) == (BUILDER, 0o700)
        code, output = await runtime.run_tool(proxied)
        assert code == 0, output
        assert "thawtiny==1.0" in (work / "lock.txt").read_text()

        probe = PROBE.replace("INDEX_PORT", str(index_port))
        socket_path = proxied.argv[4]  # relay.py's SOCKET argument
        code, output = await runtime.run_tool(relayed(ToolRun(
            argv=(sys.executable, "-I", "-S", "-c", probe), uid=BUILDER, timeout=120,
            writable=(str(work),), workdir=str(work)), socket_path))
        assert code == 0, output
        results = json.loads(output.split("RESULTS ", 1)[1])
    # The sandbox's own loopback holds no index; it has no route out at all.
    assert results["node_index_port"] == "ConnectionRefusedError"
    assert results["outside"] in ("OSError", "ConnectionRefusedError")
    # Through the proxy: the index only.
    assert results["index"].startswith("HTTP/1.1 200")
    assert results["other_host"].startswith("HTTP/1.1 403")
    assert results["node_port_22"].startswith("HTTP/1.1 403")
    assert any("example.com:443" in line for line in proxy.refusals)


async def test_an_environment_from_a_url_index_is_built_through_the_proxy(
        tmp_path: Path, index_port: int) -> None:
    tmp_path.chmod(0o755)
    settings = EnvSettings(index_url=f"http://127.0.0.1:{index_port}/simple",
                           index_hosts=(f"127.0.0.1:{index_port}",))
    envs = Environments(tmp_path / "envs", settings,
                        ProcessRuntime(sandbox=SandboxSettings()).run_tool)
    lines: list[str] = []
    lock = await envs.resolve(Dependencies(("thawtiny==1.0",), node_python(), "r"),
                              lines.append)
    assert "thawtiny==1.0" in lock and "--hash=sha256:" in lock
    env = await envs.ensure(lock, node_python(), lines.append)
    site = next((env.path / "lib").glob("python*/site-packages"))
    assert (site / "thawtiny.py").read_text() == 'VALUE = "thawtiny"\n'
