"""`thaw bench soak`: the JSON's shape, every figure measured, the goals read from them,
and what the raw clients report of the connections they make."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from thaw.bench import soak, soak_probe
from thaw.bench.soak import SoakSettings, run_soak_bench
from thaw.bench.soak_inputs import (
    Attempt,
    Target,
    bundles,
    exchange,
    hold_slow,
    quick_kinds,
    slow_kinds,
)
from thaw.bench.soak_lanes import Tally, serial_lane
from thaw.bench.soak_watch import (
    Sample,
    Watch,
    describe_link,
    fd_kind,
    fds_report,
    heap_report,
    list_fds,
    sample_process,
)
from thaw.core.spec import parse_spec
from thaw.ops.bench import bench
from thaw.ops.services import LocalPlatform

REPO = Path(__file__).resolve().parents[2]


class RecordingSampler:
    """The real sampler, remembering every figure it returned per pid."""

    def __init__(self) -> None:
        self.seen: dict[int, list[Sample]] = {}

    def __call__(self, pid: int, describe: bool) -> Sample:
        figures = sample_process(pid, describe)
        self.seen.setdefault(pid, []).append(figures)
        return figures


class RecordedPlatform(LocalPlatform):
    """LocalPlatform remembering its services' pids, for after it stopped."""

    def start(self) -> None:
        super().start()
        self.pids = {name: proc.pid for name, proc in self.procs}


