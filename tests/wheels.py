"""Tiny wheels written by hand, for tests of per-function environments without a
network: a flat folder of them is an index (uv --find-links)."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def write_wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A pure-Python wheel `name`-`version` holding `files` (path -> text)."""
    dist = f"{name}-{version}"
    entries = dict(files)
    entries[f"{dist}.dist-info/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    entries[f"{dist}.dist-info/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: thaw-tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n")
    record = []
    for path, text in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest())
        record.append(f"{path},sha256={digest.rstrip(b'=').decode()},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    entries[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in entries.items():
            archive.writestr(path, text)
    return wheel


def fake_attrs_index(folder: Path) -> Path:
    """An index with two fake versions of attrs (a package the platform itself uses)
    and a helper package that depends on nothing."""
    for version in ("0.0.1", "0.0.2"):
        write_wheel(folder, "attrs", version, {"attrs/__init__.py": f'__version__ = "{version}"\n'})
    write_wheel(folder, "thawtiny", "1.0", {"thawtiny.py": 'VALUE = "tiny"\n'})
    return folder
