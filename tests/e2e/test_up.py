"""`thaw up` (what `make up` runs): starts everything, deploys the examples (echo,
embed, tinylm, and withdeps in an environment of its own built from the machine's
package index), prints their URLs and the dev key, serves, and Ctrl-C leaves no
process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import REPO
from thaw.platform.environments_build import EnvSettings

UP_TIMEOUT = 240.0


def up_output(proc: subprocess.Popen[str], timeout: float) -> str:
    """What `thaw up` printed up to its ready line (asserted there within `timeout`)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    out = "".join(lines)
    assert "Ctrl-C stops everything" in out, out
    return out


@pytest.mark.slow
def test_thaw_up_deploys_examples_and_stops_cleanly(tmp_path: Path) -> None:
    # examples/withdeps installs humanize from the machine's package index: a machine
    # without one configured cannot pass this test, and says so (no skip: CI has one).
    machine = EnvSettings.from_environ(os.environ)
    if not (machine.index_url or machine.extra_index_urls):
        pytest.fail("no package index configured on this machine (THAW_ENV_INDEX_URL, "
                    "UV_INDEX_URL, PIP_INDEX_URL or pip's index-url/extra-index-url): "
                    "examples/withdeps needs one holding humanize 4.16.0")
    env = {**os.environ, "THAW_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "thaw.ops", "up", "--port", "0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        out = up_output(proc, UP_TIMEOUT)
        dashboard = re.search(r"dashboard\s+(http://127\.0\.0\.1:\d+)/", out)
        key = re.search(r"API key\s+(thaw_\S+)", out)
        echo = re.search(r"echo\s+(http://\S+/fn/dev/echo)\s+\[ready, restore starts\]", out)
        embed = re.search(r"embed\s+(http://\S+/fn/dev/embed)\s+\[ready, restore starts\]",
                          out)
        tinylm = re.search(r"tinylm\s+(http://\S+/fn/dev/tinylm)\s+\[ready, restore starts\]",
                           out)
        assert dashboard and key and echo and embed and tinylm, out
        assert "withdeps not deployed" not in out, out
        withdeps = re.search(r"withdeps\s+(http://\S+/fn/dev/withdeps)\s+"
                             r"\[ready, restore starts\]", out)
        assert withdeps, out
        functions = re.search(r"functions\s+(http://127\.0\.0\.1:\d+)/fn/", out)
        assert functions and echo.group(1).startswith(functions.group(1)), out
        assert functions.group(1) != dashboard.group(1)  # an origin of their own
        sandboxed = "sandboxed, a uid per tenant" if os.geteuid() == 0 else "NOT sandboxed"
        assert re.search(rf"instances\s+{sandboxed}", out), out
        assert (tmp_path / "home" / "dev-key").read_text().strip() == key.group(1)
        headers = {"Authorization": f"Bearer {key.group(1)}"}
        resp = httpx.post(echo.group(1), json={"hi": 1}, headers=headers, timeout=60)
        assert resp.status_code == 200 and resp.json()["echo"] == {"hi": 1}
        assert resp.headers["X-Thaw-Start"] == "restore"
        # withdeps runs with its own humanize, which the base environment lacks.
        sizes = httpx.post(withdeps.group(1), json={"sizes": [123456789]}, headers=headers,
                           timeout=60)
        assert sizes.status_code == 200, sizes.text
        assert sizes.json() == {"sizes": ["117.7 MiB"], "humanize": "4.16.0"}, sizes.json()
        # The README's OpenAI example: tinylm on the function origin's OpenAI routes.
        chat = httpx.post(functions.group(1) + "/v1/chat/completions", headers=headers,
                          json={"model": "tinylm", "max_tokens": 4,
                                "messages": [{"role": "user", "content": "hi"}]},
                          timeout=60)
        assert chat.status_code == 200, chat.text
        assert chat.json()["object"] == "chat.completion", chat.json()
        page = httpx.get(dashboard.group(1) + "/", timeout=10)
        assert page.status_code == 200 and "thaw" in page.text

        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= 4  # scheduler, agent, gateway, templates, instance
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        _gone, alive = psutil.wait_procs(descendants, timeout=10)
        assert not alive, f"orphans left behind: {[p.cmdline() for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
