"""Open Inference v2's binary tensor data extension (gateway/oip_binary.py) against
the published spec: little-endian row-major elements, BYTES as 4-byte length-prefixed
strings, BF16 as FP32's upper half; the JSON header split off by
Inference-Header-Content-Length; every byte accounted for; clear 400s naming the
field; binary outputs in the answer."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from thaw.core.errors import InvalidArgument
from thaw.gateway.errors import BadFunctionAnswer
from thaw.gateway.oip_binary import (
    HEADER,
    attach_inputs,
    binary_answer,
    decode,
    encode,
    split_body,
)
from thaw.gateway.oip_tensors import Tensor, outputs_of, parse_infer


@pytest.mark.parametrize(("datatype", "code", "values"), [
    ("BOOL", "?", [True, False, True, True]),
    ("INT8", "b", [-128, 0, 5, 127]), ("UINT8", "B", [0, 1, 200, 255]),
    ("INT16", "h", [-32768, 1, 2, 32767]), ("UINT16", "H", [0, 1, 2, 65535]),
    ("INT32", "i", [-(2**31), 1, 2, 2**31 - 1]), ("UINT32", "I", [0, 1, 2, 2**32 - 1]),
    ("INT64", "q", [-(2**63), 1, 2, 2**63 - 1]), ("UINT64", "Q", [0, 1, 2, 2**64 - 1]),
    ("FP16", "e", [0.5, -2.0, 1024.0, 0.25]), ("FP32", "f", [0.5, -2.0, 3.25, 1e10]),
    ("FP64", "d", [0.1, -2.0, 3.25, 1e300]),
])
def test_fixed_size_elements_round_trip(datatype: str, code: str, values: list[Any]) -> None:
    raw = struct.pack(f"<4{code}", *values)
    got = decode("x", datatype, [2, 2], raw, "inputs[0]")
    assert got == pytest.approx(values) and len(got) == 4
    assert encode(Tensor("x", (2, 2), datatype, got)) == raw


def test_bf16_is_fp32s_upper_half_and_bytes_are_length_prefixed() -> None:
    # 1.5 and -2.0 are exact in bfloat16: 0x3FC0, 0xC000.
    raw = struct.pack("<2H", 0x3FC0, 0xC000)
    assert decode("b", "BF16", [2], raw, "f") == [1.5, -2.0]
    assert encode(Tensor("b", (2,), "BF16", [1.5, -2.0])) == raw
    strings = struct.pack("<I", 2) + b"hi" + struct.pack("<I", 0) + struct.pack("<I", 4) \
        + "żó".encode()
    assert decode("s", "BYTES", [3], strings, "f") == ["hi", "", "żó"]
    assert encode(Tensor("s", (3,), "BYTES", ["hi", "", "żó"])) == strings


@pytest.mark.parametrize(("datatype", "shape", "raw", "field", "words"), [
    ("FP32", [2, 2], b"\0" * 15, "f.parameters", "is 16 bytes, binary_data_size is 15"),
    ("FP9", [1], b"\0", "f.datatype", "is not one of"),
    ("INT8", [-1], b"", "f.shape", "non-negative"),
    ("BYTES", [1], b"\x05\0\0\0ab", "f.parameters", "passes its data's end"),
    ("BYTES", [1], b"\x01\0", "f.parameters", "cut length prefix"),
    ("BYTES", [2], b"\x01\0\0\0a", "f.shape", "holds 2 elements, its binary data 1"),
    ("BYTES", [1], b"\x01\0\0\0\xff", "f.data", "not UTF-8"),
    ("FP32", [1], struct.pack("<f", float("nan")), "f.data", "NaN"),
])
def test_bad_binary_data_is_refused_naming_the_field(
        datatype: str, shape: list[int], raw: bytes, field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode("x", datatype, shape, raw, "f")
    assert caught.value.field == field and words in caught.value.message


def _request(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, str]:
    text = json.dumps(header).encode()
    return text + b"".join(blobs), str(len(text))


def test_a_binary_request_becomes_the_tensors_json_would_give() -> None:
    header = {"inputs": [
        {"name": "a", "shape": [2, 2], "datatype": "FP32",
         "parameters": {"binary_data_size": 16}},
        {"name": "j", "shape": [2], "datatype": "INT64", "data": [7, 8]},
        {"name": "s", "shape": [1], "datatype": "BYTES",
         "parameters": {"binary_data_size": 7, "other": 1}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}]}
    body, length = _request(header, struct.pack("<4f", 1, 2, 3, 4),
                            struct.pack("<I", 3) + b"abc")
    text, binary = split_body(body, length, 1 << 20)
    doc = json.loads(text)
    attach_inputs(doc, binary)
    infer = parse_infer(doc)
    assert infer.handler_body() == {"inputs": {"a": [[1.0, 2.0], [3.0, 4.0]], "j": [7, 8],
                                               "s": ["abc"]}}
    assert infer.outputs == ("y", "z") and infer.binary == frozenset({"y"})
    assert doc["inputs"][2]["parameters"] == {"other": 1}

    outputs = outputs_of({"y": {"data": [1, 2], "datatype": "INT32"}, "z": [0.5]},
                         infer.outputs)
    packed = binary_answer({"model_name": "m"}, outputs, infer.binary_outputs(outputs))
    assert packed is not None
    data, size = packed
    answer = json.loads(data[:size])
    assert answer["outputs"][0] == {"name": "y", "shape": [2], "datatype": "INT32",
                                    "parameters": {"binary_data_size": 8}}
    assert answer["outputs"][1]["data"] == [0.5]  # not asked as binary: JSON
    assert data[size:] == struct.pack("<2i", 1, 2)


def test_binary_data_output_makes_every_output_binary_and_is_not_the_models() -> None:
    infer = parse_infer({"inputs": [{"name": "x", "shape": [1], "datatype": "BOOL",
                                     "data": [True]}],
                         "parameters": {"binary_data_output": True, "top_k": 3}})
    assert infer.parameters == {"top_k": 3} and infer.binary_all
    outputs = outputs_of({"a": [True, False], "b": ["x"]}, ())
    assert infer.binary_outputs(outputs) == {"a", "b"}
    assert binary_answer({}, outputs, frozenset()) is None
    with pytest.raises(InvalidArgument) as caught:
        parse_infer({"inputs": [{"name": "x", "shape": [1], "datatype": "BOOL",
                                 "data": [True]}],
                     "outputs": [{"name": "a", "parameters": {"binary_data": "yes"}}]})
    assert caught.value.field == "outputs[0].parameters.binary_data"


@pytest.mark.parametrize(("header", "blobs", "length", "field", "words"), [
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "INT8",
                  "parameters": {"binary_data_size": 1}}]}, [b"\1\2"], None, HEADER,
     "1 bytes of binary data after"),
    ({"inputs": [{"name": "a", "shape": [2], "datatype": "INT8",
                  "parameters": {"binary_data_size": 2}}]}, [b"\1"], None,
     "inputs[0].parameters", "pass the body's end"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "INT8", "data": [1],
                  "parameters": {"binary_data_size": 1}}]}, [b"\1"], None,
     "inputs[0].data", "both 'data' and binary_data_size"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "INT8",
                  "parameters": {"binary_data_size": -1}}]}, [], None,
     "inputs[0].parameters", "non-negative integer"),
    ({"inputs": []}, [b"x"], "999999", HEADER, "the JSON header's length"),
    ({"inputs": []}, [b"x"], "-3", HEADER, "the JSON header's length"),
])
def test_bad_framing_is_refused_naming_the_field(
        header: dict[str, Any], blobs: list[bytes], length: str | None, field: str,
        words: str) -> None:
    body, own = _request(header, *blobs)
    with pytest.raises(InvalidArgument) as caught:
        text, binary = split_body(body, length or own, 1 << 20)
        attach_inputs(json.loads(text), binary)
    assert caught.value.field == field and words in caught.value.message


def test_a_json_header_past_max_json_bytes_is_refused() -> None:
    body, length = _request({"inputs": [], "pad": "x" * 100})
    with pytest.raises(InvalidArgument, match="max_json_bytes"):
        split_body(body, length, 64)
    assert split_body(b"{}", None, 64) == (b"{}", b"")


def test_an_output_its_datatype_cannot_hold_is_a_bad_answer() -> None:
    with pytest.raises(BadFunctionAnswer, match="FP16"):
        encode(Tensor("h", (1,), "FP16", [1e6]))
