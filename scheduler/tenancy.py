"""Tenants, API keys, public functions, quotas and the audit log: the store code, the
quota ledger the control plane consults before starting an instance, and the
`Tenancy` gRPC service (proto/tenancy.proto) the gateway calls.

Keys are shown once, when created; the DB holds only their SHA-256. The audit log is
append-only: this module has no update or delete of it, and neither has any other. An
entry is filed under the tenant acted upon, with the acting key's id and tenant: the
operator's changes to tenant B are in B's log (for B's admins) and in the operator's.

Revocations reach every gateway without an RPC per call: each gateway asks
`RevokedKeys` every second for the keys revoked since its last cursor and drops them
from its auth cache.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from cachetools import TTLCache
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from thaw.core.errors import AlreadyExists, InvalidArgument, NotFound, QuotaExceeded
from thaw.core.grpcutil import servicer_method
from thaw.core.priority import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN
from thaw.core.spec import NAME_PATTERN
from thaw.core.units import format_size
from thaw.proto import tenancy_pb2, tenancy_pb2_grpc
from thaw.scheduler import budgets, models
from thaw.scheduler.pools import FunctionPool
from thaw.scheduler.states import FunctionState
from thaw.scheduler.store import ALL_SCOPES, KEY_PREFIX, Store, hash_key, new_id

# Outcomes of an audited action: what the HTTP status said.
OUTCOMES = ("ok", "denied", "failed")
AUDIT_LIST_MAX = 1000
AUDIT_LIST_DEFAULT = 100
AUDIT_FIELD_LIMITS = {"action": 64, "target": 400, "source": 200, "key_id": 64,
                      "tenant": 64, "actor_tenant": 64}
KEY_NAME_MAX = 200
# A quota changed through SetQuota applies at once (the ledger is told); one changed
# straight in the DB by hand applies within this many seconds.
QUOTA_CACHE_SECONDS = 5.0
# RevokedKeys: a cursor is the scheduler's clock; each answer reaches this far before
# it, so a revocation whose transaction committed after a later one's is not missed
# (commits take milliseconds; the overlap only repeats a few ids).
REVOCATION_OVERLAP_SECONDS = 5.0
# A gateway's first call gets the keys revoked this recently: any older revocation is
# of a key no auth cache can still hold (gateway/auth.py AUTH_CACHE_SECONDS, 10 s).
REVOCATION_FIRST_WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class TenantRecord:
    id: str
    created_at: float
    max_memory_bytes: int | None
    max_instances: int | None


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: never the key itself, nor its digest."""

    id: str
    tenant: str
    name: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    priority_default: int
    priority_max: int


@dataclass(frozen=True)
class AuditEntry:
    tenant: str
    action: str
    outcome: str
    key_id: str = ""
    target: str = ""
    source: str = ""
    status: int = 0
    detail: str = "{}"
    """JSON object"""
    time: float = 0.0
    id: int = 0
    actor_tenant: str = ""
    """The acting key's tenant; "" = `tenant`."""


def _tenant(row: models.Tenant) -> TenantRecord:
    return TenantRecord(id=row.id, created_at=row.created_at,
                        max_memory_bytes=row.max_memory_bytes, max_instances=row.max_instances)


def _key(row: models.ApiKey) -> KeyInfo:
    return KeyInfo(id=row.id, tenant=row.tenant_id, name=row.name,
                   scopes=tuple(s for s in row.scopes.split(",") if s),
                   created_at=row.created_at, expires_at=row.expires_at,
                   revoked_at=row.revoked_at, priority_default=row.priority_default,
                   priority_max=row.priority_max)


def _audit(row: models.AuditRecord) -> AuditEntry:
    return AuditEntry(id=row.id, time=row.time, tenant=row.tenant, key_id=row.key_id,
                      action=row.action, target=row.target, source=row.source,
                      outcome=row.outcome, status=row.status, detail=row.detail_json,
                      actor_tenant=row.actor_tenant or row.tenant)


