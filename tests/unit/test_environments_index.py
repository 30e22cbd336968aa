"""The node's package index: THAW_ENV_INDEX_URL, UV_INDEX_URL, then pip's configuration
(read from temporary files here, never the machine's), and the uv options made of it."""

from __future__ import annotations

from pathlib import Path

from tests.wheels import write_wheel
from thaw.platform.environments_build import EnvSettings
from thaw.platform.environments_index import (
    machine_indexes,
    pip_config_files,
    plan_indexes,
    read_pip_config,
)


def _simple_tree(root: Path) -> Path:
    """A PEP 503 tree <root>/simple/<project>/index.html linking ../../files/."""
    (root / "files").mkdir(parents=True)
    project = root / "simple" / "humanize"
    project.mkdir(parents=True)
    (project / "index.html").write_text('<a href="../../files/x.whl">x.whl</a>')
    return root / "simple"


def test_pip_files_in_pip_order_and_the_named_file_last(tmp_path: Path) -> None:
    named = tmp_path / "named.conf"
    environ = {"XDG_CONFIG_DIRS": "/a:/b", "XDG_CONFIG_HOME": "/home/u/cfg"}
    assert pip_config_files(environ, home="/home/u", prefix="/venv") == [
        Path("/a/pip/pip.conf"), Path("/b/pip/pip.conf"), Path("/etc/pip.conf"),
        Path("/home/u/.pip/pip.conf"), Path("/home/u/cfg/pip/pip.conf"),
        Path("/venv/pip.conf")]
    # An existing PIP_CONFIG_FILE replaces the user's files and comes last.
    named.write_text("[global]\n")
    files = pip_config_files({"PIP_CONFIG_FILE": str(named)}, home="/home/u",
                             prefix="/venv")
    assert files == [Path("/etc/xdg/pip/pip.conf"), Path("/etc/pip.conf"),
                     Path("/venv/pip.conf"), named]
    assert Path("/home/u/.config/pip/pip.conf") in pip_config_files({}, home="/home/u")


def test_pip_config_global_install_later_files_and_environment(tmp_path: Path) -> None:
    system = tmp_path / "system.conf"
    system.write_text("[global]\nindex-url = https://mirror.example/simple\n"
                      "extra-index-url = file:///one/simple\n  file:///two/simple\n"
                      "cert = /etc/ssl/certs/ca.crt\n")
    user = tmp_path / "user.conf"
    user.write_text("[install]\nextra_index_url = file:///three/simple\n")
    missing = tmp_path / "absent.conf"
    broken = tmp_path / "broken.conf"
    broken.write_text("this is not = an ini file [\n")
    assert read_pip_config([system], {}) == (
        "https://mirror.example/simple", ("file:///one/simple", "file:///two/simple"))
    # A later file overrides an earlier one; [install] overrides [global].
    assert read_pip_config([system, missing, broken, user], {}) == (
        "https://mirror.example/simple", ("file:///three/simple",))
    # The environment overrides every file, as in pip.
    environ = {"PIP_INDEX_URL": "https://env.example/simple",
               "PIP_EXTRA_INDEX_URL": "file:///four file:///five"}
    assert read_pip_config([system, user], environ) == (
        "https://env.example/simple", ("file:///four", "file:///five"))
    assert read_pip_config([], {}) == ("", ())


def test_machine_indexes_skip_missing_local_ones(tmp_path: Path) -> None:
    present = _simple_tree(tmp_path / "pypi")
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nextra-index-url = file://{present} "
                    f"file://{tmp_path}/absent/simple https://mirror.example/simple\n")
    assert machine_indexes({}, [conf]) == (
        "", (f"file://{present}", "https://mirror.example/simple"))
    # UV_INDEX_URL wins over pip's configuration.
    assert machine_indexes({"UV_INDEX_URL": "https://uv.example/simple"}, [conf]) == (
        "https://uv.example/simple", ())
    # A missing primary: the first extra left takes its place, not uv's default.
    conf.write_text(f"[global]\nindex-url = {tmp_path}/absent\n"
                    f"extra-index-url = file://{present}\n")
    assert machine_indexes({}, [conf]) == (f"file://{present}", ())
    settings = EnvSettings.from_environ({}, [conf])
    assert (settings.index_url, settings.extra_index_urls) == (f"file://{present}", ())
    # THAW_ENV_INDEX_URL is thaw's own setting: nothing else is read.
    settings = EnvSettings.from_environ({"THAW_ENV_INDEX_URL": "/srv/wheels"}, [conf])
    assert (settings.index_url, settings.extra_index_urls) == ("/srv/wheels", ())


def test_plan_local_simple_trees_and_urls(tmp_path: Path) -> None:
    one = _simple_tree(tmp_path / "one")
    two = _simple_tree(tmp_path / "two")
    plan = plan_indexes("", (f"file://{one}", str(two), "https://mirror.example/simple"))
    assert plan.args == ("--extra-index-url", f"file://{one}",
                         "--extra-index-url", f"file://{two}",
                         "--extra-index-url", "https://mirror.example/simple")
    # Each tree's parent is bound: its pages link to ../../files.
    assert plan.local_folders == (str(tmp_path / "one"), str(tmp_path / "two"))
    assert plan.network  # uv's default index, and a remote extra
    # Only local indexes: no network at all.
    plan = plan_indexes(f"file://{tmp_path / 'one'}", (f"file://{two}",))
    assert plan.args == ("--index-url", f"file://{one}",
                         "--extra-index-url", f"file://{two}")
    assert not plan.network
    assert plan_indexes("https://mirror.example/simple").args == (
        "--index-url", "https://mirror.example/simple")


def test_plan_flat_folders_of_wheels(tmp_path: Path) -> None:
    flat = tmp_path / "wheels"
    write_wheel(flat, "thawtiny", "1.0", {"thawtiny.py": "VALUE = 1\n"})
    empty = tmp_path / "empty"
    empty.mkdir()
    plan = plan_indexes(str(flat))
    assert plan.args == ("--find-links", str(flat), "--no-index")
    assert plan.local_folders == (str(flat),) and not plan.network
    assert plan_indexes(str(empty)).args == ("--find-links", str(empty), "--no-index")
    # A flat primary with a real extra index: the extra becomes the primary.
    tree = _simple_tree(tmp_path / "tree")
    plan = plan_indexes(f"file://{flat}", (f"file://{tree}",))
    assert plan.args == ("--find-links", str(flat), "--index-url", f"file://{tree}")
    assert not plan.network
    # A flat extra is find-links beside uv's default index.
    plan = plan_indexes("", (str(flat),))
    assert plan.args == ("--find-links", str(flat)) and plan.network
