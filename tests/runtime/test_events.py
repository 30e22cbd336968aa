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
    SliceDescriptor,
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
    request = SpawnRequest("i-1", "/s.sock", "/log",
                           fds={"pickle": 7, "snapshot_json": 5, "host_arena": 9},
                           slice=SliceDescriptor(kind="host", size=1 << 20))
    line, fds = request.to_message()
    # The descriptors go in the order the line names them.
    assert json.loads(line)["fds"] == ["snapshot_json", "pickle", "host_arena"]
    assert fds == [5, 7, 9]
    request_with_slice = SpawnRequest(
        "i-1", "/s.sock", "/log", fds={**request.fds, "slice": 11}, slice=request.slice,
        env={"CUDA_VISIBLE_DEVICES": "GPU-1"})
    line, fds = request_with_slice.to_message()
    assert fds == [5, 7, 9, 11]
    assert SpawnRequest.from_message(line, fds) == request_with_slice
    # The line names no file: only the instance's own socket and log.
    record = json.loads(line)
    assert set(record) == {"op", "instance_id", "socket", "log", "fds", "slice", "env",
                           "secrets"}
    for bad, descriptors in (
            (b"", []), (b"[]", []), (b'{"op": "kill"}', []),
            (b'{"op": "spawn", "socket": "/s"}', []),
            (line, [5, 7]),  # fewer descriptors than the line names
            (line, [5, 7, 9, 11, 13]),  # more
            (json.dumps({**record, "fds": ["snapshot_json", "pickle", "pickle", "slice"]}
                        ).encode(), [1, 2, 3, 4]),
            (json.dumps({**record, "fds": ["snapshot_json", "pickle", "bogus", "slice"]}
                        ).encode(), [1, 2, 3, 4]),
            (json.dumps({**record, "fds": ["snapshot_json", "slice"]}).encode(), [1, 2]),
            (json.dumps({**record, "socket": 1}).encode(), fds),
            (json.dumps({**record, "env": {"A": 1}}).encode(), fds),
            (json.dumps({**record, "env": ["A"]}).encode(), fds),
            (json.dumps({**record, "slice": {"kind": "tpu", "size": 1}}).encode(), fds),
            (json.dumps({**record, "slice": {"kind": "host", "size": -1}}).encode(), fds),
            (json.dumps({**record, "slice": {"kind": "cuda", "size": 4}}).encode(), fds),
            (b'{"op": "spawn", "surprise": 1}', [])):
        with pytest.raises(ValueError):
            SpawnRequest.from_message(bad, descriptors)


def test_a_host_slice_must_travel_as_a_descriptor() -> None:
    request = SpawnRequest("i", "/s", "/l", fds={"snapshot_json": 3, "pickle": 4},
                           slice=SliceDescriptor(kind="host", size=4096))
    line, fds = request.to_message()
    with pytest.raises(ValueError, match="host slice"):
        SpawnRequest.from_message(line, fds)
    cuda = SliceDescriptor(kind="cuda", size=4096, pci_bus_id="0000:3b:00.0",
                           ipc_handle="ab" * 64)
    line, fds = SpawnRequest("i", "/s", "/l", fds={"snapshot_json": 3, "pickle": 4},
                             slice=cuda).to_message()
    assert SpawnRequest.from_message(line, fds).slice == cuda
