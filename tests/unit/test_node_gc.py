"""A node's garbage collection (platform/gc.py): what is kept and what goes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

from thaw.platform.gc import (
    BUILDS,
    BUNDLES,
    LOGS,
    STAGING,
    TRASH,
    GcPolicy,
    InFlight,
    InUse,
    LogFile,
    NodeCollector,
    build_key,
    process_usage,
    select_builds,
    select_bundles,
    select_logs,
    select_staging,
)

A, B, C, D, E = (c * 64 for c in "abcde")


def test_staging_folders_go_unless_their_bundle_is_being_extracted() -> None:
    names = [A, f".{B}-1a2b3c4d", f".{C}-00ff00ff", TRASH, ".other"]
    assert select_staging(names, extracting={C}) == [f".{B}-1a2b3c4d"]


def test_bundles_go_unless_kept_in_flight_or_used_by_a_live_process() -> None:
    in_use = InUse(places=frozenset({f"/srv/thaw/agent/n1/bundles/{D}",
                                     f"/var/lib/x/bundles/{E}/sub"}))
    names = [A, B, C, D, E, f".{A}-12345678"]
    assert select_bundles(names, keep={A}, in_flight={B}, in_use=in_use) == [C]


def test_build_outputs_go_unless_their_build_is_running() -> None:
    running = build_key("t1", "embed", "3")
    names = [f"{running}-a1b2c3", f"{build_key('t1', 'embed', '2')}-ffeedd",
             f"{build_key('t2', 'other', '1')}-000000"]
    assert select_builds(names, {running}) == names[1:]
    assert select_builds(names, ()) == names


def test_logs_of_ended_instances_go_after_their_age() -> None:
    now = 1_000_000.0
    folder = Path("/home/agent/logs/200001")
    live = LogFile(folder / "i-live.log", now - 90_000)
    opened = LogFile(folder / "template-t1-embed.log", now - 90_000)
    building = LogFile(folder / f"build-{build_key('t1', 'embed', '4')}.log", now - 90_000)
    old = LogFile(folder / "i-old.log", now - 90_000)
    fresh = LogFile(folder / "i-fresh.log", now - 60)
    # Quiet for a day, but seen live ten minutes ago: it ended since then.
    quiet = LogFile(folder / "i-quiet.log", now - 90_000)
    last_live = {str(quiet.path): now - 600}
    in_use = InUse(open_files=frozenset({"/home/agent/logs/200001/template-t1-embed.log"}))
    chosen = select_logs([live, opened, building, old, fresh, quiet], live={"i-live"},
                         building={build_key("t1", "embed", "4")}, in_use=in_use,
                         last_live=last_live, now=now, max_age=86_400)
    assert chosen == [old.path]
    assert last_live[str(live.path)] == now and last_live[str(opened.path)] == now
    # With no age, every log nothing uses goes at once.
    chosen = select_logs([live, opened, building, old, fresh, quiet], live={"i-live"},
                         building=set(), in_use=in_use, last_live={}, now=now, max_age=0)
    assert chosen == [building.path, old.path, fresh.path, quiet.path]


def test_a_sandboxed_process_log_counts_by_its_tail() -> None:
    in_use = InUse(open_files=frozenset({"/some/root/logs/200001/i-1.log"}))
    chosen = select_logs([LogFile(Path("/home/agent/logs/200001/i-1.log"), 0.0)], live=(),
                         building=(), in_use=in_use, last_live={}, now=1e9, max_age=0)
    assert chosen == []


def test_process_usage_sees_a_working_folder_and_open_files(tmp_path: Path) -> None:
    bundle = tmp_path / "bundles" / D
    bundle.mkdir(parents=True)
    log_path = tmp_path / "held.log"
    with open(log_path, "w") as held:
        proc = subprocess.Popen(["sleep", "30"], cwd=bundle, stdout=held)
    try:
        usage = process_usage([proc.pid, 0, 2**22 + 12345])
        assert str(bundle) in usage.places
        assert str(log_path) in usage.open_files
    finally:
        proc.kill()
        proc.wait()


def _write(path: Path, size: int = 10_000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "agent"
    for digest in (A, B, D):
        _write(home / "bundles" / digest / "app.py")
    _write(home / "bundles" / f".{C}-1a2b3c4d" / "half.bin")
    _write(home / "bundles" / f".{E}-5e6f7a8b" / "extracting.bin")
    _write(home / "builds" / "200001" / f"{build_key('t1', 'gone', '1')}-abcdef" / "x")
    _write(home / "builds" / "200001" / f"{build_key('t1', 'live', '2')}-123456" / "x")
    _write(home / "builds" / ".sealed" / f"{build_key('t1', 'gone', '1')}-fedcba" / "x")
    logs = home / "logs" / "200001"
    for name in ("i-live.log", "i-old.log", "i-recent.log"):
        _write(logs / name, 5000)
    old = time.time() - 3 * 86_400
    os.utime(logs / "i-old.log", (old, old))
    return home


def _collector(home: Path, flight: InFlight, pids: list[int]) -> NodeCollector:
    return NodeCollector(home, in_flight=flight, live_instances=lambda: ["i-live"],
                         live_pids=lambda: pids)


def test_a_collection_removes_garbage_and_keeps_what_is_used(tmp_path: Path) -> None:
    home = _home(tmp_path)
    flight = InFlight()
    user = subprocess.Popen(["sleep", "30"], cwd=home / "bundles" / D)
    try:
        async def run() -> dict[str, tuple[int, int]]:
            with flight.using(E), flight.using(A, build_key("t1", "live", "2")):
                freed = await _collector(home, flight, [user.pid]).collect(
                    GcPolicy(keep_bundles=frozenset(), log_max_age=86_400))
            return {f.kind: (f.items, f.bytes) for f in freed}

        freed = asyncio.run(run())
    finally:
        user.kill()
        user.wait()
    bundles = sorted(os.listdir(home / "bundles"))
    # A: a build in flight uses it; D: a live process works in it; E: being extracted.
    assert bundles == sorted([A, D, f".{E}-5e6f7a8b"])
    assert os.listdir(home / "builds" / "200001") == [
        f"{build_key('t1', 'live', '2')}-123456"]
    assert os.listdir(home / "builds" / ".sealed") == []
    assert sorted(os.listdir(home / "logs" / "200001")) == ["i-live.log", "i-recent.log"]
    assert os.listdir(home / TRASH) == []
    assert freed[BUNDLES][0] == 1 and freed[BUNDLES][1] >= 10_000
    assert freed[STAGING][0] == 1 and freed[STAGING][1] >= 10_000
    assert freed[BUILDS][0] == 2 and freed[BUILDS][1] >= 20_000
    assert freed[LOGS][0] == 1 and freed[LOGS][1] >= 5000


def test_kept_bundles_and_young_logs_stay(tmp_path: Path) -> None:
    home = _home(tmp_path)
    freed = asyncio.run(_collector(home, InFlight(), []).collect(
        GcPolicy(keep_bundles=frozenset({A, B, D}), log_max_age=86_400)))
    assert {A, B, D} <= set(os.listdir(home / "bundles"))
    assert {f.kind: f.items for f in freed}[BUNDLES] == 0


def test_a_start_that_arrives_after_the_choice_keeps_its_bundle(tmp_path: Path) -> None:
    """The in-flight check is repeated right before each move: a request that began
    using a chosen bundle keeps it (a later one finds none and extracts it again)."""
    home = _home(tmp_path)
    flight = InFlight()
    collector = _collector(home, flight, [])

    async def run() -> None:
        chosen = collector._choose(GcPolicy(frozenset(), 0.0), InUse(), frozenset(),
                                   frozenset(), frozenset())
        assert home / "bundles" / B in [c.path for c in chosen]
        trash = home / TRASH
        trash.mkdir()
        with flight.using(B):
            moved = collector._move(chosen, trash)
        assert (home / "bundles" / B).is_dir()
        assert not (home / "bundles" / A).exists()
        assert all(kind != BUNDLES or path.parent == trash for kind, path in moved)

    asyncio.run(run())


def test_in_flight_counts_nested_uses() -> None:
    flight = InFlight()
    with flight.using(A, "t-f-1"):
        with flight.using(A):
            assert flight.bundles == {A}
        assert flight.bundles == {A} and flight.builds == {"t-f-1"}
    assert flight.bundles == frozenset() and flight.builds == frozenset()
