"""pack_bundle is reproducible: the same folder packs to the same bytes whatever the
files' times, owners or unrelated mode bits, and whichever order the disk lists them
in, so a redeploy of an unchanged folder has the same digest."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import time
from pathlib import Path

from thaw.core.bundle import extract_bundle, pack_bundle


def _folder(root: Path) -> Path:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "thaw.toml").write_text('name = "repro"\nhandler = "app:App"\n')
    (root / "app.py").write_text("class App:\n    def __call__(self, r):\n        return r\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o750)
    (root / "pkg" / "b.txt").write_text("b")
    (root / "pkg" / "a.txt").write_text("a")
    (root / "pkg" / "sub" / "data.bin").write_bytes(os.urandom(4096))
    (root / "link.txt").symlink_to("pkg/a.txt")
    return root


def _touch_all(root: Path, when: float) -> None:
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            os.utime(os.path.join(here, name), (when, when), follow_symlinks=False)


def test_the_same_folder_packs_to_the_same_bytes_after_touching_every_file(
        tmp_path: Path) -> None:
    folder = _folder(tmp_path / "fn")
    first = pack_bundle(str(folder))
    _touch_all(folder, time.time() + 3600)
    (folder / "app.py").chmod(0o600)  # no exec bit either way: packed as 0644
    second = pack_bundle(str(folder))
    assert first == second
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()


def test_a_copy_elsewhere_written_in_another_order_packs_the_same(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "fn")
    copy = tmp_path / "elsewhere" / "other-name"
    copy.mkdir(parents=True)
    # Written in reverse order, so the directory lists them differently.
    for rel in sorted((p.relative_to(folder) for p in folder.rglob("*")), reverse=True):
        src, dst = folder / rel, copy / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy(src, dst)
    assert pack_bundle(str(copy)) == pack_bundle(str(folder))


def test_members_are_sorted_with_fixed_times_owners_and_modes(tmp_path: Path) -> None:
    data = pack_bundle(str(_folder(tmp_path / "fn")))
    header = gzip.GzipFile(fileobj=io.BytesIO(data))
    header.read()
    assert header.mtime == 0
    assert data[3] & 0x08 == 0  # FNAME flag: no file name in the gzip header
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == ["app.py", "link.txt", "run.sh", "thaw.toml", "pkg/a.txt",
                     "pkg/b.txt", "pkg/sub/data.bin"]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
    modes = {m.name: m.mode for m in members}
    assert modes["run.sh"] == 0o755
    assert modes["app.py"] == modes["pkg/a.txt"] == 0o644
    assert modes["link.txt"] == 0o777


def test_a_content_change_changes_the_bytes_and_the_bundle_still_unpacks(
        tmp_path: Path) -> None:
    folder = _folder(tmp_path / "fn")
    before = pack_bundle(str(folder))
    (folder / "pkg" / "a.txt").write_text("A")
    after = pack_bundle(str(folder))
    assert before != after
    (folder / "pkg" / "a.txt").write_text("a")
    (folder / "run.sh").chmod(0o644)  # the executable bit is content
    assert pack_bundle(str(folder)) != before
    extract_bundle(after, str(tmp_path / "out"))
    assert (tmp_path / "out" / "pkg" / "a.txt").read_text() == "A"
    assert os.access(tmp_path / "out" / "run.sh", os.X_OK)
    assert os.readlink(tmp_path / "out" / "link.txt") == "pkg/a.txt"
