"""The CLI on thaw.client, without a platform: where it finds the gateway (thaw up's
remembered URL), invoke's body and headers, deploy's report in words, and errors as
one line without an exception's class name."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import structlog

from thaw.client.credentials import DEV_URL_FILE, credentials, gateway_url
from thaw.ops import cli as cli_module
from thaw.ops.functions import _report, parse_headers, read_body


@pytest.fixture(autouse=True)
def keep_structlog() -> Iterator[None]:
    """cli() points structlog at this test's captured stderr: put back what was."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture()
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("THAW_URL", "THAW_API_KEY", "THAW_PROFILE", "THAW_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("THAW_CONFIG_FILE", str(tmp_path / "absent.toml"))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("THAW_HOME", str(home))
    return home


def test_thaw_ups_url_is_the_default_after_its_key(clean_env: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / "dev-key").write_text("dk\n")
    (clean_env / DEV_URL_FILE).write_text("http://127.0.0.1:9123\n")
    assert credentials().url == "http://127.0.0.1:9123" and credentials().key == "dk"
    assert gateway_url() == "http://127.0.0.1:9123"
    monkeypatch.setenv("THAW_URL", "http://elsewhere:1")
    assert credentials().url == "http://elsewhere:1" and gateway_url() == "http://elsewhere:1"


def test_a_key_from_elsewhere_does_not_take_thaw_ups_url(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # THAW_API_KEY is some other platform's key: thaw up's URL does not go with it.
    (clean_env / DEV_URL_FILE).write_text("http://127.0.0.1:9123\n")
    monkeypatch.setenv("THAW_API_KEY", "other")
    assert credentials().url == "http://127.0.0.1:8000"


def test_read_body(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert read_body('{"a": 1}') == b'{"a": 1}'
    (tmp_path / "in.json").write_bytes(b'{"from": "file"}')
    assert read_body(f"@{tmp_path / 'in.json'}") == b'{"from": "file"}'

    class Stdin:
        buffer = __import__("io").BytesIO(b"piped")

    monkeypatch.setattr(sys, "stdin", Stdin)
    assert read_body("-") == b"piped"
    with pytest.raises(click.BadParameter, match="cannot read .*absent"):
        read_body(f"@{tmp_path / 'absent'}")


def test_parse_headers() -> None:
    assert parse_headers(("Content-Type: text/plain", "X-A:b:c")) == {
        "Content-Type": "text/plain", "X-A": "b:c"}
    for bad in ("no colon", ": empty", "two words: x"):
        with pytest.raises(click.BadParameter, match="is not K:V"):
            parse_headers((bad,))


FN: dict[str, Any] = {"name": "embed", "version": 3, "state": "ready",
                      "start_mode": "restore", "url": "http://f/fn/dev/embed"}


def test_report_no_wait_says_the_build_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    _report({**FN, "state": "building", "latest_build": {"version": 4, "state": "building"}},
            1024, 0.5, 0.0, no_wait=True)
    out, err = capsys.readouterr()
    assert "embed v4: uploaded, building (not waited for: `thaw fn status embed`" in out
    assert out.strip().splitlines()[-1] == FN["url"]
    assert "build goes on without this command" in err and "built in" not in err


def test_report_a_failed_first_build_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _report({**FN, "state": "failed", "reason": "setup() raised ValueError"},
                1024, 0.5, 2.0, no_wait=False)
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert "embed v3: failed" in out and "setup() raised ValueError" in out
    assert "error: the deploy failed" in err and "no version of it serves" in err


def test_report_a_failed_redeploy_names_what_still_serves(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _report({**FN, "latest_build": {"version": 4, "state": "failed",
                                        "reason": "import error"}},
                1024, 0.5, 2.0, no_wait=True)
    out, err = capsys.readouterr()
    assert "version 4 failed to build: import error; version 3 still serves" in out
    assert "error: the deploy failed" in err and "no version" not in err


def _main(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["thaw", *argv])
    with pytest.raises(SystemExit) as exited:
        cli_module.main()
    return int(exited.value.code or 0)


def test_an_unreachable_gateway_is_one_line(clean_env: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens
    monkeypatch.setenv("THAW_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("THAW_API_KEY", "k")
    code = _main(monkeypatch, "fn", "ls")
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"error: cannot reach the gateway at http://127.0.0.1:{port}")
    assert len(err.strip().splitlines()) == 1
    assert "ConnectError" not in err and "Unavailable" not in err


def test_a_bug_is_one_line_without_its_class(clean_env: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> None:
        raise KeyError("url")

    monkeypatch.setattr(cli_module, "cli", lambda **_kw: broken())
    code = _main(monkeypatch, "fn", "ls")
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == ("error: unexpected failure: 'url' (THAW_DEBUG=1 shows the "
                           "traceback)")
    monkeypatch.setenv("THAW_DEBUG", "1")
    with pytest.raises(KeyError):
        cli_module.main()


def test_invoke_with_a_sub_path_a_header_and_a_file_body(
        platform: Any, tmp_path: Path) -> None:
    import json
    import os
    import subprocess

    from tests.conftest import FIXTURES

    assert platform.deploy(FIXTURES / "echo_rt", force=False).status_code in (200, 201)
    env = {k: v for k, v in os.environ.items() if not k.startswith("THAW_")}
    env.update({"THAW_URL": platform.url, "THAW_API_KEY": platform.key,
                "THAW_HOME": str(tmp_path / "none"),
                "THAW_CONFIG_FILE": str(tmp_path / "absent.toml")})
    (tmp_path / "body.json").write_text('{"from": "file"}')

    def thaw(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "thaw.ops", *args], env=env,
                              input=stdin, capture_output=True, text=True, timeout=300)

    result = thaw("invoke", "echo-rt", "--path", "/a/b", "-d", f"@{tmp_path / 'body.json'}",
                  "-H", "Content-Type: application/json; charset=utf-8")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["path"] == "/a/b" and answer["json"] == {"from": "file"}
    assert {k.lower(): v for k, v in answer["headers"].items()}["content-type"] == (
        "application/json; charset=utf-8")

    piped = thaw("invoke", "echo-rt", "-d", "-", stdin='{"from": "stdin"}')
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["json"] == {"from": "stdin"}

    missing = thaw("invoke", "no-such-function")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "Error: no function named 'no-such-function'"


def test_deploy_no_wait_says_the_build_was_not_waited_for(
        platform: Any, tmp_path: Path) -> None:
    import os
    import subprocess

    from tests.conftest import FIXTURES

    env = {k: v for k, v in os.environ.items() if not k.startswith("THAW_")}
    env.update({"THAW_URL": platform.url, "THAW_API_KEY": platform.key,
                "THAW_HOME": str(tmp_path / "none"),
                "THAW_CONFIG_FILE": str(tmp_path / "absent.toml"), "COLUMNS": "200"})
    result = subprocess.run([sys.executable, "-m", "thaw.ops", "deploy", "--no-wait",
                             "--force", str(FIXTURES / "prints")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(not waited for: `thaw fn status prints` shows when it is ready)" in result.stdout
    assert result.stdout.strip().splitlines()[-1].endswith("/fn/dev/prints")
    assert "build goes on without this command" in result.stderr
    assert "built in" not in result.stderr
