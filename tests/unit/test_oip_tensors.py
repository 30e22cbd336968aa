"""Open Inference v2 tensors (gateway/oip_tensors.py): a request's inputs checked and
nested for the handler, a handler's answer turned into v2 outputs."""

from __future__ import annotations

from typing import Any

import pytest

from thaw.core.errors import InvalidArgument
from thaw.gateway.errors import BadFunctionAnswer
from thaw.gateway.oip_tensors import (
    MAX_RANK,
    flatten,
    infer_datatype,
    outputs_of,
    parse_infer,
    reshape,
)


def request(*inputs: dict[str, Any], **rest: Any) -> dict[str, Any]:
    return {"inputs": list(inputs), **rest}


def tensor(name: str = "x", shape: Any = (2, 2), datatype: str = "FP32",
           data: Any = (1, 2, 3, 4)) -> dict[str, Any]:
    return {"name": name, "shape": list(shape), "datatype": datatype, "data": list(data)
            if isinstance(data, tuple) else data}


def test_flat_data_reaches_the_handler_nested_to_its_shape() -> None:
    parsed = parse_infer(request(tensor(data=(1, 2, 3.5, 4)), id="r1",
                                 parameters={"scale": 2}))
    assert parsed.id == "r1"
    assert parsed.handler_body() == {"inputs": {"x": [[1, 2], [3.5, 4]]},
                                     "parameters": {"scale": 2}}


def test_nested_data_is_accepted_as_it_is_and_without_parameters_none_are_sent() -> None:
    parsed = parse_infer(request(tensor(shape=(2, 1, 2), datatype="INT64",
                                        data=[[[1, 2]], [[3, 4]]])))
    assert parsed.handler_body() == {"inputs": {"x": [[[1, 2]], [[3, 4]]]}}


def test_scalar_and_empty_shapes() -> None:
    parsed = parse_infer(request(tensor("s", shape=(), datatype="BYTES", data="hi"),
                                 tensor("e", shape=(3, 0), datatype="BOOL", data=[])))
    assert parsed.handler_body()["inputs"] == {"s": "hi", "e": [[], [], []]}


