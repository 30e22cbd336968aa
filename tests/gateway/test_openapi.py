"""The OpenAPI document (issue 6, item 5): it names exactly the routes the gateway
serves, and schemathesis, driven by it against the live gateway, finds no input that
makes a 5xx and no answer that disagrees with the document."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Err

from tests.conftest import EXAMPLES, RunningPlatform
from tests.gateway.conftest import deploy_once
from thaw.core.config import GatewayConfig
from thaw.gateway.app import make_app
from thaw.gateway.request import WEBHOOK_HEADER
from thaw.gateway.routes import build_document

# Examples per operation and mode: enough to hit every branch of the validation,
# bounded so the whole run takes seconds.
EXAMPLES_PER_OPERATION = 25
FRAMING_HEADERS = ("transfer-encoding", "content-length")
# Nothing listens there: a delivery fails at once and stays on this machine.
LOOPBACK_WEBHOOK = "http://127.0.0.1:9/webhook"
# Well above a warm call, so a generated deadline only ever passes when it should.
MIN_FUZZ_DEADLINE_SECONDS = 10.0
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def served_routes() -> set[tuple[str, str]]:
    app = make_app(GatewayConfig())
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue  # aiohttp adds HEAD to every GET
        path = route.resource.canonical if route.resource else ""
        routes.add((route.method.lower(), re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)))
    return routes


def test_the_document_names_exactly_the_served_routes() -> None:
    documented = {(method, path) for path, ops in build_document()["paths"].items()
                  for method in ops}
    assert documented == served_routes()


def test_the_document_is_served(platform: RunningPlatform) -> None:
    resp = platform.http.get("/openapi.json", headers={"Authorization": ""})
    assert resp.status_code == 200
    assert resp.json()["openapi"].startswith("3.")
    assert resp.json()["paths"].keys() == build_document()["paths"].keys()


def realistic_deadline(case: schemathesis.Case) -> None:
    """A client asking for a deadline of a millisecond gets the 504 it asked for; that
    is no server error. Malformed values stay (they must be 400)."""
    headers = case.headers
    value = headers.get("X-Thaw-Timeout") if headers else None
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return
    if seconds is not None and 0 < seconds < MIN_FUZZ_DEADLINE_SECONDS:
        headers["X-Thaw-Timeout"] = str(MIN_FUZZ_DEADLINE_SECONDS)


def http_framing_left_to_the_client(case: schemathesis.Case) -> None:
    """Generated Transfer-Encoding / Content-Length headers frame the HTTP message
    itself: aiohttp's parser refuses a malformed one (400, plain text) before any
    handler sees a request, so they test the parser, not the API."""
    headers = case.headers
    if not headers:
        return
    for name in [h for h in headers if h.lower() in FRAMING_HEADERS]:
        del headers[name]


def loopback_webhook(case: schemathesis.Case) -> None:
    """Webhooks the gateway would deliver go to a closed port on this machine, never
    to a generated host; values the gateway refuses stay (they must be 400)."""
    headers = case.headers
    url = headers.get(WEBHOOK_HEADER) if headers else None
    if url is None:
        return
    try:
        parts = urlsplit(url)
        deliverable = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        deliverable = False
    if deliverable:
        headers[WEBHOOK_HEADER] = LOOPBACK_WEBHOOK


def test_no_input_is_a_server_error(platform: RunningPlatform) -> None:
    """Schemathesis per operation, inputs that fit the document and inputs that do not.

    Driven from one test rather than schemathesis' pytest plugin, whose lazy fixture
    does not run under pytest 9."""
    deploy_once(platform, EXAMPLES / "echo")  # so invocations can reach a handler
    schema = schemathesis.openapi.from_url(f"{platform.url}/openapi.json")
    auth = {"Authorization": f"Bearer {platform.key}"}
    failures: dict[str, str] = {}
    operations = set()
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            failures[f"invalid operation {result.err()}"] = "the document does not load"
            continue
        operation = result.ok()
        operations.add((operation.method.lower(), operation.path))
        # Without parameters or a body there is nothing to get wrong.
        takes_input = bool(operation.definition.raw.get("parameters")
                           or operation.definition.raw.get("requestBody"))
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if takes_input else [])
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.generate])
            def check(case: schemathesis.Case) -> None:
                realistic_deadline(case)
                loopback_webhook(case)
                http_framing_left_to_the_client(case)
                case.call_and_validate(headers=auth, checks=CHECKS)

            try:
                check()
            except Exception as exc:  # noqa: BLE001 - collected, reported below
                failures[f"{operation.label} ({mode.value})"] = str(exc)[:1500]
    # Every route was exercised (schemathesis leaves out the document's own URL).
    assert operations == served_routes() - {("get", "/openapi.json")}
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
