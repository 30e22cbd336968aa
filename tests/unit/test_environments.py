"""Per-function environments: what a bundle's dependency file asks (requirements.txt,
pyproject.toml, cog.yaml) and its limits, how an environment is keyed, and the node's
environments built with the real uv from a local folder of wheels (no network): once
per lock under concurrent callers, read-only, bounded, collected when unused."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.wheels import fake_attrs_index
from thaw.core.errors import InstanceFailed, InvalidBundle
from thaw.platform import environments as envmod
from thaw.platform.environments import (
    MAX_REQUIREMENTS,
    Dependencies,
    environment_key,
    lock_pins,
    parse_requirements,
    read_dependencies,
)
from thaw.platform.environments_build import Environments, EnvSettings
from thaw.platform.environments_launch import (
    ENVIRONMENTS_NEED_PROCESS_RUNTIME,
    LaunchEnvironments,
    environment_fingerprint,
)
from thaw.platform.process import ProcessRuntime
from thaw.platform.runtime import LaunchMode, LaunchSpec, RuntimeCapabilities, SandboxPolicy
from thaw.platform.sandbox import plan as planmod
from thaw.platform.sandbox.plan import SandboxSettings, build_plan

PY = envmod.node_python()


def bundle_with(tmp_path: Path, **files: str) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1) if name != "thaw" else folder / "thaw.toml"
         ).write_text(text)
    return folder


# ---- dependency files ------------------------------------------------------------


def test_requirements_lines_are_read_and_comments_dropped() -> None:
    text = "# pins\nattrs==0.0.1  # old on purpose\n\nnumpy>=1.26; python_version>'3'\n"
    assert parse_requirements(text) == ("attrs==0.0.1", "numpy>=1.26; python_version>'3'")


@pytest.mark.parametrize(("line", "word"), [
    ("--index-url http://elsewhere/simple", "options"),
    ("-e .", "options"),
    ("-r other.txt", "options"),
    ("./local/pkg", "not a package requirement"),
    ("pkg @ https://host/pkg.whl", "not a package requirement"),
    ("git+https://host/repo", "not a package requirement"),
])
def test_requirements_that_reach_past_the_index_are_refused_naming_the_line(
        line: str, word: str) -> None:
    with pytest.raises(InvalidBundle, match=word) as info:
        parse_requirements(f"attrs\n{line}\n")
    assert info.value.field == "requirements.txt:2"


def test_requirements_are_bounded_in_count_and_length() -> None:
    with pytest.raises(InvalidBundle, match=f"more than {MAX_REQUIREMENTS}"):
        parse_requirements("".join(f"pkg{i}\n" for i in range(MAX_REQUIREMENTS + 1)))
    with pytest.raises(InvalidBundle, match="longer than"):
        parse_requirements("a" * 600 + "\n")


def test_a_bundle_without_a_dependency_file_keeps_the_base_environment(tmp_path: Path) -> None:
    assert read_dependencies(bundle_with(tmp_path, thaw='name = "x"\n')) is None
    # A pyproject.toml without dependencies (a project's metadata only) asks nothing.
    assert read_dependencies(bundle_with(tmp_path / "p", pyproject_toml=(
        '[project]\nname = "x"\n'))) is None


def test_requirements_txt_comes_first_then_pyproject_then_cog(tmp_path: Path) -> None:
    both = bundle_with(tmp_path, requirements_txt="attrs==0.0.1\n", pyproject_toml=(
        '[project]\ndependencies = ["attrs==0.0.2"]\n'))
    deps = read_dependencies(both)
    assert deps == Dependencies(("attrs==0.0.1",), PY, "requirements.txt")


def test_pyproject_dependencies_and_requires_python(tmp_path: Path) -> None:
    folder = bundle_with(tmp_path, pyproject_toml=(
        '[project]\nname = "m"\nrequires-python = ">=3.9"\n'
        'dependencies = ["attrs==0.0.2", "thawtiny"]\n'))
    assert read_dependencies(folder) == Dependencies(("attrs==0.0.2", "thawtiny"), PY,
                                                     "pyproject.toml")
    newer_patch = ".".join(map(str, (*sys.version_info[:2], sys.version_info[2] + 1)))
    excluded = bundle_with(tmp_path / "x", pyproject_toml=(
        f'[project]\nrequires-python = ">={newer_patch}"\ndependencies = ["attrs"]\n'))
    with pytest.raises(InvalidBundle, match="excludes this node's Python") as info:
        read_dependencies(excluded)
    assert info.value.field == "project.requires-python"


def test_cog_yaml_packages_and_python_version(tmp_path: Path) -> None:
    folder = bundle_with(tmp_path, cog_yaml=(
        'build:\n  python_version: "3.11"\n  python_packages:\n    - "attrs==0.0.1"\n'
        'predict: "predict.py:Predictor"\n'))
    assert read_dependencies(folder) == Dependencies(("attrs==0.0.1",), "3.11", "cog.yaml")
    bad = bundle_with(tmp_path / "b", cog_yaml='build:\n  python_version: "two"\n'
                                               '  python_packages: ["attrs"]\n')
    with pytest.raises(InvalidBundle, match="python_version") as info:
        read_dependencies(bad)
    assert info.value.field == "build.python_version"
    not_list = bundle_with(tmp_path / "c", cog_yaml="build:\n  python_packages: attrs\n")
    with pytest.raises(InvalidBundle, match="list of strings"):
        read_dependencies(not_list)


def test_a_dependency_file_past_its_size_bound_is_refused(tmp_path: Path) -> None:
    folder = bundle_with(tmp_path, requirements_txt="# x\n" * 20000)
    with pytest.raises(InvalidBundle, match="larger than") as info:
        read_dependencies(folder)
    assert info.value.field == "requirements.txt"


# ---- keys ----------------------------------------------------------------------------


def test_the_key_covers_the_lock_the_python_and_the_platform() -> None:
    lock = "attrs==0.0.1 \\\n    --hash=sha256:00\n"
    key = environment_key(lock, "3.11", "x86_64-unknown-linux-gnu")
    assert key == environment_key(lock, "3.11", "x86_64-unknown-linux-gnu")
    assert len(key) == 32 and int(key, 16) >= 0
    others = {environment_key(lock.replace("0.0.1", "0.0.2"), "3.11", "x86_64-unknown-linux-gnu"),
              environment_key(lock, "3.12", "x86_64-unknown-linux-gnu"),
              environment_key(lock, "3.11", "aarch64-unknown-linux-gnu")}
    assert key not in others and len(others) == 3


def test_lock_pins_read_names_and_versions() -> None:
    lock = ("attrs==0.0.1 \\\n    --hash=sha256:aa\nTorch==2.3.0+cpu ; sys_platform == 'linux'"
            " \\\n    --hash=sha256:bb\nnumpy_x.y==1.0\n")
    assert lock_pins(lock) == {"attrs": "0.0.1", "torch": "2.3.0+cpu", "numpy-x-y": "1.0"}


def test_a_restore_is_checked_against_the_environments_python_torch_and_numpy() -> None:
    local = {"python": "3.11.7", "torch": "2.13.0", "numpy": "2.0", "device_type": "host"}
    assert environment_fingerprint(local, None) is local

    class Env:
        python = "3.11.7"
        lock = "numpy==1.26.4 \\\n    --hash=sha256:aa\n"

    checked = environment_fingerprint(local, Env())  # type: ignore[arg-type]
    assert checked == {"python": "3.11.7", "torch": "", "numpy": "1.26.4",
                       "device_type": "host"}


# ---- building with uv ----------------------------------------------------------------


def make_envs(tmp_path: Path, **settings: object) -> tuple[Environments, list[str]]:
    index = fake_attrs_index(tmp_path / "index")
    calls: list[str] = []
    runtime = ProcessRuntime()  # unsandboxed: as the agent's user

    async def run_tool(tool):  # type: ignore[no-untyped-def]
        calls.append(" ".join(tool.argv[1:3]))
        return await runtime.run_tool(tool)

    envs = Environments(tmp_path / "envs", EnvSettings(index_url=str(index), **settings),
                        run_tool)  # type: ignore[arg-type]
    return envs, calls


async def test_concurrent_builds_of_one_lock_build_it_once_and_seal_it(tmp_path: Path) -> None:
    envs, calls = make_envs(tmp_path)
    lines: list[str] = []
    deps = Dependencies(("attrs==0.0.1",), PY, "requirements.txt")
    lock = await envs.resolve(deps, lines.append)
    assert "attrs==0.0.1" in lock and "--hash=sha256:" in lock
    assert await envs.resolve(deps, lines.append) == lock  # kept: no second resolve
    assert calls.count("pip compile") == 1
    built = await asyncio.gather(*(envs.ensure(lock, PY, lines.append, function=f"dev/f{i}")
                                   for i in range(3)))
    assert len({b.key for b in built}) == 1 and calls.count("pip install") == 1
    assert sum("installing 1 packages" in line for line in lines) == 1
    assert sum(line.endswith("cached") for line in lines) == 2
    env = built[0]
    assert env.python.startswith(PY + ".") and env.packages == 1 and env.size_bytes > 0
    site = next(env.path.glob("lib/python*/site-packages"))
    assert (site / "attrs" / "__init__.py").read_text() == '__version__ = "0.0.1"\n'
    # Owned by the agent, nothing writable, nothing left of the staging folder.
    assert all(not os.lstat(p).st_mode & 0o222 for p in [env.path, *env.path.rglob("*")]
               if not p.is_symlink())
    assert [p.name for p in envs.root.iterdir() if p.name.startswith((".env-", ".resolve-"))] == []
    python_env = envs.python_env(env)
    assert python_env.python == str(env.path / "bin" / "python")
    runtime = Path(python_env.runtime_path)
    assert (runtime / "thaw" / "snapshotter" / "runtime" / "__main__.py").is_file()
    assert str(env.path) in python_env.paths and python_env.runtime_path in python_env.paths
    [listed] = envs.listing()
    assert listed.env == env and listed.last_used > 0
    assert listed.functions == ("dev/f0", "dev/f1", "dev/f2")


async def test_a_failed_resolve_carries_the_resolvers_message(tmp_path: Path) -> None:
    envs, _calls = make_envs(tmp_path)
    deps = Dependencies(("nosuchpkg==1.0",), PY, "requirements.txt")
    with pytest.raises(InstanceFailed, match="resolving the environment failed") as info:
        await envs.resolve(deps, lambda _line: None)
    assert "nosuchpkg" in info.value.message


async def test_an_environment_past_the_size_bound_is_refused_and_removed(tmp_path: Path) -> None:
    envs, _calls = make_envs(tmp_path, max_bytes=1024)
    lock = await envs.resolve(Dependencies(("attrs==0.0.2",), PY, "r"), lambda _l: None)
    with pytest.raises(InstanceFailed, match="more than the node's env_max_size"):
        await envs.ensure(lock, PY, lambda _l: None)
    assert [p.name for p in envs.root.iterdir() if not p.name.startswith(".")] == []
    assert [p.name for p in envs.root.iterdir() if p.name.startswith(".env-")] == []


async def test_collection_removes_only_environments_not_in_use(tmp_path: Path) -> None:
    envs, _calls = make_envs(tmp_path)
    old = await envs.ensure(await envs.resolve(
        Dependencies(("attrs==0.0.1",), PY, "r"), lambda _l: None), PY, lambda _l: None)
    new = await envs.ensure(await envs.resolve(
        Dependencies(("attrs==0.0.2",), PY, "r"), lambda _l: None), PY, lambda _l: None)
    assert (envs.root / ".uv-cache").is_dir()
    assert envs.collect({new.key}) == {old.key: old.size_bytes}
    assert not (envs.root / ".uv-cache").exists()  # rebuilt on the next build
    assert not old.path.exists() and new.path.is_dir()
    assert envs.get(new.key) is not None and envs.get(old.key) is None


async def test_a_runtime_without_environments_refuses_a_dependency_file(tmp_path: Path) -> None:
    docker_like = LaunchEnvironments(None, RuntimeCapabilities(runs_images=True))
    folder = bundle_with(tmp_path, requirements_txt="attrs==0.0.1\n")
    with pytest.raises(InstanceFailed, match="runs no per-function Python environments"):
        await docker_like.for_bundle(folder, "dev/f", lambda _l: None)
    assert ENVIRONMENTS_NEED_PROCESS_RUNTIME
    plain = bundle_with(tmp_path / "plain", thaw='name = "x"\n')
    assert await docker_like.for_bundle(plain, "dev/f", lambda _l: None) is None
    # An image brings its own packages: its dependency file is not the node's to build.
    assert await docker_like.for_bundle(folder, "dev/f", lambda _l: None,
                                        image="repo:tag@sha256:" + "0" * 64) is None


def test_a_sandbox_plan_binds_the_environment_without_running_its_interpreter(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from thaw.platform.runtime import PythonEnv

    def probe(python: str) -> tuple[str, ...]:
        raise AssertionError(f"{python} was run to find its folders")

    monkeypatch.setattr(planmod, "python_paths", probe)
    env = PythonEnv(key="k", python="/envs/k/bin/python", paths=("/envs/k", "/py", "/rt"),
                    runtime_path="/rt")
    spec = LaunchSpec(mode=LaunchMode.FRESH, bundle="/b", handler="app:H", log_path="/l",
                      instance_id="i", python_env=env,
                      sandbox=SandboxPolicy(uid=200001, gid=200001))
    plan = build_plan(spec, SandboxSettings(), env.python, {})
    read_only = plan["read_only"]
    assert isinstance(read_only, list)
    assert {"/envs/k", "/py", "/rt", "/b"} <= set(read_only)


async def test_a_package_without_a_wheel_is_refused_by_name_and_never_built(
        tmp_path: Path) -> None:
    import io
    import tarfile

    envs, _calls = make_envs(tmp_path)
    marker = tmp_path / "setup-ran"
    sdist = envs.settings.local_index() + "/sdistonly-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for name, text in {
                "sdistonly-1.0/PKG-INFO": "Metadata-Version: 2.1\nName: sdistonly\nVersion: 1.0\n",
                "sdistonly-1.0/setup.py": f"open({str(marker)!r}, 'w').write('ran')\n"}.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(InstanceFailed, match="resolving the environment failed") as info:
        await envs.resolve(Dependencies(("sdistonly==1.0",), PY, "r"), lambda _l: None)
    assert "sdistonly" in info.value.message and "wheel" in info.value.message
    assert not marker.exists()  # its setup.py never ran


async def test_collection_while_a_resolve_runs_leaves_its_folders(tmp_path: Path) -> None:
    index = fake_attrs_index(tmp_path / "index")
    runtime = ProcessRuntime()
    started, go = asyncio.Event(), asyncio.Event()

    async def gated(tool):  # type: ignore[no-untyped-def]
        started.set()
        await go.wait()
        return await runtime.run_tool(tool)

    envs = Environments(tmp_path / "envs", EnvSettings(index_url=str(index)),
                        gated)  # type: ignore[arg-type]
    resolving = asyncio.create_task(envs.resolve(
        Dependencies(("attrs==0.0.1",), PY, "r"), lambda _l: None))
    await started.wait()
    staging = [p for p in envs.root.iterdir() if p.name.startswith(".resolve-")]
    assert len(staging) == 1
    assert await asyncio.to_thread(envs.collect, set()) == {}
    assert staging[0].is_dir() and (envs.root / ".uv-cache").is_dir()
    go.set()
    assert "attrs==0.0.1" in await resolving
    assert await asyncio.to_thread(envs.collect, set()) == {}
    assert not staging[0].exists() and not (envs.root / ".uv-cache").exists()
