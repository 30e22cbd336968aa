"""The real `thaw` CLI, as a subprocess, against a running local platform: deploy,
invoke --stream, fn logs (-f), snapshot ls/inspect/verify/prewarm, top, --json
outputs, credentials from the config file, errors as one line with exit code 1."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, RunningPlatform
from thaw.ops.services import LocalPlatform

# Deploys wait for a snapshot build: seconds here, generous for a loaded machine.
CLI_TIMEOUT = 300.0
# How long `fn logs -f` may take to show a line printed after it started.
FOLLOW_WAIT = 30.0


def cli_env(tmp_path: Path, url: str = "", key: str = "", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("THAW_") or k == "THAW_TEST_POSTGRES_URL"}
    # No ~/.config/thaw or ./.thaw of the machine's user leaks into a test.
    env.update({"HOME": str(tmp_path), "THAW_HOME": str(tmp_path / "no-home"),
                "THAW_CONFIG_FILE": str(tmp_path / "absent.toml"), "COLUMNS": "200"})
    if url:
        env["THAW_URL"] = url
    if key:
        env["THAW_API_KEY"] = key
    env.update(extra)
    return env


def thaw(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "thaw.ops", *args], env=env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT)


@pytest.fixture
def env(platform: RunningPlatform, tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path, platform.url, platform.key)


@pytest.fixture
def deployed(env: dict[str, str]) -> dict[str, str]:
    # --force: new versions, fresh instances, as each test using these expects.
    for bundle in ("prints", "stream_rt", "weights"):
        result = thaw(env, "deploy", "--force", str(FIXTURES / bundle))
        assert result.returncode == 0, result.stderr
    return env


def test_deploy_prints_the_url_and_shows_the_upload(env: dict[str, str]) -> None:
    # --force: a build whatever the shared platform had of it (else "unchanged").
    result = thaw(env, "deploy", "--force", str(FIXTURES / "prints"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].endswith("/fn/dev/prints")
    assert "prints v" in result.stdout and "ready" in result.stdout
    assert "uploaded " in result.stderr and "built in" in result.stderr, result.stderr


def test_invoke_stream_prints_each_item(deployed: dict[str, str]) -> None:
    result = thaw(deployed, "invoke", "stream-rt", "--stream", "-d", '{"n": 3}')
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"i": 0}, {"i": 1}, {"i": 2}]


def test_invoke_stream_failing_midway_is_one_error_line(deployed: dict[str, str]) -> None:
    result = thaw(deployed, "invoke", "stream-rt", "--stream", "-d",
                  '{"n": 3, "fail_at": 1}')
    assert result.returncode == 1
    assert json.loads(result.stdout.splitlines()[0]) == {"i": 0}
    assert result.stderr.strip().startswith("error:") and "failed at 1" in result.stderr


def test_fn_logs_shows_what_the_handler_printed(deployed: dict[str, str],
                                                platform: RunningPlatform) -> None:
    assert platform.invoke("prints", {"tag": "logs-once"}).status_code == 200
    result = thaw(deployed, "fn", "logs", "prints", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    printed = {ln["line"] for ln in lines if ln["stream"] == "output"}
    assert {"prints: hello logs-once", "prints: warning logs-once"} <= printed
    assert any(ln["stream"] == "runtime" and "ready" in ln["line"] for ln in lines)
    assert all(ln["function"] == "dev/prints" and ln["instance"] for ln in lines)
    tail = thaw(deployed, "fn", "logs", "prints", "--tail", "1")
    assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 1


def test_fn_logs_follow_shows_new_lines(deployed: dict[str, str],
                                        platform: RunningPlatform) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "thaw.ops", "fn", "logs", "prints", "-f",
                             "--tail", "0"], env=deployed, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # The follow starts from when the gateway opens it (--tail 0), which the test
    # cannot see: a line printed before then is not new. So the function prints
    # again until the follow shows one of its lines (a warm instance answers within
    # milliseconds, well before a freshly started CLI is connected).
    assert proc.stdout is not None
    printed: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [printed.put(ln) for ln in proc.stdout or ()],
                     daemon=True).start()
    try:
        deadline = time.monotonic() + FOLLOW_WAIT
        seen = ""
        while "prints: hello followed" not in seen:
            assert time.monotonic() < deadline, f"not followed; saw {seen!r}"
            assert proc.poll() is None, f"the follow ended: {seen!r}"
            assert platform.invoke("prints", {"tag": "followed"}).status_code == 200
            with contextlib.suppress(queue.Empty):
                while True:
                    seen += printed.get(timeout=1.0)
    finally:
        proc.terminate()
        proc.wait(10)


def test_snapshot_ls_inspect_verify_and_prewarm(deployed: dict[str, str]) -> None:
    listed = thaw(deployed, "snapshot", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    snaps = {s["name"]: s for s in json.loads(listed.stdout)}
    weights = snaps["weights"]
    assert weights["raw_bytes"] >= 16 * 1024 * 1024 and weights["chunks"] >= 1
    assert weights["disk_nodes"] == ["local"] and weights["state"] == "ready"
    table = thaw(deployed, "snapshot", "ls")
    assert "weights" in table.stdout and weights["id"] in table.stdout

    inspected = thaw(deployed, "snapshot", "inspect", "weights", "--json")
    manifest = json.loads(inspected.stdout)["manifest"]
    assert manifest["arenas"]["host"]["size"] > 0
    assert manifest["fingerprint"]["device_type"] == "host"
    text = thaw(deployed, "snapshot", "inspect", "weights")
    assert "fingerprint" in text.stdout and "setup" in text.stdout

    verified = thaw(deployed, "snapshot", "verify", "weights", "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    summary = json.loads(verified.stdout)
    assert summary["ok"] and summary["nodes"] == ["local"] and summary["bad"] == []
    assert summary["bytes"] == weights["raw_bytes"] or summary["bytes"] > 0
    assert "MB" in verified.stderr  # the progress bar's bytes

    prewarmed = thaw(deployed, "snapshot", "prewarm", "weights")
    assert prewarmed.returncode == 0, prewarmed.stderr
    assert "into pinned memory on local" in prewarmed.stdout and "GB/s" in prewarmed.stdout


def test_snapshot_of_an_unknown_function_is_one_line(env: dict[str, str]) -> None:
    result = thaw(env, "snapshot", "verify", "no-such-fn")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: 404")


def test_top_once_and_json_outputs(deployed: dict[str, str]) -> None:
    top = thaw(deployed, "top", "--once")
    assert top.returncode == 0, top.stderr
    for section in ("nodes", "instances", "functions", "local", "prints"):
        assert section in top.stdout
    for args in (("fn", "ls", "--json"), ("node", "ls", "--json"),
                 ("snapshot", "ls", "--json")):
        result = thaw(deployed, *args)
        assert result.returncode == 0, result.stderr
        assert isinstance(json.loads(result.stdout), list)


def test_credentials_from_the_config_file(platform: RunningPlatform, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    env = cli_env(tmp_path, THAW_CONFIG_FILE=str(config))
    login = thaw(env, "login", "--url", platform.url, "--key", platform.key)
    assert login.returncode == 0, login.stderr
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert thaw(env, "fn", "ls", "--json").returncode == 0
    # A profile beside the defaults; the defaults now point nowhere useful.
    assert thaw(env, "login", "--url", platform.url, "--key", platform.key,
                "--profile", "local").returncode == 0
    text = config.read_text().replace(platform.key, "wrong-key", 1)
    config.write_text(text)
    assert thaw(env, "fn", "ls").returncode == 1
    assert thaw(env, "--profile", "local", "fn", "ls", "--json").returncode == 0
    # The environment wins over the file.
    env_wins = thaw({**env, "THAW_API_KEY": platform.key, "THAW_URL": platform.url},
                    "fn", "ls", "--json")
    assert env_wins.returncode == 0
    missing = thaw(env, "--profile", "nope", "fn", "ls")
    assert missing.returncode == 1 and "no profile 'nope'" in missing.stderr


def test_login_refuses_a_bad_key(platform: RunningPlatform, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    env = cli_env(tmp_path, THAW_CONFIG_FILE=str(config))
    result = thaw(env, "login", "--url", platform.url, "--key", "not-a-key")
    assert result.returncode == 1 and not config.exists()


@pytest.mark.parametrize("args", [("fn", "ls"), ("snapshot", "ls"), ("top", "--once"),
                                  ("fn", "logs", "prints"), ("node", "drain", "local"),
                                  ("snapshot", "verify", "prints"),
                                  ("deploy", str(FIXTURES / "prints"))])
def test_a_bad_key_is_one_line_and_exit_1(platform: RunningPlatform, tmp_path: Path,
                                          args: tuple[str, ...]) -> None:
    result = thaw(cli_env(tmp_path, platform.url, "thaw_bad_key"), *args)
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("error: 401") and result.stderr.count("\n") == 1, \
        result.stderr


def test_an_unreachable_gateway_is_one_line(tmp_path: Path) -> None:
    result = thaw(cli_env(tmp_path, "http://127.0.0.1:9", "key"), "fn", "ls")
    assert result.returncode == 1
    assert "cannot reach the gateway" in result.stderr and result.stderr.count("\n") == 1


def test_help_documents_the_credentials_order(tmp_path: Path) -> None:
    result = thaw(cli_env(tmp_path), "--help")
    assert "THAW_API_KEY" in result.stdout and "config.toml" in result.stdout


# ---- a platform of its own: corrupted chunks, drained node -------------------------

@pytest.fixture
def own_platform(tmp_path: Path) -> Iterator[LocalPlatform]:
    local = LocalPlatform(tmp_path / "home", gateway_port=0, host_devices="1x2GiB")
    try:
        local.start()
        yield local
    finally:
        local.stop()


def test_verify_names_a_corrupted_chunk(own_platform: LocalPlatform, tmp_path: Path) -> None:
    env = cli_env(tmp_path, own_platform.url, own_platform.key)
    assert thaw(env, "deploy", str(FIXTURES / "weights")).returncode == 0
    assert thaw(env, "snapshot", "verify", "weights").returncode == 0
    chunks = [p for p in (own_platform.home / "agent" / "local" / "chunks").rglob("*")
              if p.is_file() and not p.name.startswith(".")]
    victim = max(chunks, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    # A BLAKE3 chunk's file is named by its hex; its digest is "b3:<hex>".
    digest = "b3:" + victim.name.split(".")[0]

    result = thaw(env, "snapshot", "verify", "weights")
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"BAD local disk chunk {digest}" in result.stdout
    assert "1 bad chunk(s)" in result.stdout


def test_drain_stops_idle_instances_and_cordons(own_platform: LocalPlatform,
                                                tmp_path: Path) -> None:
    env = cli_env(tmp_path, own_platform.url, own_platform.key)
    assert thaw(env, "deploy", str(FIXTURES / "prints")).returncode == 0
    assert thaw(env, "invoke", "prints").returncode == 0
    before = json.loads(thaw(env, "node", "ls", "--json").stdout)
    assert before[0]["instances"] >= 1

    result = thaw(env, "node", "drain", "local", "--timeout", "60")
    assert result.returncode == 0, result.stderr
    assert "drained (no instances)" in result.stdout
    after = json.loads(thaw(env, "node", "ls", "--json").stdout)
    assert after[0]["state"] == "cordoned" and after[0]["instances"] == 0
    unknown = thaw(env, "node", "drain", "nowhere")
    assert unknown.returncode == 1 and "nowhere" in unknown.stderr