def check_tenant_id(tenant: str, field: str = "tenant") -> str:
    if not NAME_PATTERN.match(tenant):
        raise InvalidArgument(
            f"{field} must be 1-63 lowercase letters, digits or '-', starting with a "
            f"letter or digit; got {tenant!r}", field=field)
    return tenant


# ---- tenants -------------------------------------------------------------------------

def create_tenant(store: Store, tenant: str) -> TenantRecord:
    check_tenant_id(tenant, "id")

    def tx(s: Session) -> TenantRecord:
        if s.get(models.Tenant, tenant) is not None:
            raise AlreadyExists(f"tenant {tenant} already exists", field="id")
        row = models.Tenant(id=tenant, created_at=time.time())
        s.add(row)
        s.flush()
        return _tenant(row)
    return store._tx(tx)


def get_tenant(store: Store, tenant: str) -> TenantRecord:
    def tx(s: Session) -> TenantRecord:
        row = s.get(models.Tenant, tenant)
        if row is None:
            raise NotFound(f"tenant {tenant} not found", field="tenant")
        return _tenant(row)
    return store._tx(tx)


def list_tenants(store: Store) -> list[TenantRecord]:
    def tx(s: Session) -> list[TenantRecord]:
        return [_tenant(r) for r in s.scalars(select(models.Tenant).order_by(models.Tenant.id))]
    return store._tx(tx)


def set_quota(store: Store, tenant: str, max_memory_bytes: int | None,
              max_instances: int | None) -> TenantRecord:
    """None = no limit."""
    if max_memory_bytes is not None and max_memory_bytes < 0:
        raise InvalidArgument("max_memory_bytes must be >= 0 (or null: no limit)",
                              field="max_memory_bytes")
    if max_instances is not None and max_instances < 0:
        raise InvalidArgument("max_instances must be >= 0 (or null: no limit)",
                              field="max_instances")

    def tx(s: Session) -> TenantRecord:
        row = s.get(models.Tenant, tenant)
        if row is None:
            raise NotFound(f"tenant {tenant} not found", field="tenant")
        row.max_memory_bytes, row.max_instances = max_memory_bytes, max_instances
        s.flush()
        return _tenant(row)
    return store._tx(tx)


# ---- keys ----------------------------------------------------------------------------

def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(scopes))
    if not chosen:
        raise InvalidArgument(f"scopes must name at least one of {', '.join(ALL_SCOPES)}",
                              field="scopes")
    unknown = [s for s in chosen if s not in ALL_SCOPES]
    if unknown:
        raise InvalidArgument(f"unknown scope {unknown[0]!r}: scopes are a subset of "
                              f"{', '.join(ALL_SCOPES)}", field="scopes")
    return tuple(s for s in ALL_SCOPES if s in chosen)


def create_key(store: Store, tenant: str, scopes: Iterable[str], *, name: str = "",
               expires_at: float | None = None, priority_default: int = PRIORITY_DEFAULT,
               priority_max: int = PRIORITY_MAX, now: float | None = None) -> tuple[KeyInfo, str]:
    """A new key of an existing tenant: (its info, the key). The key is returned here
    and never again; only its SHA-256 is stored."""
    chosen = check_scopes(scopes)
    now = time.time() if now is None else now
    if len(name) > KEY_NAME_MAX:
        raise InvalidArgument(f"name is longer than {KEY_NAME_MAX} characters", field="name")
    if expires_at is not None and expires_at <= now:
        raise InvalidArgument("expires_at must be in the future", field="expires_at")
    for field, value in (("priority_default", priority_default),
                         ("priority_max", priority_max)):
        if not PRIORITY_MIN <= value <= PRIORITY_MAX:
            raise InvalidArgument(f"{field} must be in [{PRIORITY_MIN}, {PRIORITY_MAX}]",
                                  field=field)
    if priority_default > priority_max:
        raise InvalidArgument("priority_default must not exceed priority_max",
                              field="priority_default")
    key = KEY_PREFIX + secrets.token_urlsafe(32)

    def tx(s: Session) -> KeyInfo:
        if s.get(models.Tenant, tenant) is None:
            raise NotFound(f"tenant {tenant} not found", field="tenant")
        row = models.ApiKey(id=new_id("key"), tenant_id=tenant, key_sha256=hash_key(key),
                            name=name, scopes=",".join(chosen), created_at=now,
                            expires_at=expires_at, priority_default=priority_default,
                            priority_max=priority_max)
        s.add(row)
        s.flush()
        return _key(row)
    return store._tx(tx), key


