"""Typed inputs end to end: the build reads predict()'s signature, the gateway
refuses a wrong call with 422 naming the field before any instance is touched, fills
in defaults, and serves the function's OpenAPI document (docs/function-api.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import EXAMPLES, FIXTURES, RunningPlatform


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


def test_typed_function_serves_its_openapi_document_and_docs_page(
        platform: RunningPlatform) -> None:
    assert platform.deploy(FIXTURES / "typed_rt").status_code == 201
    resp = platform.http.get("/fn/dev/typed-rt/openapi.json")
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["openapi"].startswith("3.")
    call = doc["paths"]["/fn/dev/typed-rt"]["post"]
    schema = call["requestBody"]["content"]["application/json"]["schema"]
    assert list(schema["properties"]) == ["text", "n", "sep", "tags"]
    assert schema["required"] == ["text"]
    assert schema["properties"]["n"] == {"type": "integer", "default": 2, "minimum": 1,
                                         "maximum": 5}
    assert schema["properties"]["text"]["description"] == "Text to repeat"
    assert "422" in call["responses"]

    page = platform.http.get("/fn/dev/typed-rt/docs")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "<td>text</td>" in page.text and "Text to repeat" in page.text
    assert "<script" not in page.text

    # Without a key: as for calling it, 401.
    assert platform.http.get("/fn/dev/typed-rt/openapi.json",
                             headers={"Authorization": ""}).status_code == 401
    assert platform.http.get("/fn/dev/no-such-fn/openapi.json").status_code == 404
    assert platform.http.get("/fn/other/typed-rt/openapi.json").status_code == 404


def test_untyped_function_is_not_checked_and_documents_a_free_body(
        platform: RunningPlatform) -> None:
    assert platform.deploy(EXAMPLES / "echo").status_code == 201
    doc = platform.http.get("/fn/dev/echo/openapi.json").json()
    body = doc["paths"]["/fn/dev/echo"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {}
    assert "422" not in doc["paths"]["/fn/dev/echo"]["post"]["responses"]
    # Any body reaches it, as before typed inputs existed.
    assert platform.invoke("echo", [1, "two"]).json()["echo"] == [1, "two"]


def test_a_redeploy_checks_against_the_new_signature_at_once(
        platform: RunningPlatform, tmp_path: Path) -> None:
    assert platform.deploy(FIXTURES / "typed_rt").status_code == 201
    assert platform.invoke("typed-rt", {"text": "a", "n": 7}).status_code == 422
    wider = tmp_path / "typed_rt"
    shutil.copytree(FIXTURES / "typed_rt", wider)
    app = wider / "app.py"
    app.write_text(app.read_text().replace("le=5", "le=9"))
    assert platform.deploy(wider).status_code == 201
    # The replica that served the deploy knows the new schema without waiting for its
    # cache to expire.
    ok = platform.invoke("typed-rt", {"text": "a", "n": 7})
    assert ok.status_code == 200, ok.text
    assert ok.json()["out"] == "-".join("a" * 7)
