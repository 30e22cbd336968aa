"""What a bundle asks of its Python environment, and how an environment is named.

A bundle may carry `requirements.txt`, a `pyproject.toml` with `[project]
dependencies` (and `requires-python`) or a `cog.yaml` (`build.python_packages`,
`build.python_version`); the first found in that order is the function's. The agent
resolves it into a lock (exact pins with hashes, `uv pip compile`) and builds one
virtualenv per lock (environments_build.py), named by `environment_key` over the lock
text, the Python version and the platform: every function with the same lock, on any
node, shares one environment. docs/environments.md.
"""

from __future__ import annotations

import hashlib
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import tomllib

from thaw.core.errors import InvalidBundle

# The dependency files a bundle may carry, in the order one is chosen.
DEPENDENCY_FILES = ("requirements.txt", "pyproject.toml", "cog.yaml")
# Bounds on what a bundle asks (docs/environments.md, "Limits").
MAX_DEPENDENCY_FILE_BYTES = 64 * 1024
MAX_REQUIREMENTS = 256
MAX_REQUIREMENT_CHARS = 512
# A requirement line: a name, then extras, version specifiers or markers. Options
# (`-r`, `--index-url`, `-e`) are refused: the index is the node's, never the bundle's,
# and a local path or URL would install something no lock can pin.
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_URL_OR_PATH = re.compile(r"(^|\s|@)(\.{0,2}/|file:|https?:|git\+|[a-z]+://)")
_PYTHON_VERSION = re.compile(r"^3\.\d{1,2}$")


@dataclass(frozen=True)
class Dependencies:
    """A bundle's requirements as its dependency file states them."""

    requirements: tuple[str, ...]
    python: str
    """The Python (major.minor) the environment runs; the node's unless the file pins
    one (cog.yaml python_version) or excludes it (requires-python)."""
    source: str
    """The file they came from (requirements.txt, pyproject.toml, cog.yaml)."""

    def request_text(self) -> str:
        """The requirements as the resolver reads them, one a line."""
        return "".join(f"{r}\n" for r in self.requirements)


def node_python() -> str:
    """This node's Python, major.minor (the base environment's)."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def node_platform() -> str:
    """The platform environments are resolved for, as uv names it."""
    return f"{platform.machine() or 'x86_64'}-unknown-linux-gnu"


def read_dependencies(bundle: Path, python: str | None = None) -> Dependencies | None:
    """The bundle's dependencies, None when it carries no dependency file (it then runs
    in the node's base environment). InvalidBundle naming the file (and line) at fault."""
    default = python or node_python()
    for name in DEPENDENCY_FILES:
        path = bundle / name
        if not path.is_file() or path.is_symlink():
            continue
        if path.stat().st_size > MAX_DEPENDENCY_FILE_BYTES:
            raise InvalidBundle(f"{name} is larger than {MAX_DEPENDENCY_FILE_BYTES} bytes",
                                field=name)
        text = path.read_text(encoding="utf-8", errors="replace")
        found: Dependencies | None
        if name == "requirements.txt":
            found = Dependencies(parse_requirements(text, name), default, name)
        elif name == "pyproject.toml":
            found = parse_pyproject(text, default)
            if found is None:  # a pyproject without dependencies: no environment
                continue
        else:
            found = parse_cog(text, default)
        return found if found.requirements else None
    return None


def parse_requirements(text: str, source: str = "requirements.txt") -> tuple[str, ...]:
    """Requirement lines, comments and blank lines dropped; each checked."""
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        lines.append(check_requirement(line, f"{source}:{number}"))
    return _bounded(lines, source)


def check_requirement(line: str, where: str) -> str:
    """One requirement, refused (naming `where`) when it is an option, a path or URL,
    or past the length bound."""
    if len(line) > MAX_REQUIREMENT_CHARS:
        raise InvalidBundle(f"{where}: requirement longer than {MAX_REQUIREMENT_CHARS} "
                            "characters", field=where)
    if line.startswith("-"):
        raise InvalidBundle(f"{where}: options such as {line.split()[0]!r} are not "
                            "accepted (packages come from the node's index)", field=where)
    if not _NAME.match(line) or _URL_OR_PATH.search(line):
        raise InvalidBundle(f"{where}: {line!r} is not a package requirement (name and "
                            "versions; no paths or URLs)", field=where)
    return line


