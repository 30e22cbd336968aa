"""`thaw up`: its banner alone on stdout with the services' logs in files under
THAW_HOME, and later CLI calls finding its gateway (a --port of its own included)
without THAW_URL or THAW_API_KEY."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

UP_TIMEOUT = 240.0
BANNER_LINES = ("thaw is up", "  dashboard ", "  functions ", "  API key ", "  certificates ",
                "  instances ", "  metrics ", "  service logs ", "Ctrl-C stops everything")


def test_banner_alone_on_stdout_and_the_port_remembered(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("THAW_") or k == "THAW_WEBHOOK_ALLOW"}
    env.update({"THAW_HOME": str(home), "HOME": str(tmp_path),
                "THAW_CONFIG_FILE": str(tmp_path / "absent.toml")})
    proc = subprocess.Popen([sys.executable, "-m", "thaw.ops", "up", "--port", "0",
                             "--no-examples"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + UP_TIMEOUT
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C stops everything"):
                break
        out = "\n".join(lines)
        assert lines and lines[-1].startswith("Ctrl-C stops everything"), out
        # Nothing but the banner: no service's log record among its lines.
        strays = [ln for ln in lines if ln and not ln.startswith(BANNER_LINES)]
        assert strays == [], out
        logs = home / "service-logs"
        assert f"service logs  {logs}/" in out
        for name in ("scheduler", "agent-local", "gateway"):
            assert (logs / f"{name}.log").stat().st_size > 0, name
        dashboard = re.search(r"dashboard\s+(http://127\.0\.0\.1:\d+)/", out)
        assert dashboard, out
        assert (home / "dev-url").read_text().strip() == dashboard.group(1)

        # A later command with no THAW_URL: thaw up's gateway (port 0 picked a free
        # one, never the default 8000) and dev key.
        listed = subprocess.run([sys.executable, "-m", "thaw.ops", "fn", "ls", "--json"],
                                cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=120)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.strip().startswith("["), listed.stdout
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

