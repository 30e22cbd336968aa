"""A snapshot build interrupted by its agent's death goes on on another node: a real
LocalPlatform with two agents; the function's setup() waits on a gate file, the agent
building it is killed mid-build, and the build completes on the other node."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

from tests.conftest import EXAMPLES, FIXTURES, RunningPlatform, tenant_exchange
from thaw.ops.services import LocalPlatform

WAIT_SECONDS = 120.0


def wait_for(check: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def deploy_on(p: RunningPlatform, node: str, other: str, folder: Path) -> None:
    """Deploy `folder` with its build on `node` (the other node cordoned meanwhile)."""
    p.http.post(f"/v1/nodes/{other}/cordon").raise_for_status()
    try:
        assert p.deploy(folder).status_code == 201
    finally:
        p.http.post(f"/v1/nodes/{other}/uncordon").raise_for_status()


def test_a_build_whose_agent_is_killed_is_built_on_the_other_node(tmp_path: Path) -> None:
    local = LocalPlatform(tmp_path / "home", gateway_port=0, host_devices="1x2GiB", agents=2)
    local.start()
    gates: list[Path] = []
    try:
        p = RunningPlatform(local)
        # The tenant gets its area on each node with a first build there.
        deploy_on(p, "node0", "node1", EXAMPLES / "echo")
        deploy_on(p, "node1", "node0", FIXTURES / "sleep")
        gates = [tenant_exchange(local.home, "dev", node) for node in ("node0", "node1")]
        (gates[1] / "open").touch()  # a build on node1 goes straight through
        bundle = tmp_path / "build_gate"
        shutil.copytree(FIXTURES / "build_gate", bundle)
        (bundle / "gates.txt").write_text(f"{gates[0]}\n{gates[1]}\n")

        p.http.post("/v1/nodes/node1/cordon").raise_for_status()
        began = p.deploy(bundle, wait=False)
        assert began.status_code == 201 and began.json()["state"] == "building", began.text
        wait_for(lambda: list(gates[0].glob("started-*")), "the build's setup on node0")
        p.http.post("/v1/nodes/node1/uncordon").raise_for_status()
        (agent0,) = [proc for name, proc in local.procs if name == "agent node0"]
        agent0.send_signal(signal.SIGKILL)
        agent0.wait(30)

        wait_for(lambda: p.http.get("/v1/functions/build-gate").json()["state"] != "building",
                 "the build to finish")
        fn = p.http.get("/v1/functions/build-gate").json()
        assert fn["state"] == "ready" and fn["start_mode"] == "restore", fn
        reply = p.invoke("build-gate")
        assert reply.status_code == 200, reply.text
        assert reply.headers["X-Thaw-Node"] == "node1"
        assert reply.json() == {"built_behind": gates[1].name}
        events = p.http.get("/v1/events", params={"kind": "build_retried"}).json()["events"]
        assert [e["node_id"] for e in events] == ["node0"], events
        assert "build interrupted on node node0: its agent died" in events[0]["message"]
        assert "retrying on another node (attempt 2 of" in events[0]["message"]
    finally:
        for gate in gates:
            (gate / "open").touch()  # a build process left behind ends
        local.stop()
