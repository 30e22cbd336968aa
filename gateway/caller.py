"""Who is calling: a request's principal (its API key, checked by auth.py, failed logins
counted against its client address) and what its scopes let it read beyond the
route's own check.

- Stored invocations: a key with `deploy` or `admin` reads all of its tenant's; an
  invoke-only key reads only those it made itself (another key's is not found, as if
  it did not exist, so ids cannot be probed).
- Logs (function logs and anything else of an instance's output): `deploy` or
  `admin` only; an invoke-only key gets 403.
"""

from __future__ import annotations

from aiohttp import web

from thaw.core.errors import NotFound, PermissionDenied, ThawError
from thaw.gateway.state import GATEWAY_KEY
from thaw.proto import invocations_pb2, scheduler_pb2

# A request's authentication, done once however many layers ask (the audit middleware
# and the route): the principal, or the error it got.
_OUTCOME_KEY = web.RequestKey("auth_outcome", object)
READ_ALL_SCOPES = frozenset({"deploy", "admin"})


def client_address(request: web.Request, trust_forwarded_for: bool) -> str:
    """The caller's address: X-Forwarded-For's first entry when the gateway is told to
    trust it (behind a proxy), else the TCP peer."""
    if trust_forwarded_for:
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
        if forwarded:
            return forwarded
    return request.remote or ""


async def principal_of(request: web.Request) -> scheduler_pb2.Principal:
    """The principal of the request's `Authorization: Bearer <key>`."""
    outcome = request.get(_OUTCOME_KEY)
    if outcome is None:
        gw = request.app[GATEWAY_KEY]
        try:
            outcome = await gw.auth.principal(
                request.headers.get("Authorization", ""),
                client_address(request, gw.config.trust_forwarded_for))
        except ThawError as exc:
            outcome = exc
        request[_OUTCOME_KEY] = outcome
    if isinstance(outcome, ThawError):
        raise outcome
    assert isinstance(outcome, scheduler_pb2.Principal)
    return outcome


def reads_all_invocations(p: scheduler_pb2.Principal) -> bool:
    return bool(READ_ALL_SCOPES & set(p.scopes))


def invocations_key_filter(p: scheduler_pb2.Principal) -> str:
    """The key id a listing of stored invocations is limited to; "" = the tenant's all."""
    if reads_all_invocations(p):
        return ""
    if not p.key_id:  # never "" for a restricted caller: "" would mean all of them
        raise PermissionDenied("reading stored invocations needs an API key")
    return p.key_id


def may_read_invocation(p: scheduler_pb2.Principal,
                        inv: invocations_pb2.Invocation) -> bool:
    """`inv` is of p's tenant (the scheduler's lookups see to that) and p may read it."""
    return reads_all_invocations(p) or bool(p.key_id and inv.key_id == p.key_id)


def check_invocation_reader(p: scheduler_pb2.Principal,
                            inv: invocations_pb2.Invocation) -> None:
    """NotFound, worded as for a missing id, when `p` may not read `inv`."""
    if not may_read_invocation(p, inv):
        raise NotFound(f"invocation {inv.id} not found", field="id")


def require_logs(p: scheduler_pb2.Principal) -> None:
    """Logs carry what a function prints (inputs, secrets it mishandles): the deploy
    or admin scope, never invoke alone."""
    if not READ_ALL_SCOPES & set(p.scopes):
        raise PermissionDenied("reading logs needs an API key with the 'deploy' or "
                               "'admin' scope; this key has only "
                               f"{', '.join(sorted(p.scopes)) or 'no scopes'}")
