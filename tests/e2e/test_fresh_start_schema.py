"""A function whose capture is refused runs with fresh starts and keeps the input
schema its build read: the gateway checks its calls (422 naming the field), and its
OpenAPI document and docs page describe its signature (docs/function-api.md)."""

from __future__ import annotations

from tests.conftest import FIXTURES, RunningPlatform


def test_refused_capture_keeps_the_input_schema(platform: RunningPlatform) -> None:
    resp = platform.deploy(FIXTURES / "typed_unpicklable_rt")
    assert resp.status_code == 201, resp.text
    info = resp.json()
    assert info["start_mode"] == "fresh", info
    assert "cannot be snapshotted" in info["reason"], info

    wrong = platform.invoke("typed-locked", {"text": "hi", "n": 9})
    assert wrong.status_code == 422, wrong.text
    error = wrong.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_input", "n"), error
    missing = platform.invoke("typed-locked", {"n": 1})
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "text"

    ok = platform.invoke("typed-locked", {"text": "a", "sep": " "})
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"out": "a a"}  # n's default filled in

    doc = platform.http.get("/fn/dev/typed-locked/openapi.json")
    assert doc.status_code == 200, doc.text
    call = doc.json()["paths"]["/fn/dev/typed-locked"]["post"]
    schema = call["requestBody"]["content"]["application/json"]["schema"]
    assert list(schema["properties"]) == ["text", "n", "sep"]
    assert schema["required"] == ["text"]
    assert schema["properties"]["n"] == {"type": "integer", "default": 2, "minimum": 1,
                                         "maximum": 5}
    page = platform.http.get("/fn/dev/typed-locked/docs")
    assert page.status_code == 200 and "Text to repeat" in page.text

    function = platform.http.get("/v1/functions/typed-locked").json()
    assert function["start_mode"] == "fresh"
