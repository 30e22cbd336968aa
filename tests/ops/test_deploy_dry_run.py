"""`thaw deploy --dry-run`, the real CLI as a subprocess: a good folder is described and
nothing is uploaded; a bad thaw.toml or bundle is one error line naming the key or
path, exit 1; the gateway's published schema is compared when it answers."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import EXAMPLES, RunningPlatform
from tests.ops.test_cli import cli_env, thaw

TOML = 'name = "dry"\nhandler = "app:H"\n'


def _folder(tmp_path: Path, toml: str) -> Path:
    folder = tmp_path / "fn"
    folder.mkdir(exist_ok=True)
    (folder / "thaw.toml").write_text(toml)
    (folder / "app.py").write_text("class H:\n    def __call__(self, request):\n"
                                   "        return request\n")
    return folder


def test_a_good_folder_is_described_against_the_live_schema(platform: RunningPlatform,
                                                             tmp_path: Path) -> None:
    env = cli_env(tmp_path, platform.url, platform.key)
    folder = _folder(tmp_path, TOML + '[resources]\ngpu_memory = "1GiB"\n'
                     '[scaling]\nmin_instances = 1\ntimeout = "500ms"\n')
    result = thaw(env, "deploy", "--dry-run", str(folder))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "would deploy dry (handler app:H)" in out
    assert "1.0 GiB slice" in out and "1 to 4 instances" in out and "timeout 500ms" in out
    assert "publishes the same thaw.toml schema" in out
    assert platform.http.get("/v1/functions/dry").status_code == 404  # nothing uploaded


def test_the_examples_pass_without_a_gateway(tmp_path: Path) -> None:
    env = cli_env(tmp_path, "http://127.0.0.1:9", "key")
    result = thaw(env, "deploy", "--dry-run", str(EXAMPLES / "echo"))
    assert result.returncode == 0, result.stderr
    assert "would deploy echo" in result.stdout and "checked here only" in result.stdout


def test_a_bad_folder_is_one_line_naming_the_key_or_path(tmp_path: Path) -> None:
    env = cli_env(tmp_path, "http://127.0.0.1:9", "key")
    cases = [
        (TOML + "[scaling]\ntimeout = nan\n", "scaling.timeout"),
        (TOML + "[scaling]\nmin_instances = 1000\nmax_instances = 1000\n",
         "scaling.min_instances"),
        ('name = "Dry"\nhandler = "app:H"\n', "name"),
    ]
    for toml, key in cases:
        result = thaw(env, "deploy", "--dry-run", str(_folder(tmp_path, toml)))
        assert result.returncode == 1 and key in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    folder = _folder(tmp_path, TOML)
    os.symlink("/etc", folder / "outside")
    result = thaw(env, "deploy", "--dry-run", str(folder))
    assert result.returncode == 1 and "outside" in result.stderr, result.stderr
