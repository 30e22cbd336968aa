"""The Open Inference v2 routes' own logic (gateway/oip.py) with a fake scheduler:
errors in the protocol's form with the gateway's statuses, readiness by the
function's state, a function's error answer carried over."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from thaw.core.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ThawError,
    Unauthenticated,
)
from thaw.gateway import jsonbody, oip
from thaw.gateway.errors import RateLimited
from thaw.gateway.state import ERROR_CODE_KEY, GATEWAY_KEY
from thaw.proto import scheduler_pb2


class FakeScheduler:
    def __init__(self, fn: scheduler_pb2.FunctionInfo | None, ready: bool = True) -> None:
        self.fn = fn
        self._ready = ready

    async def get_function(self, tenant: str, name: str) -> scheduler_pb2.FunctionInfo:
        if self.fn is None or self.fn.tenant != tenant or self.fn.name != name:
            raise NotFound(f"function {tenant}/{name} not found", field="name")
        return self.fn

    async def ready(self) -> bool:
        return self._ready


def make_request(path: str, scheduler: FakeScheduler, name: str = "") -> web.Request:
    app = web.Application()
    app[GATEWAY_KEY] = SimpleNamespace(scheduler=scheduler)  # type: ignore[assignment]
    request = make_mocked_request("GET", path, app=app,
                                  match_info={"name": name} if name else {})
    return request


@pytest.fixture(autouse=True)
def admitted(monkeypatch: pytest.MonkeyPatch) -> None:
    async def admit(request: web.Request, gw: Any) -> scheduler_pb2.Principal:
        return scheduler_pb2.Principal(tenant="acme")
    monkeypatch.setattr(oip, "admit", admit)


def body(response: web.StreamResponse) -> Any:
    assert isinstance(response, web.Response) and response.body is not None
    return json.loads(bytes(response.body))  # type: ignore[arg-type]


@pytest.mark.parametrize(("error", "status"), [
    (InvalidArgument("input 'x': bad", field="inputs[0]"), 400),
    (Unauthenticated("no API key"), 401), (PermissionDenied("needs invoke"), 403),
    (NotFound("model 'm' not found"), 404)])
async def test_errors_answer_in_the_v2_form(error: ThawError, status: int) -> None:
    async def route(request: web.Request) -> web.StreamResponse:
        raise error
    request = make_request("/v2/models/m/infer", FakeScheduler(None))
    response = await oip.v2_errors(route)(request)
    assert response.status == status
    assert body(response) == {"error": error.message}
    assert request[ERROR_CODE_KEY] == error.code


async def test_rate_limited_keeps_retry_after() -> None:
    async def route(request: web.Request) -> web.StreamResponse:
        raise RateLimited("slow down", retry_after=2.5)
    response = await oip.v2_errors(route)(make_request("/v2", FakeScheduler(None)))
    assert response.status == 429 and response.headers["Retry-After"] == "3"
    assert body(response) == {"error": "slow down"}


async def test_readiness_follows_the_functions_state() -> None:
    fn = scheduler_pb2.FunctionInfo(tenant="acme", name="m", version="2", state="ready")
    ready = await oip.model_ready(make_request("/v2/models/m/ready", FakeScheduler(fn), "m"))
    assert ready.status == 200 and body(ready) == {"name": "m", "ready": True}
    fn.state, fn.reason = "failed", "setup() raised"
    failed = await oip.model_ready(make_request("/v2/models/m/ready", FakeScheduler(fn), "m"))
    assert failed.status == 400
    assert body(failed) == {"error": "model 'm' is failed, not ready: setup() raised"}
    fn.state = "deleted"
    gone = await oip.model_ready(make_request("/v2/models/m/ready", FakeScheduler(fn), "m"))
    assert gone.status == 404


async def test_metadata_lists_the_active_version_and_a_bad_name_is_404() -> None:
    fn = scheduler_pb2.FunctionInfo(tenant="acme", name="m", version="2", state="ready")
    meta = await oip.model_metadata(make_request("/v2/models/m", FakeScheduler(fn), "m"))
    assert body(meta) == {"name": "m", "versions": ["2"], "platform": "thaw",
                          "inputs": [], "outputs": []}
    bad = await oip.model_metadata(make_request("/v2/models/M_", FakeScheduler(fn), "M_"))
    assert bad.status == 404 and "'M_'" in body(bad)["error"]


async def test_server_readiness_is_a_4xx_when_the_scheduler_is_away() -> None:
    away = await oip.health_ready(make_request("/v2/health/ready", FakeScheduler(None, False)))
    assert away.status == 400 and "scheduler" in body(away)["error"]
    up = await oip.health_ready(make_request("/v2/health/ready", FakeScheduler(None)))
    assert up.status == 200 and body(up) == {"ready": True}


@pytest.mark.parametrize(("answer", "message"), [
    (b'{"error": {"code": "invalid_argument", "message": "predict(): no x"}}',
     "predict(): no x"),
    (b'{"error": "plain v2"}', "plain v2"), (b"boom\n", "boom"), (b"", "the function answered 500"),
    (b'{"error": 5}', '{"error": 5}')])
def test_a_functions_error_message_is_carried_over(answer: bytes, message: str) -> None:
    assert jsonbody.error_message(500, answer) == message


async def test_a_versioned_route_serves_the_active_version_only() -> None:
    fn = scheduler_pb2.FunctionInfo(tenant="acme", name="m", version="2", state="ready")
    app = web.Application()
    app[GATEWAY_KEY] = SimpleNamespace(scheduler=FakeScheduler(fn))  # type: ignore[assignment]
    for version, status in (("2", 200), ("1", 404), ("x", 404)):
        request = make_mocked_request("GET", f"/v2/models/m/versions/{version}", app=app,
                                      match_info={"name": "m", "version": version})
        response = await oip.model_metadata(request)
        assert response.status == status, version
        if status == 404:
            assert body(response) == {
                "error": f"model 'm' version {version!r} is not served (version 2 serves)"}