def list_keys(store: Store, tenant: str) -> list[KeyInfo]:
    def tx(s: Session) -> list[KeyInfo]:
        rows = s.scalars(select(models.ApiKey).where(models.ApiKey.tenant_id == tenant)
                         .order_by(models.ApiKey.created_at, models.ApiKey.id))
        return [_key(r) for r in rows]
    return store._tx(tx)


def revoke_key(store: Store, tenant: str, key_id: str, now: float | None = None) -> KeyInfo:
    """Revoke one of the tenant's keys; revoking twice keeps the first time. Another
    tenant's key is 'not found' (its existence is not disclosed)."""
    def tx(s: Session) -> KeyInfo:
        row = s.get(models.ApiKey, key_id)
        if row is None or row.tenant_id != tenant:
            raise NotFound(f"key {key_id} not found", field="id")
        if row.revoked_at is None:
            row.revoked_at = time.time() if now is None else now
        s.flush()
        return _key(row)
    return store._tx(tx)


def revoked_keys_since(store: Store, since: float, now: float | None = None
                       ) -> tuple[list[str], float]:
    """(ids of keys revoked since the cursor `since`, the next cursor). 0 = a first
    call: the keys revoked within REVOCATION_FIRST_WINDOW_SECONDS."""
    now = time.time() if now is None else now
    start = (now - REVOCATION_FIRST_WINDOW_SECONDS if since <= 0
             else since - REVOCATION_OVERLAP_SECONDS)

    def tx(s: Session) -> list[str]:
        k = models.ApiKey
        return list(s.scalars(select(k.id).where(k.revoked_at >= start)
                              .order_by(k.revoked_at)))
    return store._tx(tx), now


# ---- public functions ----------------------------------------------------------------

def _live_function(s: Session, tenant: str, name: str) -> models.Function:
    row = s.scalar(select(models.Function).where(models.Function.tenant_id == tenant,
                                                 models.Function.name == name))
    if row is None or row.state == FunctionState.DELETED.value:
        raise NotFound(f"function {tenant}/{name} not found", field="name")
    return row


def set_function_public(store: Store, tenant: str, name: str, public: bool) -> bool:
    def tx(s: Session) -> bool:
        row = _live_function(s, tenant, name)
        row.public = public
        return public
    return store._tx(tx)


def function_is_public(store: Store, tenant: str, name: str) -> bool:
    """False for a private, deleted or unknown function alike."""
    def tx(s: Session) -> bool:
        try:
            return bool(_live_function(s, tenant, name).public)
        except NotFound:
            return False
    return store._tx(tx)


# ---- audit log -----------------------------------------------------------------------

def _check_entry(e: AuditEntry) -> None:
    if e.outcome not in OUTCOMES:
        raise InvalidArgument(f"outcome must be one of {', '.join(OUTCOMES)}",
                              field="outcome")
    if not e.action:
        raise InvalidArgument("action is required", field="action")
    for field, limit in AUDIT_FIELD_LIMITS.items():
        if len(getattr(e, field)) > limit:
            raise InvalidArgument(f"{field} is longer than {limit} characters", field=field)
    try:
        if not isinstance(json.loads(e.detail or "{}"), dict):
            raise ValueError
    except ValueError as exc:
        raise InvalidArgument("detail must be a JSON object", field="detail") from exc


def append_audit(store: Store, entries: list[AuditEntry]) -> list[int]:
    """Append entries in order, in one transaction; returns their ids. An entry
    without a time gets the store's clock."""
    for e in entries:
        _check_entry(e)

    def tx(s: Session) -> list[int]:
        rows = [models.AuditRecord(
            time=e.time or time.time(), tenant=e.tenant, key_id=e.key_id,
            actor_tenant=e.actor_tenant if e.actor_tenant != e.tenant else "", action=e.action,
            target=e.target, source=e.source, outcome=e.outcome, status=e.status,
            detail_json=e.detail or "{}") for e in entries]
        ids = []
        for row in rows:  # one flush each keeps the ids in the order given
            s.add(row)
            s.flush()
            ids.append(row.id)
        return ids
    return store._tx(tx)


