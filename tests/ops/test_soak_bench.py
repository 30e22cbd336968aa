"""`thaw bench soak`: the JSON's shape, every figure measured, the goals read from them,
and what the raw clients report of the connections they make."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from thaw.bench import soak
from thaw.bench.soak import SoakSettings, run_soak_bench, sample_process
from thaw.bench.soak_inputs import (
    Attempt,
    Target,
    bundles,
    exchange,
    hold_slow,
    quick_kinds,
    slow_kinds,
)
from thaw.ops.bench import bench
from thaw.ops.services import LocalPlatform

REPO = Path(__file__).resolve().parents[2]


class RecordingSampler:
    """The real sampler, remembering every figure it returned per pid."""

    def __init__(self) -> None:
        self.seen: dict[int, list[tuple[int, int]]] = {}

    def __call__(self, pid: int) -> tuple[int, int]:
        figures = sample_process(pid)
        self.seen.setdefault(pid, []).append(figures)
        return figures


class RecordedPlatform(LocalPlatform):
    """LocalPlatform remembering its services' pids, for after it stopped."""

    def start(self) -> None:
        super().start()
        self.pids = {name: proc.pid for name, proc in self.procs}


@pytest.fixture(scope="module")
def soak_run() -> Iterator[tuple[dict[str, object], RecordingSampler, dict[str, int]]]:
    made: list[RecordedPlatform] = []

    def factory(home: Path, host_devices: str) -> RecordedPlatform:
        made.append(RecordedPlatform(home, gateway_port=0, host_devices=host_devices))
        return made[-1]

    sampler = RecordingSampler()
    out = run_soak_bench(str(REPO / "examples" / "echo"),
                         SoakSettings(duration=2.0, concurrency=2, slow=1, slow_hold=1.0),
                         platform=factory, sampler=sampler)
    yield json.loads(json.dumps(out)), sampler, made[0].pids


def test_soak_counts_add_up_and_cover_every_bad_input(soak_run: tuple) -> None:  # type: ignore[type-arg]
    out, _, _ = soak_run
    calls, valid, bad = out["calls"], out["valid"], out["bad"]
    assert calls["valid"] == sum(valid["by_status"].values()) > 0
    assert set(valid["by_function"]) == {"echo", "soak-sum"}
    assert sum(valid["errors"].values()) == sum(
        n for s, n in valid["by_status"].items() if s.isdigit() and s != "200")
    assert valid["served_fraction"] == round(valid["by_status"].get("200", 0)
                                             / calls["valid"], 4)
    assert sum(sum(c.values()) for c in valid["by_function"].values()) == calls["valid"]
    every_kind = set(quick_kinds()) | set(slow_kinds(1.0)) | set(bundles())
    assert set(bad["by_kind"]) == every_kind == set(bad["refused"])
    by_status: Counter[str] = Counter()
    for outcomes in bad["by_kind"].values():
        by_status.update(outcomes)
    assert dict(by_status) == bad["by_status"]
    assert calls["bad"] == sum(by_status.values()) >= len(every_kind)
    assert calls["sent"] == calls["valid"] + calls["bad"]
    numeric = sum(n for s, n in (Counter(valid["by_status"]) + by_status).items()
                  if s.isdigit())
    assert calls["answered"] == numeric
    assert out["elapsed_s"] >= out["duration_s"] == 2.0
    assert out["concurrency"] == 2 and out["slow_connections"] == 1
    functions = out["functions"]
    assert functions["echo"]["state"] == functions["soak-sum"]["state"] == "ready"
    assert functions["echo"]["warm_instances"] >= 1


def test_soak_reports_the_figures_it_sampled(soak_run: tuple) -> None:  # type: ignore[type-arg]
    out, sampler, pids = soak_run
    services = out["services"]
    assert set(services) == set(pids) and "gateway" in services
    assert any(name.startswith("agent") for name in services)
    for name, figures in services.items():
        seen = sampler.seen[pids[name]]
        assert figures["measured"] and figures["alive"]
        assert (figures["rss_start_bytes"], figures["fds_start"]) in seen
        assert (figures["rss_end_bytes"], figures["fds_end"]) == seen[-1]
        assert figures["rss_peak_bytes"] == max(rss for rss, _ in seen)
        assert (figures["rss_mid_bytes"], figures["rss_growth_second_half"]) == (None, None) or (
            figures["rss_mid_bytes"] in [rss for rss, _ in seen]
            and figures["rss_growth_second_half"] == round(
                (figures["rss_end_bytes"] - figures["rss_mid_bytes"])
                / figures["rss_mid_bytes"], 4))
        assert figures["rss_start_bytes"] > 1 << 20 and figures["fds_start"] > 3
        assert figures["rss_growth"] == round(
            (figures["rss_end_bytes"] - figures["rss_start_bytes"])
            / figures["rss_start_bytes"], 4)
        assert figures["fds_growth"] == figures["fds_end"] - figures["fds_start"]
    goals = out["goals"]
    judged = {n for n in services if n == "gateway" or n.startswith("agent")}
    assert set(goals["rss_growth_under_10pct"]["growth"]) == judged
    assert goals["rss_growth_under_10pct"]["ok"] == all(
        services[n]["rss_growth"] < 0.10 for n in judged)
    assert goals["no_fd_growth"]["ok"] == all(services[n]["fds_growth"] <= 0 for n in judged)
    by_status = out["valid"]["by_status"]
    fives = sum(n for s, n in by_status.items() if s.startswith("5"))
    assert goals["valid_no_5xx"]["5xx"] == fives
    failed = [s for s in by_status if s.startswith(("5", "error_")) or s == "200_wrong_answer"]
    assert goals["valid_no_5xx"]["ok"] == (not failed)
    assert goals["services_alive"]["ok"] is True


