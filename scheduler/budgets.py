"""Budgets of keys and tenants (requests and tokens per minute and per day): stored
here, counted by the gateway (gateway/budgets.py).

A key's row has its key_id; a tenant's row has key_id "" and applies to all its
keys together. A budget of 0 is no budget; a row of four zeros is dropped. The
gateway reads both with the key's principal (Authenticate), so its hot path makes no
DB round trip: a change reaches a gateway when its cached principal expires
(gateway/auth.py AUTH_CACHE_SECONDS), or at once for a key made with its budgets.

The day windows' counts of every gateway meet here (`add_usage`, a few seconds
apart per gateway), so a day's budget holds across replicas and restarts.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from thaw.core.errors import InvalidArgument, NotFound
from thaw.core.grpcutil import servicer_method
from thaw.proto import scheduler_pb2, tenancy_pb2
from thaw.scheduler import models
from thaw.scheduler.store import Store

FIELDS = ("rpm", "rpd", "tpm", "tpd")
# Stored as BIGINT; travels as uint64.
BUDGET_MAX = 2**63 - 1
TENANT = ""
"""The key_id of a tenant's own row."""


def check(budgets: scheduler_pb2.Budgets) -> scheduler_pb2.Budgets:
    for field in FIELDS:
        if getattr(budgets, field) > BUDGET_MAX:
            raise InvalidArgument(f"{field} must be at most {BUDGET_MAX}", field=field)
    return budgets


def _message(row: models.Budget | None) -> scheduler_pb2.Budgets:
    if row is None:
        return scheduler_pb2.Budgets()
    return scheduler_pb2.Budgets(rpm=row.rpm, rpd=row.rpd, tpm=row.tpm, tpd=row.tpd)


def set_budgets(store: Store, tenant: str, key_id: str,
                budgets: scheduler_pb2.Budgets) -> scheduler_pb2.Budgets:
    """Replace the four budgets of a key (key_id) or of the tenant (key_id "")."""
    check(budgets)

    def tx(s: Session) -> scheduler_pb2.Budgets:
        if s.get(models.Tenant, tenant) is None:
            raise NotFound(f"tenant {tenant} not found", field="tenant")
        if key_id:
            key = s.get(models.ApiKey, key_id)
            if key is None or key.tenant_id != tenant:
                raise NotFound(f"key {key_id} not found in tenant {tenant}", field="key_id")
        row = s.get(models.Budget, (tenant, key_id))
        if not any(getattr(budgets, f) for f in FIELDS):
            if row is not None:
                s.delete(row)
            return scheduler_pb2.Budgets()
        if row is None:
            row = models.Budget(tenant_id=tenant, key_id=key_id)
            s.add(row)
        row.rpm, row.rpd, row.tpm, row.tpd = (getattr(budgets, f) for f in FIELDS)
        s.flush()
        return _message(row)
    return store._tx(tx)


def budgets_of(store: Store, tenant: str, key_ids: Iterable[str]
               ) -> dict[str, scheduler_pb2.Budgets]:
    """The budgets of these keys of the tenant ("" for the tenant's own): every id
    asked is answered, with zeros where none is set."""
    wanted = list(dict.fromkeys(key_ids))

    def tx(s: Session) -> dict[str, scheduler_pb2.Budgets]:
        rows = s.scalars(select(models.Budget).where(
            models.Budget.tenant_id == tenant, models.Budget.key_id.in_(wanted)))
        found = {r.key_id: _message(r) for r in rows}
        return {k: found.get(k, scheduler_pb2.Budgets()) for k in wanted}
    return store._tx(tx)


def tenant_budgets(store: Store) -> dict[str, scheduler_pb2.Budgets]:
    """Every tenant's own budgets (tenants without any are left out)."""
    def tx(s: Session) -> dict[str, scheduler_pb2.Budgets]:
        rows = s.scalars(select(models.Budget).where(models.Budget.key_id == TENANT))
        return {r.tenant_id: _message(r) for r in rows}
    return store._tx(tx)


def all_key_budgets(store: Store, tenant: str) -> dict[str, scheduler_pb2.Budgets]:
    """The tenant's keys' budgets, by key id (keys without any are left out)."""
    def tx(s: Session) -> dict[str, scheduler_pb2.Budgets]:
        rows = s.scalars(select(models.Budget).where(
            models.Budget.tenant_id == tenant, models.Budget.key_id != TENANT))
        return {r.key_id: _message(r) for r in rows}
    return store._tx(tx)


# Day counts older than this many days are dropped when counts are added.
USAGE_KEPT_DAYS = 2
DAY_BUDGETS = ("rpd", "tpd")


def add_usage(store: Store, counts: list[tenancy_pb2.BudgetCount]
              ) -> list[tenancy_pb2.BudgetCount]:
    """Add each count to its day's total (all gateways together) and answer the
    totals, in the order asked. An added count is atomic (count = count + n), so two
    gateways adding at once lose nothing."""
    for c in counts:
        if c.budget not in DAY_BUDGETS:
            raise InvalidArgument(f"budget must be one of {', '.join(DAY_BUDGETS)}",
                                  field="budget")
        if c.count < 0 or not c.counter or len(c.counter) > 200:
            raise InvalidArgument("a count is a counter and a number >= 0", field="count")

    def tx(s: Session) -> list[tenancy_pb2.BudgetCount]:
        out = []
        for c in counts:
            where = (models.BudgetUsage.counter == c.counter,
                     models.BudgetUsage.budget == c.budget, models.BudgetUsage.day == c.window)
            if c.count:
                done = s.execute(update(models.BudgetUsage).where(*where).values(
                    count=models.BudgetUsage.count + c.count))
                if not getattr(done, "rowcount", 0):
                    s.add(models.BudgetUsage(counter=c.counter, budget=c.budget,
                                             day=c.window, count=c.count))
                    s.flush()
            total = s.scalar(select(models.BudgetUsage.count).where(*where)) or 0
            out.append(tenancy_pb2.BudgetCount(counter=c.counter, budget=c.budget,
                                               window=c.window, count=total))
        if counts:
            newest = max(c.window for c in counts)
            s.execute(delete(models.BudgetUsage).where(
                models.BudgetUsage.day < newest - USAGE_KEPT_DAYS))
        return out
    return store._tx(tx)


class BudgetMethods:
    """The Tenancy service's budget methods (scheduler/tenancy.py's TenancyService
    takes them from here)."""

    store: Store

    @servicer_method
    async def SetBudgets(self, request: tenancy_pb2.SetBudgetsRequest,
                         context: grpc.aio.ServicerContext) -> scheduler_pb2.Budgets:
        return await self.store.run(set_budgets, self.store, request.tenant,
                                    request.key_id, request.budgets)

    @servicer_method
    async def AddBudgetUsage(self, request: tenancy_pb2.BudgetUsage,
                             context: grpc.aio.ServicerContext) -> tenancy_pb2.BudgetUsage:
        totals = await self.store.run(add_usage, self.store, list(request.counts))
        return tenancy_pb2.BudgetUsage(counts=totals)
