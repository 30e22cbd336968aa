"""The base image of the docker runtime, built on this machine (DESIGN.md §7).

No registry is reachable, so nothing is ever pulled: the image is a minimal Debian
root filesystem made by `debootstrap --variant=minbase` with python3, from the package
mirror this machine's own apt is configured with (read at run time, never written into
the repo), then `docker import`ed as `thaw/base:<suite>`. A build takes a few minutes
and happens once: an existing tag is reused.

The image carries only what the in-instance runtime needs (it imports the standard
library only; DESIGN.md §3) plus the C++ runtime and OpenMP that torch wheels link
against, so a host virtualenv's site-packages can be mounted into it (the docker
runtime's `env_site_packages`) as long as the Python minor versions match.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from thaw.core.errors import ThawError

log = structlog.get_logger()

IMAGE_REPOSITORY = "thaw/base"
# python3 for the runtime; libstdc++6 and libgomp1 because torch's wheels link them
# from the system (its other libraries ship inside the wheel).
BASE_PACKAGES = ("python3", "libstdc++6", "libgomp1")
# Where the docker runtime mounts the in-instance runtime; the folder exists in the
# image so the read-only root needs no mount point created in it. Keep in sync with
# docker.spec.RUNTIME_MOUNT.
RUNTIME_ROOT = "/opt/thaw"
# Image labels the docker runtime reads back (the instance Python is part of a
# snapshot's fingerprint).
LABEL_PYTHON = "thaw.python"
LABEL_SUITE = "thaw.suite"
# debootstrap downloads ~40 MB and unpacks ~150: minutes on a slow mirror.
DEBOOTSTRAP_TIMEOUT_SECONDS = 1800
# Concurrent builders (a test session and CI on one engine) wait for each other here.
BUILD_LOCK = Path(tempfile.gettempdir()) / "thaw-base-image.lock"
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")


class ImageBuildError(ThawError):
    """The base image could not be built (no apt source, debootstrap or import failed)."""


@dataclass(frozen=True)
class AptSource:
    """The first `deb` entry of the machine's apt configuration."""

    uri: str
    suite: str


def _one_line_sources(text: str) -> Iterator[AptSource]:
    """`deb [options] URI suite [components]` lines of a sources.list file."""
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line[4:])
        words = line.split()
        if len(words) >= 2:
            yield AptSource(words[0], words[1])


def _deb822_sources(text: str) -> Iterator[AptSource]:
    """Stanzas of a .sources file (deb822): Types, URIs, Suites, Enabled."""
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:  # continuation line
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        uris, suites = fields.get("uris", "").split(), fields.get("suites", "").split()
        if uris and suites:
            yield AptSource(uris[0], suites[0])


