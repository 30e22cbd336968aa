"""A cog folder (cog.yaml + predict.py, no thaw.toml) as a thaw bundle (docs/cog.md).

`thaw deploy FOLDER` of such a folder packs a copy with a thaw.toml written into it,
never into the user's folder: the function is named after the folder (normalised to
the name pattern) or `--name`, its handler is cog.yaml's `predict: "predict.py:
Predictor"` as `predict:Predictor`, `build.gpu: true` asks a slice of COG_GPU_MEMORY,
`concurrency.max` (1 unless set, as in cog) bounds the calls one instance serves at
once, and cog.yaml's build.python_packages become its environment (the platform reads
cog.yaml itself and adds its own cog: docs/environments.md).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import yaml

from thaw.core.spec import MAX_CONCURRENCY, NAME_PATTERN

# cog's `build.gpu: true` asks a whole GPU and names no size, where thaw gives slices
# of a size: a cog folder gets this much (a T4-class card's memory, the smallest GPU
# Replicate serves); a folder that needs another size carries a thaw.toml.
COG_GPU_MEMORY = "16GiB"
_PREDICT = re.compile(r"^(?P<file>[A-Za-z0-9_./-]+)\.py:(?P<cls>[A-Za-z_][A-Za-z0-9_.]*)\Z")


def is_cog_folder(folder: Path) -> bool:
    """A folder cog would build: cog.yaml, and no thaw.toml of its own."""
    return (folder / "cog.yaml").is_file() and not (folder / "thaw.toml").exists()


def function_name(folder: Path, name: str | None) -> str:
    """`--name`, else the folder's name lower-cased with other characters as '-'."""
    if name is not None:
        if not NAME_PATTERN.match(name):
            raise click.UsageError(f"--name {name!r}: a name is lower-case letters, "
                                   "digits and '-', starting with a letter or digit, at "
                                   "most 63 characters")
        return name
    derived = re.sub(r"[^a-z0-9-]+", "-", folder.resolve().name.lower()).strip("-")[:63]
    derived = derived.strip("-")
    if not derived or not NAME_PATTERN.match(derived):
        raise click.UsageError(f"the folder name {folder.resolve().name!r} makes no "
                               "function name: pass --name NAME")
    return derived


def _load(cog_yaml: str) -> object:
    try:
        return yaml.safe_load(cog_yaml)
    except yaml.YAMLError as exc:
        raise click.UsageError(f"cog.yaml: {exc}") from exc


def handler_of(cog_yaml: str) -> str:
    """cog.yaml's `predict: "predict.py:Predictor"` as `predict:Predictor`."""
    data = _load(cog_yaml)
    predict = data.get("predict") if isinstance(data, dict) else None
    if not isinstance(predict, str):
        raise click.UsageError('cog.yaml has no predict: "predict.py:Predictor" (the '
                               "file and class of the predictor)")
    found = _PREDICT.match(predict.strip())
    if found is None or found["file"].startswith(("/", ".")) or ".." in found["file"]:
        raise click.UsageError(f"cog.yaml predict: {predict!r} is not "
                               "\"path/to/file.py:ClassName\" inside the folder")
    return f"{found['file'].replace('/', '.')}:{found['cls']}"


def gpu_of(cog_yaml: str) -> bool:
    """cog.yaml's `build.gpu` (false unless set, as in cog)."""
    data = _load(cog_yaml)
    build = data.get("build") if isinstance(data, dict) else None
    gpu = build.get("gpu", False) if isinstance(build, dict) else False
    if not isinstance(gpu, bool):
        raise click.UsageError(f"cog.yaml build.gpu: {gpu!r} is not true or false")
    return gpu


def concurrency_of(cog_yaml: str) -> int:
    """cog.yaml's `concurrency.max`: the predictions one instance runs at once (1
    unless set, as in cog, whose predictors are not written for concurrent calls)."""
    data = _load(cog_yaml)
    concurrency = data.get("concurrency") if isinstance(data, dict) else None
    if concurrency is None:
        return 1
    most = concurrency.get("max", 1) if isinstance(concurrency, dict) else None
    if not isinstance(most, int) or isinstance(most, bool) or not 1 <= most <= MAX_CONCURRENCY:
        raise click.UsageError(f"cog.yaml concurrency.max: {most!r} is not a whole number "
                               f"from 1 to {MAX_CONCURRENCY}")
    return most


def thaw_toml(name: str, handler: str, gpu: bool = False, concurrency: int = 1) -> str:
    """The thaw.toml a cog folder stands for."""
    text = f'name = "{name}"\nhandler = "{handler}"\n'
    if gpu:
        text += f'\n[resources]\ngpu_memory = "{COG_GPU_MEMORY}"\n'
    return text + (f"\n[scaling]\ntarget_concurrency = {concurrency}\n"
                   f"max_concurrency = {concurrency}\n")


@contextlib.contextmanager
def as_bundle(folder: Path, name: str | None) -> Iterator[Path]:
    """The folder to pack: `folder` itself when it has a thaw.toml (then --name must
    not be given), else a temporary copy with the thaw.toml cog.yaml stands for."""
    if not is_cog_folder(folder):
        if name is not None:
            raise click.UsageError("--name is for a cog folder (cog.yaml, no thaw.toml); "
                                   "a bundle's name is thaw.toml's")
        yield folder
        return
    text = (folder / "cog.yaml").read_text(encoding="utf-8")
    toml = thaw_toml(function_name(folder, name), handler_of(text), gpu_of(text),
                     concurrency_of(text))
    with tempfile.TemporaryDirectory(prefix="thaw-cog-") as tmp:
        copy = Path(tmp) / folder.resolve().name
        shutil.copytree(folder, copy, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", ".git", ".cog"))
        (copy / "thaw.toml").write_text(toml, encoding="utf-8")
        yield copy


def build_notes(folder: Path) -> str:
    """What a cog folder's build asks that thaw does differently: `gpu: true` names
    no size, so the deploy says which it asks."""
    if not is_cog_folder(folder):
        return ""
    try:
        data = yaml.safe_load((folder / "cog.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return ""
    build = data.get("build") if isinstance(data, dict) else None
    if not isinstance(build, dict):
        return ""
    if build.get("gpu") is True:
        return (f"cog.yaml asks build.gpu: true, which names no size: this deploy asks a "
                f"{COG_GPU_MEMORY} GPU slice. For another size, add a thaw.toml with "
                "[resources] gpu_memory (docs/cog.md).")
    return ""
