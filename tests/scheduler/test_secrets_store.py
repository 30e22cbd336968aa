"""The secret store: values sealed at rest (bound to tenant and name), bounds, the key
from the environment or a 0600 file, and a wrong key refused clearly."""

from __future__ import annotations

import base64
import os
import secrets
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from thaw.core.errors import InvalidArgument, NotFound, QuotaExceeded
from thaw.scheduler.secrets import (
    KEY_ENV,
    MAX_SECRET_BYTES,
    MAX_SECRETS_PER_TENANT,
    SecretBox,
    SecretKeyError,
    SecretStore,
    load_key,
)
from thaw.scheduler.store import Store


def new_store(store: Store, key: bytes | None = None) -> SecretStore:
    return SecretStore(store, SecretBox(key or secrets.token_bytes(32)))


def raw_rows(store: Store) -> list[tuple[str, str, bytes]]:
    with store._session() as s:
        return [(r[0], r[1], bytes(r[2])) for r in s.execute(text(
            "SELECT tenant_id, name, ciphertext FROM secrets ORDER BY tenant_id, name"))]


def test_values_are_sealed_at_rest_and_open_with_the_key(store: Store) -> None:
    vault = new_store(store)
    value = "tok-" + secrets.token_hex(16)
    first = vault.set_value("acme", "API_TOKEN", value)
    assert (first.name, first.version) == ("API_TOKEN", 1)
    [(tenant, name, sealed)] = raw_rows(store)
    assert (tenant, name) == ("acme", "API_TOKEN")
    assert value.encode() not in sealed and value[4:].encode() not in sealed
    assert vault.values("acme", ["API_TOKEN"]) == {"API_TOKEN": value}
    again = vault.set_value("acme", "API_TOKEN", "second")
    assert again.version == 2 and again.created_at == first.created_at
    assert vault.values("acme", ("API_TOKEN",)) == {"API_TOKEN": "second"}
    assert [i.name for i in vault.list_names("acme")] == ["API_TOKEN"]
    assert vault.list_names("other") == []


def test_a_ciphertext_moved_to_another_name_or_tenant_does_not_open(store: Store) -> None:
    vault = new_store(store)
    vault.set_value("acme", "A", "alpha")
    vault.set_value("acme", "B", "beta")
    vault.set_value("evil", "A", "mine")
    with store._session() as s, s.begin():
        s.execute(text("UPDATE secrets SET ciphertext = (SELECT ciphertext FROM secrets "
                       "WHERE tenant_id = 'acme' AND name = 'A') "
                       "WHERE (tenant_id = 'acme' AND name = 'B') "
                       "OR (tenant_id = 'evil' AND name = 'A')"))
    with pytest.raises(SecretKeyError, match="'B' does not open"):
        vault.values("acme", ["B"])
    with pytest.raises(SecretKeyError, match="'A' does not open"):
        vault.values("evil", ["A"])


def test_a_wrong_key_is_refused_naming_the_secret(store: Store) -> None:
    new_store(store).set_value("acme", "TOKEN", "x")
    with pytest.raises(SecretKeyError, match="TOKEN.*does not open.*THAW_SECRETS_KEY"):
        new_store(store).values("acme", ["TOKEN"])


def test_bounds_and_names(store: Store) -> None:
    vault = new_store(store)
    vault.set_value("acme", "BIG", "x" * MAX_SECRET_BYTES)
    with pytest.raises(InvalidArgument, match="at most 65536 bytes") as big:
        vault.set_value("acme", "BIG", "x" * (MAX_SECRET_BYTES + 1))
    assert big.value.field == "value"
    with pytest.raises(InvalidArgument, match="NUL"):
        vault.set_value("acme", "NUL", "a\0b")
    for bad in ("1ABC", "A-B", "THAW_X", "LD_PRELOAD", "PATH", "", "x" * 129):
        with pytest.raises(InvalidArgument) as named:
            vault.set_value("acme", bad, "v")
        assert named.value.field == "name"
    for i in range(MAX_SECRETS_PER_TENANT - 1):
        vault.set_value("acme", f"S{i}", "v")
    with pytest.raises(QuotaExceeded, match=f"at most {MAX_SECRETS_PER_TENANT}"):
        vault.set_value("acme", "ONE_MORE", "v")
    vault.set_value("acme", "S0", "replacing one is no new secret")
    vault.set_value("other", "ONE_MORE", "another tenant has its own count")


def test_missing_values_and_delete(store: Store) -> None:
    vault = new_store(store)
    vault.set_value("acme", "A", "a")
    assert vault.missing("acme", ["A", "B", "C", "B"]) == ["B", "C"]
    with pytest.raises(InvalidArgument, match="secrets B, C that tenant 'acme'") as gone:
        vault.values("acme", ["A", "B", "C"])
    assert gone.value.field == "secrets"
    assert vault.delete("acme", "A").name == "A"
    with pytest.raises(NotFound, match="no secret 'A'"):
        vault.delete("acme", "A")
    assert vault.missing("acme", ["A"]) == ["A"]


def test_key_from_the_environment_or_a_private_file(tmp_path: Path) -> None:
    key = secrets.token_bytes(32)
    assert load_key(tmp_path, {KEY_ENV: base64.b64encode(key).decode()}) == key
    assert not (tmp_path / "scheduler" / "secrets.key").exists()
    with pytest.raises(SecretKeyError, match="32 bytes"):
        load_key(tmp_path, {KEY_ENV: base64.b64encode(b"short").decode()})
    with pytest.raises(SecretKeyError, match="not base64"):
        load_key(tmp_path, {KEY_ENV: "not base64!"})
    made = load_key(tmp_path, {})
    path = tmp_path / "scheduler" / "secrets.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(made) == 32
    assert load_key(tmp_path, {}) == made  # made once, then read
    os.chmod(path, 0o644)
    with pytest.raises(SecretKeyError, match="owner only"):
        load_key(tmp_path, {})
