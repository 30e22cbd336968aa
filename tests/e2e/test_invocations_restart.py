"""Stored invocations survive the gateway: submitted to one gateway process, finished
and read through the next one (a graceful restart hands unfinished work back; a killed
gateway's work is picked up when its claims lapse)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningPlatform, tenant_exchange
from tests.gateway.conftest import ASYNC, BUNDLES, wait_done, wait_for_file
from thaw.ops.services import LocalPlatform

# Short, so the killed gateway's claims lapse quickly.
CLAIM_SECONDS = "2"


def client(local: LocalPlatform) -> httpx.Client:
    return httpx.Client(base_url=local.url, timeout=60,
                        headers={"Authorization": f"Bearer {local.key}"})


def test_async_invocations_survive_gateway_restarts(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THAW_INVOCATION_CLAIM_SECONDS", CLAIM_SECONDS)
    local = LocalPlatform(tmp_path / "home", gateway_port=0, host_devices="1x2GiB")
    local.start()
    try:
        p = RunningPlatform(local)
        assert p.deploy(BUNDLES / "jobs").json()["state"] == "ready"
        quick = [p.invoke("gw-jobs", {"value": i}, headers=ASYNC).json()["id"]
                 for i in range(3)]
        for invocation_id in quick:
            assert wait_done(p.http, invocation_id)["status"] == "succeeded"
        shared = tenant_exchange(local.home)
        gate, started = shared / "gate", shared / "started"
        gated = p.invoke("gw-jobs", {"gate": str(gate), "started": str(started),
                                     "value": "gated"}, headers=ASYNC).json()["id"]
        wait_for_file(started)
        p.http.close()

        # Graceful: the running invocation goes back to the queue, the next gateway
        # runs it.
        local.restart_gateway()
        with client(local) as http:
            for i, invocation_id in enumerate(quick):
                done = http.get(f"/v1/invocations/{invocation_id}").json()
                assert done["status"] == "succeeded" and done["result"]["value"] == i
            gate.touch()
            assert wait_done(http, gated)["result"]["value"] == "gated"

            gate.unlink()
            started.unlink()
            killed = http.post("/fn/dev/gw-jobs", headers=ASYNC, json={
                "gate": str(gate), "started": str(started), "value": "killed"}).json()["id"]
            wait_for_file(started)

        # Killed: nobody hands the work back; it is claimed again once its claim lapses.
        local.restart_gateway(kill=True)
        gate.touch()
        with client(local) as http:
            done = wait_done(http, killed)
            assert done["status"] == "succeeded" and done["result"]["value"] == "killed"
            assert http.get(f"/v1/invocations/{quick[0]}/result").json() == {
                "calls": 0, "value": 0}
    finally:
        local.stop()
