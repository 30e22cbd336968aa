"""Packages the platform provides to an environment that its lock does not pin.

A cog folder's predictor imports `cog`, which the platform provides (docs/cog.md); an
environment built from cog.yaml's `build.python_packages` holds exactly those, so
without help `import cog` fails there. Rather than resolving cog from the node's
index (which an air-gapped index may not serve, and which could pick another cog than
the one the platform speaks), the agent copies its OWN installed `cog` and the
packages it needs at import time into a read-only folder beside the environments,
`<envs>/.provided-<digest>`, and the launch puts it on the instance's path.

The user's pins always win: a package the lock pins is never copied (a user who lists
`cog` gets no folder at all), so the folder holds only names the environment lacks and
its place on the path shadows nothing. The folder is named by what it holds (names
and versions), made once per node and shared by every environment that lacks the same
set. docs/environments.md ("Packages the platform provides").
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from thaw.platform.environments import lock_pins
from thaw.platform.environments_build import _remove, _seal

# The dependency file whose environments get the platform's packages, and which.
PROVIDED_FOR = {"cog.yaml": ("cog",)}
PREFIX = ".provided-"


def normalize(name: str) -> str:
    """A distribution name as the lock's pins name it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: Iterable[str]) -> list[metadata.Distribution]:
    """The agent's installed distributions `roots` needs at run time: each root and,
    transitively, its requirements without extras whose markers hold here. A name not
    installed is skipped (an optional dependency of an older release)."""
    from packaging.requirements import Requirement

    found: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = normalize(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return [found[n] for n in sorted(found)]


def provided(source: str, pins: Mapping[str, str]) -> list[metadata.Distribution]:
    """What an environment from `source` whose lock pins `pins` gets from the platform:
    nothing where the file is not one the platform provides for, or where the lock
    pins the provided package itself; else the package and whatever of its run-time
    requirements the lock does not pin."""
    roots = PROVIDED_FOR.get(source, ())
    if not roots or any(normalize(r) in pins for r in roots):
        return []
    return [d for d in closure(roots) if normalize(d.metadata["Name"]) not in pins]


def folder_for(root: Path, source: str, lock: str) -> str:
    """The folder of what an environment from `source` with `lock` gets from the
    platform, made under `root` where missing; "" where it gets nothing (blocking:
    reads the installed distributions' metadata)."""
    dists = provided(source, lock_pins(lock))
    return str(ensure_folder(root, dists)) if dists else ""


def folder_name(dists: list[metadata.Distribution]) -> str:
    """The folder's name: a digest of the names and versions it holds."""
    text = "\n".join(sorted(f"{normalize(d.metadata['Name'])}=={d.version}" for d in dists))
    return PREFIX + hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_folder(root: Path, dists: list[metadata.Distribution]) -> Path:
    """The read-only folder holding copies of `dists` (their installed files inside
    site-packages, metadata included), made under `root` once (blocking)."""
    target = root / folder_name(dists)
    if target.is_dir():
        return target
    staging = root / f".staging-{PREFIX.strip('.-')}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        for dist in dists:
            _copy_dist(dist, staging)
        _seal(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # not another start's identical folder
                raise
    finally:
        if staging.exists():
            _remove(staging)
    return target


def _copy_dist(dist: metadata.Distribution, into: Path) -> None:
    for entry in dist.files or []:
        parts = entry.parts
        # Scripts and data outside site-packages (`../../bin/...`), and caches, stay.
        if not parts or parts[0] == ".." or "__pycache__" in parts:
            continue
        source = Path(str(dist.locate_file(entry)))
        if not source.is_file():
            continue
        dest = into.joinpath(*parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
