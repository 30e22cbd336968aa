"""Loading the tenant's handler class and calling it (DESIGN.md §3).

The handler needs no import from thaw: a class with `setup()`, then `predict(**inputs)`
or `__call__(request)`, optionally `on_restore()`. This module turns an HTTP request
into that call and the return value into a reply; the server writes the reply.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import json
import mimetypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .batching import Batcher
from .files import (
    FILES_CONTENT_TYPE,
    FileInputError,
    HasFiles,
    Scratch,
    after_stream,
    file_params,
    is_file_value,
    materialise,
    with_markers,
)
from .response import Response
from .signature import call_defaults, predict_of

JSON_CONTENT_TYPE = "application/json"
BYTES_CONTENT_TYPE = "application/octet-stream"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"


class InvalidInput(ValueError):
    """The caller sent a body the handler cannot take: not JSON, or keys predict() does
    not take (the runtime's own check, answered 400 invalid_argument). A handler that
    refuses an input itself raises errors.InvalidInput (422) instead."""


@dataclasses.dataclass(frozen=True)
class HandlerRef:
    """Where a handler lives: a bundle folder and `module:Class`."""

    bundle: Path
    module: str
    qualname: str

    @classmethod
    def parse(cls, bundle: str | os.PathLike[str], spec: str) -> HandlerRef:
        module, sep, qualname = spec.partition(":")
        if not sep or not module or not qualname:
            raise ValueError(f"handler must look like module:Class, got {spec!r}")
        return cls(Path(bundle).resolve(), module, qualname)

    def __str__(self) -> str:
        return f"{self.module}:{self.qualname}"


def activate_bundle(ref: HandlerRef) -> None:
    """Make the bundle the function's home: first on sys.path, and the working
    directory, so tenant code can open its own files by relative path. Every path the
    runtime itself uses is resolved before this."""
    sys.path.insert(0, str(ref.bundle))
    os.chdir(ref.bundle)


def import_handler_class(ref: HandlerRef) -> type:
    """Import the handler's module and return the class (the "import" stage)."""
    target: Any = importlib.import_module(ref.module)
    for part in ref.qualname.split("."):
        target = getattr(target, part)
    if not isinstance(target, type):
        raise TypeError(f"{ref} is not a class")
    if not callable(getattr(target, "predict", None)) and "__call__" not in dir(target):
        raise TypeError(f"{ref} defines neither predict() nor __call__()")
    return target


def create_handler(cls: type) -> object:
    """Instantiate with no arguments and run setup() (the "setup" stage)."""
    handler = cls()
    setup = getattr(handler, "setup", None)
    if callable(setup):
        setup()
    return handler


class Request:
    """What `__call__(request)` receives."""

    __slots__ = ("method", "path", "query", "headers", "body")

    def __init__(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> None:
        self.method = method
        # The sub-path after /invoke, with its leading slash ("/v1/embeddings"); "" for
        # a plain /invoke.
        self.path = path
        self.query = query
        # Lower-case names; repeated headers joined with ", " as HTTP allows.
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise InvalidInput("request body nests too deeply to parse") from exc

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path!r} {len(self.body)} bytes>"


@dataclasses.dataclass(frozen=True)
class Payload:
    """A complete reply body."""

    content_type: str
    body: bytes
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    """A Response's own headers, checked (response.py)."""


@dataclasses.dataclass(frozen=True)
class Stream:
    """Items of a generator result, the first already produced (so a handler that
    fails before its first item still gets a plain 500)."""

    items: Iterator[Any]
    close: Any  # the generator's close(), or None: run on client disconnect
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str | None = None
    """A Response's stream: its content type, and its items written as they are
    (bytes, str as UTF-8, anything else a JSON line); None: NDJSON or SSE by Accept."""


@dataclasses.dataclass(frozen=True)
class FileReply:
    """A Response whose body is a file: sent whole with its length."""

    path: str
    content_type: str
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()


Reply = Payload | Stream | FileReply


def _jsonable(value: Any) -> Any:
    # NumPy arrays and scalars and torch tensors all offer tolist(); only called for
    # values the json module cannot encode itself, so the common path pays nothing.
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    if isinstance(value, (set, frozenset)):
        return list(value)
    if is_file_value(value):
        raise HasFiles  # a path in the answer: to_reply sends it as a file
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_jsonable)


def encode_json(value: Any) -> bytes:
    return _encoder.encode(value).encode()


_JSON_TYPES = (dict, list, str, int, float, bool, tuple, type(None))
_BYTES_TYPES = (bytes, bytearray, memoryview)
_NOTHING = object()


def to_reply(result: Any) -> Reply:
    """Map a handler's return value to a reply (the table in DESIGN.md §3)."""
    if isinstance(result, Response):
        return response_reply(result)
    if isinstance(result, _JSON_TYPES):
        return _json_payload(result)
    if isinstance(result, _BYTES_TYPES):
        return Payload(BYTES_CONTENT_TYPE, bytes(result))
    if isinstance(result, Iterator):
        first = next(result, _NOTHING)
        items = iter(()) if first is _NOTHING else itertools.chain((first,), result)
        return Stream(items, getattr(result, "close", None))
    return _json_payload(result)


