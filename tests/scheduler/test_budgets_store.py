"""Budgets at the scheduler (scheduler/budgets.py): stored per key and per tenant,
and the day counts that gateway replicas share (gateway/budgets.py BudgetBook.sync),
so that a day's budget holds across replicas and a replica's restart."""

from __future__ import annotations

import asyncio

import pytest

from thaw.core.errors import InvalidArgument, NotFound
from thaw.gateway.budgets import DAY, BudgetBook, BudgetExceeded
from thaw.proto import scheduler_pb2, tenancy_pb2
from thaw.scheduler import budgets, tenancy
from thaw.scheduler.store import Store

T0 = 20_000 * DAY + 10.0


def test_budgets_are_stored_per_key_and_per_tenant(store: Store) -> None:
    tenancy.create_tenant(store, "acme")
    tenancy.create_tenant(store, "other")
    key, _ = tenancy.create_key(store, "acme", ["invoke"])
    made = budgets.set_budgets(store, "acme", key.id, scheduler_pb2.Budgets(rpd=5, tpm=10))
    assert (made.rpd, made.tpm, made.rpm) == (5, 10, 0)
    budgets.set_budgets(store, "acme", budgets.TENANT, scheduler_pb2.Budgets(tpd=100))
    found = budgets.budgets_of(store, "acme", [key.id, budgets.TENANT, "nokey"])
    assert found[key.id].rpd == 5 and found[budgets.TENANT].tpd == 100
    assert found["nokey"] == scheduler_pb2.Budgets()
    assert budgets.tenant_budgets(store) == {"acme": scheduler_pb2.Budgets(tpd=100)}
    assert set(budgets.all_key_budgets(store, "acme")) == {key.id}
    # All zeros: no budget, the row goes.
    budgets.set_budgets(store, "acme", key.id, scheduler_pb2.Budgets())
    assert budgets.all_key_budgets(store, "acme") == {}
    with pytest.raises(NotFound) as refused:
        budgets.set_budgets(store, "other", key.id, scheduler_pb2.Budgets(rpd=1))
    assert refused.value.field == "key_id"
    with pytest.raises(NotFound):
        budgets.set_budgets(store, "nobody", "", scheduler_pb2.Budgets(rpd=1))


def test_day_counts_add_up(store: Store) -> None:
    def count(counter: str, n: int, day: int = 20_000) -> tenancy_pb2.BudgetCount:
        return tenancy_pb2.BudgetCount(counter=counter, budget="rpd", window=day, count=n)
    assert [c.count for c in budgets.add_usage(store, [count("key:a", 2)])] == [2]
    assert [c.count for c in budgets.add_usage(store, [count("key:a", 3),
                                                       count("key:b", 0)])] == [5, 0]
    assert budgets.add_usage(store, [count("key:a", 0, 20_001)])[0].count == 0
    # Days long gone are dropped.
    budgets.add_usage(store, [count("key:a", 1, 20_005)])
    assert budgets.add_usage(store, [count("key:a", 0)])[0].count == 0
    with pytest.raises(InvalidArgument):
        budgets.add_usage(store, [tenancy_pb2.BudgetCount(counter="key:a", budget="rpm")])


def test_replicas_share_a_day_and_a_restart_keeps_it(store: Store) -> None:
    async def add(counts: list[tenancy_pb2.BudgetCount]) -> list[tenancy_pb2.BudgetCount]:
        return budgets.add_usage(store, counts)

    p = scheduler_pb2.Principal(tenant="acme", key_id="k", key_budgets=scheduler_pb2.Budgets(
        rpd=3, tpd=100))
    one, two = BudgetBook(lambda: T0), BudgetBook(lambda: T0)

    async def scenario() -> None:
        one.admit(p)
        one.admit(p)
        one.spend(p, 60)
        await one.sync(add)
        two.admit(p)  # before its first sync this replica knows only its own call
        await two.sync(add)
        assert two.used("key:k", "rpd") == 3 and two.used("key:k", "tpd") == 0
        with pytest.raises(BudgetExceeded):
            two.admit(p)
        # A replica learns the others' counts when it syncs a count of its own: a
        # call it admits within one sync interval may pass the budget, not more.
        one.admit(p)
        await one.sync(add)
        assert one.used("key:k", "rpd") == 4
        with pytest.raises(BudgetExceeded):
            one.admit(p)
        # A restarted replica: its first call's sync brings the day back.
        restarted = BudgetBook(lambda: T0)
        restarted.spend(p, 50)
        await restarted.sync(add)
        assert restarted.used("key:k", "tpd") == 110
        with pytest.raises(BudgetExceeded) as refused:
            restarted.check_tokens(p)
        assert refused.value.field == "tpd"

    asyncio.run(scenario())


def test_a_failed_sync_keeps_the_counts(store: Store) -> None:
    book = BudgetBook(lambda: T0)
    p = scheduler_pb2.Principal(tenant="acme", key_id="k",
                                key_budgets=scheduler_pb2.Budgets(rpd=10))

    async def down(counts: list[tenancy_pb2.BudgetCount]) -> list[tenancy_pb2.BudgetCount]:
        raise NotFound("away")

    async def add(counts: list[tenancy_pb2.BudgetCount]) -> list[tenancy_pb2.BudgetCount]:
        return budgets.add_usage(store, counts)

    async def scenario() -> None:
        book.admit(p)
        with pytest.raises(NotFound):
            await book.sync(down)
        assert book.used("key:k", "rpd") == 1
        await book.sync(add)
        assert book.used("key:k", "rpd") == 1
        assert budgets.add_usage(store, [tenancy_pb2.BudgetCount(
            counter="key:k", budget="rpd", window=20_000)])[0].count == 1

    asyncio.run(scenario())
