"""Lifecycles: only the edges in the tables are allowed (property-based)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from thaw.platform.instances import IllegalInstanceTransition, Instance, InstanceState
from thaw.scheduler.states import (
    FunctionState,
    IllegalTransition,
    SnapshotState,
    check_transition,
)


@given(st.lists(st.sampled_from(list(InstanceState)), max_size=12))
def test_instance_walks_stay_on_legal_edges(moves: list[InstanceState]) -> None:
    inst = Instance(id="i", function="t/f", version="1", socket="/x", max_concurrency=1,
                    timeout=1.0, state=InstanceState.STARTING)
    for target in moves:
        before = inst.state
        try:
            inst.move(target)
        except IllegalInstanceTransition:
            assert inst.state is before
            continue
        assert inst.state is target
    # Terminal states are absorbing.
    if inst.state in (InstanceState.DEFUNCT, InstanceState.SETUP_FAILED):
        for target in InstanceState:
            with pytest.raises(IllegalInstanceTransition):
                inst.move(target)


def test_function_and_snapshot_edges() -> None:
    check_transition(FunctionState.BUILDING, FunctionState.READY)
    check_transition(SnapshotState.READY, SnapshotState.QUARANTINED)
    with pytest.raises(IllegalTransition):
        check_transition(FunctionState.DELETED, FunctionState.READY)
    with pytest.raises(IllegalTransition):
        # A quarantined snapshot is never used again.
        check_transition(SnapshotState.QUARANTINED, SnapshotState.READY)
