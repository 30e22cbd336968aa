"""CORS of function URLs (gateway/cors.py, core/http_spec.py): the decisions and the
[http] table's checks (test_cors_e2e.py: against a deployed function)."""

from __future__ import annotations

import json

import pytest

from thaw.core.errors import InvalidBundle
from thaw.core.http_spec import Http, policy_of
from thaw.core.spec import FunctionSpec, parse_spec
from thaw.gateway.cors import (
    CORS_HEADERS_KEY,
    add_headers,
    answer_headers,
    preflight_headers,
    preflight_refusal,
)
from thaw.gateway.lane import claims

APP = "https://app.example.com"
POLICY = Http(cors_origins=(APP,), cors_methods=("GET", "POST"),
              cors_headers=("Authorization", "Content-Type"), cors_max_age=120)


def spec(http: str) -> FunctionSpec:
    return parse_spec(f'name = "f"\nhandler = "app:F"\n[http]\n{http}\n')


def test_the_http_table() -> None:
    made = spec('cors_origins = ["https://App.example.com", "http://localhost:3000"]\n'
                'cors_methods = ["post", "GET"]\ncors_max_age = 60')
    assert made.http.cors_origins == ("https://app.example.com", "http://localhost:3000")
    assert made.http.cors_methods == ("POST", "GET") and made.http.cors_max_age == 60
    assert FunctionSpec.from_dict(made.to_dict()).http == made.http
    assert parse_spec('name = "f"\nhandler = "app:F"\n').http.cors_origins == ()
    for bad, field in (('cors_origins = ["https://a.com/path"]', "http.cors_origins"),
                       ('cors_origins = ["*", "https://a.com"]', "http.cors_origins"),
                       ('cors_methods = ["TRACE"]', "http.cors_methods"),
                       ('cors_headers = ["bad header"]', "http.cors_headers"),
                       ("cors_max_age = -1", "http.cors_max_age"),
                       ('cors_origins = ["*"]\ncors_credentials = true', "http"),
                       ("cors_origin = []", "http.cors_origin")):
        with pytest.raises(InvalidBundle) as refused:
            spec(bad)
        assert refused.value.field == field, (bad, refused.value)


def test_decisions() -> None:
    assert preflight_refusal(POLICY, APP, "POST", "content-type, Authorization") is None
    assert preflight_refusal(POLICY, APP.upper(), "get", "") is None
    refused = preflight_refusal(POLICY, "https://evil.example", "POST", "")
    assert refused is not None and refused.field == "origin"
    refused = preflight_refusal(POLICY, APP, "DELETE", "")
    assert refused is not None and refused.field == "method"
    refused = preflight_refusal(POLICY, APP, "POST", "X-Other")
    assert refused is not None and refused.field == "headers" and "X-Other" in refused.message
    any_header = Http(cors_origins=("*",), cors_headers=("*",))
    assert preflight_refusal(any_header, "https://x.org", "POST", "X-Other") is None
    allowed = preflight_headers(any_header, "https://x.org", "X-Other, X-Two")
    # Never "*": the request's own origin, and the headers it asked for.
    assert allowed["Access-Control-Allow-Origin"] == "https://x.org"
    assert allowed["Access-Control-Allow-Headers"] == "X-Other, X-Two"
    assert "Access-Control-Allow-Credentials" not in allowed
    answer = answer_headers(POLICY, APP)
    assert answer == {"Access-Control-Allow-Origin": APP, "Vary": "Origin"}
    assert answer_headers(POLICY, "https://evil.example") == {"Vary": "Origin"}
    credentials = Http(cors_origins=(APP,), cors_credentials=True)
    assert answer_headers(credentials, APP)["Access-Control-Allow-Credentials"] == "true"


def test_policy_of_a_functions_configuration() -> None:
    made = spec(f'cors_origins = ["{APP}"]')
    assert policy_of(json.dumps(made.to_dict())) == made.http
    assert policy_of(json.dumps(spec("cors_max_age = 5").to_dict())) is None
    assert policy_of("") is None and policy_of("not json") is None
    assert policy_of('{"http": {"cors_origins": 5}}') is None


def test_add_headers_extends_vary() -> None:
    request = {CORS_HEADERS_KEY: {"Access-Control-Allow-Origin": APP, "Vary": "Origin"}}
    headers = {"Vary": "Accept"}
    add_headers(request, headers)
    assert headers == {"Vary": "Accept, Origin", "Access-Control-Allow-Origin": APP}
    untouched: dict[str, str] = {}
    add_headers({}, untouched)
    assert untouched == {}


def test_the_fast_lane_leaves_browser_calls_to_aiohttp() -> None:
    claim = claims()
    plain = {"content-length": "2", "authorization": "Bearer k"}
    assert claim("POST", "/fn/t/n", plain)
    assert not claim("POST", "/fn/t/n", {**plain, "origin": APP})