def list_audit(store: Store, tenant: str = "", *, from_time: float = 0.0,
               to_time: float = 0.0, action: str = "", limit: int = AUDIT_LIST_DEFAULT,
               before_id: int = 0) -> list[AuditEntry]:
    """Newest first. `tenant` empty = all tenants, else the entries acting on it or
    made by its keys; `action` ending in '.' matches every action starting with it
    ('function.')."""
    if not 1 <= limit <= AUDIT_LIST_MAX:
        raise InvalidArgument(f"limit must be in [1, {AUDIT_LIST_MAX}]", field="limit")
    if from_time and to_time and from_time > to_time:
        raise InvalidArgument("from must not be after to", field="from")

    def tx(s: Session) -> list[AuditEntry]:
        a = models.AuditRecord
        q = select(a)
        if tenant:
            q = q.where(or_(a.tenant == tenant, a.actor_tenant == tenant))
        if from_time:
            q = q.where(a.time >= from_time)
        if to_time:
            q = q.where(a.time <= to_time)
        if action.endswith("."):
            q = q.where(func.substr(a.action, 1, len(action)) == action)
        elif action:
            q = q.where(a.action == action)
        if before_id:
            q = q.where(a.id < before_id)
        return [_audit(r) for r in s.scalars(q.order_by(a.id.desc()).limit(limit))]
    return store._tx(tx)


# ---- quotas --------------------------------------------------------------------------

_UNKNOWN = object()


class QuotaLedger:
    """The check the control plane makes before it starts an instance: the tenant's
    live instances plus the starts in flight, and their slice memory, must stay within
    the tenant's quota. Claims are taken without a suspension point between the count
    and the claim, so concurrent starts cannot both slip under the limit."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._quotas: TTLCache[str, TenantRecord | None] = TTLCache(
            maxsize=10_000, ttl=QUOTA_CACHE_SECONDS)
        self._claims: dict[str, tuple[str, int]] = {}
        """Starts in flight: instance id -> (tenant, slice bytes)."""

    def forget_tenant(self, tenant: str) -> None:
        """Its quota changed: read it again on the next start."""
        self._quotas.pop(tenant, None)

    async def _quota(self, tenant: str) -> TenantRecord | None:
        cached = self._quotas.get(tenant, _UNKNOWN)
        if cached is not _UNKNOWN:
            return cached  # type: ignore[return-value]
        try:
            found: TenantRecord | None = await self.store.run(get_tenant, self.store, tenant)
        except NotFound:
            found = None
        self._quotas[tenant] = found
        return found

    async def quota_of(self, tenant: str) -> TenantRecord | None:
        """The tenant's quota as the ledger holds it (None: no such tenant); the
        deploy's admission checks min_instances against it (deploy_limits.py)."""
        return await self._quota(tenant)

    async def claim(self, tenant: str, instance_id: str, need: int,
                    pools: Iterable[FunctionPool]) -> None:
        """Count a new instance of `tenant` against its quota, or raise QuotaExceeded.
        The claim lasts until release(instance_id) (the start ended, either way)."""
        quota = await self._quota(tenant)
        if quota is None or (quota.max_instances is None and quota.max_memory_bytes is None):
            return
        # From here to the claim nothing awaits: the count is current.
        prefix = tenant + "/"
        count, memory = 0, 0
        for pool in pools:
            if pool.name.startswith(prefix):
                count += len(pool.instances)
                memory += sum(i.gpu_memory for i in pool.instances.values())
        for owner, nbytes in self._claims.values():
            if owner == tenant:
                count += 1
                memory += nbytes
        if quota.max_instances is not None and count + 1 > quota.max_instances:
            raise QuotaExceeded(
                f"tenant {tenant} already has {count} instances, its quota "
                f"(max_instances={quota.max_instances}); warm instances keep serving")
        if quota.max_memory_bytes is not None and memory + need > quota.max_memory_bytes:
            raise QuotaExceeded(
                f"another instance ({format_size(need)}) would take tenant {tenant} to "
                f"{format_size(memory + need)} of slice memory, past its quota "
                f"(max_memory_bytes={format_size(quota.max_memory_bytes)})")
        self._claims[instance_id] = (tenant, need)

    def release(self, instance_id: str) -> None:
        self._claims.pop(instance_id, None)


