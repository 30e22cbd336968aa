"""Per-call log lines: the runtime's marking writer and the agent's per-call store."""

from __future__ import annotations

import asyncio
import contextvars
import io
import threading
from pathlib import Path

import pytest

from thaw.core.errors import InvalidArgument
from thaw.platform.calllogs import (
    MAX_CALL_BYTES,
    MAX_CALL_LINES,
    TRUNCATED_TEXT,
    CallLogRetention,
)
from thaw.platform.gc import CallLogEntry, select_call_logs
from thaw.platform.logs import RUNTIME, FunctionLogs, split_call_mark, strip_call_marks
from thaw.snapshotter.runtime import calllog
from thaw.snapshotter.runtime.calllog import MARK, SEPARATOR, CallTaggedWriter, calling


def _marked(request: str, text: str) -> str:
    return f"{MARK}{request}{SEPARATOR}{text}\n"


def _writer() -> tuple[CallTaggedWriter, io.StringIO]:
    inner = io.StringIO()
    return CallTaggedWriter(inner), inner  # type: ignore[arg-type]


def test_lines_outside_a_call_pass_unchanged() -> None:
    out, inner = _writer()
    out.write("setup done\npartial")
    assert inner.getvalue() == "setup done\npartial"


def test_a_calls_lines_are_marked_and_split_writes_joined() -> None:
    out, inner = _writer()
    with calling("req-1"):
        out.write("hel")
        out.write("lo\nwor")
        assert inner.getvalue() == _marked("req-1", "hello")
        out.write("ld\n")
    out.write("after\n")
    assert inner.getvalue() == (_marked("req-1", "hello") + _marked("req-1", "world")
                                + "after\n")


