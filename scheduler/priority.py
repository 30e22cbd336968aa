"""Invocation priority at the scheduler: a function's default priority in the DB.

The ordering of waiting requests is in core/priority.py (PriorityWaitQueue) and the
control plane's acquire; an operator's raise of a queued one is ControlPlane.set_priority.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from thaw.core.errors import InvalidArgument, NotFound
from thaw.core.priority import PRIORITY_MAX, PRIORITY_MIN
from thaw.scheduler import models
from thaw.scheduler.states import FunctionState
from thaw.scheduler.store import FunctionRecord, Store, _function


def set_function_priority(store: Store, tenant: str, name: str,
                          priority: int | None) -> FunctionRecord:
    """Set (or, with None, clear) the default priority of a function's invocations."""
    if priority is not None and not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidArgument(f"priority must be an integer from {PRIORITY_MIN} to "
                              f"{PRIORITY_MAX}, got {priority}", field="priority")

    def tx(s: Session) -> FunctionRecord:
        row = s.scalar(select(models.Function).where(
            models.Function.tenant_id == tenant, models.Function.name == name))
        if row is None or row.state == FunctionState.DELETED.value:
            raise NotFound(f"function {tenant}/{name} not found", field="name")
        row.priority = priority
        s.flush()
        return _function(row)
    return store._tx(tx)
