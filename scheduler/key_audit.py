"""Every API key the scheduler makes is on the audit log, whoever asked: an entry
`key.issue` filed under the key's tenant, naming the new key (target), its scopes and
name, and what asked for it (the component whose certificate made the call, or the
bootstrap of the development key) from where.

The gateway's own entry for `POST /v1/keys` (`key.create`, gateway/audit.py) says which
API key asked and from which address; this one is written where keys are made, so no
path (a direct gRPC call, the gateway's queue of entries lost in a crash, the
bootstrap) makes a key that is not on record. A key whose entry cannot be written is
revoked at once and the call fails.
"""

from __future__ import annotations

import json

import grpc
import structlog

from thaw.core.grpcutil import caller_of, servicer_method
from thaw.proto import tenancy_pb2
from thaw.scheduler.store import Store
from thaw.scheduler.tenancy import AuditEntry, TenancyService, append_audit, revoke_key

log = structlog.get_logger()

ISSUE_ACTION = "key.issue"
BOOTSTRAP = "bootstrap"
"""The caller named for the development key the scheduler makes at start."""
# Without internal TLS (insecure_internal) a caller cannot be told: it is named so.
UNVERIFIED_CALLER = "unverified"


def issue_entry(tenant: str, key_id: str, *, scopes: list[str], name: str, caller: str,
                source: str, expires_at: float = 0.0) -> AuditEntry:
    detail: dict[str, object] = {"caller": caller, "scopes": scopes, "name": name}
    if expires_at:
        detail["expires_at"] = expires_at
    return AuditEntry(tenant=tenant, action=ISSUE_ACTION, outcome="ok", target=key_id,
                      source=source[:200], detail=json.dumps(detail))


def record_issue(store: Store, entry: AuditEntry) -> None:
    """Put a new key's entry on the log; if that fails, revoke the key and raise (a
    key must not work unrecorded). Blocking: run it through `store.run`."""
    try:
        append_audit(store, [entry])
    except Exception:
        log.error("key issue not recorded; revoking the key", key_id=entry.target,
                  tenant=entry.tenant)
        revoke_key(store, entry.tenant, entry.target)
        raise


class AuditedTenancyService(TenancyService):
    """The Tenancy service whose CreateKey records every key it makes (`key.issue`)."""

    @servicer_method
    async def CreateKey(self, request: tenancy_pb2.CreateKeyRequest,
                        context: grpc.aio.ServicerContext) -> tenancy_pb2.CreateKeyResponse:
        reply: tenancy_pb2.CreateKeyResponse = await super().CreateKey(request, context)
        entry = issue_entry(
            reply.info.tenant, reply.info.id, scopes=list(reply.info.scopes),
            name=reply.info.name, caller=caller_of(context) or UNVERIFIED_CALLER,
            source=context.peer(), expires_at=request.expires_at)
        await self.store.run(record_issue, self.store, entry)
        return reply