def test_goals_fail_on_a_5xx_growth_or_a_dead_service() -> None:
    tally = soak._Tally()
    tally.valid_result("echo", "200")
    tally.valid_result("echo", "502")
    tally.bad_result("slow_silent", "open")
    tally.bad_result("header_oversized", "431")
    watch = soak._Watch(lambda pid: (0, 0), {"gateway": 1, "agent local": 2})
    watch.start = {"gateway": (100, 10), "agent local": (100, 10)}
    watch.end = {"gateway": (120, 10), "agent local": (105, 9)}
    watch.peak_rss = {"gateway": 130, "agent local": 105}
    out = soak.report(SoakSettings(duration=1.0), {"elapsed_s": 1.0, "settle_s": 0.0},
                      tally, watch, {"gateway": True, "agent local": False})
    goals = out["goals"]
    assert goals["valid_no_5xx"] == {"ok": False, "5xx": 1, "dropped": 0,
                                     "wrong_answer": 0}
    assert goals["rss_growth_under_10pct"] == {
        "ok": False, "growth": {"gateway": 0.2, "agent local": 0.05}}
    assert goals["no_fd_growth"] == {"ok": True, "growth": {"gateway": 0, "agent local": -1}}
    assert goals["services_alive"]["ok"] is False
    assert out["bad"]["refused"] == {"header_oversized": True, "slow_silent": False}
    assert out["calls"] == {"sent": 4, "answered": 3, "valid": 2, "bad": 2}


async def _serve(handler: object) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    return server, server.sockets[0].getsockname()[1]


def test_raw_clients_report_what_the_connection_did() -> None:
    async def scenario() -> list[str]:
        peers: list[str] = []

        async def answer_431(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peers.append(writer.get_extra_info("peername")[0])
            await reader.readline()
            writer.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n")
            await writer.drain()
            writer.close()

        async def close_unanswered(reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.close()

        held: list[asyncio.StreamWriter] = []

        async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # keeps it open, reads nothing

        results = []
        line = b"GET / HTTP/1.1\r\n"
        for handler in (answer_431, close_unanswered):
            server, port = await _serve(handler)
            for source in (None, "127.0.0.2"):
                results.append(await exchange("127.0.0.1", port, line, source))
                results.append(await hold_slow("127.0.0.1", port, line, b"ab", 0.5, source))
            server.close()
        results.extend(peers)
        server, port = await _serve(never)
        results.append(await hold_slow("127.0.0.1", port, b"", b"", 0.3))
        for writer in held:
            writer.close()
        server.close()
        return results

    assert asyncio.run(scenario()) == [
        "431", "431", "431", "431", "closed", "closed", "closed", "closed",
        "127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2", "open"]


def test_cli_soak_prints_the_report(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_run(function: str, settings: SoakSettings, *, platform: object) -> dict[str, object]:
        seen.update(function=function, settings=settings, platform=platform)
        return {"goals": {}}

    monkeypatch.setattr(soak, "run_soak_bench", fake_run)
    result = CliRunner().invoke(bench, ["soak", "--duration", "5", "--concurrency", "3",
                                        "--slow", "2", "--slow-hold", "4",
                                        "--function", str(REPO / "examples" / "echo")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"goals": {}}
    assert seen["settings"] == SoakSettings(duration=5.0, concurrency=3, slow=2, slow_hold=4.0)


def test_serial_lanes_try_each_kind_once_past_the_deadline() -> None:
    done: list[str] = []

    def attempt(kind: str) -> Attempt:
        async def run(target: object) -> str:
            done.append(kind)
            return "400"
        return run

    kinds = {k: attempt(k) for k in ("a", "b", "c")}
    tally = soak._Tally()
    target = Target("127.0.0.1", 1, 2, "key", "dev", "echo")

    async def lanes() -> None:
        tried: set[str] = set()
        await asyncio.gather(*(soak._serial_lane(kinds, target, tally, 0.0, tried,
                                                 reserve=1.0, start=i) for i in range(2)))

    asyncio.run(lanes())
    assert sorted(done) == ["a", "b", "c"]
    assert tally.bad == {k: Counter({"400": 1}) for k in kinds}
