"""Status events and spawn requests: the records the runtime and the agent exchange."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from thaw.snapshotter.runtime.events import (
    Captured,
    Event,
    ExitCode,
    Failed,
    Ready,
    Spawned,
    SpawnRequest,
    Stage,
    StatusChannel,
    TemplateReady,
    event_to_line,
    parse_event,
)

timings = st.dictionaries(st.sampled_from(["import", "setup", "map", "unpickle"]),
                          st.floats(min_value=0, max_value=1e6))
events = st.one_of(
    st.builds(Ready, pid=st.integers(1, 2**22), timings=timings),
    st.builds(Failed, stage=st.sampled_from(Stage), reason=st.text(),
              attribute_path=st.none() | st.text(min_size=1)),
    st.builds(Captured, timings=timings, host_size=st.integers(0), device_size=st.integers(0)),
    st.builds(TemplateReady, pid=st.integers(1, 2**22), timings=timings),
    st.builds(Spawned, pid=st.integers(1, 2**22)),
)


@given(events)
def test_every_event_round_trips_as_one_line(event: Event) -> None:
    line = event_to_line(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_event(line) == event


def test_wire_format_matches_the_contract() -> None:
    assert json.loads(event_to_line(Failed(Stage.CAPTURE, "TypeError: x", "self.a"))) == {
        "event": "failed", "stage": "capture", "reason": "TypeError: x",
        "attribute_path": "self.a"}
    # attribute_path only appears where it applies.
    assert json.loads(event_to_line(Failed(Stage.SETUP, "E: y"))) == {
        "event": "failed", "stage": "setup", "reason": "E: y"}
    assert json.loads(event_to_line(Ready(7, {"import": 1.0}))) == {
        "event": "ready", "pid": 7, "timings": {"import": 1.0}}


@pytest.mark.parametrize("line", [b"[]", b'{"event": "nope"}', b'{"event": "ready"}', b"{"])
def test_parse_event_rejects_malformed_lines(line: bytes) -> None:
    with pytest.raises(ValueError):
        parse_event(line)


def test_each_failure_stage_has_its_own_nonzero_exit_code() -> None:
    codes = {stage.exit_code for stage in Stage if stage is not Stage.SPAWN}
    assert len(codes) == len(Stage) - 1
    assert ExitCode.OK not in codes and ExitCode.USAGE not in codes


def test_status_channel_writes_whole_lines() -> None:
    written: list[bytes] = []
    StatusChannel(written.append).emit(Spawned(3))
    assert written == [b'{"event":"spawned","pid":3}\n']


def test_spawn_request_round_trip_and_validation() -> None:
    request = SpawnRequest("i-1", "/s.sock", "/p", "/h", None, "/snap.json", "/log")
    assert SpawnRequest.from_line(request.to_line()) == request
    without_device = json.loads(request.to_line())
    del without_device["device_arena"]
    assert SpawnRequest.from_line(json.dumps(without_device).encode()).device_arena is None
    for bad in (b"", b"[]", b'{"op": "kill"}', b'{"op": "spawn", "socket": "/s"}',
                b'{"op":"spawn","instance_id":"i","socket":1,"pickle":"p","host_arena":"h",'
                b'"snapshot_json":"j","log":"l"}', b'{"op": "spawn", "surprise": 1}'):
        with pytest.raises(ValueError):
            SpawnRequest.from_line(bad)
