"""Placement and eviction decisions are pure (placement.py): fake candidates in,
a node or an eviction plan out."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from thaw.scheduler.placement import (
    Candidate,
    IdleInstance,
    best_fit_device,
    choose_node,
    plan_eviction,
)

GiB = 1024**3


def idle(instance_id: str, last_used: float, nbytes: int = 2 * GiB, node: str = "n1",
         device: int = 0, function: str = "f") -> IdleInstance:
    return IdleInstance(instance_id, function, node, device, nbytes, last_used)


def test_best_fit_device_leaves_the_least_over_and_ties_go_low() -> None:
    assert best_fit_device([4 * GiB, 3 * GiB, 8 * GiB], 3 * GiB) == 1
    assert best_fit_device([3 * GiB, 3 * GiB], 2 * GiB) == 0
    assert best_fit_device([1 * GiB, 2 * GiB], 4 * GiB) is None
    assert best_fit_device([], 0) is None


def test_choose_node_prefers_the_snapshot_then_fewer_starts_then_best_fit() -> None:
    nodes = [Candidate("any", [8 * GiB]), Candidate("disk", [8 * GiB], snapshot_on_disk=True),
             Candidate("pinned-full", [GiB // 2], snapshot_pinned=True),
             Candidate("busy-disk", [8 * GiB], snapshot_on_disk=True, starts_in_flight=3)]
    chosen = choose_node(nodes, GiB)
    assert chosen is not None and chosen.node_id == "disk"


def test_eviction_takes_least_recently_used_first_and_only_what_is_needed() -> None:
    nodes = [Candidate("n1", [1 * GiB])]
    plan = plan_eviction(nodes, [idle("new", 30.0), idle("old", 10.0), idle("mid", 20.0)],
                         3 * GiB, {"f": 3})
    assert plan is not None and [v.instance_id for v in plan.victims] == ["old"]
    plan = plan_eviction(nodes, [idle("new", 30.0), idle("old", 10.0), idle("mid", 20.0)],
                         5 * GiB, {"f": 3})
    assert plan is not None and [v.instance_id for v in plan.victims] == ["old", "mid"]


def test_eviction_never_goes_below_min_instances() -> None:
    nodes = [Candidate("n1", [0])]
    victims = [idle("a1", 1.0, function="a"), idle("a2", 2.0, function="a"),
               idle("b1", 3.0, function="b")]
    # Function a may lose one instance (spare 1), b none: 4 GiB cannot be freed.
    assert plan_eviction(nodes, victims, 4 * GiB, {"a": 1, "b": 0}) is None
    plan = plan_eviction(nodes, victims, 4 * GiB, {"a": 1, "b": 1})
    assert plan is not None and [v.instance_id for v in plan.victims] == ["a1", "b1"]


def test_eviction_frees_one_device_and_prefers_fewer_then_staler_victims() -> None:
    nodes = [Candidate("n1", [GiB, GiB]), Candidate("n2", [0])]
    victims = [idle("d0-small-a", 1.0, GiB, device=0), idle("d0-small-b", 2.0, GiB, device=0),
               idle("d1-big", 50.0, 4 * GiB, device=1),
               idle("n2-big", 40.0, 4 * GiB, node="n2")]
    plan = plan_eviction(nodes, victims, 3 * GiB, {"f": 10})
    # One victim beats two; of the one-victim plans, the one idle longest.
    assert plan is not None and (plan.node_id, plan.device_index) == ("n2", 0)
    assert [v.instance_id for v in plan.victims] == ["n2-big"]
    # A slice never spans devices: 1 GiB free on each of two devices is not 2 GiB.
    assert plan_eviction([Candidate("n1", [GiB, GiB])], [], 2 * GiB, {}) is None


def test_eviction_when_it_already_fits_evicts_nothing() -> None:
    plan = plan_eviction([Candidate("n1", [4 * GiB])], [idle("x", 1.0)], GiB, {"f": 1})
    assert plan is not None and plan.victims == ()


@given(free=st.lists(st.integers(0, 16), min_size=1, max_size=4),
       sizes=st.lists(st.tuples(st.integers(1, 8), st.integers(0, 100), st.integers(0, 3)),
                      max_size=8),
       need=st.integers(1, 16), spare=st.integers(0, 8))
def test_an_eviction_plan_always_makes_the_slice_fit(free: list[int],
                                                     sizes: list[tuple[int, int, int]],
                                                     need: int, spare: int) -> None:
    victims = [IdleInstance(f"i{n}", "f", "n1", device % len(free), nbytes, float(last))
               for n, (nbytes, last, device) in enumerate(sizes)]
    plan = plan_eviction([Candidate("n1", free)], victims, need, {"f": spare})
    if plan is None:
        # Then even every allowed victim on the best device would not be enough.
        for index, room in enumerate(free):
            on_device = sorted((v for v in victims if v.device_index == index),
                               key=lambda v: (v.last_used, v.instance_id))[:spare]
            assert room + sum(v.nbytes for v in on_device) < need
        return
    assert len(plan.victims) <= spare
    assert all(v.device_index == plan.device_index for v in plan.victims)
    assert free[plan.device_index] + sum(v.nbytes for v in plan.victims) >= need
