"""The Secrets service at the control plane: a new value retires the live instances of
the functions using it (and a start under way once it joins), a first value retires
nothing, deletion is refused while used unless forced; a start's FunctionSpec gets the
current values and a missing one fails it naming the secret."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any

import pytest

from thaw.core.errors import InvalidArgument
from thaw.core.spec import FunctionSpec
from thaw.proto import agent_pb2, secrets_pb2
from thaw.scheduler.pools import FunctionPool, InstanceView
from thaw.scheduler.secrets import SecretBox, SecretStore
from thaw.scheduler.secrets_delivery import check_secrets_exist, with_secrets
from thaw.scheduler.secrets_service import SecretsService
from thaw.scheduler.states import InstanceState
from thaw.scheduler.store import Store


@dataclass
class Fn:
    id: str
    name: str
    spec: FunctionSpec
    tenant: str = "acme"


@dataclass
class FakeInstances:
    retired: list[tuple[str, str]] = field(default_factory=list)

    def retire(self, pool: FunctionPool, inst: InstanceView, reason: str) -> None:
        inst.move(InstanceState.STOPPING, reason)
        self.retired.append((inst.id, reason))


@dataclass
class FakeState:
    placing: dict[str, tuple[str, str]] = field(default_factory=dict)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    secrets: SecretStore | None = None
    store: Store | None = None

    def spawn(self, coro: Any) -> None:
        self.tasks.append(asyncio.ensure_future(coro))


class FakeControl:
    def __init__(self, functions: list[Fn]) -> None:
        self.functions = functions
        self.pools: dict[str, FunctionPool] = {}
        self.instances = FakeInstances()
        self.state = FakeState()

    async def list_functions(self, tenant: str) -> list[Fn]:
        return [f for f in self.functions if f.tenant == tenant]


def instance(fn: Fn, n: int, state: InstanceState = InstanceState.READY) -> InstanceView:
    return InstanceView(id=f"{fn.name}-{n}", function_id=fn.id, version=1, node_id="n1",
                        start="restore", gpu_memory=0, state=state)


def spec(name: str, *names: str) -> FunctionSpec:
    return FunctionSpec(name=name, handler="app:H", secrets=tuple(names))


@pytest.fixture
def vault(store: Store) -> SecretStore:
    return SecretStore(store, SecretBox(secrets.token_bytes(32)))


async def test_a_new_value_retires_the_instances_using_it(vault: SecretStore) -> None:
    chat, other = Fn("f1", "chat", spec("chat", "TOKEN")), Fn("f2", "plain", spec("plain"))
    control = FakeControl([chat, other])
    service = SecretsService(vault, control)  # type: ignore[arg-type]
    pools = {fn.id: FunctionPool(fn.id, name=fn.name) for fn in (chat, other)}
    control.pools.update(pools)
    for fn in (chat, other):
        pools[fn.id].instances[f"{fn.name}-1"] = instance(fn, 1)
    pools[chat.id].instances["chat-2"] = instance(chat, 2, InstanceState.STOPPING)

    first = await service.Set(secrets_pb2.SetSecretRequest(
        tenant="acme", name="TOKEN", value="one"), None)  # type: ignore[arg-type]
    assert (list(first.functions), first.drained) == (["chat"], 0)
    assert control.instances.retired == []

    control.state.placing["chat-3"] = (chat.id, "n1")  # a start under way
    second = await service.Set(secrets_pb2.SetSecretRequest(
        tenant="acme", name="TOKEN", value="two"), None)  # type: ignore[arg-type]
    assert (list(second.functions), second.drained, second.info.version) == (
        ["chat"], 2, 2)
    assert [i for i, _ in control.instances.retired] == ["chat-1"]
    assert "secret TOKEN was set to a new value" in control.instances.retired[0][1]
    # The start under way joins its pool later: retired then.
    joined = instance(chat, 3)
    pools[chat.id].instances["chat-3"] = joined
    pools[chat.id].changed.fire()
    await asyncio.wait_for(asyncio.gather(*control.state.tasks), 5)
    assert [i for i, _ in control.instances.retired] == ["chat-1", "chat-3"]
    assert pools[other.id].instances["plain-1"].ready


async def test_delete_is_refused_while_used_unless_forced(vault: SecretStore) -> None:
    control = FakeControl([Fn("f1", "chat", spec("chat", "TOKEN"))])
    service = SecretsService(vault, control)  # type: ignore[arg-type]
    vault.set_value("acme", "TOKEN", "v")
    refused = await service.Delete(secrets_pb2.DeleteSecretRequest(
        tenant="acme", name="TOKEN"), None)  # type: ignore[arg-type]
    assert (refused.deleted, list(refused.used_by)) == (False, ["chat"])
    assert vault.missing("acme", ["TOKEN"]) == []
    forced = await service.Delete(secrets_pb2.DeleteSecretRequest(
        tenant="acme", name="TOKEN", force=True), None)  # type: ignore[arg-type]
    assert (forced.deleted, list(forced.used_by)) == (True, ["chat"])
    listed = await service.List(secrets_pb2.ListSecretsRequest(tenant="acme"),
                                None)  # type: ignore[arg-type]
    assert list(listed.secrets) == []


async def test_starts_get_current_values_and_fail_naming_a_missing_one(
        vault: SecretStore, store: Store) -> None:
    state = FakeState(secrets=vault, store=store)
    fn = Fn("f1", "chat", spec("chat", "TOKEN", "OTHER"))
    with pytest.raises(InvalidArgument, match="secrets TOKEN, OTHER") as missing:
        await check_secrets_exist(state, "acme", fn.spec.secrets)  # type: ignore[arg-type]
    assert missing.value.field == "secrets"
    vault.set_value("acme", "TOKEN", "t1")
    vault.set_value("acme", "OTHER", "o1")
    await check_secrets_exist(state, "acme", fn.spec.secrets)  # type: ignore[arg-type]
    message = await with_secrets(state, fn, agent_pb2.FunctionSpec(  # type: ignore[arg-type]
        name="chat", env={"MODE": "x"}))
    assert dict(message.secrets) == {"TOKEN": "t1", "OTHER": "o1"}
    vault.set_value("acme", "TOKEN", "t2")
    again = await with_secrets(state, fn, agent_pb2.FunctionSpec(  # type: ignore[arg-type]
        name="chat"))
    assert again.secrets["TOKEN"] == "t2"
    vault.delete("acme", "OTHER")
    with pytest.raises(InvalidArgument, match="secret OTHER that tenant 'acme'"):
        await with_secrets(state, fn, agent_pb2.FunctionSpec(name="chat"))  # type: ignore[arg-type]
    plain = Fn("f2", "plain", spec("plain"))
    untouched = await with_secrets(FakeState(), plain,  # type: ignore[arg-type]
                                   agent_pb2.FunctionSpec(name="plain"))
    assert dict(untouched.secrets) == {}
