"""`fresh` mode: import, setup, serve HTTP/1.1 over a unix socket (DESIGN.md §3)."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

import pytest

from .conftest import Client, Processes, start_fresh, wait_ready


@pytest.fixture(scope="module")
def instances(module_processes: Processes) -> dict[str, str]:
    """One fresh instance per serving fixture; started together, they start in parallel."""
    started = {name: start_fresh(module_processes, name)
               for name in ("echo_rt", "bytes_rt", "predict_rt", "stream_rt", "raises_rt")}
    for process, _ in started.values():
        wait_ready(process)
    return {name: socket_path for name, (_, socket_path) in started.items()}


@pytest.fixture
def client(request: pytest.FixtureRequest, instances: dict[str, str]) -> Any:
    connection = Client(instances[request.param])
    yield connection
    connection.close()


def test_ready_event_reports_pid_and_timings(processes: Processes) -> None:
    process, _ = start_fresh(processes, "echo_rt")
    event = wait_ready(process)
    assert event["pid"] == process.pid
    assert set(event["timings"]) == {"import", "setup"}
    assert all(isinstance(v, float) and v >= 0 for v in event["timings"].values())


@pytest.mark.parametrize("client", ["echo_rt"], indirect=True)
def test_healthz(client: Client) -> None:
    response = client.request("GET", "/healthz")
    assert response.status == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize("client", ["echo_rt"], indirect=True)
def test_call_receives_request_and_returns_json(client: Client) -> None:
    response = client.invoke({"k": [1, 2]}, path="/invoke/v1/embeddings?x=1",
                             headers={"X-Custom": "yes"})
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.body)
    echoed = response.json()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/v1/embeddings"
    assert echoed["query"] == "x=1"
    assert echoed["headers"]["x-custom"] == "yes"
    assert echoed["json"] == {"k": [1, 2]}
    assert echoed["body"] == '{"k": [1, 2]}'


@pytest.mark.parametrize("client", ["echo_rt"], indirect=True)
def test_plain_invoke_has_empty_sub_path(client: Client) -> None:
    assert client.invoke({}).json()["path"] == ""


@pytest.mark.parametrize("client", ["echo_rt"], indirect=True)
def test_server_timing_header(client: Client) -> None:
    timing = client.invoke({}).headers["server-timing"]
    name, _, duration = timing.partition(";dur=")
    assert name == "run"
    assert 0 <= float(duration) < 1000


@pytest.mark.parametrize("client", ["echo_rt"], indirect=True)
def test_keep_alive_reuses_one_connection(client: Client) -> None:
    client.invoke({})
    first_socket = client.connection.sock
    for i in range(20):
        assert client.invoke({"i": i}).json()["json"] == {"i": i}
    assert client.connection.sock is first_socket


@pytest.mark.parametrize("client", ["echo_rt"], indirect=True)
def test_unknown_route_is_404_and_wrong_method_405(client: Client) -> None:
    missing = client.request("GET", "/nope")
    assert missing.status == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong = client.request("GET", "/invoke")
    assert wrong.status == 405
    assert client.request("POST", "/healthz", b"").status == 405


def test_chunked_request_body_and_expect_continue(instances: dict[str, str]) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(instances["echo_rt"])
    sock.sendall(b"POST /invoke HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    sock.sendall(b"5\r\n{\"a\":\r\n3\r\n 1}\r\n0\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        data += sock.recv(65536)
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["json"] == {"a": 1}


def test_concurrent_connections(instances: dict[str, str]) -> None:
    results: list[Any] = []

    def call(i: int) -> None:
        client = Client(instances["echo_rt"])
        results.append(client.invoke({"i": i}).json()["json"]["i"])
        client.close()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == list(range(16))


@pytest.mark.parametrize("client", ["bytes_rt"], indirect=True)
def test_bytes_result_is_octet_stream(client: Client) -> None:
    payload = bytes(range(256)) * 1000  # above the one-write size: head and body apart
    response = client.request("POST", "/invoke", payload)
    assert response.status == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.body == payload[::-1]


@pytest.mark.parametrize("client", ["predict_rt"], indirect=True)
def test_predict_gets_json_keys_as_kwargs(client: Client) -> None:
    assert client.invoke({"a": 40}).json() == {"sum": 42}
    assert client.invoke({"a": 1, "b": 1}).json() == {"sum": 2}


@pytest.mark.parametrize("client", ["predict_rt"], indirect=True)
@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"a": 1, "c": 3}', "unexpected keyword"),
        (b"{}", "missing a required argument"),
    ],
)
def test_bad_predict_body_is_400(client: Client, body: bytes, fragment: str) -> None:
    response = client.request("POST", "/invoke", body, {"Content-Type": "application/json"})
    assert response.status == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_argument"
    assert fragment in error["message"]


@pytest.mark.parametrize("client", ["raises_rt"], indirect=True)
def test_handler_exception_is_500_with_type_and_message(client: Client) -> None:
    response = client.invoke({})
    assert response.status == 500
    assert response.json() == {"error": {"code": "handler_error", "message": "ValueError: boom"}}
    # The instance keeps serving after a failed call.
    assert client.request("GET", "/healthz").status == 200


def _read_stream(socket_path: str, payload: dict[str, Any], accept: str | None) -> Any:
    client = Client(socket_path)
    headers = {"Content-Type": "application/json"}
    if accept:
        headers["Accept"] = accept
    client.connection.request("POST", "/invoke", json.dumps(payload).encode(), headers)
    response = client.connection.getresponse()
    return client, response


def test_generator_streams_server_sent_events(instances: dict[str, str]) -> None:
    client, response = _read_stream(instances["stream_rt"], {"n": 3}, "text/event-stream")
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    assert response.getheader("Transfer-Encoding") == "chunked"
    body = response.read().decode()
    assert body == (
        'data: {"i":0}\n\ndata: {"i":1}\n\ndata: {"i":2}\n\nevent: done\ndata: {}\n\n'
    )
    # The chunked stream ended cleanly: the connection is reusable.
    assert client.invoke({"n": 1}, headers={"Accept": "text/event-stream"}).status == 200
    client.close()


def test_generator_streams_ndjson_by_default(instances: dict[str, str]) -> None:
    client, response = _read_stream(instances["stream_rt"], {"n": 4}, None)
    assert response.getheader("Content-Type") == "application/x-ndjson"
    lines = response.read().decode().splitlines()
    assert [json.loads(line) for line in lines] == [{"i": i} for i in range(4)]
    client.close()


def test_stream_failure_midway_ends_with_an_error_item(instances: dict[str, str]) -> None:
    client, response = _read_stream(instances["stream_rt"], {"n": 5, "fail_at": 2}, None)
    lines = [json.loads(line) for line in response.read().decode().splitlines()]
    assert lines[:2] == [{"i": 0}, {"i": 1}]
    assert lines[2] == {"error": {"code": "handler_error", "message": "RuntimeError: failed at 2"}}
    client.close()

    client, response = _read_stream(
        instances["stream_rt"], {"n": 5, "fail_at": 1}, "text/event-stream"
    )
    body = response.read().decode()
    assert body.startswith('data: {"i":0}\n\nevent: error\ndata: {"error":')
    assert "event: done" not in body
    client.close()


def test_stream_failing_before_first_item_is_a_plain_500(instances: dict[str, str]) -> None:
    client = Client(instances["stream_rt"])
    response = client.invoke({"n": 3, "fail_at": 0})
    assert response.status == 500
    assert response.json()["error"]["message"] == "RuntimeError: failed at 0"
    client.close()


@pytest.mark.parametrize(
    ("bundle", "stage", "code", "reason"),
    [
        ("setup_fails_rt", "setup", 11, "RuntimeError: weights missing"),
        ("import_fails_rt", "import", 10, "ModuleNotFoundError: No module named "
                                          "'module_that_does_not_exist'"),
    ],
)
def test_failed_start_reports_stage_and_exits_nonzero(
    processes: Processes, bundle: str, stage: str, code: int, reason: str
) -> None:
    process, _ = start_fresh(processes, bundle)
    event = process.event()
    assert event == {"event": "failed", "stage": stage, "reason": reason}
    assert process.wait() == code
    assert "Traceback" in process.log()  # the tenant sees why in the instance log
