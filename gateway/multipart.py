"""A `multipart/form-data` request body as its parts, parsed by python-multipart
within bounds: at most `max_parts` parts, each part's headers bounded by the parser,
and the body itself already read within the function's body limit (request.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from thaw.core.errors import InvalidArgument

FORM_CONTENT_TYPE = "multipart/form-data"
# A part's headers: Content-Disposition, Content-Type and a few more.
MAX_PART_HEADERS = 8


@dataclass
class Part:
    """One part: a field (no filename) or a file."""

    name: str = ""
    filename: str | None = None
    content_type: str = ""
    data: bytearray = field(default_factory=bytearray)

    @property
    def is_file(self) -> bool:
        return self.filename is not None


def is_form(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == FORM_CONTENT_TYPE


def boundary_of(content_type: str) -> bytes:
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > 200:
        raise InvalidArgument("a multipart/form-data body needs a boundary (1 to 200 "
                              "characters) in its Content-Type", field="Content-Type")
    return boundary


def parse_form(content_type: str, body: bytes, max_parts: int) -> list[Part]:
    """The parts of a form body; raises InvalidArgument (field "body") for a malformed
    one or one of more than `max_parts` parts."""
    parts: list[Part] = []
    header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}
    headers: dict[str, str] = {}

    def on_part_begin() -> None:
        if len(parts) >= max_parts:
            raise InvalidArgument(f"the form has more than {max_parts} parts "
                                  "(max_input_files)", field="body")
        headers.clear()
        parts.append(Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        headers[header["field"].decode("latin-1").lower()] = header["value"].decode(
            "utf-8", "replace")
        header["field"].clear()
        header["value"].clear()

    def on_headers_finished() -> None:
        part = parts[-1]
        kind, options = parse_options_header(headers.get("content-disposition", ""))
        if kind != b"form-data" or not options.get(b"name"):
            raise InvalidArgument("each part of a form needs Content-Disposition: "
                                  'form-data; name="..."', field="body")
        part.name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            part.filename = options[b"filename"].decode("utf-8", "replace")
        part.content_type = headers.get("content-type", "").strip()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data += data[start:end]

    parser = MultipartParser(boundary_of(content_type), {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
    }, max_header_count=MAX_PART_HEADERS)
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidArgument(f"the multipart/form-data body is malformed: {exc}",
                              field="body") from None
    if parser.state != MultipartState.END:
        raise InvalidArgument("the multipart/form-data body ends before its closing "
                              "boundary", field="body")
    return parts
