"""The Open Inference Protocol v2 routes on a LocalPlatform, called with plain JSON as
the published spec (KServe v2 / Triton HTTP) writes it: health, model metadata and
readiness, and inference on a function that doubles and sums a tensor."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import FIXTURES, RunningPlatform
from tests.gateway.tenancy_helpers import new_tenant

NAME = "tensor-math"


@pytest.fixture(scope="module")
def v2(platform: RunningPlatform) -> Iterator[httpx.Client]:
    """The function origin, with the dev tenant's key, tensor-math deployed."""
    resp = platform.deploy(FIXTURES / "tensor_math")
    assert resp.status_code == 201 and resp.json()["state"] == "ready", resp.text
    with httpx.Client(base_url=platform.platform.function_url, timeout=120,
                      headers={"Authorization": f"Bearer {platform.key}"}) as client:
        yield client


def infer_body(**extra: object) -> dict[str, object]:
    return {"id": "req-1", "inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]},
        {"name": "tag", "shape": [1], "datatype": "BYTES", "data": ["a"]}], **extra}


def test_health_and_server_metadata_need_no_key(v2: httpx.Client,
                                                platform: RunningPlatform) -> None:
    for base in (platform.platform.function_url, platform.url):  # both origins
        with httpx.Client(base_url=base, timeout=30) as anonymous:
            assert anonymous.get("/v2/health/live").json() == {"live": True}
            ready = anonymous.get("/v2/health/ready")
            assert ready.status_code == 200 and ready.json() == {"ready": True}
            assert anonymous.get("/v2").json()["name"] == "thaw"


def test_model_metadata_and_readiness(v2: httpx.Client) -> None:
    meta = v2.get(f"/v2/models/{NAME}")
    assert meta.status_code == 200, meta.text
    doc = meta.json()
    assert doc["name"] == NAME and doc["platform"] == "thaw"
    assert doc["versions"] and doc["inputs"] == [] and doc["outputs"] == []
    ready = v2.get(f"/v2/models/{NAME}/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_infer_maps_tensors_to_the_handler_and_back(v2: httpx.Client) -> None:
    resp = v2.post(f"/v2/models/{NAME}/infer", json=infer_body())
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["model_name"] == NAME and doc["id"] == "req-1"
    assert doc["model_version"] in v2.get(f"/v2/models/{NAME}").json()["versions"]
    outputs = {o["name"]: o for o in doc["outputs"]}
    # The handler got x nested to [2, 3] (it doubles each row's elements in place).
    assert outputs["doubled"] == {"name": "doubled", "shape": [2, 3], "datatype": "INT64",
                                  "data": [2, 4, 6, 8, 10, 12]}
    assert outputs["sum"] == {"name": "sum", "shape": [1], "datatype": "INT64",
                              "data": [21]}
    assert outputs["names"]["data"] == ["tag", "x"]
    assert outputs["names"]["datatype"] == "BYTES"


def test_versioned_routes_serve_the_active_version_only(v2: httpx.Client) -> None:
    (active,) = v2.get(f"/v2/models/{NAME}").json()["versions"]
    base = f"/v2/models/{NAME}/versions/{active}"
    assert v2.get(base).json()["versions"] == [active]
    assert v2.get(f"{base}/ready").status_code == 200
    resp = v2.post(f"{base}/infer", json=infer_body())
    assert resp.status_code == 200 and resp.json()["model_version"] == active, resp.text
    other = f"/v2/models/{NAME}/versions/{int(active) + 100}"
    for method, path in (("GET", other), ("GET", f"{other}/ready"),
                         ("POST", f"{other}/infer")):
        refused = v2.request(method, path, json=infer_body())
        assert refused.status_code == 404, (path, refused.text)
        assert f"version {active} serves" in refused.json()["error"]


def test_parameters_reach_the_handler_and_outputs_can_be_chosen(v2: httpx.Client) -> None:
    resp = v2.post(f"/v2/models/{NAME}/infer", json=infer_body(
        parameters={"scale": 0.5}, outputs=[{"name": "doubled"}]))
    assert resp.status_code == 200, resp.text
    (only,) = resp.json()["outputs"]
    assert only["name"] == "doubled" and only["datatype"] == "FP64"
    assert only["data"] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]


