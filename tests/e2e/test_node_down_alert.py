"""The node_down alert end to end: a real LocalPlatform with two agents and short
heartbeats; one agent process is killed, the scheduler marks its node lost, and the
gateway's alert engine POSTs node_down for that node (and only that one) to a local
receiver."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_alerts import Receiver, receiver  # noqa: F401 (the fixture)
from thaw.ops.services import LocalPlatform

# The scheduler notices a silent node after THAW_NODE_TIMEOUT (3 s here); the alert
# engine looks every 0.2 s, so the notice follows within a few seconds.
FAST_ENV = {"THAW_HEARTBEAT_INTERVAL": "0.5", "THAW_NODE_TIMEOUT": "3",
            "THAW_RECONCILE_INTERVAL": "0.25",
            "THAW_ALERTS_INTERVAL": "0.2", "THAW_ALERTS_COOLDOWN": "0",
            # Lost only: the notice comes from the scheduler's own verdict.
            "THAW_ALERTS_HEARTBEAT_AGE": "0"}


def node_down(node_id: str, state: str = "firing") -> Any:
    return lambda b: (b.get("alert") == "node_down" and b.get("subject") == node_id
                      and b.get("state") == state)


def test_a_killed_agent_fires_node_down_for_its_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        receiver: Receiver) -> None:  # noqa: F811 (the fixture)
    monkeypatch.setenv("THAW_ALERTS_WEBHOOK_URLS", f"{receiver.url}/hook")
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    local = LocalPlatform(tmp_path / "home", gateway_port=0, host_devices="1x1GiB",
                          agents=2)
    try:
        local.start()
        with httpx.Client(base_url=local.url, timeout=30,
                          headers={"Authorization": f"Bearer {local.key}"}) as http:
            nodes = {n["id"]: n["state"] for n in http.get("/v1/nodes").json()["nodes"]}
            assert nodes == {"node0": "ready", "node1": "ready"}
            # Both up: whatever the engine has sent so far, no node is down.
            assert not [b for b in receiver.bodies("/hook") if b.get("alert") == "node_down"]

            (agent,) = [p for name, p in local.procs if name == "agent node1"]
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)

            notice = receiver.wait_for("/hook", node_down("node1"))
            assert notice["severity"] == "critical"
            assert "node node1 is lost" in notice["message"]
            assert notice["resolved_at"] is None
            listed = http.get("/v1/alerts").json()
            active = [(a["subject"], a["state"]) for a in listed["active"]
                      if a["alert"] == "node_down"]
            assert active == [("node1", "firing")]
            # The node still beating is not reported.
            assert not [b for b in receiver.bodies("/hook") if node_down("node0")(b)]
    finally:
        local.stop()