# ---- gRPC edge -----------------------------------------------------------------------

def _limit_in(value: int | None) -> int:
    return -1 if value is None else value


def _limit_out(value: int) -> int | None:
    return None if value < 0 else value


def tenant_message(t: TenantRecord) -> tenancy_pb2.TenantInfo:
    return tenancy_pb2.TenantInfo(id=t.id, created_at=t.created_at,
                                  max_memory_bytes=_limit_in(t.max_memory_bytes),
                                  max_instances=_limit_in(t.max_instances))


def key_message(k: KeyInfo) -> tenancy_pb2.KeyInfo:
    return tenancy_pb2.KeyInfo(id=k.id, tenant=k.tenant, name=k.name, scopes=list(k.scopes),
                               created_at=k.created_at, expires_at=k.expires_at or 0.0,
                               revoked_at=k.revoked_at or 0.0,
                               priority_default=k.priority_default,
                               priority_max=k.priority_max)


def audit_message(e: AuditEntry) -> tenancy_pb2.AuditEntry:
    return tenancy_pb2.AuditEntry(id=e.id, time=e.time, tenant=e.tenant, key_id=e.key_id,
                                  action=e.action, target=e.target, source=e.source,
                                  outcome=e.outcome, status=e.status, detail_json=e.detail,
                                  actor_tenant=e.actor_tenant)


