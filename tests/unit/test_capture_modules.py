"""A snapshot lists each module once, in first-import order: a build forked from a
template lists the template's modules and then those setup() imported, which may
repeat one; templates are keyed by that list."""

from __future__ import annotations

from pathlib import Path

from thaw.snapshotter.runtime.capture import capture
from thaw.snapshotter.runtime.snapshot import SnapshotMeta


class Plain:
    def __init__(self) -> None:
        self.value = 3


def test_a_capture_lists_each_module_once_in_first_import_order(tmp_path: Path) -> None:
    meta = capture(Plain(), tmp_path / "snap", modules=["app", "torch", "tok", "torch"],
                   timings={})
    assert meta.modules == ("app", "torch", "tok")
    assert SnapshotMeta.load(tmp_path / "snap" / "snapshot.json").modules == meta.modules