def _json_payload(result: Any) -> Payload:
    """JSON, or, when paths are in it, FILES_CONTENT_TYPE with the files inside
    (files.py; the check costs nothing until the encoder meets a value it cannot
    encode)."""
    try:
        return Payload(JSON_CONTENT_TYPE, encode_json(result))
    except HasFiles:
        return Payload(FILES_CONTENT_TYPE, encode_json(with_markers(result)))


def response_reply(response: Response) -> Reply:
    """A Response's reply: its body as the plain value's would be, with its status,
    headers and content type (a file's guessed from its name)."""
    body, status, headers = response.body, response.status, response.headers
    path = response.file_path
    if path is not None:
        content_type = response.content_type or (
            mimetypes.guess_type(path)[0] or BYTES_CONTENT_TYPE)
        return FileReply(path, content_type, status, headers)
    if isinstance(body, str):
        return Payload(response.content_type or TEXT_CONTENT_TYPE, body.encode(), status,
                       headers)
    if isinstance(body, _BYTES_TYPES):
        return Payload(response.content_type or BYTES_CONTENT_TYPE, bytes(body), status,
                       headers)
    if isinstance(body, Iterator):
        first = next(body, _NOTHING)
        items = iter(()) if first is _NOTHING else itertools.chain((first,), body)
        return Stream(items, getattr(body, "close", None), status, headers,
                      response.content_type or BYTES_CONTENT_TYPE)
    payload = _json_payload(body)
    content_type = payload.content_type
    if content_type == JSON_CONTENT_TYPE and response.content_type:
        content_type = response.content_type
    return Payload(content_type, payload.body, status, headers)


class Invoker:
    """Calls one handler object; chosen once, so each call is a straight dispatch."""

    def __init__(self, handler: object) -> None:
        self.handler = handler
        self._predict = predict_of(handler)
        self._signature: inspect.Signature | None = None
        if self._predict is not None:
            try:
                self._signature = inspect.signature(self._predict)
            except (TypeError, ValueError):  # builtins without a signature: skip checks
                self._signature = None
        elif not callable(handler):
            raise TypeError(f"{type(handler).__name__} defines neither predict() nor __call__()")
        # Arguments whose default is an `Input(...)`: the value it stands for is passed,
        # never the Input object (the gateway fills them too where it checks the call).
        self._input_defaults, self._input_required = (
            call_defaults(self._predict) if self._predict is not None else ({}, frozenset()))
        # With batching on, the handler takes one list (of input dicts for predict(),
        # of Requests for __call__) and returns a list of results.
        target = self._predict if self._predict is not None else handler
        self._batcher = Batcher.from_env(target)  # type: ignore[arg-type]
        # Parameters that take files (a path in the instance's /tmp; files.py).
        self._files = file_params(self._predict) if self._predict is not None else {}

    @property
    def any_method(self) -> bool:
        """Whether the handler takes every HTTP method (`__call__`); predict() takes
        its inputs from a POST's JSON body only."""
        return self._predict is None

    def invoke(self, request: Request) -> Reply:
        """Raises InvalidInput for a bad request; anything else is the handler's."""
        if self._batcher is not None:
            value = request if self._predict is None else self._parse_inputs(request.body)
            return to_reply(self._batcher.submit(value))
        if self._predict is None:
            return to_reply(self.handler(request))  # type: ignore[operator]
        inputs = self._parse_inputs(request.body)
        if self._input_defaults or self._input_required:
            inputs = self._with_input_defaults(inputs)
        if self._signature is not None:
            try:
                self._signature.bind(**inputs)
            except TypeError as exc:
                raise InvalidInput(f"predict(): {exc}") from exc
        if not self._files:
            return to_reply(self._predict(**inputs))
        try:
            inputs, scratch = materialise(inputs, self._files)
        except FileInputError as exc:
            raise InvalidInput(str(exc)) from None
        try:
            reply = to_reply(self._predict(**inputs))
        except BaseException:
            scratch.cleanup()
            raise
        return _after_reply(reply, scratch)

    def _with_input_defaults(self, inputs: dict[str, Any]) -> dict[str, Any]:
        missing = sorted(self._input_required - inputs.keys())
        if missing:
            raise InvalidInput(f"predict(): missing required argument {missing[0]!r}")
        return {**self._input_defaults, **inputs}

    @staticmethod
    def _parse_inputs(body: bytes) -> dict[str, Any]:
        if not body.strip():
            return {}
        try:
            inputs = json.loads(body)
        except ValueError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise InvalidInput("request body nests too deeply to parse") from exc
        if not isinstance(inputs, dict):
            raise InvalidInput(
                f"predict() takes a JSON object of keyword arguments, got {type(inputs).__name__}"
            )
        return inputs


def _after_reply(reply: Reply, scratch: Scratch) -> Reply:
    """The reply, with the call's input files removed once it is sent (a stream's
    when its items end or stop)."""
    if isinstance(reply, Stream):
        return dataclasses.replace(reply, items=after_stream(reply.items, scratch.cleanup))
    scratch.cleanup()
    return reply
