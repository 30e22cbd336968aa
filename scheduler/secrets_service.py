"""The `Secrets` gRPC service (proto/secrets.proto) over SecretStore, and what a
secret's value changes at the control plane.

Rotation: a new value for a secret that functions use stops their running
instances (the idle ones now, the busy ones once their calls are done), so the next
call starts (restores) a new instance, which gets the new value before its
`on_restore` runs. Snapshots are not rebuilt: a snapshot never holds a value
(the runtime removes the function's secrets from its environment before capture).

Deletion of a secret that functions use is refused (the reply names them) unless
forced; after a forced deletion their running instances keep the value they have
and every new start fails, naming the secret.
"""

from __future__ import annotations

import asyncio

import grpc
import structlog

from thaw.core.grpcutil import servicer_method
from thaw.proto import secrets_pb2, secrets_pb2_grpc
from thaw.scheduler.control import START_RPC_TIMEOUT, ControlPlane
from thaw.scheduler.pools import Broadcast, FunctionPool
from thaw.scheduler.secrets import SecretInfo, SecretStore
from thaw.scheduler.store import FunctionRecord
from thaw.scheduler.tenancy import check_tenant_id

log = structlog.get_logger()


def info_message(info: SecretInfo) -> secrets_pb2.SecretInfo:
    return secrets_pb2.SecretInfo(name=info.name, created_at=info.created_at,
                                  updated_at=info.updated_at, version=info.version)


def users_of(functions: list[FunctionRecord], name: str) -> list[FunctionRecord]:
    """The functions whose serving version names secret `name`, by name."""
    return sorted((fn for fn in functions if name in fn.spec.secrets),
                  key=lambda fn: fn.name)


class SecretsService(secrets_pb2_grpc.SecretsServicer):
    def __init__(self, secrets: SecretStore, control: ControlPlane) -> None:
        self.secrets = secrets
        self.control = control
        self.run = secrets.store.run

    @servicer_method
    async def Set(self, request: secrets_pb2.SetSecretRequest,
                  context: grpc.aio.ServicerContext) -> secrets_pb2.SetSecretResponse:
        tenant = check_tenant_id(request.tenant)
        info = await self.run(self.secrets.set_value, tenant, request.name, request.value)
        users = users_of(await self.control.list_functions(tenant), request.name)
        drained = self.drain(users, f"secret {request.name} was set to a new value") \
            if info.version > 1 else 0
        log.info("secret set", tenant=tenant, secret=request.name, version=info.version,
                 functions=[fn.name for fn in users], drained=drained)
        return secrets_pb2.SetSecretResponse(info=info_message(info),
                                             functions=[fn.name for fn in users],
                                             drained=drained)

    @servicer_method
    async def List(self, request: secrets_pb2.ListSecretsRequest,
                   context: grpc.aio.ServicerContext) -> secrets_pb2.ListSecretsResponse:
        found = await self.run(self.secrets.list_names, check_tenant_id(request.tenant))
        return secrets_pb2.ListSecretsResponse(secrets=[info_message(i) for i in found])

    @servicer_method
    async def Delete(self, request: secrets_pb2.DeleteSecretRequest,
                     context: grpc.aio.ServicerContext) -> secrets_pb2.DeleteSecretResponse:
        tenant = check_tenant_id(request.tenant)
        users = [fn.name for fn in users_of(await self.control.list_functions(tenant),
                                            request.name)]
        if users and not request.force:
            return secrets_pb2.DeleteSecretResponse(deleted=False, used_by=users)
        await self.run(self.secrets.delete, tenant, request.name)
        log.info("secret deleted", tenant=tenant, secret=request.name, used_by=users)
        return secrets_pb2.DeleteSecretResponse(deleted=True, used_by=users)

    def drain(self, functions: list[FunctionRecord], reason: str) -> int:
        """Retire every live instance of `functions`: none is picked for a call from
        now on; each stops now when idle, else when its calls are done. Returns how
        many."""
        count = 0
        for fn in functions:
            pool = self.control.pools.get(fn.id)
            if pool is None:
                continue
            for inst in list(pool.instances.values()):
                if inst.ready:
                    self.control.instances.retire(pool, inst, reason)
                    count += 1
            for instance_id, (function_id, _node) in list(self.control.state.placing.items()):
                if function_id == fn.id:
                    # Started with the value before: retired once it joins its pool.
                    self.control.state.spawn(self._retire_when_started(
                        pool, instance_id, reason))
                    count += 1
        return count

    async def _retire_when_started(self, pool: FunctionPool, instance_id: str,
                                   reason: str) -> None:
        deadline = asyncio.get_running_loop().time() + START_RPC_TIMEOUT
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            token = pool.changed.token()
            inst = pool.instances.get(instance_id)
            if inst is not None:
                if inst.ready:
                    self.control.instances.retire(pool, inst, reason)
                return
            await Broadcast.wait(token, left)
