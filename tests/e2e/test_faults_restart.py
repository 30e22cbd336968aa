"""Restarting a node's agent keeps the node: a real LocalPlatform whose agent process is
restarted (SIGTERM, then SIGKILL) under steady calls. The node never flaps between
ready and lost: a graceful restart goes only through "restarting", a crash at most once
through "lost", and the function answers again afterwards."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from tests.conftest import FIXTURES, RunningPlatform
from thaw.ops.services import LocalPlatform


def node_events(p: RunningPlatform, after: int) -> list[dict[str, str]]:
    kinds = ["node_registered", "node_lost", "node_recovered"]
    events = p.http.get("/v1/events", params={"kind": kinds, "after": after,
                                              "limit": 500}).json()
    return [e for e in events["events"] if e["node_id"] == "local"]


def last_seq(p: RunningPlatform) -> int:
    last: int = p.http.get("/v1/events", params={"limit": 0}).json()["last_seq"]
    return last


class Watch:
    """Calls the function and reads the node's state in a loop while a restart runs."""

    def __init__(self, p: RunningPlatform) -> None:
        self.p = p
        self.states: list[str] = []
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            nodes = self.p.http.get("/v1/nodes").json()["nodes"]
            self.states.append(nodes[0]["state"])
            try:
                reply = self.p.invoke("sleep", {"seconds": 0})
                self.statuses.append(reply.status_code)
                if reply.status_code != 200:
                    self.failures.append(reply.text)
            except httpx.HTTPError:
                self.statuses.append(-1)

    def calls_after(self, count: int) -> None:
        seen = len(self.statuses)
        while len(self.statuses) < seen + count and self._thread.is_alive():
            self._stop.wait(0.05)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def test_restarting_an_agent_keeps_its_node_ready(tmp_path: Path) -> None:
    local = LocalPlatform(tmp_path / "home", gateway_port=0, host_devices="1x2GiB")
    local.start()
    try:
        p = RunningPlatform(local)
        assert p.deploy(FIXTURES / "sleep").json()["state"] == "ready"
        assert p.invoke("sleep", {"seconds": 0}).status_code == 200

        seq = last_seq(p)
        with Watch(p) as watch:
            local.restart_agent("local")
            watch.calls_after(3)  # a few calls after the new agent registered
        events = node_events(p, seq)
        assert not [e for e in events if e["kind"] == "node_lost"], events
        assert set(watch.states) <= {"ready", "restarting"}, watch.states
        # Calls wait for the node instead of failing; one sent on a lease the gateway
        # kept while the old agent was gone is refused at connect and sent again.
        assert watch.statuses[-3:] == [200, 200, 200], watch.statuses
        assert watch.failures == [], watch.failures
        messages = [e["message"] for e in events]
        assert "node local restarting: its agent is stopping" in messages
        assert "node local re-registered: its agent restarted" in messages
        assert p.http.get("/v1/nodes").json()["nodes"][0]["state"] == "ready"
        reply = p.invoke("sleep", {"seconds": 0})
        assert reply.status_code == 200 and reply.headers["X-Thaw-Node"] == "local"

        # A crash: its node may be written off once, never flapping, and serves again.
        seq = last_seq(p)
        local.restart_agent("local", kill=True)
        assert p.invoke("sleep", {"seconds": 0}).status_code == 200
        assert p.invoke("sleep", {"seconds": 0}).status_code == 200
        kinds = [e["kind"] for e in node_events(p, seq)]
        assert kinds.count("node_lost") <= 1, kinds
        assert kinds.count("node_recovered") == 0, kinds  # it registered, not recovered
        assert p.http.get("/v1/nodes").json()["nodes"][0]["state"] == "ready"
    finally:
        local.stop()
