"""Secret values on their way to an agent: checked at deploy, filled into the
FunctionSpec of each build and instance start (never a template's: templates are
shared by every function of a code). The scheduler's parts call these; they read the
store through PlaneState.secrets."""

from __future__ import annotations

from thaw.proto import agent_pb2
from thaw.scheduler.plane_state import PlaneState
from thaw.scheduler.secrets import missing_secrets
from thaw.scheduler.store import FunctionRecord


async def check_secrets_exist(state: PlaneState, tenant: str, names: tuple[str, ...]
                              ) -> None:
    """At deploy: InvalidArgument (400, field `secrets`) naming each secret thaw.toml
    lists that the tenant does not have."""
    if not names:
        return
    if state.secrets is None:
        raise missing_secrets(tenant, list(names))
    gone = await state.store.run(state.secrets.missing, tenant, names)
    if gone:
        raise missing_secrets(tenant, gone)


async def with_secrets(state: PlaneState, fn: FunctionRecord,
                       message: agent_pb2.FunctionSpec) -> agent_pb2.FunctionSpec:
    """`message` (fn's spec for a build or an instance start) with the current values
    of the secrets fn's thaw.toml lists; InvalidArgument naming any that is gone."""
    names = fn.spec.secrets
    if not names:
        return message
    if state.secrets is None:
        raise missing_secrets(fn.tenant, list(names))
    values = await state.store.run(state.secrets.values, fn.tenant, names)
    message.secrets.update(values)
    return message
