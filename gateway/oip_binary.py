"""Open Inference v2's binary tensor data extension (docs/open-inference.md, "Binary
tensor data"), as Triton and its clients speak it.

A request whose `Inference-Header-Content-Length` header is N carries a JSON header of
N bytes, then the raw data of every input whose `parameters.binary_data_size` says how
many bytes are its, in the inputs' order: little-endian, row-major; BOOL one byte an
element; BYTES elements each a 4-byte little-endian length and that many bytes; BF16
the upper 16 bits of an FP32. The data becomes the input's elements, checked as JSON
data is. An answer carries outputs asked with `parameters.binary_data: true` (or all,
with the request's `parameters.binary_data_output: true`) the same way: the JSON
header (those outputs with `parameters.binary_data_size` and no `data`), then their
bytes, its length in the answer's `Inference-Header-Content-Length`.
Pure functions, no I/O; InvalidArgument (400) names the field at fault.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from thaw.core.errors import InvalidArgument
from thaw.gateway.errors import BadFunctionAnswer
from thaw.gateway.oip_tensors import DATATYPES, MAX_RANK, Tensor

HEADER = "Inference-Header-Content-Length"
OCTETS = "application/octet-stream"
# struct's code and size of one element of each fixed-size datatype.
FIXED: dict[str, tuple[str, int]] = {
    "BOOL": ("?", 1), "INT8": ("b", 1), "UINT8": ("B", 1), "INT16": ("h", 2),
    "UINT16": ("H", 2), "INT32": ("i", 4), "UINT32": ("I", 4), "INT64": ("q", 8),
    "UINT64": ("Q", 8), "FP16": ("e", 2), "FP32": ("f", 4), "FP64": ("d", 8),
    "BF16": ("H", 2)}
FLOATS = frozenset({"FP16", "FP32", "FP64", "BF16"})


def split_body(body: bytes, header: str | None, max_json_bytes: int) -> tuple[bytes, bytes]:
    """The JSON header and the binary data after it (b"" without the header)."""
    if header is None:
        return body, b""
    value = header.strip()
    if not value.isdigit() or not 0 < int(value) <= len(body):
        raise InvalidArgument(f"{HEADER} must be the JSON header's length in bytes, 1 "
                              f"to the body's {len(body)}; got {header[:40]!r}",
                              field=HEADER)
    length = int(value)
    if length > max_json_bytes:
        raise InvalidArgument(f"the JSON header ({HEADER} {length}) is larger than "
                              f"max_json_bytes ({max_json_bytes})", field=HEADER)
    return body[:length], body[length:]


def attach_inputs(doc: Any, binary: bytes) -> None:
    """Give each input of `doc` (the parsed JSON header) that names a
    `binary_data_size` its elements from `binary`, in order, as its `data`; every
    byte of `binary` must be some input's."""
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    offset = 0
    for index, raw in enumerate(inputs if isinstance(inputs, list) else []):
        params = raw.get("parameters") if isinstance(raw, dict) else None
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        field = f"inputs[{index}]"
        name = raw.get("name")
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"input {name!r}: binary_data_size must be a "
                                  "non-negative integer", field=f"{field}.parameters")
        if "data" in raw:
            raise InvalidArgument(f"input {name!r} has both 'data' and binary_data_size",
                                  field=f"{field}.data")
        if offset + size > len(binary):
            raise InvalidArgument(f"input {name!r}: its {size} bytes of binary data "
                                  f"pass the body's end ({len(binary) - offset} left)",
                                  field=f"{field}.parameters")
        raw["data"] = decode(name, raw.get("datatype"), raw.get("shape"),
                             binary[offset:offset + size], field)
        raw["parameters"] = {k: v for k, v in params.items() if k != "binary_data_size"}
        offset += size
    if offset != len(binary):
        raise InvalidArgument(f"{len(binary) - offset} bytes of binary data after the "
                              "inputs' binary_data_size; the header length or a size is "
                              "wrong", field=HEADER)


