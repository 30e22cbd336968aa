"""Open Inference v2's binary tensor data extension on a LocalPlatform, with plain
HTTP as the published spec (Triton's binary_tensor_data extension) frames it: a JSON
header of Inference-Header-Content-Length bytes, then the inputs' raw little-endian
data; outputs asked as binary come back the same way; bad framing is a v2 400."""

from __future__ import annotations

import json
import struct

import httpx

from tests.e2e.test_open_inference import NAME, v2  # noqa: F401  (the fixture)
from thaw.gateway.oip_binary import HEADER


def _binary_request(header: dict[str, object], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + b"".join(blobs), {HEADER: str(len(text)),
                                    "Content-Type": "application/octet-stream"}


def test_binary_inputs_and_outputs(v2: httpx.Client) -> None:  # noqa: F811
    body, headers = _binary_request(
        {"id": "bin-1", "inputs": [
            {"name": "x", "shape": [2, 3], "datatype": "FP32",
             "parameters": {"binary_data_size": 24}},
            {"name": "tag", "shape": [1], "datatype": "BYTES",
             "parameters": {"binary_data_size": 5}}],
         "outputs": [{"name": "doubled", "parameters": {"binary_data": True}},
                     {"name": "sum"}, {"name": "names", "parameters": {"binary_data": True}}]},
        struct.pack("<6f", 1, 2, 3, 4, 5, 6), struct.pack("<I", 1) + b"a")
    resp = v2.post(f"/v2/models/{NAME}/infer", content=body, headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/octet-stream")
    size = int(resp.headers[HEADER])
    doc = json.loads(resp.content[:size])
    assert doc["model_name"] == NAME and doc["id"] == "bin-1"
    doubled, total, names = doc["outputs"]
    # The handler got x as FP32 values nested to [2, 3] and doubled them (floats now).
    assert doubled == {"name": "doubled", "shape": [2, 3], "datatype": "FP64",
                       "parameters": {"binary_data_size": 48}}
    assert total == {"name": "sum", "shape": [1], "datatype": "FP64", "data": [21.0]}
    assert names["parameters"] == {"binary_data_size": 4 + 3 + 4 + 1}
    data = resp.content[size:]
    assert struct.unpack("<6d", data[:48]) == (2, 4, 6, 8, 10, 12)
    assert data[48:] == struct.pack("<I", 3) + b"tag" + struct.pack("<I", 1) + b"x"

    # binary_data_output: every output binary; the plain JSON form still answers JSON.
    everything, headers = _binary_request(
        {"inputs": [{"name": "x", "shape": [1], "datatype": "INT32",
                     "parameters": {"binary_data_size": 4}}],
         "parameters": {"binary_data_output": True}}, struct.pack("<i", 7))
    resp = v2.post(f"/v2/models/{NAME}/infer", content=everything, headers=headers)
    size = int(resp.headers[HEADER])
    assert all("data" not in o for o in json.loads(resp.content[:size])["outputs"])
    plain = v2.post(f"/v2/models/{NAME}/infer", json={"inputs": [
        {"name": "x", "shape": [1], "datatype": "INT32", "data": [7]}]})
    assert plain.headers["content-type"].startswith("application/json")
    assert HEADER not in plain.headers and plain.json()["outputs"]


def test_bad_framing_is_a_v2_400_naming_it(v2: httpx.Client) -> None:  # noqa: F811
    header = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                          "parameters": {"binary_data_size": 8}}]}
    for blobs, words in (((struct.pack("<f", 1),), "pass the body's end"),
                         ((struct.pack("<3f", 1, 2, 3),), "4 bytes of binary data after")):
        body, headers = _binary_request(header, *blobs)
        resp = v2.post(f"/v2/models/{NAME}/infer", content=body, headers=headers)
        assert resp.status_code == 400, resp.text
        assert words in resp.json()["error"]
    body, headers = _binary_request(header, struct.pack("<2f", 1, 2))
    resp = v2.post(f"/v2/models/{NAME}/infer", content=body,
                   headers={**headers, HEADER: "0"})
    assert resp.status_code == 400 and HEADER in resp.json()["error"], resp.text
    # Binary data without the header: the message says what is missing.
    resp = v2.post(f"/v2/models/{NAME}/infer", json=header)
    assert resp.status_code == 400 and HEADER in resp.json()["error"], resp.text
    # A pure JSON body is still bounded by max_json_depth.
    deep = b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    resp = v2.post(f"/v2/models/{NAME}/infer", content=deep,
                   headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and "max_json_depth" in resp.text, resp.text
