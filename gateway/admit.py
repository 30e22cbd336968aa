"""Admission at the edge: who is calling, allowed to invoke, within the key's rate;
and the dispatch `Call` built from an admitted request."""

from __future__ import annotations

from aiohttp import web

from thaw.core.priority import PRIORITY_DEFAULT
from thaw.gateway.auth import require
from thaw.gateway.caller import principal_of
from thaw.gateway.dispatch import Call
from thaw.gateway.state import PRINCIPAL_KEY, RECEIVED_KEY, REQUEST_ID_KEY, Gateway
from thaw.gateway.tenancy import anonymous_principal
from thaw.proto import scheduler_pb2


async def admit(request: web.Request, gw: Gateway) -> scheduler_pb2.Principal:
    """Who is calling, allowed to invoke, within the key's rate and budgets."""
    if "Authorization" not in request.headers:
        # A public function's URL needs no key (rate-limited by client address).
        anonymous = await anonymous_principal(request, gw)
        if anonymous is not None:
            return anonymous
    p = await principal_of(request)
    require(p, "invoke")
    await gw.limiter.admit(p)
    request[PRINCIPAL_KEY] = p
    return p


def new_call(request: web.Request, tenant: str, name: str, path: str, body: bytes,
             headers: dict[str, str], timeout: float | None,
             priority: int = PRIORITY_DEFAULT) -> Call:
    """The call to dispatch for an admitted request."""
    p = request.get(PRINCIPAL_KEY)
    return Call(tenant=tenant, name=name, path=path, body=body, headers=headers,
                request_id=request[REQUEST_ID_KEY], timeout=timeout,
                received=request[RECEIVED_KEY], key_id=p.key_id if p is not None else "",
                priority=priority)
