"""A cog folder whose cog.yaml lists `build.python_packages` end to end: deployed
unchanged with `thaw deploy FOLDER`, it gets an environment of those packages (from a
local index of hand-written wheels, no network) AND the platform's own cog, which the
predictor imports; the user's pins win over the packages cog brings (a fake
`structlog`, which the platform's cog requires, is the function's own version), and
/predictions answers in cog's shape (docs/cog.md, docs/environments.md)."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningPlatform, running
from tests.ops.test_cli import cli_env, thaw
from tests.wheels import fake_attrs_index, write_wheel
from thaw.ops.services import LocalPlatform

PREDICTOR = '''import attrs
import cog
import requests
import structlog
from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def setup(self) -> None:
        self.versions = {"attrs": attrs.__version__, "structlog": structlog.__version__,
                         "cog": cog.__version__, "requests": requests.__version__,
                         "cog_file": cog.__file__, "attrs_file": attrs.__file__}

    def predict(self, word: str = Input(default="hi", description="A word")) -> dict:
        return {**self.versions, "word": word}
'''


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    index = fake_attrs_index(tmp_path_factory.mktemp("index"))
    write_wheel(index, "structlog", "0.0.1", {"structlog/__init__.py": '__version__ = "0.0.1"\n'})
    index.chmod(0o755)  # the builder's uid reads it (docs/environments.md)
    home = tmp_path_factory.mktemp("thaw-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("THAW_ENV_INDEX_URL", str(index))
        local = LocalPlatform(home, gateway_port=0, host_devices="1x2GiB")
        with running(local) as started:
            yield started


def test_cog_folder_with_python_packages_gets_the_platforms_cog(
        platform: RunningPlatform, tmp_path: Path) -> None:
    folder = tmp_path / "Pinned_Cog"
    folder.mkdir()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    (folder / "cog.yaml").write_text(
        f'build:\n  gpu: false\n  python_version: "{python}"\n'
        '  python_packages:\n    - "attrs==0.0.2"\n    - "structlog==0.0.1"\n'
        'predict: "predict.py:Predictor"\n')
    (folder / "predict.py").write_text(PREDICTOR)
    result = thaw(cli_env(tmp_path, platform.url, platform.key), "deploy", str(folder))
    assert result.returncode == 0, result.stdout + result.stderr

    answer = platform.http.post("/fn/dev/pinned-cog/predictions",
                                json={"input": {"word": "yo"}})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "succeeded", body
    out = body["output"]
    # The function's own pins, from its environment, over the packages cog brings.
    assert out["attrs"] == "0.0.2" and out["structlog"] == "0.0.1", out
    assert "/envs/" in out["attrs_file"] and "/.provided-" not in out["attrs_file"], out
    # The platform's cog (and requests, which the lock does not pin) from the folder
    # the agent provides beside the environments.
    assert out["cog"] == importlib.metadata.version("cog"), out
    assert out["requests"] == importlib.metadata.version("requests"), out
    assert "/envs/.provided-" in out["cog_file"], out
    assert out["word"] == "yo" and body["input"] == {"word": "yo"}, body

    defaults = platform.http.post("/fn/dev/pinned-cog/predictions", json={"input": {}})
    assert defaults.json()["output"]["word"] == "hi", defaults.text
