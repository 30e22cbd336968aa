"""The one checked way to change a lifecycle's state: `move` for in-memory views,
`move_row` for DB rows. An illegal move is refused, logged, and changes nothing."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from thaw.scheduler.pools import InstanceView
from thaw.scheduler.states import (
    FunctionState,
    IllegalTransition,
    InstanceState,
    NodeState,
    VersionState,
    legal,
    move,
    move_row,
)


@dataclass
class Row:
    state: str


def _instance(state: InstanceState = InstanceState.READY) -> InstanceView:
    return InstanceView(id="inst-1", function_id="fn-1", version=1, node_id="n0",
                        start="fresh", gpu_memory=0, state=state)


def test_an_illegal_move_is_refused_and_logged() -> None:
    inst = _instance(InstanceState.GONE)
    with capture_logs() as logs, pytest.raises(IllegalTransition):
        move(inst, InstanceState.READY, "instance inst-1")
    assert inst.state is InstanceState.GONE
    assert logs == [{"event": "illegal state move refused", "log_level": "warning",
                     "lifecycle": "InstanceState", "what": "instance inst-1",
                     "current": "gone", "target": "ready"}]


def test_a_legal_move_assigns_without_logging() -> None:
    inst = _instance()
    with capture_logs() as logs:
        move(inst, InstanceState.STOPPING)
        move(inst, InstanceState.STOPPING)  # stopping again is the same stop
        move(inst, InstanceState.GONE)
    assert inst.state is InstanceState.GONE and logs == []


def test_rows_keep_the_value_and_refuse_like_views() -> None:
    row = Row(VersionState.BUILDING.value)
    move_row(row, VersionState.READY)
    assert row.state == "ready" and type(row.state) is str
    failed = Row(VersionState.FAILED.value)
    with capture_logs() as logs, pytest.raises(IllegalTransition):
        move_row(failed, VersionState.READY, "version")
    assert failed.state == "failed" and logs[0]["lifecycle"] == "VersionState"
    deleted = Row(FunctionState.DELETED.value)
    with pytest.raises(IllegalTransition):
        move_row(deleted, FunctionState.READY)


@given(st.lists(st.sampled_from(list(InstanceState)), max_size=12))
def test_instance_view_walks_stay_on_legal_edges(moves: list[InstanceState]) -> None:
    inst = _instance(InstanceState.STARTING)
    for target in moves:
        before = inst.state
        try:
            move(inst, target)
        except IllegalTransition:
            assert inst.state is before and not legal(before, target)
            continue
        assert inst.state is target and legal(before, target)
    if inst.state is InstanceState.GONE:  # absorbing
        assert not any(legal(InstanceState.GONE, t) for t in InstanceState)


@given(st.lists(st.sampled_from(list(NodeState)), max_size=12))
def test_node_walks_stay_on_legal_edges(moves: list[NodeState]) -> None:
    row = Row(NodeState.READY.value)
    for target in moves:
        before = NodeState(row.state)
        try:
            move_row(row, target)
        except IllegalTransition:
            assert row.state == before.value and before is NodeState.LOST
            assert target is NodeState.LOST
            continue
        assert row.state == target.value


@pytest.mark.parametrize(("state", "inflight", "version", "usable", "idle"), [
    (InstanceState.READY, 0, 1, True, True),
    (InstanceState.READY, 1, 1, True, False),
    (InstanceState.READY, 2, 1, False, False),  # at max_concurrency
    (InstanceState.READY, 0, 2, False, True),   # another version
    (InstanceState.STOPPING, 0, 1, False, False),
    (InstanceState.STARTING, 0, 1, False, False),
    (InstanceState.GONE, 0, 1, False, False),
])
def test_instance_checks_in_one_place(state: InstanceState, inflight: int, version: int,
                                      usable: bool, idle: bool) -> None:
    inst = _instance(state)
    inst.inflight, inst.version = inflight, version
    assert inst.usable(1, max_concurrency=2) is usable
    assert inst.idle is idle
    assert inst.ready is (state is InstanceState.READY)
    assert inst.gone is (state is InstanceState.GONE)
    assert inst.retired is (state is InstanceState.STOPPING and inflight == 0)
