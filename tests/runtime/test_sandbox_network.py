"""A sandbox that asks for egress ([runtime] network = "egress") reaches addresses
outside the node through slirp4netns, and still never the node's loopback, where the
platform's ports listen; one without egress reaches nothing.

All of it runs in a network namespace this test makes (`unshare --net`): the "outside"
is an address of the benchmarking range on that namespace's own interface, so no
packet leaves the machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0, reason="kernel sandboxes need root")]

REPO = Path(__file__).resolve().parents[2]
OUTSIDE = "198.18.0.1"

SCRIPT = textwrap.dedent('''
    import asyncio, dataclasses, json, os, shutil, socket, subprocess, sys, threading
    from pathlib import Path
    from thaw.core.http1 import NodeClient
    from thaw.platform.process import ProcessRuntime
    from thaw.platform.runtime import LaunchSpec, SandboxPolicy
    from thaw.platform.sandbox.areas import make_readable
    from thaw.platform.sandbox.plan import SandboxSettings

    work, bundle_src, outside = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    for cmd in (["ip", "link", "set", "lo", "up"],
                ["ip", "addr", "add", outside + "/32", "dev", "lo"]):
        subprocess.run(cmd, check=True)

    def serve(host):
        listener = socket.socket()
        listener.bind((host, 0))
        listener.listen()
        def loop():
            while True:
                conn, _ = listener.accept()
                conn.sendall(b"hi " + host.encode())
                conn.close()
        threading.Thread(target=loop, daemon=True).start()
        return listener.getsockname()[1]

    far, near = serve(outside), serve("127.0.0.1")

    async def probe(network):
        bundle = work / f"bundle-{network}"
        shutil.copytree(bundle_src, bundle)
        make_readable(bundle)
        area = work / f"area-{network}"
        area.mkdir()
        os.chown(area, 200_960, 200_960)
        spec = LaunchSpec.from_runtime_args(
            "fresh", ["--bundle", str(bundle), "--handler", "app:NetProbe",
                      "--socket", str(area / "i.sock")], str(work / f"{network}.log"),
            cwd=str(bundle), instance_id="i-" + network)
        spec = dataclasses.replace(spec, sandbox=SandboxPolicy(
            network=network, uid=200_960, gid=200_960, writable=(str(area),)))
        runtime = ProcessRuntime(sandbox=SandboxSettings())
        proc = await runtime.launch(spec)
        try:
            event = await proc.next_event(60)
            assert event["event"] == "ready", (event, (work / f"{network}.log").read_text())
            targets = [f"{outside}:{far}", f"127.0.0.1:{near}", f"100.64.0.2:{near}"]
            answer = await NodeClient().post_unix(
                str(area / "i.sock"), "/invoke",
                json.dumps({"connect": targets}).encode(),
                {"Content-Type": "application/json"})
            body = json.loads(await answer.read())
        finally:
            await proc.kill()
            await runtime.close()
        return {"far": body[targets[0]], "own loopback": body[targets[1]],
                "node loopback": body[targets[2]]}

    async def main():
        print(json.dumps({"egress": await probe("egress"), "none": await probe("none")}))

    asyncio.run(main())
''')


@pytest.mark.skipif(shutil.which("slirp4netns") is None and os.environ.get("CI") != "true",
                    reason="egress needs slirp4netns (.ci/run installs it)")
def test_egress_reaches_outside_and_never_the_nodes_loopback(tmp_path: Path) -> None:
    script = tmp_path / "netns.py"
    script.write_text(SCRIPT)
    os.chmod(tmp_path, 0o755)
    result = subprocess.run(
        ["unshare", "--net", sys.executable, str(script), str(tmp_path),
         str(REPO / "tests" / "fixtures" / "bundles" / "netprobe"), OUTSIDE],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["egress"]["far"] == f"ok hi {OUTSIDE}"
    # Its own 127.0.0.1 is its own namespace's; the gateway does not lead to the
    # node's loopback (--disable-host-loopback).
    assert found["egress"]["own loopback"] == "ECONNREFUSED"
    assert found["egress"]["node loopback"] in ("ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH")
    assert found["none"]["far"] in ("ENETUNREACH", "EHOSTUNREACH")
    assert found["none"]["own loopback"] == "ECONNREFUSED"