def test_an_unfinished_line_goes_out_when_the_call_ends(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    out, inner = _writer()
    monkeypatch.setattr("sys.stdout", out)
    with calling("req-2"):
        out.write("no newline")
        assert inner.getvalue() == ""
    assert inner.getvalue() == _marked("req-2", "no newline")


def test_an_id_that_is_not_a_request_id_marks_nothing() -> None:
    out, inner = _writer()
    for bad in ("", "a\x1fb", "../x", "x" * 129, None):
        with calling(bad):
            out.write("plain\n")
    assert inner.getvalue() == "plain\n" * 5


def test_concurrent_calls_in_threads_keep_their_own_lines() -> None:
    out, inner = _writer()
    barrier = threading.Barrier(2)

    def serve(request: str) -> None:
        with calling(request):
            for i in range(200):
                out.write(f"{request} part ")
                if i == 0:
                    barrier.wait()  # both calls hold an unfinished line now
                out.write(f"{i}\n")

    threads = [threading.Thread(target=serve, args=(r,)) for r in ("call-a", "call-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = inner.getvalue().splitlines()
    assert len(lines) == 400
    for line in lines:
        request, text = split_call_mark(line)
        assert request in ("call-a", "call-b")
        assert text.startswith(f"{request} part ")
    for request in ("call-a", "call-b"):
        mine = [split_call_mark(ln)[1] for ln in lines if split_call_mark(ln)[0] == request]
        assert mine == [f"{request} part {i}" for i in range(200)]


def test_a_thread_started_in_a_call_is_untagged_unless_it_copies_the_context() -> None:
    out, inner = _writer()
    with calling("req-3"):
        plain = threading.Thread(target=lambda: out.write("from a thread\n"))
        plain.start()
        plain.join()
        context = contextvars.copy_context()
        copied = threading.Thread(target=context.run,
                                  args=(lambda: out.write("from a copied context\n"),))
        copied.start()
        copied.join()
    assert inner.getvalue() == "from a thread\n" + _marked("req-3", "from a copied context")


def test_asyncio_tasks_inherit_the_call() -> None:
    out, inner = _writer()

    async def handler() -> None:
        await asyncio.gather(asyncio.create_task(_say(out, "task one")),
                             asyncio.create_task(_say(out, "task two")))

    with calling("req-4"):
        asyncio.run(handler())
    assert sorted(inner.getvalue().splitlines()) == sorted(
        _marked("req-4", t).rstrip("\n") for t in ("task one", "task two"))


async def _say(out: CallTaggedWriter, text: str) -> None:
    await asyncio.sleep(0)
    out.write(text + "\n")


def test_install_wraps_both_streams_once(monkeypatch: pytest.MonkeyPatch) -> None:
    stdout, stderr = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdout", stdout)
    monkeypatch.setattr("sys.stderr", stderr)
    calllog.install()
    import sys
    wrapped = sys.stdout
    assert isinstance(wrapped, CallTaggedWriter) and wrapped.inner is stdout
    calllog.install()
    assert sys.stdout is wrapped
    with calling("req-5"):
        print("to stdout")
        print("to stderr", file=sys.stderr)
    assert stdout.getvalue() == _marked("req-5", "to stdout")
    assert stderr.getvalue() == _marked("req-5", "to stderr")


def test_a_logging_handler_made_after_install_is_attributed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import logging
    import sys

    stderr = io.StringIO()
    monkeypatch.setattr("sys.stdout", io.StringIO())
    monkeypatch.setattr("sys.stderr", stderr)
    calllog.install()  # as the runtime does before the function's imports
    handler = logging.StreamHandler()  # what an import's basicConfig makes
    logger = logging.getLogger("call-logs-test")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with calling("req-6"):
            logger.warning("from logging")
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    assert handler.stream is sys.stderr
    assert stderr.getvalue() == _marked("req-6", "from logging") + "outside\n"


def test_a_forked_child_gets_a_fresh_lock_and_no_pending_lines() -> None:
    import copy
    import threading

    out, inner = _writer()
    with calling("req-7"):
        out.write("unfinished")
        lock = threading.RLock()
        out.after_fork(lock)
    assert inner.getvalue() == ""  # the parent's call is not the child's
    assert copy.copy(out).inner is inner  # a copy does not recurse into __getattr__


# ---- the agent's side ------------------------------------------------------------------

def test_a_log_files_tail_is_shown_without_marks() -> None:
    tail = "setup\n" + _marked("r1", "Traceback (most recent call last):") + "  boom"
    assert strip_call_marks(tail) == "setup\nTraceback (most recent call last):\n  boom"
    assert strip_call_marks("plain\ntext") == "plain\ntext"


def test_marks_are_parsed_and_malformed_ones_kept_whole() -> None:
    assert split_call_mark(_marked("r1", "x").rstrip("\n")) == ("r1", "x")
    assert split_call_mark("plain") == ("", "plain")
    no_separator = f"{MARK}r1 x"
    assert split_call_mark(no_separator) == ("", no_separator)


def _logs(**retention: float) -> tuple[FunctionLogs, list[float]]:
    now = [1000.0]
    logs = FunctionLogs(clock=lambda: now[0], retention=CallLogRetention(**retention))
    return logs, now


def test_output_lines_are_filed_under_their_call() -> None:
    logs, _ = _logs()
    text = _marked("r1", "one") + "untagged\n" + _marked("r2", "two") + _marked("r1", "three")
    logs._append_output("t/f", "inst-1", text)
    assert [ln.line for ln in logs.lines("t/f", request="r1")] == ["one", "three"]
    assert [ln.line for ln in logs.lines("t/f", request="r2")] == ["two"]
    everything = logs.lines("t/f")
    assert [(ln.request, ln.line) for ln in everything] == [
        ("r1", "one"), ("", "untagged"), ("r2", "two"), ("r1", "three")]
    assert logs.lines("t/other", request="r1") == []
    assert everything[0].as_dict()["request"] == "r1"


def test_a_calls_lines_are_capped_with_one_truncation_line() -> None:
    logs, _ = _logs()
    logs._append_output("t/f", "i", "".join(_marked("r", f"line {i}")
                                            for i in range(MAX_CALL_LINES + 50)))
    kept = logs.lines("t/f", request="r")
    assert len(kept) == MAX_CALL_LINES
    assert kept[-2].line == f"line {MAX_CALL_LINES - 2}"
    assert (kept[-1].stream, kept[-1].line, kept[-1].request) == (RUNTIME, TRUNCATED_TEXT, "r")
    big = "x" * 4000
    logs._append_output("t/f", "i", "".join(_marked("s", big) for _ in range(400)))
    kept = logs.lines("t/f", request="s")
    assert sum(len(ln.line) + 1 for ln in kept[:-1]) <= MAX_CALL_BYTES
    assert kept[-1].line == TRUNCATED_TEXT and len(kept) < 400


def test_retention_drops_old_calls_and_the_oldest_past_the_byte_total() -> None:
    logs, now = _logs(max_age_seconds=60.0, max_bytes_per_function=MAX_CALL_BYTES)
    logs._append_output("t/f", "i", _marked("old", "a"))
    now[0] += 30
    logs._append_output("t/f", "i", _marked("newer", "b"))
    now[0] += 40
    assert logs.calls.collect(now[0]) == 1
    assert logs.lines("t/f", request="old") == []
    assert [ln.line for ln in logs.lines("t/f", request="newer")] == ["b"]
    # Past the byte total the oldest calls go as soon as they are added.
    line = "y" * 3000
    for i in range(400):
        logs._append_output("t/f", "i", _marked(f"c{i}", line))
    assert logs.calls.bytes_of("t/f") <= MAX_CALL_BYTES
    assert logs.lines("t/f", request="c399") and not logs.lines("t/f", request="c0")
    assert logs.lines("t/f", request="newer") == []


def test_select_call_logs_is_age_then_bytes() -> None:
    calls = [CallLogEntry("a", 10.0, 100), CallLogEntry("b", 50.0, 100),
             CallLogEntry("c", 90.0, 100), CallLogEntry("d", 95.0, 100)]
    assert select_call_logs(calls, now=100.0, max_age=60.0, max_bytes=1000) == ["a"]
    assert select_call_logs(calls, now=100.0, max_age=60.0, max_bytes=150) == ["a", "b", "c"]


def test_retention_settings_are_checked_and_read_from_the_environment() -> None:
    r = CallLogRetention.from_env({"THAW_CALL_LOGS_MAX_AGE_SECONDS": "3600",
                                   "THAW_CALL_LOGS_MAX_BYTES": str(2 * MAX_CALL_BYTES)})
    assert (r.max_age_seconds, r.max_bytes_per_function) == (3600.0, 2 * MAX_CALL_BYTES)
    with pytest.raises(InvalidArgument) as bad:
        CallLogRetention.from_env({"THAW_CALL_LOGS_MAX_AGE_SECONDS": "a day"})
    assert bad.value.field == "THAW_CALL_LOGS_MAX_AGE_SECONDS"
    with pytest.raises(InvalidArgument) as small:
        CallLogRetention.from_env({"THAW_CALL_LOGS_MAX_BYTES": "10"})
    assert small.value.field == "THAW_CALL_LOGS_MAX_BYTES"


def test_a_failures_log_tail_shows_lines_as_printed_without_call_marks(
        tmp_path: Path) -> None:
    from thaw.platform.process import log_tail
    from thaw.snapshotter.runtime.calllog import MARK, SEPARATOR

    log = tmp_path / "instance.log"
    log.write_text(f"importing\n{MARK}req-1{SEPARATOR}in the call\nTraceback: boom\n")
    assert log_tail(str(log)) == "importing\nin the call\nTraceback: boom"
