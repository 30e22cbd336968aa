"""Where the CLI finds its credentials (ops/config.py): env, config file, dev key."""

from __future__ import annotations

from pathlib import Path

import pytest

from thaw.core.errors import InvalidArgument, Unauthenticated
from thaw.ops.config import DEFAULT_URL, config_path, credentials, read_config, write_config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("THAW_URL", "THAW_API_KEY", "THAW_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "config.toml"
    monkeypatch.setenv("THAW_CONFIG_FILE", str(config))
    monkeypatch.setenv("THAW_HOME", str(tmp_path / "home"))
    return config


def test_env_then_file_then_dev_key(clean_env: Path, monkeypatch: pytest.MonkeyPatch,
                                    tmp_path: Path) -> None:
    with pytest.raises(Unauthenticated):
        credentials()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "dev-key").write_text("dev-key\n")
    assert credentials().key == "dev-key" and credentials().url == DEFAULT_URL
    write_config({"url": "http://file:1", "api_key": "file-key",
                  "profiles": {"prod": {"url": "http://prod:2", "api_key": "prod-key"}}},
                 clean_env)
    assert credentials() == credentials().__class__("http://file:1", "file-key")
    monkeypatch.setenv("THAW_PROFILE", "prod")
    assert credentials().key == "prod-key" and credentials().url == "http://prod:2"
    monkeypatch.setenv("THAW_API_KEY", "env-key")
    monkeypatch.setenv("THAW_URL", "http://env:3/")
    assert credentials().key == "env-key" and credentials().url == "http://env:3"


def test_a_written_config_reads_back_and_is_private(clean_env: Path) -> None:
    config = {"url": "http://a\"b", "api_key": "k\\1",
              "profiles": {"x y": {"url": "u", "api_key": "v"}}}
    write_config(config, clean_env)
    assert read_config(clean_env) == config
    assert clean_env.stat().st_mode & 0o777 == 0o600
    assert config_path() == clean_env


def test_bad_files_and_profiles_name_the_problem(clean_env: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env.write_text("url = \n")
    with pytest.raises(InvalidArgument, match="cannot read the config file"):
        credentials()
    write_config({"api_key": "k"}, clean_env)
    monkeypatch.setenv("THAW_PROFILE", "missing")
    with pytest.raises(InvalidArgument, match="no profile 'missing'"):
        credentials()
