"""The gateway's client of the scheduler's Invocations service (the stored
invocations' table: create, claim, renew, complete, webhooks and their signing
secrets, sweep)."""

from __future__ import annotations

from typing import Any

from thaw.core.grpcutil import call as grpc_call
from thaw.proto import invocations_pb2, invocations_pb2_grpc

# Metadata calls to the scheduler are quick.
RPC_TIMEOUT = 30.0


class InvocationsClient:
    def __init__(self, channel: Any) -> None:
        self._stub = invocations_pb2_grpc.InvocationsStub(channel)

    async def create(self, inv: invocations_pb2.Invocation, claimed_by: str = "",
                     claim_seconds: float = 0.0
                     ) -> tuple[invocations_pb2.Invocation, bool]:
        resp = await grpc_call(self._stub.Create(invocations_pb2.CreateInvocationRequest(
            invocation=inv, claimed_by=claimed_by, claim_seconds=claim_seconds),
            timeout=RPC_TIMEOUT))
        return resp.invocation, resp.created

    async def get(self, tenant: str, invocation_id: str, with_bodies: bool = False
                  ) -> invocations_pb2.Invocation:
        return await grpc_call(self._stub.Get(invocations_pb2.GetInvocationRequest(
            tenant=tenant, id=invocation_id, with_bodies=with_bodies), timeout=RPC_TIMEOUT))

    async def list_recent(self, tenant: str, limit: int, state: str, function: str,
                          key_id: str = "", source: str = ""
                          ) -> list[invocations_pb2.Invocation]:
        """`key_id`: only the invocations that key made ("" = any key's); `source`:
        only "call" or only "schedule" ones ("" = both)."""
        resp = await grpc_call(self._stub.List(invocations_pb2.ListInvocationsRequest(
            tenant=tenant, limit=limit, state=state, function=function, key_id=key_id,
            source=source), timeout=RPC_TIMEOUT))
        return list(resp.invocations)

    async def claim(self, gateway_id: str, limit: int, claim_seconds: float
                    ) -> list[invocations_pb2.Invocation]:
        resp = await grpc_call(self._stub.Claim(invocations_pb2.ClaimInvocationsRequest(
            gateway_id=gateway_id, limit=limit, claim_seconds=claim_seconds),
            timeout=RPC_TIMEOUT))
        return list(resp.invocations)

    async def renew(self, gateway_id: str, ids: list[str], claim_seconds: float
                    ) -> list[str]:
        resp = await grpc_call(self._stub.Renew(invocations_pb2.RenewClaimsRequest(
            gateway_id=gateway_id, ids=ids, claim_seconds=claim_seconds),
            timeout=RPC_TIMEOUT))
        return list(resp.stop_ids)

    async def complete(self, request: invocations_pb2.CompleteInvocationRequest
                       ) -> invocations_pb2.Invocation:
        return await grpc_call(self._stub.Complete(request, timeout=RPC_TIMEOUT))

    async def release(self, gateway_id: str, ids: list[str]) -> None:
        await grpc_call(self._stub.Release(invocations_pb2.ReleaseInvocationsRequest(
            gateway_id=gateway_id, ids=ids), timeout=RPC_TIMEOUT))

    async def cancel(self, tenant: str, invocation_id: str, ttl_seconds: float
                     ) -> invocations_pb2.Invocation:
        return await grpc_call(self._stub.Cancel(invocations_pb2.CancelInvocationRequest(
            tenant=tenant, id=invocation_id, ttl_seconds=ttl_seconds), timeout=RPC_TIMEOUT))

    async def record_webhook(self, invocation_id: str, state: str, attempts: int,
                             error: str, gateway_id: str = "", retry_in: float = 0.0,
                             claim_seconds: float = 0.0, last_status: int = 0
                             ) -> invocations_pb2.Invocation:
        return await grpc_call(self._stub.RecordWebhook(
            invocations_pb2.WebhookDeliveryRequest(
                id=invocation_id, state=state, attempts=attempts, error=error,
                gateway_id=gateway_id, retry_in_seconds=retry_in,
                claim_seconds=claim_seconds, last_status=last_status),
            timeout=RPC_TIMEOUT))

    async def webhook_secret(self, tenant: str, rotate: bool = False
                             ) -> invocations_pb2.WebhookSecret:
        """The tenant's webhook signing secret (made on first use); a new one with
        `rotate`."""
        return await grpc_call(self._stub.GetWebhookSecret(
            invocations_pb2.WebhookSecretRequest(tenant=tenant, rotate=rotate),
            timeout=RPC_TIMEOUT))

    async def claim_webhooks(self, gateway_id: str, limit: int, claim_seconds: float
                             ) -> list[invocations_pb2.Invocation]:
        resp = await grpc_call(self._stub.ClaimWebhooks(invocations_pb2.ClaimWebhooksRequest(
            gateway_id=gateway_id, limit=limit, claim_seconds=claim_seconds),
            timeout=RPC_TIMEOUT))
        return list(resp.invocations)

    async def renew_webhooks(self, gateway_id: str, ids: list[str], claim_seconds: float
                             ) -> list[str]:
        resp = await grpc_call(self._stub.Renew(invocations_pb2.RenewClaimsRequest(
            gateway_id=gateway_id, webhook_ids=ids, claim_seconds=claim_seconds),
            timeout=RPC_TIMEOUT))
        return list(resp.stop_webhook_ids)

    async def release_webhooks(self, gateway_id: str, ids: list[str]) -> None:
        await grpc_call(self._stub.Release(invocations_pb2.ReleaseInvocationsRequest(
            gateway_id=gateway_id, webhook_ids=ids), timeout=RPC_TIMEOUT))

    async def sweep(self) -> tuple[int, int]:
        resp = await grpc_call(self._stub.Sweep(invocations_pb2.SweepInvocationsRequest(),
                                                timeout=RPC_TIMEOUT))
        return resp.expired, resp.deleted
