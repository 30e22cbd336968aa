"""The webhook deny list (gateway/stored/targets.py): literal addresses, names through
an injected resolver (no real DNS), the operator's allow-list, and refusals that say
only "not allowed"."""

from __future__ import annotations

import asyncio

import pytest

from thaw.core.config import GatewayConfig
from thaw.core.errors import InvalidArgument
from thaw.gateway.stored.targets import (
    NOT_ALLOWED,
    Target,
    WebhookGuard,
    WebhookNotAllowed,
)

PUBLIC_V4 = "93.184.215.14"
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"

DENIED_LITERALS = [
    "127.0.0.1", "127.8.9.10", "0.0.0.0", "10.1.2.3", "172.16.0.1", "192.168.1.1",
    "169.254.169.254", "169.254.1.1", "100.64.0.1", "100.100.100.200", "224.0.0.1",
    "239.255.255.250", "255.255.255.255", "192.0.2.1", "198.18.0.1", "240.0.0.1",
    "[::1]", "[::]", "[fe80::1]", "[fc00::1]", "[fd00:ec2::254]", "[ff02::1]",
    "[2001:db8::1]",
    # IPv4 written as IPv6: mapped, compatible, NAT64, 6to4, Teredo.
    "[::ffff:127.0.0.1]", "[::ffff:169.254.169.254]", "[::ffff:10.0.0.1]",
    "[::127.0.0.1]", "[64:ff9b::127.0.0.1]", "[64:ff9b::a9fe:a9fe]",
    "[2002:7f00:1::]", "[2002:a9fe:a9fe::1]",
    # Teredo whose client (last 32 bits, inverted) is 127.0.0.1.
    "[2001:0:4136:e378:8000:63bf:80ff:fffe]",
]


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def resolver_of(table: dict[str, list[str]]) -> object:
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        if host not in table:
            raise OSError("no such host")
        return table[host]
    resolve.asked = asked  # type: ignore[attr-defined]
    return resolve


def no_dns() -> object:
    async def resolve(host: str, port: int) -> list[str]:
        raise AssertionError(f"a literal address was resolved: {host}")
    return resolve


@pytest.mark.parametrize("host", DENIED_LITERALS)
def test_literal_addresses_on_the_deny_list_are_refused(host: str) -> None:
    guard = WebhookGuard(resolver=no_dns())  # type: ignore[arg-type]
    with pytest.raises(WebhookNotAllowed) as caught:
        run(guard.check(f"http://{host}:8080/hook"))
    assert caught.value.message == NOT_ALLOWED
    assert caught.value.field == "X-Thaw-Webhook"
    assert isinstance(caught.value, InvalidArgument)  # 400


@pytest.mark.parametrize("host", [PUBLIC_V4, f"[{PUBLIC_V6}]", "8.8.8.8",
                                  "[2002:808:808::1]"])
def test_public_literals_are_allowed_and_delivered_to_as_checked(host: str) -> None:
    guard = WebhookGuard(resolver=no_dns())  # type: ignore[arg-type]
    target = run(guard.check(f"https://{host}/hook?x=1"))
    assert isinstance(target, Target)
    assert target.address == host.strip("[]") and target.port == 443


def test_a_name_is_resolved_and_every_address_must_pass() -> None:
    resolve = resolver_of({"hooks.example": [PUBLIC_V4, PUBLIC_V6],
                           "mixed.example": [PUBLIC_V4, "10.0.0.7"],
                           "metadata.example": ["169.254.169.254"],
                           "inside.example": ["::ffff:192.168.0.1"],
                           # Shorthand IPv4 (decimal, octal) is a name to the URL
                           # parser; the system resolver answers it as the address.
                           "2130706433": ["127.0.0.1"], "0177.1": ["127.0.0.1"]})
    guard = WebhookGuard(resolver=resolve)  # type: ignore[arg-type]
    target = run(guard.check("https://Hooks.Example:8443/in"))
    assert isinstance(target, Target)
    assert (target.host, target.port, target.address) == ("hooks.example", 8443, PUBLIC_V4)
    assert str(target.connect_url) == f"https://{PUBLIC_V4}:8443/in"
    assert target.host_header == "hooks.example:8443"
    for name in ("mixed.example", "metadata.example", "inside.example", "unknown.example",
                 "2130706433", "0177.1"):
        with pytest.raises(WebhookNotAllowed) as caught:
            run(guard.check(f"http://{name}/hook"))
        # The same words whether the name resolved or not, whatever the rule.
        assert caught.value.message == NOT_ALLOWED


