"""A function imports Input, InvalidInput and HTTPError from `thaw` itself, inside its
sandboxed instance, and they behave as the runtime's own (docs/function-api.md)."""

from __future__ import annotations

from tests.conftest import FIXTURES, RunningPlatform


def test_public_names_import_from_thaw_inside_the_instance(
        platform: RunningPlatform) -> None:
    resp = platform.deploy(FIXTURES / "public_names_rt")
    assert resp.status_code == 201, resp.text
    assert resp.json()["start_mode"] == "restore", resp.json()

    ok = platform.invoke("public-names", {"word": "hi"})
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"word": "hi"}
    # Input's constraint: checked at the gateway.
    short = platform.invoke("public-names", {"word": ""})
    assert short.status_code == 422 and short.json()["error"]["field"] == "word"
    # InvalidInput and HTTPError raised by the handler.
    bad = platform.invoke("public-names", {"word": "bad"})
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"] == {"code": "invalid_input", "message": "not that word",
                                   "field": "word"}
    teapot = platform.invoke("public-names", {"word": "x", "status": 418})
    assert teapot.status_code == 418, teapot.text
    assert teapot.json()["error"]["message"] == "answered 418 on purpose"
