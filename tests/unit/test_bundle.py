"""Bundles are read and unpacked as a stream with every limit checked on the way:
sizes (declared and decompressed), member count, depth, compression ratio, sparse and
special files, links out of the bundle. Each refusal names its limit and member."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
from pathlib import Path

import pytest

from thaw.core.bundle import (
    BundleLimits,
    extract_bundle,
    pack_bundle,
    scan_bundle,
)
from thaw.core.errors import BundleTooLarge, InvalidBundle
from thaw.core.spec import read_bundle
from thaw.gateway.errors import status_of

TOML = b'name = "x"\nhandler = "app:X"\n'
MiB = 1024 * 1024


def _info(name: str, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def _tar(*members: tuple[tarfile.TarInfo, bytes | None], mode: str = "w:gz",
         fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:  # type: ignore[call-overload]
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return _info(name), data


def _refused(data: bytes, limits: BundleLimits | None = None) -> InvalidBundle:
    with pytest.raises(InvalidBundle) as caught:
        scan_bundle(data, limits or BundleLimits())
    return caught.value


def test_a_good_bundle_reads_in_every_compression() -> None:
    plain = _tar(_file("thaw.toml", TOML), _file("app.py", b"x = 1\n"), mode="w")
    for data in (plain, gzip.compress(plain), bz2.compress(plain), lzma.compress(plain)):
        scan = scan_bundle(data)
        assert scan.toml == TOML and scan.members == 2 and scan.unpacked_bytes == len(TOML) + 6
        assert read_bundle(data).name == "x"


def test_a_gzip_bomb_is_refused_by_ratio_without_inflating_it() -> None:
    bomb = gzip.compress(_tar(_file("thaw.toml", TOML), _file("zeros", bytes(64 * MiB)),
                              mode="w"), compresslevel=9)
    assert len(bomb) < MiB
    err = _refused(bomb)
    assert isinstance(err, BundleTooLarge) and status_of(err) == 413
    assert "ratio" in err.message and err.field == "bundle"


def test_unpacked_size_is_checked_from_the_header_before_the_data() -> None:
    limits = BundleLimits(unpacked_bytes=MiB, ratio=1e9)
    ok = _tar(_file("thaw.toml", TOML), _file("a.bin", os.urandom(MiB // 2)))
    scan_bundle(ok, limits)
    big = _tar(_file("thaw.toml", TOML), _file("a.bin", os.urandom(MiB // 2)),
               _file("dir/b.bin", os.urandom(MiB // 2 + 1)))
    err = _refused(big, limits)
    assert isinstance(err, BundleTooLarge) and "unpacked_bytes" in err.message
    assert err.field == "bundle/dir/b.bin"


def test_the_decompressed_stream_is_cut_off_past_the_limit() -> None:
    # Files of no size whose extended headers are each within bounds: what the
    # headers declare is nothing, the stream itself is what gets counted and cut off.
    limits = BundleLimits(unpacked_bytes=64 * 1024, files=20, ratio=1e9)
    padded = _tar(_file("thaw.toml", TOML), *(
        (_info(f"f{i}", pax_headers={"comment": "x" * 60_000}), b"") for i in range(19)))
    err = _refused(padded, limits)
    assert isinstance(err, BundleTooLarge) and "unpacked_bytes" in err.message
    assert err.field == "bundle"


def test_a_huge_extended_header_is_refused_before_it_is_read() -> None:
    header = _tar(_file("thaw.toml", TOML),
                  (_info("x", pax_headers={"comment": "y" * 200_000}), b""))
    err = _refused(header)
    assert isinstance(err, BundleTooLarge) and "header_bytes" in err.message


def test_member_count_and_depth_are_bounded() -> None:
    many = _tar(_file("thaw.toml", TOML), *(_file(f"f{i}", b"") for i in range(20)))
    err = _refused(many, BundleLimits(files=10))
    assert isinstance(err, BundleTooLarge) and "files" in err.message
    deep = _tar(_file("thaw.toml", TOML), _file("/".join(["d"] * 40) + "/f", b""))
    err = _refused(deep)
    assert not isinstance(err, BundleTooLarge) and "path_depth" in err.message
    assert err.field is not None and err.field.startswith("bundle/d/d/")


def test_sparse_files_are_refused() -> None:
    # PAX sparse (what GNU tar --sparse writes): 2 GiB declared, nothing stored.
    pax = _tar(_file("thaw.toml", TOML), (_info("big", pax_headers={
        "GNU.sparse.size": str(2 * 1024**3), "GNU.sparse.map": "0,0"}), b""))
    err = _refused(pax)
    assert "sparse" in err.message and err.field == "bundle/big"
    # Old GNU sparse members are refused from their header block.
    old = _tar(_file("thaw.toml", TOML), (_info("old", type=tarfile.GNUTYPE_SPARSE), None),
               fmt=tarfile.GNU_FORMAT)
    assert "sparse" in _refused(old).message


@pytest.mark.parametrize(("kind", "word"), [(tarfile.FIFOTYPE, "FIFO"),
                                             (tarfile.CHRTYPE, "device"),
                                             (tarfile.BLKTYPE, "device")])
def test_special_files_are_refused(kind: bytes, word: str) -> None:
    data = _tar(_file("thaw.toml", TOML), (_info("dev", type=kind), None))
    err = _refused(data)
    assert word in err.message and err.field == "bundle/dev"


def test_links_must_stay_inside_the_bundle() -> None:
    def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE
             ) -> tuple[tarfile.TarInfo, None]:
        return _info(name, type=kind, linkname=target), None

    inside = _tar(_file("thaw.toml", TOML), _file("pkg/a.py", b""), link("lib", "pkg"),
                  link("pkg/b.py", "a.py"), link("pkg/c.py", "../pkg/a.py"),
                  link("hard.py", "pkg/a.py", tarfile.LNKTYPE))
    assert scan_bundle(inside).members == 6
    for bad in (link("l", "/etc/passwd"), link("l", "../outside"), link("a/l", "../../x"),
                link("h", "/etc/shadow", tarfile.LNKTYPE), link("h", "missing", tarfile.LNKTYPE)):
        err = _refused(_tar(_file("thaw.toml", TOML), bad))
        assert err.field == f"bundle/{bad[0].name}", err.message
    # Each link alone stays inside; through another, one climbs out.
    chained = _tar(_file("thaw.toml", TOML), _file("a/b/f", b""), link("a/b/up", "../.."),
                   link("escape", "a/b/up/.."))
    assert _refused(chained).field == "bundle/escape"
    # A link made through another link is where it really is: pkg/up, not lib/up.
    aliased = _tar(_file("thaw.toml", TOML), _file("pkg/f", b""), link("lib", "pkg"),
                   link("lib/up", ".."), link("escape", "pkg/up/.."))
    assert _refused(aliased).field == "bundle/escape"


def test_unsafe_and_repeated_paths_are_refused() -> None:
    assert "unsafe path" in _refused(_tar(_file("thaw.toml", TOML),
                                          _file("../x", b""))).message
    assert "unsafe path" in _refused(_tar(_file("thaw.toml", TOML),
                                          _file("/abs", b""))).message
    assert "twice" in _refused(_tar(_file("thaw.toml", TOML), _file("thaw.toml", TOML))).message


def test_thaw_toml_must_be_a_small_file() -> None:
    as_dir = _tar((_info("thaw.toml", type=tarfile.DIRTYPE), None), _file("app.py", b""))
    err = _refused(as_dir)
    assert err.field == "thaw.toml" and "folder" in err.message and status_of(err) == 400
    big = _tar(_file("thaw.toml", TOML + b"#" * 300_000))
    err = _refused(big)
    assert isinstance(err, BundleTooLarge) and err.field == "thaw.toml"


def test_extract_unpacks_and_leaves_nothing_when_refused(tmp_path: Path) -> None:
    good = _tar(_file("thaw.toml", TOML), _file("pkg/a.py", b"A"),
                (_info("lib", type=tarfile.SYMTYPE, linkname="pkg"), None))
    dest = tmp_path / "ok"
    extract_bundle(good, str(dest))
    assert (dest / "pkg" / "a.py").read_bytes() == b"A"
    assert os.readlink(dest / "lib") == "pkg"
    limits = BundleLimits(unpacked_bytes=MiB, ratio=1e9)
    bad = _tar(_file("thaw.toml", TOML), _file("a.bin", os.urandom(MiB // 2)),
               _file("b.bin", os.urandom(MiB)))
    with pytest.raises(BundleTooLarge):
        extract_bundle(bad, str(tmp_path / "bad"), limits)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(InvalidBundle, match="ratio"):
        extract_bundle(gzip.compress(_tar(_file("z", bytes(64 * MiB)), mode="w")),
                       str(tmp_path / "bomb"))
    assert not (tmp_path / "bomb").exists()


def test_pack_keeps_inside_links_and_refuses_the_rest(tmp_path: Path) -> None:
    folder = tmp_path / "fn"
    (folder / "pkg").mkdir(parents=True)
    (folder / "thaw.toml").write_bytes(TOML)
    (folder / "pkg" / "a.py").write_text("A")
    (folder / "lib").symlink_to("pkg")
    (folder / "b.py").symlink_to(folder / "pkg" / "a.py")
    data = pack_bundle(str(folder))
    dest = tmp_path / "out"
    extract_bundle(data, str(dest))
    assert (dest / "lib" / "a.py").read_text() == "A" and (dest / "b.py").is_symlink()
    assert os.readlink(dest / "b.py") == "pkg/a.py"
    (folder / "out").symlink_to(tmp_path)
    with pytest.raises(InvalidBundle, match="outside the bundle folder") as caught:
        pack_bundle(str(folder))
    assert caught.value.field == "bundle/out"
    (folder / "out").unlink()
    os.mkfifo(folder / "pipe")
    with pytest.raises(InvalidBundle, match="FIFO") as caught:
        pack_bundle(str(folder))
    assert caught.value.field == "bundle/pipe"
    (folder / "pipe").unlink()
    (folder / "big.bin").write_bytes(os.urandom(2 * MiB))
    with pytest.raises(BundleTooLarge, match="unpacked_bytes"):
        pack_bundle(str(folder), BundleLimits(unpacked_bytes=MiB))
