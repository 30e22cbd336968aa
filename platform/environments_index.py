"""The package indexes a node's environments come from, and uv's arguments for them.

The node's index is THAW_ENV_INDEX_URL (the agent's env_index_url), else the machine's
UV_INDEX_URL, else what pip is configured with (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL, then
pip's configuration files, [global] and [install]), else uv's default. An operator who
set up pip for this machine has set up thaw's environments too. Local indexes (a folder
of wheels, or a PEP 503 `simple/` tree, named by a path or file://) need no network; a
local one that does not exist is skipped. docs/environments.md, "Settings".
"""

from __future__ import annotations

import configparser
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger()
# Files of wheels or source archives: a folder holding them is a flat index (find-links).
_ARCHIVES = (".whl", ".tar.gz", ".zip")


@dataclass(frozen=True)
class IndexPlan:
    """What uv is given for a node's indexes."""

    args: tuple[str, ...]
    """uv's index options (--index-url, --extra-index-url, --find-links, --no-index)."""
    local_folders: tuple[str, ...]
    """Folders uv reads the local indexes from (bound read-only into its sandbox)."""
    network: bool
    """Whether some index is remote (uv's default one included): the sandbox gets egress."""


def local_path(url: str) -> str:
    """The folder a local index names (an absolute path or file://), or ""."""
    path = url.removeprefix("file://")
    return path if path.startswith("/") else ""


def _is_flat(folder: str) -> bool:
    """A folder of wheels (find-links), not a simple/ tree of one folder per project.
    An empty folder counts as flat."""
    try:
        names = os.listdir(folder)
    except OSError:
        return True
    if any(name.endswith(_ARCHIVES) for name in names):
        return True
    return not any(name == "index.html" or os.path.isdir(os.path.join(folder, name))
                   for name in names)


def _local(folder: str) -> tuple[str, str, str]:
    """(kind, uv's URL or folder, folder to bind) of a local index: kind "index" for
    a simple tree, "flat" for a folder of wheels. A simple tree's pages may link to
    files beside it (../../files/...), so its parent folder is bound."""
    folder = folder.rstrip("/") or "/"
    if os.path.isdir(os.path.join(folder, "simple")):
        return "index", f"file://{folder}/simple", folder
    if _is_flat(folder):
        return "flat", folder, folder
    return "index", f"file://{folder}", os.path.dirname(folder) or folder


def plan_indexes(index_url: str, extra_urls: Sequence[str] = ()) -> IndexPlan:
    """uv's options for the primary index `index_url` ("" for uv's default) and the
    extra ones. A flat primary folder turns the default index off (--no-index) unless
    an extra index is a real index, which then becomes the primary."""
    args: list[str] = []
    folders: list[str] = []
    extra_indexes: list[str] = []
    network = False
    for url in extra_urls:
        local = local_path(url)
        if not local:
            extra_indexes.append(url)
            network = True
            continue
        kind, target, bind = _local(local)
        folders.append(bind)
        if kind == "flat":
            args += ["--find-links", target]
        else:
            extra_indexes.append(target)
    primary = local_path(index_url)
    if primary:
        kind, target, bind = _local(primary)
        folders.insert(0, bind)
        if kind == "flat":
            args = ["--find-links", target, *args]
            if extra_indexes:
                args += ["--index-url", extra_indexes.pop(0)]
            else:
                args.append("--no-index")
        else:
            args += ["--index-url", target]
    elif index_url:
        args += ["--index-url", index_url]
        network = True
    else:
        network = True  # uv's default index
    for url in extra_indexes:
        args += ["--extra-index-url", url]
    return IndexPlan(args=tuple(args), local_folders=tuple(dict.fromkeys(folders)),
                     network=network)


def pip_config_files(environ: Mapping[str, str], home: str | None = None,
                     prefix: str = sys.prefix) -> list[Path]:
    """pip's configuration files in the order pip reads them (a later one overrides an
    earlier one): the machine's (XDG_CONFIG_DIRS' pip/pip.conf, /etc/pip.conf), the
    user's (~/.pip/pip.conf, then $XDG_CONFIG_HOME/pip/pip.conf or
    ~/.config/pip/pip.conf; not read when PIP_CONFIG_FILE names an existing file), the
    virtualenv's (<prefix>/pip.conf), then PIP_CONFIG_FILE's."""
    home = home if home is not None else os.path.expanduser("~")
    dirs = environ.get("XDG_CONFIG_DIRS") or "/etc/xdg"
    files = [Path(d) / "pip" / "pip.conf" for d in dirs.split(":") if d]
    files.append(Path("/etc/pip.conf"))
    named = environ.get("PIP_CONFIG_FILE", "")
    if not (named and os.path.exists(named)):
        user = environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
        files += [Path(home) / ".pip" / "pip.conf", Path(user) / "pip" / "pip.conf"]
    files.append(Path(prefix) / "pip.conf")
    if named and named != os.devnull:
        files.append(Path(named))
    return list(dict.fromkeys(files))


def read_pip_config(files: Sequence[Path], environ: Mapping[str, str]
                    ) -> tuple[str, tuple[str, ...]]:
    """(index-url, extra-index-urls) as pip would use them for `pip install`: the files
    in order ([install] over [global] in each), then PIP_INDEX_URL and
    PIP_EXTRA_INDEX_URL over them. Unreadable or malformed files are skipped."""
    values: dict[str, str] = {}
    for path in files:
        parser = configparser.RawConfigParser()
        try:
            if not parser.read(path, encoding="utf-8"):
                continue
        except (configparser.Error, UnicodeDecodeError, OSError) as exc:
            log.warning("pip configuration file skipped", path=str(path), error=str(exc))
            continue
        for section in ("global", "install"):
            if not parser.has_section(section):
                continue
            for option in ("index-url", "extra-index-url"):
                for name in (option, option.replace("-", "_")):
                    if parser.has_option(section, name):
                        values[option] = parser.get(section, name)
    if environ.get("PIP_INDEX_URL"):
        values["index-url"] = environ["PIP_INDEX_URL"]
    if environ.get("PIP_EXTRA_INDEX_URL"):
        values["extra-index-url"] = environ["PIP_EXTRA_INDEX_URL"]
    return values.get("index-url", "").strip(), tuple(values.get("extra-index-url", "").split())


def machine_indexes(environ: Mapping[str, str], files: Sequence[Path] | None = None
                    ) -> tuple[str, tuple[str, ...]]:
    """The machine's indexes when thaw names none: UV_INDEX_URL alone, else pip's
    (environment, then configuration `files`, by default pip's own list). Local ones
    that do not exist are skipped; when pip's index-url is one of them, the first
    extra index left takes its place (uv's default is not used in its stead)."""
    if environ.get("UV_INDEX_URL"):
        return environ["UV_INDEX_URL"], ()
    if files is None:
        files = pip_config_files(environ)
    index, extras = read_pip_config(files, environ)
    kept = tuple(url for url in extras if _exists(url))
    if len(kept) < len(extras):
        log.info("missing local package indexes skipped",
                 indexes=[url for url in extras if url not in kept])
    if index and not _exists(index):
        log.info("missing local package index skipped", index=index)
        index, kept = (kept[0], kept[1:]) if kept else ("", ())
    return index, kept


def _exists(url: str) -> bool:
    local = local_path(url)
    return not local or os.path.isdir(local)
