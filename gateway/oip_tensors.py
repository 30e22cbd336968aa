"""Open Inference Protocol v2 tensors (docs/open-inference.md): a v2 inference request
checked and turned into the JSON body a handler reads, and the handler's answer turned
into v2 outputs. Pure functions, no I/O: gateway/oip.py is the edge that calls them.

The handler receives `{"inputs": {name: data}, "parameters": {...}}` (`parameters`
only when the request carries some), each input's data nested to its shape (row-major;
a shape of [] gives the bare element). It answers a JSON object of name -> value (a
nested list, a number, a bool or a string; or an explicit `{"data", "shape"?,
"datatype"?}`), or any other JSON value, which becomes the one output "output0".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from thaw.core.errors import InvalidArgument, ThawError
from thaw.gateway.errors import BadFunctionAnswer

# Integer datatypes and their inclusive ranges.
INT_RANGES: dict[str, tuple[int, int]] = {
    **{f"INT{b}": (-(2 ** (b - 1)), 2 ** (b - 1) - 1) for b in (8, 16, 32, 64)},
    **{f"UINT{b}": (0, 2 ** b - 1) for b in (8, 16, 32, 64)},
}
FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})
DATATYPES = frozenset({"BOOL", "BYTES", *INT_RANGES, *FLOAT_TYPES})
# A tensor's rank: the data the handler gets nests this deep (plus two levels), within
# the gateway's max_json_depth (64) with room to spare.
MAX_RANK = 32
MAX_TENSORS = 256  # inputs of one request, and outputs of one answer
MAX_NAME_CHARS = 256
# Lists built for an empty tensor (a shape with a 0 after large dimensions): a
# non-empty tensor's are bounded by its data, which the body's size bounds.
MAX_EMPTY_CONTAINERS = 4096
OUTPUT0 = "output0"


@dataclass(frozen=True)
class Tensor:
    """One checked tensor: its elements flat in row-major order."""

    name: str
    shape: tuple[int, ...]
    datatype: str
    flat: list[Any]

    def nested(self) -> Any:
        """The elements nested to the shape (the bare element for shape [])."""
        return reshape(self.flat, self.shape)

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "datatype": self.datatype,
                "data": self.flat}


Refuse = Callable[[str, str], ThawError]
"""Builds the error for a bad tensor from (message, field)."""


def _bad_request(message: str, field: str) -> ThawError:
    return InvalidArgument(message, field=field)


def _bad_answer(message: str, field: str) -> ThawError:
    return BadFunctionAnswer(f"the function's answer: {message}", field=field)


def flatten(data: Any) -> tuple[list[Any], tuple[int, ...]] | None:
    """Nested lists' elements in row-major order and their shape; None when ragged. A
    bare element is shape ()."""
    shape: list[int] = []
    probe = data
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    level = [data]
    for size in shape:
        below: list[Any] = []
        for item in level:
            if not isinstance(item, list) or len(item) != size:
                return None
            below.extend(item)
        level = below
    if any(isinstance(item, list) for item in level):
        return None
    return level, tuple(shape)


def reshape(flat: list[Any], shape: tuple[int, ...]) -> Any:
    """`flat` (whose length is the shape's product) nested to `shape`."""
    if not shape:
        return flat[0]
    nested = flat
    for axis in range(len(shape) - 1, 0, -1):
        size, groups = shape[axis], math.prod(shape[:axis])
        nested = [nested[i * size:(i + 1) * size] for i in range(groups)]
    return nested


def _element_fault(datatype: str, value: Any) -> str | None:
    """Why `value` is not an element of `datatype`; None when it is."""
    if datatype == "BOOL":
        return None if isinstance(value, bool) else "needs true or false"
    if datatype == "BYTES":
        return None if isinstance(value, str) else "needs strings"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "needs numbers"
    if datatype in FLOAT_TYPES:
        return None
    low, high = INT_RANGES[datatype]
    if not isinstance(value, int):
        return "needs integers"
    return None if low <= value <= high else f"needs integers in [{low}, {high}]"


def check_elements(name: str, datatype: str, flat: list[Any], field: str,
                   refuse: Refuse) -> None:
    for index, value in enumerate(flat):
        fault = _element_fault(datatype, value)
        if fault is not None:
            raise refuse(f"tensor {name!r}: datatype {datatype} {fault}; element "
                         f"{index} is {value!r}"[:400], field)


def _shape(name: str, raw: Any, field: str, refuse: Refuse) -> tuple[int, ...]:
    if (not isinstance(raw, list) or len(raw) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                       for d in raw)):
        raise refuse(f"tensor {name!r}: 'shape' must be a list of at most {MAX_RANK} "
                     "non-negative integers", field)
    return tuple(raw)