def test_a_resolver_that_hangs_is_refused_not_waited_for(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr("thaw.gateway.stored.targets.RESOLVE_TIMEOUT_SECONDS", 0.01)

    async def hang(host: str, port: int) -> list[str]:
        await asyncio.Event().wait()
        return []
    with pytest.raises(WebhookNotAllowed):
        run(WebhookGuard(resolver=hang).check("http://slow.example/hook"))


def test_the_operator_allow_list_lets_hosts_and_networks_through() -> None:
    resolve = resolver_of({"hooks.corp": ["10.8.0.5"], "other.corp": ["10.9.0.5"],
                           "meta.corp": ["169.254.169.254"]})
    allow = GatewayConfig.load(flags={"webhook_allow": "127.0.0.1, 10.8.0.0/16, Meta.Corp"}
                               ).webhook_allow
    assert allow == ["127.0.0.1/32", "10.8.0.0/16", "meta.corp"]
    guard = WebhookGuard(allow, resolver=resolve)  # type: ignore[arg-type]
    for url in ("http://127.0.0.1:9000/hook", "http://[::ffff:127.0.0.1]:9000/hook",
                "http://hooks.corp/hook"):
        assert isinstance(run(guard.check(url)), Target), url
    for url in ("http://127.0.0.2/hook", "http://other.corp/hook", "http://[::1]/hook",
                # Metadata endpoints stay refused even by name on the allow-list.
                "http://meta.corp/hook", "http://169.254.169.254/latest/meta-data"):
        with pytest.raises(WebhookNotAllowed):
            run(guard.check(url))
    # A name allowed by the operator is trusted whatever it resolves to.
    named = WebhookGuard(["hooks.corp"], resolver=resolver_of(  # type: ignore[arg-type]
        {"hooks.corp": ["192.168.7.7"]}))
    assert isinstance(run(named.check("http://hooks.corp/x")), Target)


def test_allow_list_entries_are_checked_when_the_gateway_loads() -> None:
    with pytest.raises(InvalidArgument) as caught:
        GatewayConfig.load(flags={"webhook_allow": "10.0.0.0/33"})
    assert caught.value.field == "webhook_allow"
    with pytest.raises(InvalidArgument):
        GatewayConfig.load(flags={"webhook_allow": "not a host"})
    assert GatewayConfig.load(flags={"webhook_allow": ""}).webhook_allow == []


@pytest.mark.parametrize("url", ["ftp://8.8.8.8/x", "http:///x", "8.8.8.8/x",
                                 "http://[oops/x", "http://8.8.8.8:99999/x"])
def test_urls_that_are_not_http_to_a_host_are_refused(url: str) -> None:
    with pytest.raises(WebhookNotAllowed):
        run(WebhookGuard(resolver=no_dns()).check(url))  # type: ignore[arg-type]


def test_ipv6_targets_are_bracketed_for_the_connection_and_host_header() -> None:
    guard = WebhookGuard(resolver=resolver_of(  # type: ignore[arg-type]
        {"v6.example": [PUBLIC_V6]}))
    target = run(guard.check("http://v6.example/hook"))
    assert isinstance(target, Target)
    assert str(target.connect_url) == f"http://[{PUBLIC_V6}]/hook"
    assert target.host_header == "v6.example"
    literal = run(guard.check(f"http://[{PUBLIC_V6}]:8080/hook"))
    assert isinstance(literal, Target)
    assert literal.host_header == f"[{PUBLIC_V6}]:8080"


def test_only_callers_with_a_key_may_ask_for_a_webhook() -> None:
    from thaw.core.errors import PermissionDenied
    from thaw.gateway.stored.submit import check_webhook, refuse_anonymous_webhook
    from thaw.proto import scheduler_pb2

    anonymous = scheduler_pb2.Principal(tenant="acme", key_id="", scopes=["invoke"])
    keyed = scheduler_pb2.Principal(tenant="acme", key_id="key_1", scopes=["invoke"])
    with pytest.raises(PermissionDenied) as caught:
        refuse_anonymous_webhook(anonymous, "https://hooks.example/in")
    assert caught.value.field == "X-Thaw-Webhook"
    refuse_anonymous_webhook(anonymous, "")  # no webhook asked: nothing to refuse
    refuse_anonymous_webhook(keyed, "https://hooks.example/in")
    guard = WebhookGuard(resolver=no_dns())  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied):  # refused before any lookup
        run(check_webhook(anonymous, f"https://{PUBLIC_V4}/in", guard))
    run(check_webhook(keyed, f"https://{PUBLIC_V4}/in", guard))
    with pytest.raises(WebhookNotAllowed):
        run(check_webhook(keyed, "http://127.0.0.1/in", guard))
