"""CORS of a deployed function's URL (gateway/cors.py): the gateway answers
preflights without a key and without an instance, and adds the headers to the
function's answers (and its own errors); a function without [http] gets none."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import RunningPlatform
from tests.gateway.tenancy_helpers import deploy, echo_bundle, unique

APP = "https://app.example.com"


def test_preflights_and_answers_of_a_deployed_function(platform: RunningPlatform,
                                                       tmp_path: Path) -> None:
    name, plain = unique("cors"), unique("nocors")
    folder = echo_bundle(tmp_path, name)
    with open(folder / "thaw.toml", "a") as toml:
        toml.write(f'\n[http]\ncors_origins = ["{APP}"]\ncors_methods = ["POST"]\n'
                   'cors_headers = ["Authorization", "Content-Type"]\ncors_max_age = 120\n')
    assert deploy(platform.http, folder).status_code == 201
    assert deploy(platform.http, echo_bundle(tmp_path, plain)).status_code == 201
    url = platform.http.get(f"/v1/functions/{name}").json()["url"]
    plain_url = platform.http.get(f"/v1/functions/{plain}").json()["url"]
    asks = {"Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"}
    # No key: the gateway answers, the function is not involved.
    ok = httpx.options(url, headers={"Origin": APP, **asks}, timeout=60)
    assert ok.status_code == 204, ok.text
    assert ok.headers["Access-Control-Allow-Origin"] == APP
    assert ok.headers["Access-Control-Allow-Methods"] == "POST"
    assert ok.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
    assert ok.headers["Access-Control-Max-Age"] == "120"
    assert "Origin" in ok.headers["Vary"]
    sub_path = httpx.options(f"{url}/deeper", headers={"Origin": APP, **asks}, timeout=60)
    assert sub_path.status_code == 204
    for headers, field in (({"Origin": "https://evil.example", **asks}, "origin"),
                           ({"Origin": APP, **asks, "Access-Control-Request-Method": "PUT"},
                            "method"),
                           ({"Origin": APP, **asks,
                             "Access-Control-Request-Headers": "x-secret"}, "headers")):
        refused = httpx.options(url, headers=headers, timeout=60)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == {**refused.json()["error"], "code": "cors_refused",
                                           "field": field}
        assert "Access-Control-Allow-Origin" not in refused.headers
    # Preflights made no instance.
    assert platform.http.get(f"/v1/functions/{name}").json()["warm_instances"] == 0
    auth = {"Authorization": f"Bearer {platform.key}"}
    called = httpx.post(url, json={"x": 1}, headers={**auth, "Origin": APP}, timeout=120)
    assert called.status_code == 200 and called.json()["echo"] == {"x": 1}
    assert called.headers["Access-Control-Allow-Origin"] == APP
    assert "Origin" in called.headers["Vary"]
    assert platform.http.get(f"/v1/functions/{name}").json()["warm_instances"] >= 1
    other = httpx.post(url, json={}, headers={**auth, "Origin": "https://evil.example"},
                       timeout=120)
    assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers
    # An error answer carries them too (the browser may read why).
    denied = httpx.post(url, json={}, headers={"Origin": APP}, timeout=60)
    assert denied.status_code == 401
    assert denied.headers["Access-Control-Allow-Origin"] == APP
    # A function without [http] gets no CORS headers at all.
    bare = httpx.post(plain_url, json={}, headers={**auth, "Origin": APP}, timeout=120)
    assert bare.status_code == 200
    assert "Access-Control-Allow-Origin" not in bare.headers
    assert "Origin" not in bare.headers.get("Vary", "")
    # ... and its OPTIONS calls, preflight-shaped or not, reach its handler (a key needed).
    passed = httpx.options(plain_url, headers={**auth, "Origin": APP, **asks}, timeout=120)
    assert passed.status_code == 200 and passed.json()["echo"] is None, passed.text
    assert "Access-Control-Allow-Origin" not in passed.headers
    assert httpx.options(plain_url, headers={"Origin": APP, **asks},
                         timeout=60).status_code == 401
    for fn_name in (name, plain):
        platform.http.delete(f"/v1/functions/{fn_name}")