@pytest.fixture(scope="module")
def soak_run(tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[dict[str, object], RecordingSampler, dict[str, int]]]:
    made: list[RecordedPlatform] = []
    # The echo example, scaled down after a second idle: the quiet points wait for it.
    echo = tmp_path_factory.mktemp("soak") / "echo"
    shutil.copytree(REPO / "examples" / "echo", echo)
    toml = (echo / "thaw.toml").read_text()
    assert 'scaledown_window = "60s"' in toml
    (echo / "thaw.toml").write_text(toml.replace('scaledown_window = "60s"',
                                                 'scaledown_window = "1s"'))

    def factory(home: Path, host_devices: str) -> RecordedPlatform:
        made.append(RecordedPlatform(home, gateway_port=0, host_devices=host_devices))
        return made[-1]

    sampler = RecordingSampler()
    out = run_soak_bench(str(echo),
                         SoakSettings(duration=2.0, concurrency=2, slow=1, slow_hold=1.0,
                                      warmup=1.0, drain=0.0),
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
    # Listed after the end's quiet point, at rest: echo (scaled down after a second
    # idle) at its floor of none, soak-sum (min_instances = 1) warm.
    assert functions["echo"]["warm_instances"] == 0
    assert functions["soak-sum"]["warm_instances"] == 1


def test_soak_reports_the_figures_it_sampled(soak_run: tuple) -> None:  # type: ignore[type-arg]
    out, sampler, pids = soak_run
    services = out["services"]
    assert set(services) == set(pids) and "gateway" in services
    assert any(name.startswith("agent") for name in services)
    for name, figures in services.items():
        seen = sampler.seen[pids[name]]
        described = [s for s in seen if s.links is not None]
        # Described in full: once deployed (ready), after the warm-up (start), at the end.
        assert len(described) == 3 and described[-1] is seen[-1]
        ready, start, end = described
        assert figures["measured"] and figures["alive"]
        assert figures["rss_ready_bytes"] == ready.rss
        assert (figures["rss_start_bytes"], figures["fds_start"]) == (start.rss, start.fds)
        assert (figures["rss_end_bytes"], figures["fds_end"]) == (end.rss, end.fds)
        assert figures["rss_peak_bytes"] == max(s.rss for s in seen)
        assert (figures["rss_mid_bytes"], figures["rss_growth_second_half"]) == (None, None) or (
            figures["rss_mid_bytes"] in [s.rss for s in seen]
            and figures["rss_growth_second_half"] == round(
                (figures["rss_end_bytes"] - figures["rss_mid_bytes"])
                / figures["rss_mid_bytes"], 4))
        assert figures["rss_start_bytes"] > 1 << 20 and figures["fds_start"] > 3
        assert figures["rss_growth"] == round(
            (figures["rss_end_bytes"] - figures["rss_start_bytes"])
            / figures["rss_start_bytes"], 4)
        assert figures["fds_growth"] == figures["fds_end"] - figures["fds_start"]
        assert figures["rss_growth_from_ready"] == round(
            (end.rss - ready.rss) / ready.rss, 4)
        # Descriptors by kind, and which appeared or went, from the described samples.
        assert figures["fd_kinds_start"] == dict(Counter(fd_kind(d) for d in start.links))
        assert figures["fd_kinds_end"] == dict(Counter(fd_kind(d) for d in end.links))
        assert sum(figures["fd_kinds_end"].values()) == figures["fds_end"]
        new = Counter(end.links) - Counter(start.links)
        gone = Counter(start.links) - Counter(end.links)
        assert figures["fds_new"] == sorted(new.elements())[:20]
        assert figures["fds_gone"] == sorted(gone.elements())[:20]
        assert any(d.startswith("tcp") and d.endswith("LISTEN") for d in start.links) or (
            name.startswith("agent"))  # the scheduler and the gateway listen on TCP
        # The heap, from inside the service (the probe), at the three points.
        heap = figures["heap"]
        assert heap["measured"], name
        for key in ("gc_objects", "allocated_blocks", "malloc_in_use_bytes"):
            fig = heap[key]
            assert fig["ready"] > 0 and fig["start"] > 0 and fig["end"] > 0
            assert fig["growth"] == round((fig["end"] - fig["start"]) / fig["start"], 4)
        assert "traced_bytes" not in heap  # tracemalloc is off unless asked for
        assert heap["modules_imported"]["count"] >= len(heap["modules_imported"]["names"])
        assert all(n > 0 for n in heap["types_grown"].values())
        assert all(n > 0 for n in heap["warmup_types_grown"].values())
    # The functions at both quiet points, as the API lists them (an instance more holds
    # descriptors of its own).
    # Both at rest: echo scaled down to none, soak-sum at its one.
    assert out["at_rest"] == {"start": True, "end": True}
    for point in ("start", "end"):
        assert out["functions_at"][point] == {
            "echo": {"state": "ready", "warm_instances": 0},
            "soak-sum": {"state": "ready", "warm_instances": 1}}
    # A warm-up of one second in a run of two: no room for a step.
    assert out["warmup_seconds"] == out["warmup_planned_s"] == 1.0
    assert out["warmup_steady"] is None and out["warmup_last_step_growth"] == {}
    assert out["warmup_elapsed_s"] >= 1.0 and out["measured_elapsed_s"] >= 1.0
    assert out["elapsed_s"] == round(out["warmup_elapsed_s"] + out["measured_elapsed_s"], 2)
    goals = out["goals"]
    judged = {n for n in services if n == "gateway" or n.startswith("agent")}
    assert set(goals["rss_growth_under_10pct"]["growth"]) == judged
    assert goals["rss_growth_under_10pct"]["ok"] == all(
        services[n]["rss_growth"] < 0.10 for n in judged)
    assert goals["no_fd_growth"]["ok"] == all(services[n]["fds_growth"] <= 0 for n in judged)
    heap_growth = {n: max(services[n]["heap"]["gc_objects"]["growth"],
                          services[n]["heap"]["malloc_in_use_bytes"]["growth"]) for n in judged}
    assert goals["heap_growth_under_10pct"] == {
        "ok": all(g < 0.10 for g in heap_growth.values()), "growth": heap_growth}
    by_status = out["valid"]["by_status"]
    fives = sum(n for s, n in by_status.items() if s.startswith("5"))
    assert goals["valid_no_5xx"]["5xx"] == fives
    failed = [s for s in by_status if s.startswith(("5", "error_")) or s == "200_wrong_answer"]
    assert goals["valid_no_5xx"]["ok"] == (not failed)
    assert goals["services_alive"]["ok"] is True


def test_goals_fail_on_a_5xx_growth_or_a_dead_service() -> None:
    tally = Tally()
    tally.valid_result("echo", "200")
    tally.valid_result("echo", "502")
    tally.bad_result("slow_silent", "open")
    tally.bad_result("header_oversized", "431")
    watch = Watch(lambda pid, describe: Sample(0, 0), {"gateway": 1, "agent local": 2})
    watch.start = {"gateway": Sample(100, 10), "agent local": Sample(100, 10)}
    watch.end = {"gateway": Sample(120, 10), "agent local": Sample(105, 9)}
    watch.peak_rss = {"gateway": 130, "agent local": 105}
    watch.heap_start = {"gateway": {"gc_objects": 1000, "malloc_in_use_bytes": 100},
                        "agent local": {"gc_objects": 1000, "malloc_in_use_bytes": 100}}
    watch.heap_end = {"gateway": {"gc_objects": 1050, "malloc_in_use_bytes": 120},
                      "agent local": {"gc_objects": 1010, "malloc_in_use_bytes": 99}}
    out = soak.report(SoakSettings(duration=1.0),
                      {"warmup_elapsed_s": 0.5, "quiet_s": 0.0, "elapsed_s": 1.0,
                       "settle_s": 0.0},
                      tally, watch, {"gateway": True, "agent local": False})
    goals = out["goals"]
    assert goals["valid_no_5xx"] == {"ok": False, "5xx": 1, "dropped": 0,
                                     "wrong_answer": 0}
    assert goals["rss_growth_under_10pct"] == {
        "ok": False, "growth": {"gateway": 0.2, "agent local": 0.05}}
    assert goals["no_fd_growth"] == {"ok": True, "growth": {"gateway": 0, "agent local": -1}}
    # The larger of the two heap figures' growth: malloc's 20% for the gateway.
    assert goals["heap_growth_under_10pct"] == {
        "ok": False, "growth": {"gateway": 0.2, "agent local": 0.01}}
    assert out["warmup_planned_s"] == 0.5  # never more than half the duration
    assert out["elapsed_s"] == 1.5
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
    tally = Tally()
    target = Target("127.0.0.1", 1, 2, "key", "dev", "echo")

    async def lanes() -> None:
        tried: set[str] = set()
        await asyncio.gather(*(serial_lane(kinds, target, tally, 0.0, tried,
                                                 reserve=1.0, start=i) for i in range(2)))

    asyncio.run(lanes())
    assert sorted(done) == ["a", "b", "c"]
    assert tally.bad == {k: Counter({"400": 1}) for k in kinds}


def test_descriptors_are_described_by_kind(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    read_end, write_end = os.pipe()
    path = tmp_path / "held"
    path.write_text("x")
    try:
        with path.open() as held:
            links = list_fds(os.getpid())
            assert f"tcp 127.0.0.1:{port}->0.0.0.0:0 LISTEN" in links
            assert f"file {path}" in links and held.fileno() >= 0
            assert links.count("pipe") >= 2
            kinds = Counter(fd_kind(d) for d in links)
            assert kinds["tcp"] >= 1 and kinds["file"] >= 1 and kinds["pipe"] >= 2
            assert sample_process(os.getpid(), True).links is not None
            assert sample_process(os.getpid()).links is None
    finally:
        listener.close()
        os.close(read_end)
        os.close(write_end)


def test_each_kind_of_link_is_named() -> None:
    sockets = {"77": "unix /run/x.sock"}
    assert describe_link("socket:[77]", sockets) == "unix /run/x.sock"
    assert describe_link("socket:[78]", sockets) == "socket other"
    assert describe_link("pipe:[5]", sockets) == "pipe"
    assert describe_link("anon_inode:[eventfd]", sockets) == "anon_inode eventfd"
    assert describe_link("anon_inode:inotify", sockets) == "anon_inode inotify"
    assert describe_link("/memfd:arena (deleted)", sockets) == "memfd arena (deleted)"
    assert describe_link("/dev/null", sockets) == "device /dev/null"
    assert describe_link("/var/log/x.log", sockets) == "file /var/log/x.log"
    assert [fd_kind(d) for d in ("anon_inode eventfd", "memfd arena", "tcp a->b LISTEN")] == [
        "anon_inode eventfd", "memfd", "tcp"]


def test_the_warm_up_is_a_fifth_at_least_twenty_seconds_never_over_half() -> None:
    assert SoakSettings(duration=180).warmup_seconds() == 36.0
    assert SoakSettings(duration=60).warmup_seconds() == 20.0
    assert SoakSettings(duration=10).warmup_seconds() == 5.0
    assert SoakSettings(duration=120, warmup=100).warmup_seconds() == 60.0
    assert SoakSettings(duration=120, warmup=0).warmup_seconds() == 0.0


def test_fds_and_heap_are_compared_as_the_samples_say() -> None:
    start = Sample(1, 3, ("pipe", "tcp a->b ESTABLISHED", "file /x"))
    end = Sample(1, 4, ("pipe", "pipe", "tcp a->c ESTABLISHED", "file /x"))
    assert fds_report(start, end) == {
        "fd_kinds_start": {"pipe": 1, "tcp": 1, "file": 1},
        "fd_kinds_end": {"pipe": 2, "tcp": 1, "file": 1},
        "fds_new": ["pipe", "tcp a->c ESTABLISHED"], "fds_gone": ["tcp a->b ESTABLISHED"]}
    assert fds_report(Sample(1, 3), end) == {}
    ready = {"gc_objects": 80, "types": {"a.A": 1}, "modules": ["m"]}
    first = {"gc_objects": 100, "allocated_blocks": 10, "malloc_in_use_bytes": None,
             "types": {"a.A": 5, "b.B": 2}, "modules": ["m", "n"]}
    last = {"gc_objects": 90, "allocated_blocks": 11, "malloc_in_use_bytes": None,
            "types": {"a.A": 4, "b.B": 3, "c.C": 1}, "modules": ["m", "n", "o", "p"]}
    assert heap_report(first, last, ready) == {
        "measured": True,
        "gc_objects": {"start": 100, "end": 90, "growth": -0.1, "ready": 80},
        "allocated_blocks": {"start": 10, "end": 11, "growth": 0.1},
        "types_grown": {"b.B": 1, "c.C": 1},
        "modules_imported": {"count": 2, "names": ["o", "p"]},
        "warmup_types_grown": {"a.A": 4, "b.B": 2},
        "warmup_modules_imported": {"count": 1, "names": ["n"]}}
    assert heap_report(None, last) == {"measured": False}


def test_the_probe_answers_only_in_a_service_and_leaves_no_trace_in_the_environment(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(soak_probe.PROBE_ENV, str(tmp_path))
    monkeypatch.setenv(soak_probe.TRACE_ENV, "1")
    monkeypatch.setenv(soak_probe.SAVED_PYTHONPATH_ENV, "/before")
    monkeypatch.setenv("PYTHONPATH", f"/probe{os.pathsep}/before")
    assert soak_probe.install() is False  # pytest is no platform service
    assert os.environ["PYTHONPATH"] == "/before"
    for name in (soak_probe.PROBE_ENV, soak_probe.TRACE_ENV, soak_probe.SAVED_PYTHONPATH_ENV):
        assert name not in os.environ
    monkeypatch.setenv(soak_probe.SAVED_PYTHONPATH_ENV, "")
    soak_probe.install()
    assert "PYTHONPATH" not in os.environ


def test_heap_figures_count_what_the_collector_tracks() -> None:
    figures = soak_probe.heap_figures()
    types = figures["types"]
    assert isinstance(types, dict) and sum(types.values()) == figures["gc_objects"]
    assert types["builtins.dict"] > 0 and "thaw.bench.soak_probe" in figures["modules"]  # type: ignore[operator]
    assert isinstance(figures["allocated_blocks"], int) and figures["allocated_blocks"] > 0
    in_use = figures["malloc_in_use_bytes"]
    assert in_use is None or (isinstance(in_use, int) and in_use > 0)


def test_the_platform_is_at_rest_with_each_function_at_its_floor() -> None:
    rest = soak.Rest({"echo": 0, "soak-sum": 1}, 90.0, lambda: None)
    assert rest.holds({"echo": {"warm_instances": 0}, "soak-sum": {"warm_instances": 1},
                       "other": {"warm_instances": 5}})
    assert not rest.holds({"echo": {"warm_instances": 1}, "soak-sum": {"warm_instances": 1}})
    assert not rest.holds({"soak-sum": {"warm_instances": 0}})  # echo not listed
    assert not rest.holds(None)  # no answer
    echo = parse_spec('name = "echo"\nhandler = "a:B"\n[scaling]\nscaledown_window = "60s"\n')
    pinned = parse_spec(soak.SUM_TOML)  # min_instances = max_instances: never scales down
    assert soak._rest_within((echo, pinned)) == 60.0 + soak.REST_MARGIN_S
    assert soak._rest_within((pinned,)) == soak.REST_MARGIN_S
    slow = parse_spec('name = "s"\nhandler = "a:B"\n[scaling]\nscaledown_window = "3600s"\n')
    assert soak._rest_within((slow,)) == soak.REST_LONGEST_S


def test_the_warm_up_goes_on_while_a_judged_heap_still_grows() -> None:
    before = {"gateway": {"gc_objects": 1000}, "agent local": {"gc_objects": 500},
              "scheduler": {"gc_objects": 10}}
    filling = {"gateway": {"gc_objects": 1100}, "agent local": {"gc_objects": 501},
               "scheduler": {"gc_objects": 99}}
    names = soak.judged(["scheduler", "agent local", "gateway"])
    assert names == ["agent local", "gateway"]  # the scheduler is reported, not judged
    steps = soak.heap_steps(before, filling, names)
    assert steps == {"agent local": 0.002, "gateway": 0.1}
    assert not soak.warmup_steady(steps)
    full = {"gateway": {"gc_objects": 1105}, "agent local": {"gc_objects": 499}}
    assert soak.warmup_steady(soak.heap_steps(filling, full, names))
    assert not soak.warmup_steady(soak.heap_steps(filling, {"gateway": {"gc_objects": 1}},
                                                  names))  # the agent did not answer
    assert not soak.warmup_steady({})
