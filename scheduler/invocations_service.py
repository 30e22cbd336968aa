"""The `Invocations` gRPC service: the edge over the stored invocations
(invocations.InvocationStore), the tenants' webhook signing secrets
(webhook_secrets.WebhookSecrets) and their cron schedules with their last runs
(schedules_service.py), one method per RPC."""

from __future__ import annotations

import grpc

from thaw.core.errors import InvalidArgument
from thaw.core.grpcutil import servicer_method
from thaw.proto import invocations_pb2, invocations_pb2_grpc
from thaw.scheduler.invocations import Completion, InvocationState, InvocationStore
from thaw.scheduler.schedules_service import list_schedules
from thaw.scheduler.webhook_secrets import WebhookSecrets


class InvocationsService(invocations_pb2_grpc.InvocationsServicer):
    def __init__(self, invocations: InvocationStore,
                 webhook_secrets: WebhookSecrets | None = None) -> None:
        self.invocations = invocations
        self.webhook_secrets = webhook_secrets or WebhookSecrets(invocations.store,
                                                                 invocations.clock)
        self.run = invocations.store.run

    @servicer_method
    async def Create(self, request: invocations_pb2.CreateInvocationRequest,
                     context: grpc.aio.ServicerContext
                     ) -> invocations_pb2.CreateInvocationResponse:
        inv, created = await self.run(self.invocations.create, request.invocation,
                                      request.claimed_by, request.claim_seconds)
        return invocations_pb2.CreateInvocationResponse(invocation=inv, created=created)

    @servicer_method
    async def Get(self, request: invocations_pb2.GetInvocationRequest,
                  context: grpc.aio.ServicerContext) -> invocations_pb2.Invocation:
        return await self.run(self.invocations.get, request.tenant, request.id,
                              request.with_bodies)

    @servicer_method
    async def List(self, request: invocations_pb2.ListInvocationsRequest,
                   context: grpc.aio.ServicerContext
                   ) -> invocations_pb2.ListInvocationsResponse:
        found = await self.run(self.invocations.list_recent, request.tenant, request.limit,
                               request.state, request.function, request.key_id,
                               request.source)
        return invocations_pb2.ListInvocationsResponse(invocations=found)

    @servicer_method
    async def Claim(self, request: invocations_pb2.ClaimInvocationsRequest,
                    context: grpc.aio.ServicerContext
                    ) -> invocations_pb2.ClaimInvocationsResponse:
        found = await self.run(self.invocations.claim, request.gateway_id, request.limit,
                               request.claim_seconds)
        return invocations_pb2.ClaimInvocationsResponse(invocations=found)

    @servicer_method
    async def Renew(self, request: invocations_pb2.RenewClaimsRequest,
                    context: grpc.aio.ServicerContext
                    ) -> invocations_pb2.RenewClaimsResponse:
        stop = await self.run(self.invocations.renew, request.gateway_id, list(request.ids),
                              request.claim_seconds) if request.ids else []
        stop_webhooks = await self.run(self.invocations.renew_webhooks, request.gateway_id,
                                       list(request.webhook_ids), request.claim_seconds)
        return invocations_pb2.RenewClaimsResponse(stop_ids=stop,
                                                    stop_webhook_ids=stop_webhooks)

    @servicer_method
    async def Complete(self, request: invocations_pb2.CompleteInvocationRequest,
                       context: grpc.aio.ServicerContext) -> invocations_pb2.Invocation:
        try:
            state = InvocationState(request.state)
        except ValueError:
            raise InvalidArgument("state must be succeeded or failed", field="state") from None
        done = Completion(state=state, result_status=request.result_status,
                          result_content_type=request.result_content_type,
                          result_body=request.result_body, error_code=request.error_code,
                          error_message=request.error_message, start=request.start)
        return await self.run(self.invocations.complete, request.id, request.gateway_id,
                              done, request.ttl_seconds, request.webhook_claim_seconds)

    @servicer_method
    async def Release(self, request: invocations_pb2.ReleaseInvocationsRequest,
                      context: grpc.aio.ServicerContext
                      ) -> invocations_pb2.ReleaseInvocationsResponse:
        await self.run(self.invocations.release, request.gateway_id, list(request.ids))
        await self.run(self.invocations.release_webhooks, request.gateway_id,
                       list(request.webhook_ids))
        return invocations_pb2.ReleaseInvocationsResponse()

    @servicer_method
    async def Cancel(self, request: invocations_pb2.CancelInvocationRequest,
                     context: grpc.aio.ServicerContext) -> invocations_pb2.Invocation:
        return await self.run(self.invocations.cancel, request.tenant, request.id,
                              request.ttl_seconds)

    @servicer_method
    async def RecordWebhook(self, request: invocations_pb2.WebhookDeliveryRequest,
                            context: grpc.aio.ServicerContext) -> invocations_pb2.Invocation:
        return await self.run(self.invocations.record_webhook, request.id, request.state,
                              request.attempts, request.error, request.gateway_id,
                              request.retry_in_seconds, request.claim_seconds,
                              request.last_status)

    @servicer_method
    async def ClaimWebhooks(self, request: invocations_pb2.ClaimWebhooksRequest,
                            context: grpc.aio.ServicerContext
                            ) -> invocations_pb2.ClaimInvocationsResponse:
        found = await self.run(self.invocations.claim_webhooks, request.gateway_id,
                               request.limit, request.claim_seconds)
        return invocations_pb2.ClaimInvocationsResponse(invocations=found)

    @servicer_method
    async def Sweep(self, request: invocations_pb2.SweepInvocationsRequest,
                    context: grpc.aio.ServicerContext
                    ) -> invocations_pb2.SweepInvocationsResponse:
        expired, deleted = await self.run(self.invocations.sweep)
        return invocations_pb2.SweepInvocationsResponse(expired=expired, deleted=deleted)

    @servicer_method
    async def GetWebhookSecret(self, request: invocations_pb2.WebhookSecretRequest,
                               context: grpc.aio.ServicerContext
                               ) -> invocations_pb2.WebhookSecret:
        return await self.run(self.webhook_secrets.get, request.tenant, request.rotate)

    @servicer_method
    async def ListSchedules(self, request: invocations_pb2.ListSchedulesRequest,
                            context: grpc.aio.ServicerContext
                            ) -> invocations_pb2.ListSchedulesResponse:
        found = await self.run(list_schedules, self.invocations.store,
                               self.invocations.clock, request.tenant, request.function)
        return invocations_pb2.ListSchedulesResponse(schedules=found)
