"""`thaw blobstore migrate`: the agents' chunk stores under $THAW_HOME (or the folders
named) get BLAKE3 names for their SHA-256 chunks, a JSON report each; a corrupt chunk
is left, listed, and the command exits 1."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from tests.blobstore.test_blobstore_digests import arena_bytes, flip, restored, write_old_store
from thaw.blobstore import DiskTier
from thaw.ops.cli import cli


def test_migrate_finds_every_agents_store_under_thaw_home(tmp_path: Path) -> None:
    arena = arena_bytes(3)
    stores = [tmp_path / "agent" / node / "chunks" for node in ("a", "b")]
    refs = [write_old_store(store, arena) for store in stores]
    done = CliRunner().invoke(cli, ["blobstore", "migrate"], env={"THAW_HOME": str(tmp_path)})
    assert done.exit_code == 0, done.output
    reports = [json.loads(line) for line in done.output.splitlines()]
    assert [r["root"] for r in reports] == [str(s) for s in stores]
    for report, store, store_refs in zip(reports, stores, refs, strict=True):
        assert report["corrupt"] == [] and report["migrated"] == len(store_refs), report
        # The old names still restore the same bytes.
        assert restored(store_refs, DiskTier(store), len(arena)) == arena


def test_migrate_lists_a_corrupt_chunk_and_fails(tmp_path: Path) -> None:
    store = tmp_path / "chunks"
    refs = write_old_store(store, arena_bytes(3))
    victim = refs[1].digest
    flip(next(store.glob(f"{victim[:2]}/{victim}*")))
    done = CliRunner().invoke(cli, ["blobstore", "migrate", str(store)])
    assert done.exit_code == 1, done.output
    assert json.loads(done.output.splitlines()[0])["corrupt"] == [victim]


def test_migrate_with_no_store_names_the_folder_it_looked_in(tmp_path: Path) -> None:
    done = CliRunner().invoke(cli, ["blobstore", "migrate"], env={"THAW_HOME": str(tmp_path)})
    assert done.exit_code != 0
    assert "no chunk store under" in done.output + str(done.exception)
