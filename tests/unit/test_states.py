"""Lifecycles: only the edges in the tables are allowed (property-based). The state
machines over the stores that keep versions and invocations are in
tests/scheduler/test_lifecycles.py."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from thaw.platform.instances import IllegalInstanceTransition, Instance, InstanceState
from thaw.scheduler.invocations import InvalidTransition, InvocationState
from thaw.scheduler.invocations import check_transition as check_invocation_transition
from thaw.scheduler.states import (
    FunctionState,
    IllegalTransition,
    SnapshotState,
    check_transition,
)
from thaw.scheduler.versions import VersionState, check_version_move


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


@given(st.lists(st.sampled_from(list(VersionState)), max_size=12))
def test_version_walks_stay_on_legal_edges(moves: list[VersionState]) -> None:
    state = VersionState.BUILDING
    for target in moves:
        try:
            check_version_move(state, target)
        except IllegalTransition:
            # A failed version is final; a ready one never fails (only its rebuild
            # can); nothing is ever building twice in a row.
            assert state is VersionState.FAILED or (state, target) in {
                (VersionState.READY, VersionState.FAILED),
                (VersionState.BUILDING, VersionState.BUILDING)}
            continue
        assert state is not VersionState.FAILED
        state = target


@given(st.lists(st.sampled_from(list(InvocationState)), max_size=12))
def test_invocation_walks_end_in_a_terminal_state_that_only_expires(
        moves: list[InvocationState]) -> None:
    state = InvocationState.QUEUED
    for target in moves:
        try:
            check_invocation_transition(state, target)
        except InvalidTransition:
            continue
        if state.finished:
            # Terminal: the outcome stays; only its TTL passing changes it.
            assert target is InvocationState.EXPIRED
        if target is InvocationState.EXPIRED:
            assert state.finished
        state = target
    if state is InvocationState.EXPIRED:  # absorbing
        for target in InvocationState:
            with pytest.raises(InvalidTransition):
                check_invocation_transition(state, target)