def _bounded(requirements: list[str], source: str) -> tuple[str, ...]:
    if len(requirements) > MAX_REQUIREMENTS:
        raise InvalidBundle(f"{source} lists {len(requirements)} requirements, more than "
                            f"{MAX_REQUIREMENTS}", field=source)
    return tuple(requirements)


def parse_pyproject(text: str, default_python: str) -> Dependencies | None:
    """[project].dependencies and requires-python; None without dependencies."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidBundle(f"pyproject.toml: {exc}", field="pyproject.toml") from exc
    project = data.get("project")
    if not isinstance(project, dict) or "dependencies" not in project:
        return None
    deps = project["dependencies"]
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise InvalidBundle("pyproject.toml: [project].dependencies must be a list of "
                            "strings", field="project.dependencies")
    requirements = _bounded([check_requirement(d.strip(), "project.dependencies")
                             for d in deps], "pyproject.toml")
    python = default_python
    requires = project.get("requires-python")
    if requires is not None:
        if not isinstance(requires, str):
            raise InvalidBundle("pyproject.toml: requires-python must be a string",
                                field="project.requires-python")
        python = python_for(requires, default_python)
    return Dependencies(requirements, python, "pyproject.toml")


def python_for(requires: str, default_python: str) -> str:
    """The node's Python if `requires` (a requires-python specifier) admits it."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        spec = SpecifierSet(requires)
    except InvalidSpecifier as exc:
        raise InvalidBundle(f"pyproject.toml: requires-python {requires!r} is not a "
                            "version specifier", field="project.requires-python") from exc
    # The node's own Python is known to the patch; another is taken as any patch.
    candidates = ([".".join(map(str, sys.version_info[:3]))]
                  if default_python == node_python()
                  else [f"{default_python}.0", f"{default_python}.99"])
    if any(spec.contains(version, prereleases=True) for version in candidates):
        return default_python
    raise InvalidBundle(f"pyproject.toml: requires-python {requires!r} excludes this "
                        f"node's Python {default_python}", field="project.requires-python")


def parse_cog(text: str, default_python: str) -> Dependencies:
    """build.python_packages and build.python_version of a cog.yaml."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidBundle(f"cog.yaml: {exc}", field="cog.yaml") from exc
    build = data.get("build") if isinstance(data, dict) else None
    if build is None:
        return Dependencies((), default_python, "cog.yaml")
    if not isinstance(build, dict):
        raise InvalidBundle("cog.yaml: build must be a mapping", field="build")
    packages = build.get("python_packages") or []
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        raise InvalidBundle("cog.yaml: build.python_packages must be a list of strings",
                            field="build.python_packages")
    requirements = _bounded([check_requirement(p.strip(), "build.python_packages")
                             for p in packages], "cog.yaml")
    python = build.get("python_version", default_python)
    python = str(python) if isinstance(python, (str, float)) else ""
    if not _PYTHON_VERSION.match(python):
        raise InvalidBundle(f"cog.yaml: build.python_version {python!r} is not a Python "
                            "version such as \"3.11\"", field="build.python_version")
    return Dependencies(requirements, python, "cog.yaml")


def resolution_key(deps: Dependencies, platform_name: str, index: str) -> str:
    """Names a resolution: the same requests for the same Python, platform and index
    resolve once per node (a new deploy of changed requirements resolves again)."""
    text = f"{deps.request_text()}\0{deps.python}\0{platform_name}\0{index}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def environment_key(lock: str, python: str, platform_name: str) -> str:
    """Names an environment: the SHA-256 of its lock text, its Python version and its
    platform (the first 32 hex digits)."""
    text = f"{lock}\0python:{python}\0platform:{platform_name}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def lock_pins(lock: str) -> dict[str, str]:
    """Package name (normalized) -> pinned version, from a lock's `name==version` lines."""
    pins: dict[str, str] = {}
    for line in lock.splitlines():
        head = line.strip().split(" ", 1)[0].split(";", 1)[0]
        name, sep, version = head.partition("==")
        if sep and _NAME.fullmatch(name):
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins
