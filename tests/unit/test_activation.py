"""The activation budget (platform/activation.py): N restores admitted per link, the
next ones wait in arrival order and report how long, holds count for placement, and the
budget's size is configured or derived from a measured bandwidth."""

from __future__ import annotations

import asyncio

import pytest

from thaw.core.errors import InvalidArgument
from thaw.platform.activation import (
    DEFAULT_RESTORES_PER_LINK,
    HOST_LINK,
    MAX_DERIVED_RESTORES_PER_LINK,
    ActivationBudget,
    activation_budget,
    derive_per_link,
    slice_link,
)
from thaw.platform.devices import HostDevices, Slice


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    """Let every task that can run do so."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_n_restores_are_admitted_at_once_and_report_no_wait() -> None:
    budget = ActivationBudget(2)
    async with budget.admit("pcie-a") as first, budget.admit("pcie-a") as second:
        assert (first, second) == (0.0, 0.0)
        assert budget.load("pcie-a") == 2
    assert budget.load("pcie-a") == 0


async def test_the_next_restore_waits_for_a_place_and_reports_the_wait() -> None:
    clock = Clock()
    budget = ActivationBudget(2, clock=clock)
    release = asyncio.Event()
    waits: dict[str, float] = {}
    inside: list[str] = []

    async def restore(name: str) -> None:
        async with budget.admit("pcie-a") as waited:
            waits[name] = waited
            inside.append(name)
            await release.wait()

    first = [asyncio.create_task(restore(n)) for n in ("r1", "r2")]
    await settle()
    third = asyncio.create_task(restore("r3"))
    await settle()
    assert inside == ["r1", "r2"]  # the third is not admitted while two run
    [usage] = budget.usage()
    assert (usage.admitted, usage.waiting, usage.limit) == (2, 1, 2)
    assert budget.load("pcie-a") == 3

    clock.now += 1.5
    release.set()
    await asyncio.gather(*first, third)
    assert inside == ["r1", "r2", "r3"]
    assert waits == {"r1": 0.0, "r2": 0.0, "r3": pytest.approx(1.5)}
    assert budget.load("pcie-a") == 0


async def test_links_are_counted_apart() -> None:
    budget = ActivationBudget(1)
    async with budget.admit("pcie-a") as a, budget.admit("pcie-b") as b:
        assert (a, b) == (0.0, 0.0)
        assert (budget.load("pcie-a"), budget.load("pcie-b")) == (1, 1)


async def test_waiters_are_admitted_in_arrival_order() -> None:
    budget = ActivationBudget(1)
    order: list[int] = []
    gate = asyncio.Event()

    async def restore(n: int) -> None:
        async with budget.admit("pcie-a"):
            order.append(n)
            if n == 0:
                await gate.wait()

    tasks = [asyncio.create_task(restore(0))]
    await settle()
    for n in range(1, 5):
        tasks.append(asyncio.create_task(restore(n)))
        await settle()
    gate.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_a_cancelled_waiter_gives_up_its_turn() -> None:
    budget = ActivationBudget(1)
    gate = asyncio.Event()
    admitted: list[str] = []

    async def restore(name: str) -> None:
        async with budget.admit("pcie-a"):
            admitted.append(name)
            await gate.wait()

    running = asyncio.create_task(restore("running"))
    await settle()
    cancelled = asyncio.create_task(restore("cancelled"))
    after = asyncio.create_task(restore("after"))
    await settle()
    cancelled.cancel()
    await settle()
    assert budget.load("pcie-a") == 2  # the running one and "after"
    gate.set()
    await asyncio.gather(running, after)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert admitted == ["running", "after"]
    assert budget.load("pcie-a") == 0


async def test_a_failed_restore_frees_its_place() -> None:
    budget = ActivationBudget(1)
    with pytest.raises(RuntimeError):
        async with budget.admit("pcie-a"):
            raise RuntimeError("the restore failed")
    async with budget.admit("pcie-a") as waited:
        assert waited == 0.0


async def test_a_hold_counts_until_its_slice_is_admitted() -> None:
    budget = ActivationBudget(4)
    sl = Slice("inst-1", "cuda0", 1024, "")
    budget.hold("pcie-a", sl.id)
    budget.hold("pcie-a", "inst-2")
    assert budget.load("pcie-a") == 2
    # The slice names no link: it is admitted on the host link, and its hold goes.
    async with budget.admit(sl):
        assert budget.load("pcie-a") == 1
        assert budget.load(HOST_LINK) == 1
    budget.drop("inst-2")
    budget.drop("never-held")
    assert budget.load("pcie-a") == 0


async def test_raising_the_limit_admits_waiting_restores() -> None:
    budget = ActivationBudget(1)
    gate = asyncio.Event()
    admitted: list[int] = []

    async def restore(n: int) -> None:
        async with budget.admit("pcie-a"):
            admitted.append(n)
            await gate.wait()

    tasks = [asyncio.create_task(restore(n)) for n in range(3)]
    await settle()
    assert admitted == [0]
    budget.set_per_link(3)
    await settle()
    assert admitted == [0, 1, 2]
    gate.set()
    await asyncio.gather(*tasks)
    assert budget.load("pcie-a") == 0


def test_slice_link_names_the_node_link_for_slices_without_one() -> None:
    assert slice_link(Slice("s", "host0", 1, "/dev/shm/s")) == HOST_LINK


@pytest.mark.parametrize(("gbps", "expected"), [
    (None, DEFAULT_RESTORES_PER_LINK), (0.0, DEFAULT_RESTORES_PER_LINK),
    (float("nan"), DEFAULT_RESTORES_PER_LINK), (2.0, 1), (12.5, 2), (25.0, 4), (53.0, 8),
    (1000.0, MAX_DERIVED_RESTORES_PER_LINK)])
def test_the_derived_budget_gives_each_restore_a_fair_share(gbps: float | None,
                                                           expected: int) -> None:
    assert derive_per_link(gbps) == expected


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_a_bad_limit_names_the_setting(bad: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        ActivationBudget(bad)  # type: ignore[arg-type]
    assert info.value.field == "restore_concurrency_per_link"


def test_the_host_backend_gets_the_configured_or_default_budget(tmp_path: object) -> None:
    from pathlib import Path

    devices = HostDevices([1 << 20], Path(str(tmp_path)))
    assert activation_budget(devices).per_link == DEFAULT_RESTORES_PER_LINK
    assert activation_budget(devices, 7).per_link == 7
    with pytest.raises(InvalidArgument):
        activation_budget(devices, -1)
