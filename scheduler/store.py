"""Bookkeeping in the metadata DB. Synchronous SQLAlchemy; the async control plane
calls it through a bounded thread pool (Store.run) so the event loop never blocks."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from thaw.core.errors import NotFound, Unauthenticated, Unavailable
from thaw.core.priority import PRIORITY_DEFAULT, PRIORITY_MAX
from thaw.core.spec import FunctionSpec
from thaw.scheduler import models
from thaw.scheduler.states import (
    FunctionState,
    InstanceState,
    NodeState,
    SnapshotState,
    move_row,
    set_row,
)

T = TypeVar("T")
# SQLite serialises writers anyway; a few threads cover PostgreSQL's round trips.
DB_THREADS = 4
KEY_PREFIX = "thaw_"
ALL_SCOPES = ("invoke", "deploy", "admin")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class FunctionRecord:
    id: str
    tenant: str
    name: str
    version: int
    state: FunctionState
    reason: str
    start_mode: str
    handler: str
    bundle_digest: str
    spec: FunctionSpec
    snapshot_id: str | None
    created_at: float
    updated_at: float
    priority: int | None = None
    """Default priority (1-100) of its invocations; None = the key's default."""


@dataclass(frozen=True)
class SnapshotRecord:
    id: str
    function_id: str
    version: int
    state: SnapshotState
    reason: str
    node_id: str
    manifest: bytes | None
    stored_bytes: int


@dataclass(frozen=True)
class NodeRecord:
    id: str
    control_address: str
    data_url: str
    state: str
    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class InstanceRecord:
    id: str
    function_id: str
    version: int
    node_id: str
    start_kind: str
    state: str
    end_reason: str


@dataclass(frozen=True)
class LiveSnapshot:
    """A snapshot some current function uses, with whose it is."""

    function_id: str
    function: str
    """tenant/name"""
    manifest: bytes


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant: str
    scopes: tuple[str, ...]
    priority_default: int = PRIORITY_DEFAULT
    priority_max: int = PRIORITY_MAX
    expires_at: float | None = None


def spec_from_json(spec_json: str) -> FunctionSpec:
    """A stored spec (a functions or function_versions row's spec_json) as the typed
    FunctionSpec: the one place the scheduler reads one back."""
    return FunctionSpec.from_dict(json.loads(spec_json))


def _function(row: models.Function) -> FunctionRecord:
    return FunctionRecord(
        id=row.id, tenant=row.tenant_id, name=row.name, version=row.version,
        state=FunctionState(row.state), reason=row.reason, start_mode=row.start_mode,
        handler=row.handler, bundle_digest=row.bundle_digest,
        spec=spec_from_json(row.spec_json), snapshot_id=row.snapshot_id,
        created_at=row.created_at, updated_at=row.updated_at, priority=row.priority)


def _snapshot(row: models.Snapshot) -> SnapshotRecord:
    return SnapshotRecord(
        id=row.id, function_id=row.function_id, version=row.version,
        state=SnapshotState(row.state), reason=row.reason, node_id=row.node_id,
        manifest=row.manifest, stored_bytes=row.stored_bytes)


def _instance(row: models.Instance) -> InstanceRecord:
    return InstanceRecord(id=row.id, function_id=row.function_id, version=row.version,
                          node_id=row.node_id, start_kind=row.start_kind, state=row.state,
                          end_reason=row.end_reason)


