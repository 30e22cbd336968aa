"""Node agent behaviour seen from outside: batching, max_concurrency, graceful drain."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.conftest import FIXTURES, RunningPlatform
from tests.tls import sync_channel
from thaw.core.httptls import local_client_context
from thaw.ops.services import LocalPlatform


def test_concurrent_calls_reach_a_batched_handler_as_one_list(
        platform: RunningPlatform) -> None:
    assert platform.deploy(FIXTURES / "batched").json()["state"] == "ready"
    platform.invoke("batched", {"x": 0}).raise_for_status()  # warm it
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda x: platform.invoke("batched", {"x": x}), range(8)))
    bodies = [r.json() for r in replies]
    assert [b["doubled"] for b in bodies] == [2 * x for x in range(8)]
    assert max(b["batch_size"] for b in bodies) >= 2


def test_agent_enforces_max_concurrency(platform: RunningPlatform) -> None:
    assert platform.deploy(FIXTURES / "sleep").json()["state"] == "ready"
    first = platform.invoke("sleep", {"seconds": 0})
    instance = first.headers["X-Thaw-Instance"]
    node = platform.http.get("/v1/nodes").json()["nodes"][0]
    url = f"{node['data_url']}/v1/instances/{instance}/invoke"
    # The data plane serves the gateway's certificate only (mutual TLS).
    tls = local_client_context(platform.platform.home)
    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(httpx.post, url, json={"seconds": 1.5}, timeout=30, verify=tls)
                 for _ in range(3)]
        statuses = sorted(c.result().status_code for c in calls)
    # max_concurrency = 2: the third concurrent call is refused, not queued inside.
    assert statuses == [200, 200, 429]


def test_sigterm_on_the_agent_finishes_in_flight_requests(tmp_path: Path) -> None:
    local = LocalPlatform(tmp_path / "home", gateway_port=0, host_devices="1x2GiB")
    local.start()
    try:
        p = RunningPlatform(local)
        assert p.deploy(FIXTURES / "sleep").json()["state"] == "ready"
        p.invoke("sleep", {"seconds": 0}).raise_for_status()
        results: list[httpx.Response] = []
        caller = threading.Thread(
            target=lambda: results.append(p.invoke("sleep", {"seconds": 2})))
        caller.start()
        agent = next(proc for name, proc in local.procs if name.startswith("agent"))
        import time

        time.sleep(0.7)  # the call is in flight on the instance
        agent.send_signal(signal.SIGTERM)
        caller.join(30)
        assert results and results[0].status_code == 200, results
        assert results[0].json()["slept"] == 2
        assert agent.wait(30) == 0
    finally:
        local.stop()


def test_node_telemetry_as_prometheus_metrics(platform: RunningPlatform) -> None:
    assert platform.deploy(FIXTURES / "sleep").json()["state"] == "ready"
    instance = platform.invoke("sleep", {"seconds": 0}).headers["X-Thaw-Instance"]
    node = platform.http.get("/v1/nodes").json()["nodes"][0]
    text = httpx.get(f"{node['data_url']}/metrics", timeout=30,
                     verify=local_client_context(platform.platform.home)).text
    assert "thaw_node_cpu_percent" in text and "thaw_node_memory_used_bytes" in text
    assert 'thaw_device_memory_capacity_bytes{device="host0"' in text
    rss = [line for line in text.splitlines()
           if line.startswith("thaw_instance_rss_bytes") and instance in line]
    assert rss and float(rss[0].rsplit(" ", 1)[1]) > 1_000_000
    assert f'thaw_instance_unique_bytes{{function="dev/sleep",instance="{instance}"' in text


def test_heartbeats_carry_telemetry_to_the_scheduler(platform: RunningPlatform) -> None:
    import time

    from thaw.proto import scheduler_pb2, scheduler_pb2_grpc

    assert platform.deploy(FIXTURES / "sleep").json()["state"] == "ready"
    instance = platform.invoke("sleep", {"seconds": 0}).headers["X-Thaw-Instance"]
    channel = sync_channel(platform.platform.scheduler_address, platform.platform.home,
                           "scheduler")
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    deadline = time.monotonic() + 15
    try:
        while True:
            node = stub.ListNodes(scheduler_pb2.ListNodesRequest(), timeout=10).nodes[0]
            seen = {i.instance_id: i for i in node.telemetry.instances}
            if instance in seen:
                break
            assert time.monotonic() < deadline, "no heartbeat carried the instance"
            time.sleep(0.3)
    finally:
        channel.close()
    assert seen[instance].rss_bytes > 1_000_000 and seen[instance].function == "dev/sleep"
    assert node.telemetry.memory_total_bytes > node.telemetry.memory_used_bytes > 0
    assert [d.id for d in node.telemetry.devices] == ["host0", "host1"]
    assert all(d.utilization_percent == -1.0 for d in node.telemetry.devices)


def test_a_call_in_flight_on_a_killed_node_is_retried_only_if_idempotent(
        tmp_path: Path) -> None:
    import time

    local = LocalPlatform(tmp_path / "home", gateway_port=0, host_devices="1x2GiB", agents=2)
    local.start()
    try:
        p = RunningPlatform(local)
        assert p.deploy(FIXTURES / "sleep").json()["state"] == "ready"
        # Put the warm instance on node0.
        p.http.post("/v1/nodes/node1/cordon").raise_for_status()
        assert p.invoke("sleep", {"seconds": 0}).headers["X-Thaw-Node"] == "node0"
        p.http.post("/v1/nodes/node1/uncordon").raise_for_status()

        results: dict[str, httpx.Response] = {}

        def call(label: str, headers: dict[str, str]) -> None:
            results[label] = p.invoke("sleep", {"seconds": 3}, headers=headers)

        callers = [threading.Thread(target=call, args=("plain", {})),
                   threading.Thread(target=call, args=("idempotent",
                                                       {"Idempotency-Key": "k-1"}))]
        for caller in callers:
            caller.start()
        # Both calls running on node0's instance (a call not yet sent when the node
        # dies is sent elsewhere whatever its kind: nothing of it ran).
        node0 = next(n for n in p.http.get("/v1/nodes").json()["nodes"] if n["id"] == "node0")
        tls = local_client_context(local.home)
        deadline = time.monotonic() + 60
        while sum(i["inflight"] for i in httpx.get(
                f"{node0['data_url']}/v1/instances", verify=tls, timeout=10
        ).json()["instances"]) < 2:
            assert time.monotonic() < deadline, "the two calls never ran at once"
            time.sleep(0.05)
        agent0 = next(proc for name, proc in local.procs if name == "agent node0")
        agent0.send_signal(signal.SIGKILL)
        for caller in callers:
            caller.join(60)
        assert results["plain"].status_code in (502, 503), results["plain"].text
        assert "code" in results["plain"].json()["error"]
        assert results["idempotent"].status_code == 200, results["idempotent"].text
        assert results["idempotent"].headers["X-Thaw-Node"] == "node1"
    finally:
        local.stop()


def test_pressure_is_a_metric_and_events_are_listed(platform: RunningPlatform) -> None:
    import time

    assert platform.deploy(FIXTURES / "sleep").json()["state"] == "ready"
    platform.invoke("sleep", {"seconds": 0}).raise_for_status()
    deadline = time.monotonic() + 15
    while 'thaw_memory_pressure_level{node="local",resource="pinned"}' not in (
            text := platform.http.get("/metrics").text):
        assert time.monotonic() < deadline, "no pressure gauge after a heartbeat"
        time.sleep(0.3)
    line = next(x for x in text.splitlines()
                if x.startswith('thaw_memory_pressure_level{node="local",resource="pinned"}'))
    assert float(line.rsplit(" ", 1)[1]) == 0.0  # normal
    events = platform.http.get("/v1/events", params={"kind": "instance_started"}).json()
    assert events["events"] and all(e["kind"] == "instance_started" for e in events["events"])
    assert any(e["function"] == "dev/sleep" for e in events["events"])
    bad = platform.http.get("/v1/events", params={"limit": "lots"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "limit"
