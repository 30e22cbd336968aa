"""Which bundles the scheduler tells nodes to keep (scheduler/gc.py)."""

from __future__ import annotations

from types import SimpleNamespace

from thaw.scheduler.gc import VersionRow, bundles_to_keep, running_versions


def _rows(function_id: str, active: int, states: dict[int, str], *,
          deleted: bool = False) -> list[VersionRow]:
    return [VersionRow(function_id, deleted, active, v, state, f"{function_id}-v{v}")
            for v, state in states.items()]


def test_active_building_and_retained_versions_are_kept() -> None:
    rows = _rows("fn1", 5, {1: "ready", 2: "ready", 3: "failed", 4: "ready", 5: "ready",
                            6: "building", 7: "failed"})
    keep = bundles_to_keep(rows, running=(), retained=2)
    # v5 active, v6 building, v4 and v2 the two most recent other ready versions.
    assert keep == {"fn1-v5", "fn1-v6", "fn1-v4", "fn1-v2"}


def test_a_deleted_function_keeps_only_what_still_runs() -> None:
    rows = _rows("gone", 2, {1: "ready", 2: "ready"}, deleted=True)
    assert bundles_to_keep(rows, running=()) == set()
    # An instance finishing its calls after the delete keeps its version's bundle.
    assert bundles_to_keep(rows, running=[("gone", 2)]) == {"gone-v2"}


def test_functions_are_judged_apart() -> None:
    rows = [*_rows("a", 1, {1: "ready"}), *_rows("b", 1, {1: "ready"}, deleted=True)]
    assert bundles_to_keep(rows, running=()) == {"a-v1"}


def test_running_versions_are_live_instances_and_builds_in_flight() -> None:
    inst = SimpleNamespace(function_id="fn1", version=3, gone=False)
    gone = SimpleNamespace(function_id="fn2", version=1, gone=True)
    state = SimpleNamespace(
        pools={"fn1": SimpleNamespace(instances={"i1": inst}),
               "fn2": SimpleNamespace(instances={"i2": gone})},
        builds={"fn3@4": object(), "bad@key": object()})
    assert running_versions(state) == {("fn1", 3), ("fn3", 4)}  # type: ignore[arg-type]