def find_apt_source(sources_list: Path = APT_SOURCES,
                    sources_dir: Path = APT_SOURCES_DIR) -> AptSource:
    """The mirror and suite to debootstrap from, in apt's own order: sources.list, then
    sources.list.d/*.list and *.sources by name (apt ignores any other file there)."""
    files = [sources_list] if sources_list.exists() else []
    if sources_dir.is_dir():
        files += sorted(p for p in sources_dir.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        parse = _deb822_sources if path.suffix == ".sources" else _one_line_sources
        for source in parse(text):
            if source.uri.startswith(("http://", "https://", "file:/")):
                return source
    raise ImageBuildError(f"no deb source in {sources_list} or {sources_dir}/*.sources "
                          "to build the base image from")


def image_tag(suite: str) -> str:
    return f"{IMAGE_REPOSITORY}:{suite}"


def _find_image(client: Any, tag: str) -> Any | None:
    import docker.errors

    try:
        return client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.DockerException as exc:
        raise ImageBuildError(f"docker engine: {exc}") from exc


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    with open(BUILD_LOCK, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(argv: list[str], timeout: float, what: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(f"{what}: {exc}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ImageBuildError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def _debootstrap(root: Path, source: AptSource, packages: tuple[str, ...]) -> None:
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is not installed (apt-get install debootstrap)")
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
          source.suite, str(root), source.uri], DEBOOTSTRAP_TIMEOUT_SECONDS, "debootstrap")


def _unmount_under(path: Path) -> None:
    """A debootstrap that failed half-way can leave /proc or /sys mounted in the new
    root; deleting the tree must not descend into them."""
    prefix = str(path.resolve()) + "/"
    try:
        with open("/proc/self/mounts") as handle:
            points = [line.split()[1] for line in handle]
    except OSError:
        return
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _trim(root: Path) -> None:
    """Drop what an instance never uses: package caches, lists, docs."""
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                "usr/share/man", "usr/share/locale", "usr/share/info"):
        target = root / sub
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
    (root / RUNTIME_ROOT.lstrip("/") / "thaw").mkdir(parents=True, exist_ok=True)


def _python_version(root: Path) -> str:
    out = _run(["chroot", str(root), "python3", "-c",
                "import sys; print('.'.join(map(str, sys.version_info[:3])))"],
               60, "python3 in the new root")
    return out.strip()


def _import(client: Any, root: Path, tag: str, labels: dict[str, str]) -> None:
    import docker.errors

    repository, _, version = tag.partition(":")
    changes = [f'LABEL {key}="{value}"' for key, value in labels.items()]
    changes += ['CMD ["python3"]', "ENV LANG=C.UTF-8"]
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(tarball), "."],
             600, "tar of the root filesystem")
        try:
            client.api.import_image_from_file(str(tarball), repository=repository,
                                              tag=version, changes=changes)
        except docker.errors.DockerException as exc:
            raise ImageBuildError(f"docker import of {tag}: {exc}") from exc


def ensure_base_image(client: Any, *, tag: str | None = None,
                      packages: tuple[str, ...] = BASE_PACKAGES,
                      source: AptSource | None = None, force: bool = False) -> str:
    """The base image's tag, building it first unless it already exists.

    `client` is a docker.DockerClient. Building needs root (debootstrap, chroot)."""
    source = source or find_apt_source()
    tag = tag or image_tag(source.suite)
    if not force and _find_image(client, tag) is not None:
        return tag
    with _build_lock():
        if not force and _find_image(client, tag) is not None:
            return tag  # another builder finished while we waited
        log.info("building base image", tag=tag, suite=source.suite, mirror=source.uri)
        workdir = Path(tempfile.mkdtemp(prefix="thaw-base-", dir="/var/tmp"))
        try:
            root = workdir / "root"
            _debootstrap(root, source, packages)
            _trim(root)
            labels = {LABEL_PYTHON: _python_version(root), LABEL_SUITE: source.suite}
            _import(client, root, tag, labels)
        finally:
            _unmount_under(workdir)
            shutil.rmtree(workdir, ignore_errors=True)
        log.info("base image built", tag=tag, python=labels[LABEL_PYTHON])
    return tag


def image_python(client: Any, tag: str) -> str:
    """The Python version (X.Y.Z) inside an image built here; '' if unknown."""
    image = _find_image(client, tag)
    if image is None:
        raise ImageBuildError(f"image {tag} does not exist; build it with `thaw image build`")
    labels = image.attrs.get("Config", {}).get("Labels") or {}
    return str(labels.get(LABEL_PYTHON, ""))


def docker_client() -> Any:
    """A client for the local engine (DOCKER_HOST etc. from the environment)."""
    try:
        import docker
        import docker.errors
    except ImportError as exc:
        raise ImageBuildError("the docker SDK is not installed (pip install 'docker>=7')"
                              ) from exc

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise ImageBuildError(f"no docker engine reachable: {exc}") from exc
    return client


__all__ = [
    "AptSource",
    "BASE_PACKAGES",
    "IMAGE_REPOSITORY",
    "ImageBuildError",
    "docker_client",
    "ensure_base_image",
    "find_apt_source",
    "image_python",
    "image_tag",
]