class TenancyService(budgets.BudgetMethods, tenancy_pb2_grpc.TenancyServicer):
    """Who may call what is the gateway's business (operator, tenant admin); this
    service trusts its caller, like the Scheduler service does."""

    def __init__(self, store: Store, quotas: QuotaLedger) -> None:
        self.store = store
        self.quotas = quotas

    @servicer_method
    async def CreateTenant(self, request: tenancy_pb2.CreateTenantRequest,
                           context: grpc.aio.ServicerContext) -> tenancy_pb2.TenantInfo:
        return tenant_message(await self.store.run(create_tenant, self.store, request.id))

    @servicer_method
    async def ListTenants(self, request: tenancy_pb2.ListTenantsRequest,
                          context: grpc.aio.ServicerContext
                          ) -> tenancy_pb2.ListTenantsResponse:
        tenants = await self.store.run(list_tenants, self.store)
        spent = await self.store.run(budgets.tenant_budgets, self.store)
        infos = [tenant_message(t) for t in tenants]
        for info in infos:
            if info.id in spent:
                info.budgets.CopyFrom(spent[info.id])
        return tenancy_pb2.ListTenantsResponse(tenants=infos)

    @servicer_method
    async def GetTenant(self, request: tenancy_pb2.TenantRequest,
                        context: grpc.aio.ServicerContext) -> tenancy_pb2.TenantInfo:
        info = tenant_message(await self.store.run(get_tenant, self.store, request.id))
        found = await self.store.run(budgets.budgets_of, self.store, request.id,
                                     [budgets.TENANT])
        info.budgets.CopyFrom(found[budgets.TENANT])
        return info

    @servicer_method
    async def SetQuota(self, request: tenancy_pb2.SetQuotaRequest,
                       context: grpc.aio.ServicerContext) -> tenancy_pb2.TenantInfo:
        t = await self.store.run(set_quota, self.store, request.tenant,
                                 _limit_out(request.max_memory_bytes),
                                 _limit_out(request.max_instances))
        self.quotas.forget_tenant(request.tenant)
        return tenant_message(t)

    @servicer_method
    async def CreateKey(self, request: tenancy_pb2.CreateKeyRequest,
                        context: grpc.aio.ServicerContext) -> tenancy_pb2.CreateKeyResponse:
        budgets.check(request.budgets)
        info, key = await self.store.run(
            create_key, self.store, request.tenant, list(request.scopes), name=request.name,
            expires_at=request.expires_at or None,
            priority_default=request.priority_default or PRIORITY_DEFAULT,
            priority_max=request.priority_max or PRIORITY_MAX)
        made = key_message(info)
        if request.HasField("budgets"):
            # Checked (budgets.check) before the key was made: this cannot refuse.
            made.budgets.CopyFrom(await self.store.run(
                budgets.set_budgets, self.store, request.tenant, info.id, request.budgets))
        return tenancy_pb2.CreateKeyResponse(info=made, key=key)

    @servicer_method
    async def ListKeys(self, request: tenancy_pb2.ListKeysRequest,
                       context: grpc.aio.ServicerContext) -> tenancy_pb2.ListKeysResponse:
        keys = await self.store.run(list_keys, self.store, request.tenant)
        set_ = await self.store.run(budgets.all_key_budgets, self.store, request.tenant)
        infos = [key_message(k) for k in keys]
        for info in infos:
            if info.id in set_:
                info.budgets.CopyFrom(set_[info.id])
        return tenancy_pb2.ListKeysResponse(keys=infos)

    @servicer_method
    async def RevokeKey(self, request: tenancy_pb2.RevokeKeyRequest,
                        context: grpc.aio.ServicerContext) -> tenancy_pb2.KeyInfo:
        return key_message(await self.store.run(revoke_key, self.store, request.tenant,
                                                request.id))

    @servicer_method
    async def SetFunctionPublic(self, request: tenancy_pb2.SetFunctionPublicRequest,
                                context: grpc.aio.ServicerContext
                                ) -> tenancy_pb2.FunctionVisibility:
        public = await self.store.run(set_function_public, self.store, request.tenant,
                                      request.name, request.public)
        return tenancy_pb2.FunctionVisibility(tenant=request.tenant, name=request.name,
                                              public=public)

    @servicer_method
    async def GetFunctionVisibility(self, request: tenancy_pb2.FunctionRef,
                                    context: grpc.aio.ServicerContext
                                    ) -> tenancy_pb2.FunctionVisibility:
        public = await self.store.run(function_is_public, self.store, request.tenant,
                                      request.name)
        return tenancy_pb2.FunctionVisibility(tenant=request.tenant, name=request.name,
                                              public=public)

    @servicer_method
    async def AppendAudit(self, request: tenancy_pb2.AppendAuditRequest,
                          context: grpc.aio.ServicerContext
                          ) -> tenancy_pb2.AppendAuditResponse:
        entries = [AuditEntry(tenant=e.tenant, action=e.action, outcome=e.outcome,
                              key_id=e.key_id, target=e.target, source=e.source,
                              status=e.status, detail=e.detail_json or "{}", time=e.time,
                              actor_tenant=e.actor_tenant)
                   for e in request.entries]
        ids = await self.store.run(append_audit, self.store, entries)
        return tenancy_pb2.AppendAuditResponse(ids=ids)

    @servicer_method
    async def ListAudit(self, request: tenancy_pb2.ListAuditRequest,
                        context: grpc.aio.ServicerContext) -> tenancy_pb2.ListAuditResponse:
        entries = await self.store.run(
            list_audit, self.store, request.tenant, from_time=request.from_time,
            to_time=request.to_time, action=request.action,
            limit=request.limit or AUDIT_LIST_DEFAULT, before_id=request.before_id)
        return tenancy_pb2.ListAuditResponse(entries=[audit_message(e) for e in entries])

    @servicer_method
    async def RevokedKeys(self, request: tenancy_pb2.RevokedKeysRequest,
                          context: grpc.aio.ServicerContext
                          ) -> tenancy_pb2.RevokedKeysResponse:
        key_ids, cursor = await self.store.run(revoked_keys_since, self.store, request.since)
        return tenancy_pb2.RevokedKeysResponse(key_ids=key_ids, cursor=cursor)
