"""Function versions in the metadata DB: every deploy is an immutable version (its
bundle digest, parsed thaw.toml and snapshot); the `functions` row mirrors the active
(serving) one.

A first deploy (or one after the function failed or was deleted) moves the functions
row to the new version at once, BUILDING, as before versions existed. A redeploy of a
READY function leaves the row alone while the new version builds: the old version
keeps serving, and `activate` switches the row in one transaction when the new one is
ready. A failed build is recorded on its version; the function stays on the old one.
Rollback activates a kept version again; its snapshot is kept while it is one of the
RETAINED_VERSIONS most recent ready versions besides the active one
(`retained_manifests`, called by the garbage collection).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from thaw.core.errors import NotFound
from thaw.core.spec import FunctionSpec
from thaw.scheduler import models
from thaw.scheduler.states import (
    FunctionState,
    SnapshotState,
    VersionState,
    check_transition,
    move_row,
    set_row,
)
from thaw.scheduler.store import FunctionRecord, Store, _function, new_id, spec_from_json

# Ready versions kept restorable besides the active one (their snapshots are not
# garbage-collected, so a rollback to them is instant).
RETAINED_VERSIONS = 3
# Ready versions' input schemas kept in memory (a ready version's never changes): a
# function running fresh reads its schema with every record the scheduler answers.
SCHEMA_CACHE_ENTRIES = 1024


def check_version_move(current: VersionState, target: VersionState) -> None:
    check_transition(current, target, "version")


@dataclass(frozen=True)
class VersionRecord:
    function_id: str
    version: int
    state: VersionState
    reason: str
    bundle_digest: str
    handler: str
    spec: FunctionSpec
    start_mode: str
    snapshot_id: str | None
    snapshot_state: str
    """ready | building | failed | quarantined | collected | "" (no snapshot)"""
    snapshot_bytes: int
    created_at: float
    activated_at: float | None
    input_schema: str = ""
    """The JSON Schema its build read from the handler ("" for none)."""

    @property
    def restorable(self) -> bool:
        """Activating it needs no build: it runs fresh, or its snapshot still exists."""
        return self.start_mode != "restore" or self.snapshot_state == "ready"


def _version(row: models.FunctionVersion, snap: models.Snapshot | None) -> VersionRecord:
    if row.snapshot_collected:
        snapshot_state = "collected"
    elif snap is None:
        snapshot_state = ""
    else:
        snapshot_state = snap.state
    return VersionRecord(
        function_id=row.function_id, version=row.version, state=VersionState(row.state),
        reason=row.reason, bundle_digest=row.bundle_digest, handler=row.handler,
        spec=spec_from_json(row.spec_json), start_mode=row.start_mode,
        snapshot_id=row.snapshot_id, snapshot_state=snapshot_state,
        snapshot_bytes=snap.stored_bytes if snap is not None and not row.snapshot_collected
        else 0,
        created_at=row.created_at, activated_at=row.activated_at,
        input_schema=row.input_schema or "")


def as_function(fn: FunctionRecord, v: VersionRecord) -> FunctionRecord:
    """The function as it will be once `v` is active (what a build or start of `v`
    is told about the function)."""
    return replace(fn, version=v.version, handler=v.handler, bundle_digest=v.bundle_digest,
                   spec=v.spec, start_mode=v.start_mode, snapshot_id=v.snapshot_id)


class VersionStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._schemas: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._schemas_lock = threading.Lock()  # read from the store's worker threads

    def _get_row(self, s: Session, function_id: str, version: int) -> models.FunctionVersion:
        row = s.scalar(select(models.FunctionVersion).where(
            models.FunctionVersion.function_id == function_id,
            models.FunctionVersion.version == version))
        if row is None:
            raise NotFound(f"no version {version} of this function", field="version")
        return row

    def _record(self, s: Session, row: models.FunctionVersion) -> VersionRecord:
        snap = s.get(models.Snapshot, row.snapshot_id) if row.snapshot_id else None
        return _version(row, snap)

    def _supersede_builds(self, s: Session, function_id: str, by: str) -> None:
        """At most one version of a function builds toward activation: an older build
        still running is recorded as superseded (its result is never activated)."""
        for row in s.scalars(select(models.FunctionVersion).where(
                models.FunctionVersion.function_id == function_id,
                models.FunctionVersion.state == VersionState.BUILDING.value)):
            move_row(row, VersionState.FAILED, "version")
            row.reason = f"superseded by {by}"

    def deploy(self, tenant: str, spec: FunctionSpec, bundle_digest: str,
               start_mode: str, build: bool, reason: str = ""
               ) -> tuple[FunctionRecord, VersionRecord]:
        """Record a new version. Returns the function row as it is now and the new
        version: BUILDING when it needs a snapshot build, else READY and already
        active (snapshots disabled: nothing to build)."""
        self.store.ensure_tenant(tenant)

        def tx(s: Session) -> tuple[FunctionRecord, VersionRecord]:
            now = time.time()
            fn = s.scalar(select(models.Function).where(
                models.Function.tenant_id == tenant, models.Function.name == spec.name))
            spec_json = json.dumps(spec.to_dict())
            if fn is None:
                fn = models.Function(
                    id=new_id("fn"), tenant_id=tenant, name=spec.name, version=0,
                    state=FunctionState.BUILDING.value, reason="", start_mode=start_mode,
                    handler=spec.handler, bundle_digest=bundle_digest, spec_json=spec_json)
                s.add(fn)
                s.flush()
                newest = 0
            else:
                newest = s.scalar(select(func.max(models.FunctionVersion.version)).where(
                    models.FunctionVersion.function_id == fn.id)) or 0
            number = max(newest, fn.version) + 1
            self._supersede_builds(s, fn.id, f"v{number}")
            row = models.FunctionVersion(
                id=new_id("ver"), function_id=fn.id, version=number,
                bundle_digest=bundle_digest, handler=spec.handler, spec_json=spec_json,
                start_mode=start_mode, reason=reason, created_at=now,
                state=(VersionState.BUILDING if build else VersionState.READY).value,
                activated_at=None if build else now)
            s.add(row)
            serving = fn.state == FunctionState.READY.value
            if not build or not serving:
                # Nothing serves (first deploy, failed or deleted before), or nothing
                # to build: the function is this version from now on.
                fn.version, fn.handler, fn.spec_json = number, spec.handler, spec_json
                fn.bundle_digest, fn.start_mode, fn.snapshot_id = bundle_digest, start_mode, None
                # A new version starts the row's lifecycle over (it may have been
                # deleted or failed before).
                set_row(fn, FunctionState.BUILDING if build else FunctionState.READY)
                fn.reason = reason
            s.flush()
            return _function(fn), _version(row, None)
        return self.store._tx(tx)

    def keep_unchanged(self, tenant: str, name: str, bundle_digest: str
                       ) -> FunctionRecord | None:
        """A redeploy of the bundle the function serves now (same digest: same files,
        thaw.toml included): the serving version is kept and nothing is recorded or
        built; a build of another version still running is superseded, since the
        tenant asked for what serves. None when it is a change (another digest, or
        the function is not serving: failed, building its first version, deleted)."""
        def tx(s: Session) -> FunctionRecord | None:
            fn = s.scalar(select(models.Function).where(
                models.Function.tenant_id == tenant, models.Function.name == name))
            if (fn is None or fn.state != FunctionState.READY.value
                    or fn.bundle_digest != bundle_digest):
                return None
            self._supersede_builds(s, fn.id, f"a redeploy of v{fn.version} (unchanged)")
            s.flush()
            return _function(fn)
        return self.store._tx(tx)

    def activate(self, function_id: str, version: int, *, start_mode: str,
                 reason: str = "", snapshot_id: str | None = None,
                 after_build: bool = True, input_schema: str | None = None
                 ) -> FunctionRecord | None:
        """Make `version` the serving one, in one transaction. After a build it must
        still be BUILDING (not superseded by a newer deploy or a rollback); returns
        None when it was superseded or the function was deleted meanwhile. A build
        passes the input schema it read (kept on the version, snapshot or not)."""
        def tx(s: Session) -> FunctionRecord | None:
            row = self._get_row(s, function_id, version)
            fn = s.get(models.Function, function_id)
            if fn is None or fn.state == FunctionState.DELETED.value:
                return None
            if after_build and row.state != VersionState.BUILDING.value:
                return None
            if not after_build:  # a rollback: a build still running must not switch later
                self._supersede_builds(s, function_id, f"a rollback to v{version}")
            move_row(row, VersionState.READY, "version")
            row.start_mode, row.reason = start_mode, reason
            if snapshot_id is not None:
                row.snapshot_id, row.snapshot_collected = snapshot_id, False
            if input_schema is not None:
                row.input_schema = input_schema
            row.activated_at = time.time()
            fn.version, fn.handler, fn.spec_json = row.version, row.handler, row.spec_json
            fn.bundle_digest, fn.start_mode = row.bundle_digest, row.start_mode
            fn.snapshot_id = row.snapshot_id if row.start_mode == "restore" else None
            move_row(fn, FunctionState.READY, "function")
            fn.reason = row.reason
            s.flush()
            return _function(fn)
        return self.store._tx(tx)

    def fail(self, function_id: str, version: int, reason: str) -> FunctionRecord | None:
        """The build of `version` failed: recorded on the version. The function fails
        with it only when nothing else serves (its row describes this version)."""
        def tx(s: Session) -> FunctionRecord | None:
            row = self._get_row(s, function_id, version)
            if row.state == VersionState.BUILDING.value:
                move_row(row, VersionState.FAILED, "version")
                row.reason = reason
            fn = s.get(models.Function, function_id)
            if fn is None:
                return None
            if fn.version == version and fn.state == FunctionState.BUILDING.value:
                move_row(fn, FunctionState.FAILED, "function")
                fn.reason = reason
            s.flush()
            return _function(fn)
        return self.store._tx(tx)

    def begin_rebuild(self, function_id: str, version: int) -> VersionRecord:
        """A rollback to a version whose snapshot is gone: it builds again (from its
        stored bundle) while the active version keeps serving."""
        def tx(s: Session) -> VersionRecord:
            row = self._get_row(s, function_id, version)
            self._supersede_builds(s, function_id, f"a rollback to v{version}")
            move_row(row, VersionState.BUILDING, "version")
            row.reason = ""
            row.snapshot_id, row.snapshot_collected = None, False
            s.flush()
            return self._record(s, row)
        return self.store._tx(tx)

    def fail_interrupted_builds(self) -> int:
        """After a scheduler restart no build is running: versions still BUILDING
        failed (and a function that was building its first version with them)."""
        reason = "the scheduler restarted during its build; deploy again"

        def tx(s: Session) -> int:
            rows = list(s.scalars(select(models.FunctionVersion).where(
                models.FunctionVersion.state == VersionState.BUILDING.value)))
            for row in rows:
                move_row(row, VersionState.FAILED, "version")
                row.reason = reason
                fn = s.get(models.Function, row.function_id)
                if (fn is not None and fn.version == row.version
                        and fn.state == FunctionState.BUILDING.value):
                    move_row(fn, FunctionState.FAILED, "function")
                    fn.reason = reason
            return len(rows)
        return self.store._tx(tx)

    def run_fresh(self, function_id: str, version: int, reason: str) -> None:
        """Its snapshot was quarantined: the version runs with fresh starts from now on
        (also after a rollback to it: no rebuild loop)."""
        def tx(s: Session) -> None:
            row = s.scalar(select(models.FunctionVersion).where(
                models.FunctionVersion.function_id == function_id,
                models.FunctionVersion.version == version))
            if row is not None:
                row.start_mode, row.reason = "fresh", reason
        self.store._tx(tx)

    def input_schema(self, function_id: str, version: int) -> str:
        """The input schema `version`'s build read; "" for none (or no such version)."""
        key = (function_id, version)
        with self._schemas_lock:
            cached = self._schemas.get(key)
            if cached is not None:
                self._schemas.move_to_end(key)
                return cached

        def tx(s: Session) -> tuple[str, str]:
            row = s.execute(select(models.FunctionVersion.input_schema,
                                   models.FunctionVersion.state).where(
                models.FunctionVersion.function_id == function_id,
                models.FunctionVersion.version == version)).first()
            return ("", "") if row is None else (row[0] or "", row[1])
        schema, state = self.store._tx(tx)
        if state == VersionState.READY.value:
            with self._schemas_lock:
                self._schemas[key] = schema
                while len(self._schemas) > SCHEMA_CACHE_ENTRIES:
                    self._schemas.popitem(last=False)
        return schema

    def learn_input_schema(self, function_id: str, version: int, schema: str) -> bool:
        """Keep the input schema a fresh start of `version` reported when the version
        has none (one that is never built, `snapshot = false`, learns it from its
        first start); True when kept. A schema it has already is never replaced."""
        if not schema or self.input_schema(function_id, version):
            return False

        def tx(s: Session) -> bool:
            row = s.scalar(select(models.FunctionVersion).where(
                models.FunctionVersion.function_id == function_id,
                models.FunctionVersion.version == version))
            if row is None or row.input_schema:
                return False
            row.input_schema = schema
            return True
        kept = self.store._tx(tx)
        with self._schemas_lock:  # the cache held "" for it
            self._schemas.pop((function_id, version), None)
        return kept

    def get(self, function_id: str, version: int) -> VersionRecord:
        def tx(s: Session) -> VersionRecord:
            return self._record(s, self._get_row(s, function_id, version))
        return self.store._tx(tx)

    def all(self, function_id: str) -> list[VersionRecord]:
        """Newest first."""
        def tx(s: Session) -> list[VersionRecord]:
            rows = s.execute(
                select(models.FunctionVersion, models.Snapshot)
                .outerjoin(models.Snapshot,
                           models.Snapshot.id == models.FunctionVersion.snapshot_id)
                .where(models.FunctionVersion.function_id == function_id)
                .order_by(models.FunctionVersion.version.desc()))
            return [_version(v, snap) for v, snap in rows]
        return self.store._tx(tx)

    def latest(self, function_id: str) -> VersionRecord | None:
        def tx(s: Session) -> VersionRecord | None:
            row = s.scalar(select(models.FunctionVersion)
                           .where(models.FunctionVersion.function_id == function_id)
                           .order_by(models.FunctionVersion.version.desc()).limit(1))
            return None if row is None else self._record(s, row)
        return self.store._tx(tx)

    def retained_manifests(self, keep: int = RETAINED_VERSIONS) -> list[bytes]:
        """Manifests of the ready snapshots of retained versions: per function not
        deleted, the active version's and those of the `keep` most recent other ready
        versions. Every other version's snapshot is marked collected (the caller has
        the nodes drop it), so a rollback to it knows to rebuild."""
        def tx(s: Session) -> list[bytes]:
            rows = s.execute(
                select(models.FunctionVersion, models.Function, models.Snapshot)
                .join(models.Function, models.Function.id == models.FunctionVersion.function_id)
                .join(models.Snapshot, models.Snapshot.id == models.FunctionVersion.snapshot_id)
                .where(models.FunctionVersion.snapshot_collected.is_(False),
                       models.FunctionVersion.state == VersionState.READY.value)
                .order_by(models.FunctionVersion.function_id,
                          models.FunctionVersion.version.desc()))
            kept: list[bytes] = []
            others: dict[str, int] = {}
            for version, fn, snap in rows:
                active = (fn.snapshot_id == version.snapshot_id
                          and fn.state != FunctionState.DELETED.value)
                if not active and fn.state != FunctionState.DELETED.value:
                    others[fn.id] = others.get(fn.id, 0) + 1
                    retained = others[fn.id] <= keep
                else:
                    retained = active
                if not retained:
                    version.snapshot_collected = True
                elif snap.state == SnapshotState.READY.value and snap.manifest:
                    kept.append(snap.manifest)
            return kept
        return self.store._tx(tx)