def _count(name: Any, shape: Any, field: str) -> int:
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                       for d in shape)):
        raise InvalidArgument(f"tensor {name!r}: 'shape' must be a list of at most "
                              f"{MAX_RANK} non-negative integers", field=f"{field}.shape")
    return math.prod(shape)


def decode(name: Any, datatype: Any, shape: Any, raw: bytes, field: str) -> list[Any]:
    """A tensor's elements, flat, from its binary data."""
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidArgument(f"tensor {name!r}: datatype {datatype!r} is not one of "
                              f"{', '.join(sorted(DATATYPES))}", field=f"{field}.datatype")
    count = _count(name, shape, field)
    if datatype == "BYTES":
        return _decode_bytes(name, count, raw, field)
    code, size = FIXED[datatype]
    if len(raw) != count * size:
        raise InvalidArgument(f"tensor {name!r}: shape {shape} of {datatype} is "
                              f"{count * size} bytes, binary_data_size is {len(raw)}",
                              field=f"{field}.parameters")
    values: list[Any] = list(struct.unpack(f"<{count}{code}", raw))
    if datatype == "BF16":
        values = list(struct.unpack(f"<{count}f",
                                    struct.pack(f"<{count}I", *(v << 16 for v in values))))
    if datatype in FLOATS and not all(math.isfinite(v) for v in values):
        raise InvalidArgument(f"tensor {name!r}: NaN and infinite values cannot reach "
                              "the handler (its body is JSON)", field=f"{field}.data")
    return values


def _decode_bytes(name: Any, count: int, raw: bytes, field: str) -> list[Any]:
    values: list[str] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"tensor {name!r}: BYTES element {len(values)} has a "
                                  "cut length prefix", field=f"{field}.parameters")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(f"tensor {name!r}: BYTES element {len(values)} of "
                                  f"{length} bytes passes its data's end",
                                  field=f"{field}.parameters")
        try:
            values.append(raw[offset:offset + length].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"tensor {name!r}: BYTES element {len(values)} is not "
                                  "UTF-8 (the handler's body is JSON)",
                                  field=f"{field}.data") from exc
        offset += length
    if len(values) != count:
        raise InvalidArgument(f"tensor {name!r}: its shape holds {count} elements, its "
                              f"binary data {len(values)}", field=f"{field}.shape")
    return values


def encode(t: Tensor) -> bytes:
    """An output's elements as binary data; BadFunctionAnswer (502) for a value its
    datatype cannot hold (an FP16 past 65504)."""
    n = len(t.flat)
    try:
        if t.datatype == "BYTES":
            parts = []
            for value in t.flat:
                data = str(value).encode("utf-8")
                parts.append(struct.pack("<I", len(data)) + data)
            return b"".join(parts)
        if t.datatype == "BF16":
            bits = struct.unpack(f"<{n}I", struct.pack(f"<{n}f", *t.flat))
            # Round to nearest, ties to even, as float32 -> bfloat16 converters do.
            return struct.pack(f"<{n}H", *(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
                                           for b in bits))
        code, _ = FIXED[t.datatype]
        return struct.pack(f"<{n}{code}", *t.flat)
    except (struct.error, OverflowError) as exc:
        raise BadFunctionAnswer(f"the function's answer: output {t.name!r} does not fit "
                                f"{t.datatype}: {exc}", field=f"outputs.{t.name}") from exc


def binary_answer(body: dict[str, Any], outputs: list[Tensor], binary: frozenset[str]
                  ) -> tuple[bytes, int] | None:
    """The answer with the outputs named in `binary` as binary data, and its JSON
    header's length; None when no output is binary."""
    if not any(t.name in binary for t in outputs):
        return None
    blobs: list[bytes] = []
    described = []
    for t in outputs:
        doc = t.json()
        if t.name in binary:
            blob = encode(t)
            del doc["data"]
            doc["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        described.append(doc)
    header = json.dumps({**body, "outputs": described}, separators=(",", ":")).encode()
    return header + b"".join(blobs), len(header)
