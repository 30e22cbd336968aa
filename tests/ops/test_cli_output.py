"""The CLI's own log records go to stderr, never into a command's output on stdout
(`thaw bench … --json` is parsed by scripts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_log_records_of_the_cli_process_go_to_stderr(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "thaw.ops", "pki", "init", "--dir",
                           str(tmp_path / "pki")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "platform CA created" in done.stderr
    assert "platform CA created" not in done.stdout
    assert str(tmp_path / "pki" / "ca.crt") in done.stdout  # the command's own output
