"""The node's per-function log ring buffer (platform/logs.py), with a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

from thaw.platform.logs import MAX_LINE_BYTES, OUTPUT, RUNTIME, FunctionLogs


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_buffer_keeps_the_newest_lines_per_function() -> None:
    logs = FunctionLogs(max_lines=3, clock=Clock())
    for i in range(5):
        logs.append("t/a", "i1", OUTPUT, f"line {i}")
    logs.append("t/b", "i2", RUNTIME, "other function")
    assert [ln.line for ln in logs.lines("t/a")] == ["line 2", "line 3", "line 4"]
    assert [ln.line for ln in logs.lines("t/b")] == ["other function"]
    assert [ln.line for ln in logs.lines("t/a", tail=1)] == ["line 4"]
    assert logs.lines("t/none") == []


def test_since_filters_by_time_and_long_lines_are_cut() -> None:
    clock = Clock()
    logs = FunctionLogs(clock=clock)
    logs.append("t/a", "i1", OUTPUT, "old")
    clock.now += 10
    logs.append("t/a", "i1", OUTPUT, "x" * (MAX_LINE_BYTES * 2))
    new = logs.lines("t/a", since=clock.now)
    assert len(new) == 1 and len(new[0].line) == MAX_LINE_BYTES


def test_files_are_followed_line_by_line_and_flushed_at_the_end(tmp_path: Path) -> None:
    log_file = tmp_path / "inst.log"
    log_file.write_text("before the watch\n")
    logs = FunctionLogs(clock=Clock())
    logs.watch("i1", "t/a", str(log_file))
    with open(log_file, "a") as handle:
        handle.write("first\nsecond without end")
    logs.poll()
    assert [ln.line for ln in logs.lines("t/a")] == ["first"]
    logs.unwatch("i1")
    assert [ln.line for ln in logs.lines("t/a")] == ["first", "second without end"]
    assert all(ln.instance == "i1" and ln.stream == OUTPUT for ln in logs.lines("t/a"))


def test_follow_yields_kept_lines_then_new_ones_and_ends_on_close() -> None:
    async def run() -> list[str]:
        logs = FunctionLogs(clock=Clock())
        logs.append("t/a", "i1", OUTPUT, "kept")
        seen: list[str] = []

        async def follow() -> None:
            async for ln in logs.follow("t/a"):
                seen.append(ln.line)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0)
        logs.append("t/a", "i1", OUTPUT, "new one")
        logs.append("t/b", "i1", OUTPUT, "not this function")
        await asyncio.sleep(0.01)
        logs.close()
        await asyncio.wait_for(task, 1.0)
        return seen

    assert asyncio.run(run()) == ["kept", "new one"]
