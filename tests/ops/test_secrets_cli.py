"""`thaw secret`: the value comes from stdin or a file, never from the command line;
what is sent, and what is printed (never the value)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from thaw.ops import secrets as secrets_cli
from thaw.ops.cli import cli


class FakeClient:
    sent: list[tuple[str, str, dict[str, Any]]] = []

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        FakeClient.sent.append((method, path, kwargs))
        if method == "PUT":
            doc: dict[str, Any] = {"name": path.rsplit("/", 1)[1], "version": 2,
                                   "created_at": 1.0, "updated_at": 2.0,
                                   "functions": ["chat"], "drained": 3}
        elif method == "GET":
            doc = {"secrets": [{"name": "TOKEN", "version": 1, "created_at": 1.0,
                                "updated_at": 1.0}]}
        else:
            doc = {"name": path.rsplit("/", 1)[1], "deleted": True, "used_by": []}
        return httpx.Response(200, json=doc)


@pytest.fixture(autouse=True)
def fake_client(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeClient.sent = []
    monkeypatch.setattr(secrets_cli, "Client", FakeClient)


def test_set_reads_stdin_and_drops_one_trailing_newline() -> None:
    result = CliRunner().invoke(cli, ["secret", "set", "TOKEN"], input="abc def\n\n")
    assert result.exit_code == 0, result.output
    method, path, kwargs = FakeClient.sent[0]
    assert (method, path, kwargs["json"]) == ("PUT", "/v1/secrets/TOKEN",
                                              {"value": "abc def\n"})
    assert "abc def" not in result.output
    assert "updated (version 2)" in result.output and "used by chat" in result.output


def test_set_reads_a_file_and_names_a_tenant(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"from-file\r\n")
    result = CliRunner().invoke(cli, ["secret", "set", "TOKEN", "--from-file", str(path),
                                      "--tenant", "acme"])
    assert result.exit_code == 0, result.output
    _method, _path, kwargs = FakeClient.sent[0]
    assert kwargs["json"] == {"value": "from-file"} and kwargs["params"] == {
        "tenant": "acme"}


def test_a_value_on_the_command_line_is_refused() -> None:
    result = CliRunner().invoke(cli, ["secret", "set", "TOKEN", "the-value"])
    assert result.exit_code == 2 and "Got unexpected extra argument" in result.output
    assert FakeClient.sent == []


def test_values_past_the_bound_or_not_utf8_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (secrets_cli.MAX_VALUE_BYTES + 1))
    result = CliRunner().invoke(cli, ["secret", "set", "T", "--from-file", str(big)])
    assert result.exit_code == 1 and "at most 65536 bytes" in str(result.exception)
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe")
    result = CliRunner().invoke(cli, ["secret", "set", "T", "--from-file", str(binary)])
    assert result.exit_code == 1 and "UTF-8" in str(result.exception)
    assert FakeClient.sent == []


def test_ls_and_rm() -> None:
    listing = CliRunner().invoke(cli, ["secret", "ls"])
    assert listing.exit_code == 0 and "TOKEN" in listing.output
    removed = CliRunner().invoke(cli, ["secret", "rm", "TOKEN", "--force"])
    assert removed.exit_code == 0 and "secret TOKEN deleted" in removed.output
    assert FakeClient.sent[-1][2]["params"] == {"force": "true"}
