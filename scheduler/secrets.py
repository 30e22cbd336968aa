"""Each tenant's secrets (`thaw secret set NAME`), encrypted at rest in the metadata DB.

A value is sealed with AES-256-GCM under the scheduler's secrets key, with the tenant
and the name as associated data: a ciphertext copied to another row (or tenant) does
not open there. The key comes from THAW_SECRETS_KEY (base64 of 32 bytes), else from
`<home>/scheduler/secrets.key`, made once (mode 0600) the first time the scheduler
starts. Whoever has the DB and not the key has only ciphertexts.

Values leave the scheduler in one place only: the FunctionSpec of a build or an
instance start (`values`), over the mutual-TLS channel to the agent. Listing gives
names and times, never values; nothing here logs a value.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets as token
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Float, Integer, LargeBinary, String, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from thaw.core.errors import InvalidArgument, NotFound, QuotaExceeded, ThawError
from thaw.core.spec import check_env_name
from thaw.scheduler.models import Base
from thaw.scheduler.store import Store
from thaw.scheduler.tenancy import check_tenant_id

KEY_ENV = "THAW_SECRETS_KEY"
KEY_FILE = "secrets.key"
KEY_BYTES = 32
NONCE_BYTES = 12
# The first byte of every stored ciphertext: how the rest is laid out (nonce, then
# AES-GCM's output). A later scheme gets a new byte; rows of this one still open.
SCHEME_AESGCM = 1
MAX_SECRET_BYTES = 64 * 1024
"""Largest value (UTF-8 bytes); an environment variable of an instance holds it."""
MAX_SECRETS_PER_TENANT = 100


class Secret(Base):
    """One secret of a tenant: its value sealed (see the module), its times and how
    many times it was set (migration 0009)."""

    __tablename__ = "secrets"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    version: Mapped[int] = mapped_column(Integer)


@dataclass(frozen=True)
class SecretInfo:
    """What may be shown of a secret: never its value."""

    name: str
    created_at: float
    updated_at: float
    version: int


class SecretKeyError(ThawError):
    """The secrets key is missing, malformed, or not the one the values were sealed with."""

    code = "secrets_key"


def decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SecretKeyError(f"{where} is not base64: {exc}", field=where) from exc
    if len(key) != KEY_BYTES:
        raise SecretKeyError(f"{where} must be {KEY_BYTES} bytes (base64), got {len(key)}",
                             field=where)
    return key


def load_key(home: Path, env: Mapping[str, str] = os.environ) -> bytes:
    """The secrets key: THAW_SECRETS_KEY, else `<home>/scheduler/secrets.key`, made
    (0600, exclusively: two schedulers starting at once keep one key) when missing."""
    given = env.get(KEY_ENV, "")
    if given:
        return decode_key(given, KEY_ENV)
    path = home / "scheduler" / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.b64encode(token.token_bytes(KEY_BYTES)).decode() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    if path.stat().st_mode & 0o077:
        raise SecretKeyError(f"{path} must be readable by its owner only (chmod 600)",
                             field=str(path))
    return decode_key(path.read_text(), str(path))


def check_secret_name(name: str) -> str:
    try:
        return check_env_name(name, "a secret's name")
    except ValueError as exc:
        raise InvalidArgument(str(exc), field="name") from exc


def check_secret_value(value: str) -> bytes:
    """The value as UTF-8, within bounds; an environment variable cannot hold NUL."""
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument("a secret's value must be valid Unicode text",
                              field="value") from exc
    if len(data) > MAX_SECRET_BYTES:
        raise InvalidArgument(f"a secret's value is at most {MAX_SECRET_BYTES} bytes, got "
                              f"{len(data)}", field="value")
    if b"\0" in data:
        raise InvalidArgument("a secret's value cannot contain a NUL character (it is "
                              "passed as an environment variable)", field="value")
    return data


class SecretBox:
    """Seals and opens values under one key, bound to their tenant and name."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise SecretKeyError(f"the secrets key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    @staticmethod
    def _bound_to(tenant: str, name: str) -> bytes:
        return f"thaw-secret\0{tenant}\0{name}".encode()

    def seal(self, tenant: str, name: str, plain: bytes) -> bytes:
        nonce = token.token_bytes(NONCE_BYTES)
        return (bytes([SCHEME_AESGCM]) + nonce
                + self._aead.encrypt(nonce, plain, self._bound_to(tenant, name)))

    def open(self, tenant: str, name: str, sealed: bytes) -> str:
        if len(sealed) < 1 + NONCE_BYTES or sealed[0] != SCHEME_AESGCM:
            raise SecretKeyError(f"secret {name!r} is stored in an unknown form",
                                 field=name)
        nonce, body = sealed[1:1 + NONCE_BYTES], sealed[1 + NONCE_BYTES:]
        try:
            plain = self._aead.decrypt(nonce, body, self._bound_to(tenant, name))
        except InvalidTag as exc:
            raise SecretKeyError(
                f"secret {name!r} does not open with this scheduler's key (was "
                f"{KEY_ENV} or {KEY_FILE} changed?); set it again", field=name) from exc
        return plain.decode("utf-8")