def test_a_bad_shape_is_400_naming_the_input(v2: httpx.Client) -> None:
    body = infer_body()
    body["inputs"] = [{"name": "x", "shape": [4, 4], "datatype": "FP32",
                       "data": [1, 2, 3]}]
    resp = v2.post(f"/v2/models/{NAME}/infer", json=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert isinstance(error, str) and "'x'" in error and "16 elements" in error


def test_an_output_not_answered_is_400_naming_it(v2: httpx.Client) -> None:
    resp = v2.post(f"/v2/models/{NAME}/infer", json=infer_body(outputs=[{"name": "nope"}]))
    assert resp.status_code == 400 and "'nope'" in resp.json()["error"]


def test_a_handler_that_raises_is_a_v2_500(v2: httpx.Client) -> None:
    # No input "x": the handler's inputs["x"] raises KeyError.
    resp = v2.post(f"/v2/models/{NAME}/infer", json={"inputs": [
        {"name": "y", "shape": [1], "datatype": "INT64", "data": [1]}]})
    assert resp.status_code == 500, resp.text
    assert isinstance(resp.json()["error"], str)


def test_no_key_is_401_and_another_tenants_function_is_404(
        v2: httpx.Client, platform: RunningPlatform) -> None:
    with httpx.Client(base_url=platform.platform.function_url, timeout=30) as anonymous:
        for method, path in (("GET", f"/v2/models/{NAME}"),
                             ("GET", f"/v2/models/{NAME}/ready"),
                             ("POST", f"/v2/models/{NAME}/infer")):
            resp = anonymous.request(method, path, json=infer_body())
            assert resp.status_code == 401, (path, resp.text)
            assert isinstance(resp.json()["error"], str)
    other = new_tenant(platform, scopes=("invoke",))
    with httpx.Client(base_url=platform.platform.function_url, timeout=30,
                      headers={"Authorization": f"Bearer {other.key}"}) as theirs:
        for method, path in (("GET", f"/v2/models/{NAME}"),
                             ("GET", f"/v2/models/{NAME}/ready"),
                             ("POST", f"/v2/models/{NAME}/infer")):
            resp = theirs.request(method, path, json=infer_body())
            assert resp.status_code == 404, (path, resp.text)
            assert NAME in resp.json()["error"]
    other.http.close()


def test_a_deploy_only_key_is_403(platform: RunningPlatform, v2: httpx.Client) -> None:
    deployer = new_tenant(platform, scopes=("deploy",))
    with httpx.Client(base_url=platform.platform.function_url, timeout=30,
                      headers={"Authorization": f"Bearer {deployer.key}"}) as client:
        resp = client.post(f"/v2/models/{NAME}/infer", json=infer_body())
        assert resp.status_code == 403 and isinstance(resp.json()["error"], str)
    deployer.http.close()


def test_the_function_origin_still_refuses_the_management_api(v2: httpx.Client) -> None:
    assert v2.get("/v1/functions").status_code == 404


def test_a_typed_handlers_schema_checks_the_body_it_gets(v2: httpx.Client,
                                                         platform: RunningPlatform) -> None:
    resp = platform.deploy(FIXTURES / "tensor_typed")
    assert resp.status_code == 201 and resp.json()["state"] == "ready", resp.text
    ints = {"name": "m", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}
    ok = v2.post("/v2/models/tensor-typed/infer", json={"inputs": [ints]})
    assert ok.status_code == 200, ok.text
    assert ok.json()["outputs"] == [{"name": "m", "shape": [2], "datatype": "INT64",
                                     "data": [3, 7]}]
    # parameters are no argument of this predict(): refused before any instance runs.
    extra = v2.post("/v2/models/tensor-typed/infer",
                    json={"inputs": [ints], "parameters": {"k": 1}})
    assert extra.status_code == 422 and "parameters" in extra.json()["error"], extra.text
