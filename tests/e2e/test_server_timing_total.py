"""No hidden time: on a real platform, a call's Server-Timing stages add up to its
`total` (within 2%, or 0.1 ms for the rounding of each stage to 0.01 ms on a short
call) for warm, restore and fresh starts, on the fast lane and on aiohttp's route."""

from __future__ import annotations

import httpx

from tests.conftest import EXAMPLES, FIXTURES, RunningPlatform

# Each stage is printed to 0.01 ms: a dozen of them round to within this.
ROUNDING_MS = 0.1
SHARE = 0.02


def stages_of(resp: httpx.Response) -> tuple[dict[str, float], float]:
    assert resp.status_code == 200, resp.text
    stages: dict[str, float] = {}
    total = None
    for part in resp.headers["Server-Timing"].split(","):
        name, _, rest = part.strip().partition(";dur=")
        if name == "total":
            total = float(rest)
        else:
            assert name not in stages, f"{name} twice: {resp.headers['Server-Timing']}"
            stages[name] = float(rest)
            assert stages[name] >= 0.0
    assert total is not None, resp.headers["Server-Timing"]
    return stages, total


def assert_adds_up(resp: httpx.Response, start: str, lane: bool) -> dict[str, float]:
    assert resp.headers["X-Thaw-Start"] == start
    # aiohttp names itself in Server; the fast lane sends none.
    assert ("aiohttp" in resp.headers.get("Server", "")) is not lane, resp.headers
    stages, total = stages_of(resp)
    assert {"admission", "placement", "run", "node", "hop", "relay"} <= stages.keys(), stages
    assert abs(sum(stages.values()) - total) <= max(SHARE * total, ROUNDING_MS), (
        start, lane, stages, total)
    return stages


def test_the_stages_add_up_to_the_total_for_every_start_and_path(
        platform: RunningPlatform) -> None:
    client = httpx.Client(base_url=platform.platform.function_url, timeout=600,
                          headers={"Authorization": f"Bearer {platform.key}"})

    def call(name: str, body: object) -> httpx.Response:
        # On the function origin the fast lane answers a plain POST; a `%` escape in
        # the sub-path hands the call to aiohttp's route (gateway/lane.py).
        return client.post(f"/fn/dev/{name}" if lane else f"/fn/dev/{name}/a%20b", json=body)

    for lane in (True, False):
        assert platform.deploy(EXAMPLES / "echo").status_code == 201
        cold = assert_adds_up(call("echo", {"n": 1}), "restore", lane)
        assert {"queue", "restore", "prefault"} <= cold.keys()
        assert_adds_up(call("echo", {"n": 2}), "warm", lane)

        assert platform.deploy(FIXTURES / "fresh_typed").status_code == 201
        fresh = assert_adds_up(call("fresh-typed", {"value": 1.5}), "fresh", lane)
        assert {"queue", "launch", "import", "setup"} <= fresh.keys()
        assert_adds_up(call("fresh-typed", {"value": 2.5}), "warm", lane)
    client.close()