def _info(row: Secret) -> SecretInfo:
    return SecretInfo(row.name, row.created_at, row.updated_at, row.version)


class SecretStore:
    """The secrets table; every method blocks (run it through `store.run`)."""

    def __init__(self, store: Store, box: SecretBox,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.box = box
        self.clock = clock

    def set_value(self, tenant: str, name: str, value: str) -> SecretInfo:
        """Create or replace; QuotaExceeded past MAX_SECRETS_PER_TENANT."""
        check_tenant_id(tenant)
        check_secret_name(name)
        sealed = self.box.seal(tenant, name, check_secret_value(value))
        now = self.clock()

        def tx(s: Session) -> SecretInfo:
            row = s.get(Secret, (tenant, name))
            if row is None:
                count = s.scalar(select(func.count()).select_from(Secret)
                                 .where(Secret.tenant_id == tenant)) or 0
                if count >= MAX_SECRETS_PER_TENANT:
                    raise QuotaExceeded(f"a tenant keeps at most {MAX_SECRETS_PER_TENANT} "
                                        "secrets; remove one first (thaw secret rm)",
                                        field="name")
                row = Secret(tenant_id=tenant, name=name, ciphertext=sealed,
                             created_at=now, updated_at=now, version=1)
                s.add(row)
            else:
                row.ciphertext = sealed
                row.updated_at = now
                row.version += 1
            s.flush()
            return _info(row)
        return self.store._tx(tx)

    def list_names(self, tenant: str) -> list[SecretInfo]:
        check_tenant_id(tenant)

        def tx(s: Session) -> list[SecretInfo]:
            rows = s.scalars(select(Secret).where(Secret.tenant_id == tenant)
                             .order_by(Secret.name))
            return [_info(r) for r in rows]
        return self.store._tx(tx)

    def delete(self, tenant: str, name: str) -> SecretInfo:
        check_tenant_id(tenant)
        check_secret_name(name)

        def tx(s: Session) -> SecretInfo:
            row = s.get(Secret, (tenant, name))
            if row is None:
                raise NotFound(f"tenant {tenant!r} has no secret {name!r}", field="name")
            info = _info(row)
            s.delete(row)
            return info
        return self.store._tx(tx)

    def missing(self, tenant: str, names: Iterable[str]) -> list[str]:
        """Which of `names` the tenant has no secret of, in the order given."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return []

        def tx(s: Session) -> set[str]:
            return set(s.scalars(select(Secret.name).where(
                Secret.tenant_id == tenant, Secret.name.in_(wanted))))
        have = self.store._tx(tx)
        return [n for n in wanted if n not in have]

    def values(self, tenant: str, names: Iterable[str]) -> dict[str, str]:
        """The current values of `names`; InvalidArgument naming those that are gone."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}

        def tx(s: Session) -> dict[str, bytes]:
            rows = s.scalars(select(Secret).where(Secret.tenant_id == tenant,
                                                  Secret.name.in_(wanted)))
            return {r.name: r.ciphertext for r in rows}
        sealed = self.store._tx(tx)
        gone = [n for n in wanted if n not in sealed]
        if gone:
            raise missing_secrets(tenant, gone)
        return {n: self.box.open(tenant, n, sealed[n]) for n in wanted}


def missing_secrets(tenant: str, names: list[str]) -> InvalidArgument:
    listed = ", ".join(names)
    return InvalidArgument(
        f"thaw.toml names secret{'s' if len(names) > 1 else ''} {listed} that tenant "
        f"{tenant!r} does not have: set {'them' if len(names) > 1 else 'it'} first "
        f"(thaw secret set NAME)", field="secrets")


def open_secret_store(store: Store, home: Path,
                      env: Mapping[str, str] = os.environ) -> SecretStore:
    """The scheduler's secret store, with its key loaded (or made) from `home`."""
    return SecretStore(store, SecretBox(load_key(home, env)))
