"""Errors a handler raises on purpose (snapshotter/runtime/errors.py): answered with
their own status and the error shape, marked as the tenant's; anything else stays a 500
whose traceback reaches the tenant's log and never the answer."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import pytest

from thaw.snapshotter.runtime import HTTPError, InvalidInput
from thaw.snapshotter.runtime.errors import (
    RESERVED_STATUSES,
    TENANT_ERROR_HEADER,
    tenant_error_body,
)

from .conftest import Client, Processes, RuntimeProcess, start_fresh, wait_ready

MARK = TENANT_ERROR_HEADER.lower()


@pytest.fixture(scope="module")
def instance(module_processes: Processes) -> tuple[RuntimeProcess, str]:
    process, socket_path = start_fresh(module_processes, "tenant_errors_rt")
    wait_ready(process)
    return process, socket_path


@pytest.fixture
def client(instance: tuple[RuntimeProcess, str]) -> Iterator[Client]:
    connection = Client(instance[1])
    yield connection
    connection.close()


def test_invalid_input_is_422_with_its_field(client: Client) -> None:
    response = client.invoke({"kind": "invalid"})
    assert response.status == 422
    assert response.headers[MARK] == "tenant"
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": {"code": "invalid_input", "field": "prompt",
                                         "message": "prompt must not be empty"}}


@pytest.mark.parametrize("status", [400, 401, 404, 409, 418, 429, 500, 503])
def test_http_error_answers_its_status(client: Client, status: int) -> None:
    response = client.invoke({"kind": "http", "status": status})
    assert response.status == status
    assert response.headers[MARK] == "tenant"
    assert response.json() == {"error": {"code": "http_error",
                                         "message": f"answered {status} on purpose"}}


def test_retry_after_is_sent_in_whole_seconds(client: Client) -> None:
    response = client.invoke({"kind": "busy"})
    assert response.status == 503
    assert response.headers["retry-after"] == "3"
    assert response.headers[MARK] == "tenant"
    assert "retry-after" not in client.invoke({"kind": "http", "status": 503}).headers


@pytest.mark.parametrize("retry_after", [-1, float("nan"), float("inf"), "3", True])
def test_retry_after_must_be_seconds(retry_after: object) -> None:
    with pytest.raises(ValueError, match="retry_after"):
        HTTPError(503, "no", retry_after=retry_after)  # type: ignore[arg-type]


def test_http_error_without_detail_says_the_status_phrase(client: Client) -> None:
    response = client.invoke({"kind": "bare", "status": 404})
    assert response.status == 404
    assert response.json() == {"error": {"code": "http_error", "message": "Not Found"}}


@pytest.mark.parametrize("status", sorted(RESERVED_STATUSES))
def test_a_reserved_status_is_the_handlers_own_failure(client: Client, status: int) -> None:
    response = client.invoke({"kind": "http", "status": status})
    assert response.status == 500
    assert MARK not in response.headers
    error = response.json()["error"]
    assert error["code"] == "handler_error"
    assert "kept by the platform" in error["message"]


def test_other_exceptions_are_500_with_the_traceback_only_in_the_log(
        client: Client, instance: tuple[RuntimeProcess, str]) -> None:
    response = client.invoke({"kind": "crash"})
    assert response.status == 500
    assert MARK not in response.headers
    assert response.json() == {"error": {
        "code": "handler_error",
        "message": "RuntimeError: the handler failed inside crunch()"}}
    assert b"Traceback" not in response.body
    assert b"app.py" not in response.body
    log = instance[0].log()
    assert "Traceback (most recent call last)" in log
    assert 'raise RuntimeError("the handler failed inside crunch()")' in log


def test_tenant_errors_leave_no_traceback_in_the_log(
        client: Client, instance: tuple[RuntimeProcess, str]) -> None:
    before = instance[0].log().count("Traceback")
    assert client.invoke({"kind": "http", "status": 500}).status == 500
    assert client.invoke({"kind": "invalid"}).status == 422
    assert client.invoke({"kind": "ok"}).json() == {"ok": True}  # the log is caught up
    assert instance[0].log().count("Traceback") == before


def test_an_http_error_midstream_is_the_streams_last_item(client: Client) -> None:
    response = client.invoke({"kind": "stream", "status": 409})
    assert response.status == 200
    lines = response.body.decode().splitlines()
    assert lines[0] == '{"token":"a"}'
    assert lines[-1] == '{"error":{"code":"http_error","message":"gave up midway"}}'


def test_wrong_arguments_stay_the_runtimes_400(client: Client) -> None:
    response = client.invoke({"kind": "ok", "nope": 1})
    assert response.status == 400
    assert MARK not in response.headers
    assert response.json()["error"]["code"] == "invalid_argument"


@pytest.mark.parametrize("status", [399, 600, 502, 504, 507])
def test_http_error_refuses_statuses_out_of_range_or_reserved(status: int) -> None:
    with pytest.raises(ValueError, match=f"got {status}"):
        HTTPError(status, "no")


@pytest.mark.parametrize("status", [True, "404", 404.0])
def test_http_error_status_must_be_an_int(status: object) -> None:
    with pytest.raises(TypeError, match="must be an int"):
        HTTPError(status, "no")  # type: ignore[arg-type]


def test_invalid_input_is_a_value_error_and_survives_pickling() -> None:
    exc = InvalidInput("too long", field="prompt")
    assert isinstance(exc, ValueError) and isinstance(exc, HTTPError)
    assert (exc.status, str(exc), exc.field) == (422, "too long", "prompt")
    copy = pickle.loads(pickle.dumps(exc))
    assert (type(copy), copy.status, copy.detail, copy.field) == (
        InvalidInput, 422, "too long", "prompt")
    http = pickle.loads(pickle.dumps(HTTPError(409, "taken", field="name")))
    assert tenant_error_body(http) == {"error": {"code": "http_error", "message": "taken",
                                                 "field": "name"}}
    busy = pickle.loads(pickle.dumps(Overloaded("gpu0")))
    assert (type(busy), busy.status, busy.retry_after, busy.device) == (
        Overloaded, 503, 1.5, "gpu0")


class Overloaded(HTTPError):
    """A tenant's own subclass, with arguments and attributes of its own."""

    def __init__(self, device: str) -> None:
        super().__init__(503, f"{device} is full", retry_after=1.5)
        self.device = device