def tensor(name: str, shape_raw: Any, datatype: Any, data: Any, field: str,
           refuse: Refuse) -> Tensor:
    """A tensor from its parts, checked: known datatype, a shape whose product is the
    data's length (flat or nested data), elements of the datatype."""
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise refuse(f"tensor {name!r}: datatype {datatype!r} is not one of "
                     f"{', '.join(sorted(DATATYPES))}", f"{field}.datatype")
    shape = _shape(name, shape_raw, f"{field}.shape", refuse)
    flat_shape = flatten(data if isinstance(data, list) else [data])
    if flat_shape is None:
        raise refuse(f"tensor {name!r}: 'data' is ragged (nested lists of unequal "
                     "lengths)", f"{field}.data")
    flat = flat_shape[0]
    if math.prod(shape) != len(flat):
        raise refuse(f"tensor {name!r}: shape {list(shape)} holds {math.prod(shape)} "
                     f"elements but 'data' has {len(flat)}", f"{field}.shape")
    if not flat and any(math.prod(shape[:axis]) > MAX_EMPTY_CONTAINERS
                        for axis in range(1, len(shape))):
        raise refuse(f"tensor {name!r}: an empty tensor of shape {list(shape)} is too "
                     "large to nest", f"{field}.shape")
    check_elements(name, datatype, flat, f"{field}.data", refuse)
    return Tensor(name, shape, datatype, flat)


def _name(raw: Any, field: str, refuse: Refuse) -> str:
    if not isinstance(raw, str) or not 0 < len(raw) <= MAX_NAME_CHARS:
        raise refuse(f"'name' must be a string of 1 to {MAX_NAME_CHARS} characters",
                     field)
    return raw


@dataclass(frozen=True)
class InferRequest:
    """A checked v2 inference request."""

    id: str | None
    inputs: tuple[Tensor, ...]
    parameters: dict[str, Any]
    outputs: tuple[str, ...]  # the outputs asked for, in order; () = all
    binary: frozenset[str] = frozenset()
    """Outputs asked as binary data (gateway/oip_binary.py)."""
    binary_all: bool = False
    """The request's `parameters.binary_data_output`: every output as binary data."""

    def binary_outputs(self, outputs: list[Tensor]) -> frozenset[str]:
        """The names of `outputs` to answer as binary data."""
        return frozenset(t.name for t in outputs) if self.binary_all else self.binary

    def handler_body(self) -> dict[str, Any]:
        """The JSON body the handler reads."""
        body: dict[str, Any] = {"inputs": {t.name: t.nested() for t in self.inputs}}
        if self.parameters:
            body["parameters"] = self.parameters
        return body


def _object(raw: Any, field: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{field!r} must be a JSON object", field=field)
    return raw


def _input(raw: Any, index: int) -> Tensor:
    field = f"inputs[{index}]"
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{field} must be a JSON object with name, shape, "
                              "datatype and data", field=field)
    name = _name(raw.get("name"), f"{field}.name", _bad_request)
    parameters = _object(raw.get("parameters"), f"{field}.parameters")
    if "binary_data_size" in parameters:
        raise InvalidArgument(f"input {name!r}: binary data needs the "
                              "Inference-Header-Content-Length header (the JSON "
                              "header's length); send it, or the data as JSON",
                              field=f"{field}.parameters")
    for key in ("shape", "datatype", "data"):
        if key not in raw:
            raise InvalidArgument(f"input {name!r}: {key!r} is required",
                                  field=f"{field}.{key}")
    return tensor(name, raw["shape"], raw["datatype"], raw["data"], field, _bad_request)


def _requested_outputs(raw: Any) -> tuple[tuple[str, ...], frozenset[str]]:
    """The outputs asked for, and those of them asked as binary data."""
    if raw is None:
        return (), frozenset()
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise InvalidArgument(f"'outputs' must be a list of at most {MAX_TENSORS} "
                              "objects with a name", field="outputs")
    names: list[str] = []
    binary: set[str] = set()
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidArgument(f"outputs[{index}] must be an object with a name",
                                  field=f"outputs[{index}]")
        name = _name(item.get("name"), f"outputs[{index}].name", _bad_request)
        if name in names:
            raise InvalidArgument(f"output {name!r} is asked for twice",
                                  field=f"outputs[{index}].name")
        names.append(name)
        parameters = _object(item.get("parameters"), f"outputs[{index}].parameters")
        if _flag(parameters, "binary_data", f"outputs[{index}].parameters.binary_data"):
            binary.add(name)
    return tuple(names), frozenset(binary)


