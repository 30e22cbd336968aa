"""README's "One function, every client" section, run as written: every shell and
Python block between its markers against a running platform, with THAW_URL and
THAW_API_KEY set as the section tells the reader to."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import EXAMPLES, REPO, RunningPlatform
from tests.ops.test_cli import CLI_TIMEOUT, cli_env

SECTION = re.search(r"<!-- clients:begin -->(.*?)<!-- clients:end -->",
                    (REPO / "README.md").read_text(), re.S)
assert SECTION is not None, "README.md lost its clients section markers"
BLOCKS = re.findall(r"```(sh|python)\n(.*?)```", SECTION.group(1), re.S)


def _run(kind: str, code: str, env: dict[str, str]) -> str:
    # The CLI the shell block calls is this interpreter's (`thaw` of the checkout).
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    command = (["bash", "-euo", "pipefail", "-c", code] if kind == "sh"
               else [sys.executable, "-c", code])
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT)
    assert done.returncode == 0, f"{kind} block failed:\n{code}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_every_client_block_of_the_readme_runs_as_written(
        platform: RunningPlatform, tmp_path: Path) -> None:
    assert [kind for kind, _ in BLOCKS] == ["sh", "python", "python", "python"]
    # The OpenAI block calls examples/tinylm, which `thaw up` deploys.
    assert platform.deploy(EXAMPLES / "tinylm", force=False).status_code in (200, 201)
    env = cli_env(tmp_path, platform.url, platform.key)
    outputs = [_run(kind, code, env) for kind, code in BLOCKS]

    shell, client, replicate_client, openai_client = outputs
    lines = shell.splitlines()
    assert '"Hello, Ada! Hello, Ada!"' in lines, shell
    refused = [line for line in lines if "invalid_input" in line]
    assert len(refused) == 1 and '"field": "name"' in refused[0], shell
    assert client.splitlines() == ["Hello, Ada! Hello, Ada!", "422 times"]
    assert replicate_client.splitlines() == ["Hello, Ada!"]
    finish, tokens = openai_client.splitlines()[-1].split()
    assert (finish, int(tokens)) == ("length", 8) or (finish == "stop" and int(tokens) < 8)
