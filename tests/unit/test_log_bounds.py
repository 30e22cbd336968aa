"""Bounds on what failures and logs carry: service logs render plain tracebacks without
locals, each value and traceback cut; the in-instance runtime cuts failure reasons and
printed tracebacks; the agent cuts what a build reports and kills a build whose status
line it cannot read instead of waiting for it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog

from thaw.core import logs as core_logs
from thaw.platform.builds import Builds
from thaw.proto import agent_pb2
from thaw.snapshotter.runtime import bounded
from thaw.snapshotter.runtime.events import Failed, Stage, event_to_line, parse_event

SECRET = "locals-must-not-show-" + "s" * 20


def _raise_holding_secret() -> None:
    held = SECRET * 1000  # noqa: F841 (a local a rich traceback would show)
    raise ValueError("boom " + "y" * 100_000)


def _caught() -> BaseException:
    try:
        _raise_holding_secret()
    except ValueError as exc:
        return exc
    raise AssertionError("unreachable")


# ---- service logs (core/logs.py) ------------------------------------------------------


def test_format_exception_is_plain_bounded_and_without_locals() -> None:
    text = core_logs.format_exception(_caught())
    assert SECRET not in text
    assert "Traceback (most recent call last)" in text
    assert "ValueError: boom y" in text and "characters cut" in text
    assert len(text) <= core_logs.MAX_TRACEBACK_CHARS + 200
    assert max(len(line) for line in text.splitlines()) <= \
        core_logs.MAX_TRACEBACK_LINE_CHARS + 40


def test_long_tracebacks_keep_head_and_tail() -> None:
    def deep(n: int) -> None:
        if n == 0:
            raise KeyError("innermost")
        try:
            deep(n - 1)
        except (KeyError, RuntimeError) as exc:
            raise RuntimeError(f"level {n} " + "z" * 900) from exc

    try:
        deep(60)
    except RuntimeError as exc:
        text = core_logs.format_exception(exc)
    assert len(text) <= core_logs.MAX_TRACEBACK_CHARS + 200
    assert "characters of the traceback cut" in text
    assert text.startswith("Traceback") and "RuntimeError: level 60" in text[-2000:]


def test_bound_value_cuts_strings_bytes_containers_and_exceptions() -> None:
    assert core_logs.bound_value(5) == 5 and core_logs.bound_value(None) is None
    assert core_logs.bound_value("short") == "short"
    long = core_logs.bound_value("x" * 100_000)
    assert len(long) < core_logs.MAX_VALUE_CHARS + 50 and "characters cut" in long
    assert core_logs.bound_value(b"abc") == b"abc"
    assert core_logs.bound_value(b"q" * (40 << 20)) == f"<{40 << 20} bytes>"
    small = {"import": 0.1, "setup": 0.2}
    assert core_logs.bound_value(small) is small
    big = core_logs.bound_value({"a": "b" * 100_000, "c": list(range(10))})
    assert isinstance(big, str) and len(big) < 1000
    request = agent_pb2.BuildSnapshotRequest(bundle=b"\0" * (1 << 20))
    assert core_logs.bound_value(request) == f"<BuildSnapshotRequest: {request.ByteSize()} bytes>"
    small_request = agent_pb2.BuildSnapshotRequest(bundle=b"tiny")
    assert core_logs.bound_value(small_request) is small_request
    exc = core_logs.bound_value(ValueError("v" * 100_000))
    assert exc.startswith("ValueError: v") and len(exc) < core_logs.MAX_VALUE_CHARS + 50


def test_bound_reason() -> None:
    assert core_logs.bound_reason("setup failed: x") == "setup failed: x"
    cut = core_logs.bound_reason("r" * 50_000)
    assert len(cut) < core_logs.MAX_REASON_CHARS + 50 and cut.endswith("characters cut]")


@pytest.mark.parametrize("as_json", [False, True])
def test_configured_logging_shows_no_locals_and_stays_bounded(
        as_json: bool, capsys: pytest.CaptureFixture[str]) -> None:
    core_logs.configure_logging("test", as_json=as_json)
    try:
        log = structlog.get_logger("bounds")
        try:
            _raise_holding_secret()
        except ValueError:
            log.exception("unexpected error in servicer", reason="r" * 1_000_000,
                          request=b"\0" * (40 << 20))
        try:
            _raise_holding_secret()
        except ValueError:
            logging.getLogger("aiohttp.server").exception("stdlib record")
        err = capsys.readouterr().err
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers[:] = []
    assert SECRET not in err
    assert "ValueError: boom" in err and "stdlib record" in err
    assert f"<{40 << 20} bytes>" in err
    # Two records, each bounded: the traceback, a cut value and the rest.
    assert len(err) < 2 * (core_logs.MAX_TRACEBACK_CHARS + core_logs.MAX_VALUE_CHARS + 2000)
    if as_json:
        first = json.loads(err.splitlines()[0])
        assert first["exception"].startswith("Traceback")


# ---- the in-instance runtime (snapshotter/runtime/bounded.py) -------------------------


def test_describe_exception_is_bounded_for_any_message() -> None:
    assert bounded.describe_exception(ValueError("bad")) == "ValueError: bad"
    for exc in (RuntimeError(b"\xff" * (40 << 20)), RuntimeError("m" * (40 << 20)),
                RuntimeError("a", "b" * 100_000)):
        reason = bounded.describe_exception(exc)
        assert reason.startswith("RuntimeError: ")
        assert len(reason) <= bounded.MAX_REASON_CHARS + 40, len(reason)

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert bounded.describe_exception(Unprintable()) == "Unprintable: <unprintable Unprintable>"


def test_runtime_prints_a_bounded_traceback_without_locals() -> None:
    out = io.StringIO()
    try:
        _raise_holding_secret()
    except ValueError:
        bounded.print_exception(file=out)
    text = out.getvalue()
    assert SECRET not in text and "ValueError: boom" in text
    assert len(text) <= bounded.MAX_TRACEBACK_CHARS + 200
    assert max(len(line) for line in text.splitlines()) <= \
        bounded.MAX_TRACEBACK_LINE_CHARS + 40


def test_failed_events_are_bounded_on_both_sides() -> None:
    made = Failed(Stage.SETUP, "x" * 1_000_000, "a." * 100_000)
    assert len(made.reason) <= bounded.MAX_REASON_CHARS + 40
    assert made.attribute_path is not None
    assert len(made.attribute_path) <= bounded.MAX_REASON_CHARS + 40
    assert len(event_to_line(made)) < 3 * bounded.MAX_REASON_CHARS
    # A process writing its own line on the status descriptor: cut when read.
    line = json.dumps({"event": "failed", "stage": "setup", "reason": "y" * 1_000_000})
    read = parse_event(line)
    assert isinstance(read, Failed) and len(read.reason) <= bounded.MAX_REASON_CHARS + 40


def test_a_bad_status_line_is_quoted_short() -> None:
    with pytest.raises(ValueError) as info:
        parse_event(json.dumps({"event": "nonsense", "junk": "j" * 1_000_000}))
    assert len(str(info.value)) < 400


# ---- the agent's build path -------------------------------------------------------------


class _HungBuild:
    """A build process whose status line the agent cannot read (past the reader's
    limit) and which never exits on its own (blocked writing the rest)."""

    def __init__(self) -> None:
        self.killed = asyncio.Event()
        self.proc = SimpleNamespace(wait=self._wait)

    async def _wait(self) -> int:
        await self.killed.wait()
        return -9

    async def next_event(self, timeout: float) -> dict[str, Any]:
        raise ValueError("Separator is not found, and chunk exceed the limit")

    async def kill(self) -> None:
        self.killed.set()


def test_a_build_with_an_unreadable_status_line_is_killed_and_failed(tmp_path: Path) -> None:
    build = _HungBuild()

    async def launch(spec: object) -> _HungBuild:
        return build

    agent = SimpleNamespace(
        runtime=SimpleNamespace(launch=launch, capabilities=SimpleNamespace(
            runs_images=False)),
        start_timeout=5.0, volumes=None, _as_tenant=lambda launch, spec: launch)
    spec = agent_pb2.FunctionSpec(tenant="dev", name="f", version="1", handler="app:H")
    event = asyncio.run(asyncio.wait_for(Builds._build_fresh(
        agent, spec, tmp_path, tmp_path / "out", str(tmp_path / "build.log")),  # type: ignore[arg-type]
        timeout=10))
    assert build.killed.is_set()
    assert event["event"] == "failed" and event["stage"] == "setup"
    assert "exceed the limit" in event["reason"]


def test_build_failures_are_bounded_responses() -> None:
    from thaw.platform.build_failures import build_failed, event_text

    assert event_text(None, "setup") == "setup" and event_text(7, "x") == "x"
    assert event_text("capture", "setup") == "capture"
    resp = build_failed("setup", "z" * 1_000_000, "p" * 1_000_000)
    assert not resp.ok and resp.stage == "setup"
    assert len(resp.reason) <= core_logs.MAX_REASON_CHARS + 40
    assert len(resp.attribute_path) <= core_logs.MAX_REASON_CHARS + 40
    assert len(resp.SerializeToString()) < 3 * core_logs.MAX_REASON_CHARS


# ---- function logs on the node (platform/logs.py) ----------------------------------------


def test_a_builds_output_is_kept_up_to_its_bound(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from thaw.platform import logs as node_logs

    monkeypatch.setattr(node_logs, "READ_BYTES_PER_POLL", 1 << 30)
    path = tmp_path / "build.log"
    path.write_bytes(b"")
    logs = node_logs.FunctionLogs(max_lines=100_000)
    logs.watch("b1", "t/f", str(path), max_bytes=node_logs.MAX_BUILD_LOG_BYTES)
    line = b"o" * 999 + b"\n"
    with open(path, "ab") as handle:
        handle.write(line * 3000)  # about 3 MiB
    logs.poll()
    with open(path, "ab") as handle:
        handle.write(b"later\n")
    asyncio.run(logs.unwatch_in_thread("b1"))
    kept = logs.lines("t/f")
    output = [ln for ln in kept if ln.stream == node_logs.OUTPUT]
    assert sum(len(ln.line) + 1 for ln in output) <= node_logs.MAX_BUILD_LOG_BYTES + 1
    assert len(output) >= node_logs.MAX_BUILD_LOG_BYTES // 1000 - 1
    notes = [ln.line for ln in kept if ln.stream == node_logs.RUNTIME]
    assert len(notes) == 1 and "not kept" in notes[0]
    assert "later" not in {ln.line for ln in output}


def test_a_log_file_past_its_bound_is_emptied_and_followed_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from thaw.platform import logs as node_logs

    monkeypatch.setattr(node_logs, "MAX_LOG_FILE_BYTES", 10_000)
    path = tmp_path / "inst.log"
    path.write_bytes(b"")
    logs = node_logs.FunctionLogs()
    logs.watch("i1", "t/f", str(path))
    # O_APPEND, as the runtimes open instance logs: writes go on at the new start.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x" * 99 + b"\n" + b"y" * 20_000 + b"\n")
        asyncio.run(logs.poll_in_thread())
        assert path.stat().st_size == 0
        os.write(fd, b"after\n")
        asyncio.run(logs.poll_in_thread())
    finally:
        os.close(fd)
    lines = logs.lines("t/f")
    assert [ln.line for ln in lines if ln.stream == node_logs.OUTPUT][-1] == "after"
    notes = [ln.line for ln in lines if ln.stream == node_logs.RUNTIME]
    assert len(notes) == 1 and "emptied" in notes[0]
    assert path.read_bytes() == b"after\n"