class Store:
    def __init__(self, engine: Engine) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._pool = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="thaw-db")

    async def run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run a store method in the DB thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _session(self) -> Session:
        return self._sessions()

    def _tx(self, fn: Callable[[Session], T]) -> T:
        try:
            with self._session() as session, session.begin():
                return fn(session)
        except SQLAlchemyError as exc:
            if isinstance(exc, IntegrityError):
                raise
            raise Unavailable(f"metadata DB error: {exc.__class__.__name__}: {exc}") from exc

    # ---- tenants and keys ---------------------------------------------------

    def ensure_tenant(self, tenant: str) -> None:
        def tx(s: Session) -> None:
            if s.get(models.Tenant, tenant) is None:
                s.add(models.Tenant(id=tenant))
        self._tx(tx)

    def create_key(self, tenant: str, scopes: tuple[str, ...] = ALL_SCOPES,
                   name: str = "", expires_at: float | None = None,
                   key: str | None = None) -> tuple[str, str]:
        """A new API key: returns (key id, the key). Only its SHA-256 is stored."""
        self.ensure_tenant(tenant)
        key = key or KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = new_id("key")

        def tx(s: Session) -> None:
            s.add(models.ApiKey(id=key_id, tenant_id=tenant, key_sha256=hash_key(key),
                                name=name, scopes=",".join(scopes), expires_at=expires_at))
        self._tx(tx)
        return key_id, key

    def key_exists(self, key: str) -> bool:
        def tx(s: Session) -> bool:
            return s.scalar(select(models.ApiKey.id).where(
                models.ApiKey.key_sha256 == hash_key(key))) is not None
        return self._tx(tx)

    def authenticate(self, key_sha256: str) -> KeyRecord:
        def tx(s: Session) -> KeyRecord:
            row = s.scalar(select(models.ApiKey).where(models.ApiKey.key_sha256 == key_sha256))
            if row is None or row.revoked_at is not None:
                raise Unauthenticated("unknown or revoked API key")
            if row.expires_at is not None and row.expires_at < time.time():
                raise Unauthenticated("API key expired")
            return KeyRecord(id=row.id, tenant=row.tenant_id,
                             scopes=tuple(x for x in row.scopes.split(",") if x),
                             priority_default=row.priority_default,
                             priority_max=row.priority_max, expires_at=row.expires_at)
        return self._tx(tx)

    # ---- functions ----------------------------------------------------------

    def upsert_function(self, tenant: str, spec: FunctionSpec, bundle_digest: str,
                        start_mode: str, state: FunctionState, reason: str = "") -> FunctionRecord:
        """Create the function, or move an existing one to a new version."""
        self.ensure_tenant(tenant)

        def tx(s: Session) -> FunctionRecord:
            row = s.scalar(select(models.Function).where(
                models.Function.tenant_id == tenant, models.Function.name == spec.name))
            spec_json = json.dumps(spec.to_dict())
            if row is None:
                row = models.Function(
                    id=new_id("fn"), tenant_id=tenant, name=spec.name, version=1,
                    state=state.value, reason=reason, start_mode=start_mode,
                    handler=spec.handler, bundle_digest=bundle_digest, spec_json=spec_json)
                s.add(row)
            else:
                if FunctionState(row.state) == FunctionState.DELETED:
                    # A deleted function deployed again starts its lifecycle over.
                    row.version = row.version + 1
                    set_row(row, state)
                else:
                    move_row(row, state, "function")
                    row.version += 1
                row.reason, row.start_mode, row.handler = reason, start_mode, spec.handler
                row.bundle_digest, row.spec_json, row.snapshot_id = bundle_digest, spec_json, None
            s.flush()
            return _function(row)
        return self._tx(tx)

    def get_function(self, tenant: str, name: str, *, include_deleted: bool = False
                     ) -> FunctionRecord:
        def tx(s: Session) -> FunctionRecord:
            row = s.scalar(select(models.Function).where(
                models.Function.tenant_id == tenant, models.Function.name == name))
            if row is None or (row.state == FunctionState.DELETED.value and not include_deleted):
                raise NotFound(f"function {tenant}/{name} not found", field="name")
            return _function(row)
        return self._tx(tx)

    def get_function_by_id(self, function_id: str) -> FunctionRecord:
        def tx(s: Session) -> FunctionRecord:
            row = s.get(models.Function, function_id)
            if row is None:
                raise NotFound(f"function {function_id} not found")
            return _function(row)
        return self._tx(tx)

    def list_functions(self, tenant: str) -> list[FunctionRecord]:
        def tx(s: Session) -> list[FunctionRecord]:
            rows = s.scalars(select(models.Function).where(
                models.Function.tenant_id == tenant,
                models.Function.state != FunctionState.DELETED.value
            ).order_by(models.Function.name))
            return [_function(r) for r in rows]
        return self._tx(tx)

    def active_functions(self) -> list[FunctionRecord]:
        """Every function not deleted, of every tenant (the reconcile loop's view)."""
        def tx(s: Session) -> list[FunctionRecord]:
            rows = s.scalars(select(models.Function).where(
                models.Function.state != FunctionState.DELETED.value
            ).order_by(models.Function.tenant_id, models.Function.name))
            return [_function(r) for r in rows]
        return self._tx(tx)

    def set_function_state(self, function_id: str, version: int, state: FunctionState,
                           reason: str = "", start_mode: str | None = None,
                           snapshot_id: str | None = None) -> FunctionRecord | None:
        """Move a function's state, unless a newer version has replaced it (returns None)."""
        def tx(s: Session) -> FunctionRecord | None:
            row = s.get(models.Function, function_id)
            if row is None or row.version != version:
                return None
            move_row(row, state, "function")
            row.reason = reason
            if start_mode is not None:
                row.start_mode = start_mode
            if snapshot_id is not None:
                row.snapshot_id = snapshot_id
            s.flush()
            return _function(row)
        return self._tx(tx)

    # ---- snapshots ----------------------------------------------------------

    def create_snapshot(self, function_id: str, version: int, node_id: str) -> str:
        snapshot_id = new_id("snap")

        def tx(s: Session) -> None:
            s.add(models.Snapshot(id=snapshot_id, function_id=function_id, version=version,
                                  state=SnapshotState.BUILDING.value, node_id=node_id))
        self._tx(tx)
        return snapshot_id

    def finish_snapshot(self, snapshot_id: str, state: SnapshotState, *, reason: str = "",
                        manifest: bytes | None = None, stored_bytes: int = 0) -> None:
        def tx(s: Session) -> None:
            row = s.get(models.Snapshot, snapshot_id)
            if row is None:
                raise NotFound(f"snapshot {snapshot_id} not found")
            move_row(row, state, "snapshot")
            row.reason = reason
            if manifest is not None:
                row.manifest, row.stored_bytes = manifest, stored_bytes
        self._tx(tx)

    def get_snapshot(self, snapshot_id: str) -> SnapshotRecord:
        def tx(s: Session) -> SnapshotRecord:
            row = s.get(models.Snapshot, snapshot_id)
            if row is None:
                raise NotFound(f"snapshot {snapshot_id} not found")
            return _snapshot(row)
        return self._tx(tx)

    # ---- nodes and instances ----------------------------------------------------

    def upsert_node(self, node_id: str, control_address: str, data_url: str,
                    devices_json: str) -> None:
        def tx(s: Session) -> None:
            row = s.get(models.Node, node_id)
            if row is None:
                s.add(models.Node(id=node_id, control_address=control_address,
                                  data_url=data_url, state="ready", devices_json=devices_json))
            else:
                row.control_address, row.data_url = control_address, data_url
                row.state, row.devices_json = "ready", devices_json
                row.last_heartbeat = time.time()
        self._tx(tx)

    def list_nodes(self) -> list[NodeRecord]:
        def tx(s: Session) -> list[NodeRecord]:
            return [NodeRecord(id=r.id, control_address=r.control_address, data_url=r.data_url,
                               state=r.state, device_ids=tuple(json.loads(r.devices_json)))
                    for r in s.scalars(select(models.Node).order_by(models.Node.id))]
        return self._tx(tx)

    def set_node_state(self, node_id: str, state: str) -> None:
        def tx(s: Session) -> None:
            row = s.get(models.Node, node_id)
            if row is not None:
                set_row(row, NodeState(state))  # mirrors the checked in-memory view
        self._tx(tx)

    def add_instance(self, instance_id: str, function_id: str, version: int, node_id: str,
                     start_kind: str) -> None:
        def tx(s: Session) -> None:
            s.add(models.Instance(id=instance_id, function_id=function_id, version=version,
                                  node_id=node_id, state="ready", start_kind=start_kind))
        self._tx(tx)

    def end_instance(self, instance_id: str, reason: str) -> None:
        def tx(s: Session) -> None:
            row = s.get(models.Instance, instance_id)
            if row is not None and row.ended_at is None:
                set_row(row, InstanceState.GONE)  # mirrors the checked in-memory view
                row.ended_at, row.end_reason = time.time(), reason
        self._tx(tx)

    def live_manifests(self) -> list[bytes]:
        """Manifests of the snapshots that current functions use: everything a node
        must keep; chunks of any other snapshot may be collected."""
        def tx(s: Session) -> list[bytes]:
            rows = s.execute(
                select(models.Snapshot.manifest)
                .join(models.Function, models.Function.snapshot_id == models.Snapshot.id)
                .where(models.Function.state != FunctionState.DELETED.value,
                       models.Snapshot.state == SnapshotState.READY.value))
            return [r[0] for r in rows if r[0]]
        return self._tx(tx)

    def get_instance(self, instance_id: str) -> InstanceRecord:
        def tx(s: Session) -> InstanceRecord:
            row = s.get(models.Instance, instance_id)
            if row is None:
                raise NotFound(f"instance {instance_id} not found")
            return _instance(row)
        return self._tx(tx)

    def live_instances(self) -> list[InstanceRecord]:
        """Instances not known to have ended, oldest first."""
        def tx(s: Session) -> list[InstanceRecord]:
            rows = s.scalars(select(models.Instance)
                             .where(models.Instance.ended_at.is_(None))
                             .order_by(models.Instance.started_at, models.Instance.id))
            return [_instance(r) for r in rows]
        return self._tx(tx)

    def live_snapshots(self) -> list[LiveSnapshot]:
        """The ready snapshots of current functions, with their function's name."""
        def tx(s: Session) -> list[LiveSnapshot]:
            rows = s.execute(
                select(models.Function.id, models.Function.tenant_id, models.Function.name,
                       models.Snapshot.manifest)
                .join(models.Snapshot, models.Function.snapshot_id == models.Snapshot.id)
                .where(models.Function.state != FunctionState.DELETED.value,
                       models.Snapshot.state == SnapshotState.READY.value))
            return [LiveSnapshot(r[0], f"{r[1]}/{r[2]}", r[3]) for r in rows if r[3]]
        return self._tx(tx)
