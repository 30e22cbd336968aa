"""Typed inputs end to end: the build reads predict()'s signature, the gateway
refuses a wrong call with 422 naming the field before any instance is touched, fills
in defaults, and serves the function's OpenAPI document (docs/function-api.md)."""

from __future__ import annotations

from tests.conftest import FIXTURES, RunningPlatform


def warm_instances(platform: RunningPlatform, name: str) -> int:
    resp = platform.http.get(f"/v1/functions/{name}")
    assert resp.status_code == 200, resp.text
    return int(resp.json()["warm_instances"])


def test_typed_function_checks_calls_at_the_gateway(platform: RunningPlatform) -> None:
    resp = platform.deploy(FIXTURES / "typed_rt")
    assert resp.status_code == 201, resp.text
    assert resp.json()["start_mode"] == "restore", resp.json()
    assert warm_instances(platform, "typed-rt") == 0

    for body, field in (({"text": "hi", "n": "3"}, "n"), ({"text": "hi", "n": 9}, "n"),
                        ({"n": 1}, "text"), ({"text": "hi", "tags": ["a", 1]}, "tags.1"),
                        ({"text": "hi", "other": 1}, "other")):
        wrong = platform.invoke("typed-rt", body)
        assert wrong.status_code == 422, wrong.text
        error = wrong.json()["error"]
        assert (error["code"], error["field"]) == ("invalid_input", field), error
    # Refused before any instance was started for them.
    assert warm_instances(platform, "typed-rt") == 0

    ok = platform.invoke("typed-rt", {"text": "hi"})
    assert ok.status_code == 200, ok.text
    # Defaults filled in; the first call to reach the handler.
    assert ok.json() == {"out": "hi-hi", "tags": None, "calls": 1}
    again = platform.invoke("typed-rt", {"text": "a", "n": 3, "sep": " ", "tags": ["x"]})
    assert again.json() == {"out": "a a a", "tags": ["x"], "calls": 2}