def _flag(parameters: dict[str, Any], key: str, field: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{key} must be true or false", field=field)
    return value


def parse_infer(doc: Any) -> InferRequest:
    """A v2 inference request from its parsed JSON; InvalidArgument (400) naming the
    field (and the input) at fault."""
    if not isinstance(doc, dict):
        raise InvalidArgument("the body must be a JSON object", field="body")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidArgument("'id' must be a string", field="id")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not 0 < len(raw_inputs) <= MAX_TENSORS:
        raise InvalidArgument(f"'inputs' must be a list of 1 to {MAX_TENSORS} tensors",
                              field="inputs")
    inputs = tuple(_input(raw, i) for i, raw in enumerate(raw_inputs))
    seen: set[str] = set()
    for index, t in enumerate(inputs):
        if t.name in seen:
            raise InvalidArgument(f"input {t.name!r} is given twice",
                                  field=f"inputs[{index}].name")
        seen.add(t.name)
    parameters = _object(doc.get("parameters"), "parameters")
    binary_all = _flag(parameters, "binary_data_output", "parameters.binary_data_output")
    # The protocol's own parameter, not the model's: the handler does not get it.
    parameters = {k: v for k, v in parameters.items() if k != "binary_data_output"}
    names, binary = _requested_outputs(doc.get("outputs"))
    return InferRequest(request_id, inputs, parameters, names, binary, binary_all)


def infer_datatype(flat: list[Any]) -> str | None:
    """The datatype of a handler's elements: BOOL, INT64, FP64 (ints and floats
    mixed too) or BYTES; None when they mix kinds or are not JSON scalars. An empty
    tensor is FP64."""
    kinds = {"BOOL" if isinstance(v, bool) else "INT64" if isinstance(v, int)
             else "FP64" if isinstance(v, float) else "BYTES" if isinstance(v, str)
             else "?" for v in flat}
    if kinds <= {"INT64", "FP64"}:
        return "FP64" if "FP64" in kinds or not kinds else "INT64"
    return kinds.pop() if len(kinds) == 1 and "?" not in kinds else None


def output_tensor(name: str, value: Any) -> Tensor:
    """One output from a handler's value (see the module); BadFunctionAnswer (502)
    when it is not a tensor."""
    field = f"outputs.{name}"
    if isinstance(value, dict):
        if "data" not in value:
            raise _bad_answer(f"output {name!r} is an object without 'data'", field)
        data = value["data"]
        flat_shape = flatten(data if isinstance(data, list) else [data])
        shape_raw = value.get("shape")
        if shape_raw is None and flat_shape is not None:
            shape_raw = list(flat_shape[1]) if isinstance(data, list) else [1]
        datatype = value.get("datatype")
        if datatype is None and flat_shape is not None:
            datatype = infer_datatype(flat_shape[0])
        return tensor(name, shape_raw, datatype, data, field, _bad_answer)
    flat_shape = flatten(value if isinstance(value, list) else [value])
    if flat_shape is None:
        raise _bad_answer(f"output {name!r} is ragged (nested lists of unequal "
                          "lengths)", field)
    flat, shape = flat_shape
    datatype = infer_datatype(flat)
    if datatype is None:
        raise _bad_answer(f"output {name!r} mixes kinds of elements or holds "
                          "objects or nulls", field)
    return tensor(name, list(shape), datatype, flat, field, _bad_answer)


def outputs_of(answer: Any, requested: tuple[str, ...]) -> list[Tensor]:
    """The v2 outputs of a handler's answer: every output, or those asked for, in the
    order asked (400 naming an output the answer lacks)."""
    named = answer if isinstance(answer, dict) else {OUTPUT0: answer}
    if len(named) > MAX_TENSORS:
        raise _bad_answer(f"more than {MAX_TENSORS} outputs", "outputs")
    for index, name in enumerate(requested):
        if name not in named:
            raise InvalidArgument(f"output {name!r} is not in the function's answer "
                                  f"(it has: {', '.join(sorted(named))[:300]})",
                                  field=f"outputs[{index}].name")
    return [output_tensor(str(name), named[name]) for name in (requested or named)]