@pytest.mark.parametrize(("bad", "field", "words"), [
    (tensor(shape=(3, 2)), "inputs[0].shape", "shape [3, 2] holds 6 elements but 'data' has 4"),
    (tensor(datatype="FLOAT"), "inputs[0].datatype", "datatype 'FLOAT' is not one of"),
    (tensor(datatype="INT8", data=(1, 2, 300, 4)), "inputs[0].data", "element 2 is 300"),
    (tensor(datatype="INT32", data=(1, 2, 3.5, 4)), "inputs[0].data", "needs integers"),
    (tensor(datatype="UINT8", data=(1, -1, 3, 4)), "inputs[0].data", "needs integers in"),
    (tensor(datatype="BOOL", data=(1, 0, 1, 0)), "inputs[0].data", "true or false"),
    (tensor(datatype="FP64", data=(True, 2, 3, 4)), "inputs[0].data", "needs numbers"),
    (tensor(datatype="BYTES", data=(1, 2, 3, 4)), "inputs[0].data", "needs strings"),
    (tensor(data=[[1, 2], [3]]), "inputs[0].data", "ragged"),
    (tensor(shape=(-1, 4)), "inputs[0].shape", "non-negative integers"),
    (tensor(shape=[1] * (MAX_RANK + 1), data=(1,)), "inputs[0].shape", "at most 32"),
    (tensor(shape=(10**9, 0), data=()), "inputs[0].shape", "too large to nest"),
    ({"name": "x", "shape": [1], "datatype": "FP32"}, "inputs[0].data", "'data' is required"),
    ({**tensor(), "parameters": {"binary_data_size": 16}}, "inputs[0].parameters",
     "needs the Inference-Header-Content-Length header"),
    ({**tensor(), "name": ""}, "inputs[0].name", "'name' must be"),
])
def test_a_bad_input_is_refused_naming_it(bad: dict[str, Any], field: str,
                                          words: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_infer(request(tensor("ok", shape=(1,), data=(1,)), bad))
    assert caught.value.field == field.replace("inputs[0]", "inputs[1]")
    assert words in caught.value.message
    if bad.get("name"):
        assert repr(bad["name"]) in caught.value.message  # the input is named


@pytest.mark.parametrize(("doc", "field"), [
    ([], "body"), ({}, "inputs"), ({"inputs": []}, "inputs"), ({"inputs": "x"}, "inputs"),
    (request(tensor(), id=3), "id"), (request(tensor(), parameters=[]), "parameters"),
    (request(tensor(), tensor()), "inputs[1].name"),
    (request(tensor(), outputs=[{"name": "y"}, {"name": "y"}]), "outputs[1].name"),
    (request(tensor(), outputs=[{}]), "outputs[0].name"),
    (request(tensor(), outputs={"name": "y"}), "outputs"),
])
def test_a_bad_request_is_refused_naming_the_field(doc: Any, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_infer(doc)
    assert caught.value.field == field


def test_flatten_and_reshape_are_inverse() -> None:
    nested = [[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [10, 11, 12]]]
    flat_shape = flatten(nested)
    assert flat_shape == (list(range(1, 13)), (2, 2, 3))
    assert reshape(list(range(1, 13)), (2, 2, 3)) == nested
    assert flatten([[1], [2, 3]]) is None and flatten([[1], 2]) is None
    assert flatten(5) == ([5], ())


@pytest.mark.parametrize(("flat", "datatype"), [
    ([True, False], "BOOL"), ([1, 2], "INT64"), ([1, 2.5], "FP64"), ([0.5], "FP64"),
    (["a"], "BYTES"), ([], "FP64"), ([1, "a"], None), ([True, 1], None), ([None], None),
    ([{"a": 1}], None),
])
def test_datatypes_come_from_python_types(flat: list[Any], datatype: str | None) -> None:
    assert infer_datatype(flat) == datatype


def test_a_handlers_dict_becomes_outputs_with_inferred_shapes() -> None:
    outputs = outputs_of({"sum": 10, "doubled": [[2, 4], [6, 8.0]], "ok": [True],
                          "label": "cat"}, ())
    assert [t.json() for t in outputs] == [
        {"name": "sum", "shape": [1], "datatype": "INT64", "data": [10]},
        {"name": "doubled", "shape": [2, 2], "datatype": "FP64", "data": [2, 4, 6, 8.0]},
        {"name": "ok", "shape": [1], "datatype": "BOOL", "data": [True]},
        {"name": "label", "shape": [1], "datatype": "BYTES", "data": ["cat"]}]


def test_an_explicit_tensor_keeps_its_datatype_and_shape() -> None:
    (out,) = outputs_of({"y": {"data": [1, 2, 3, 4], "shape": [2, 2],
                               "datatype": "FP32"}}, ())
    assert out.json() == {"name": "y", "shape": [2, 2], "datatype": "FP32",
                          "data": [1, 2, 3, 4]}
    (nested,) = outputs_of({"y": {"data": [[1, 2]]}}, ())
    assert nested.json() == {"name": "y", "shape": [1, 2], "datatype": "INT64",
                             "data": [1, 2]}


def test_a_bare_answer_is_output0() -> None:
    (out,) = outputs_of([1.5, 2.5], ())
    assert out.json() == {"name": "output0", "shape": [2], "datatype": "FP64",
                          "data": [1.5, 2.5]}


def test_requested_outputs_are_answered_in_the_order_asked() -> None:
    outputs = outputs_of({"a": 1, "b": 2, "c": 3}, ("c", "a"))
    assert [t.name for t in outputs] == ["c", "a"]
    with pytest.raises(InvalidArgument) as caught:
        outputs_of({"a": 1}, ("a", "zz"))
    assert caught.value.field == "outputs[1].name" and "'zz'" in caught.value.message


@pytest.mark.parametrize("answer", [
    {"y": [[1, 2], [3]]}, {"y": [1, "a"]}, {"y": None}, {"y": {"shape": [1]}},
    {"y": {"data": [1, 2], "shape": [3]}}, {"y": {"data": [1.5], "datatype": "INT64"}},
    {"y": {"data": [1], "datatype": "NOPE"}},
])
def test_an_answer_that_is_no_tensor_is_the_functions_fault(answer: Any) -> None:
    with pytest.raises(BadFunctionAnswer) as caught:
        outputs_of(answer, ())
    assert "'y'" in caught.value.message
