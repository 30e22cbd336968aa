"""thaw.toml and bundle validation: every bad input names the key at fault."""

import io
import tarfile

import pytest

from thaw.core.errors import InvalidBundle
from thaw.core.spec import parse_spec, read_bundle
from thaw.core.units import parse_duration, parse_size


def test_full_spec() -> None:
    spec = parse_spec("""
name = "embed"
handler = "app:Embedder"
[resources]
gpu_memory = "2GiB"
gpu_compute = 25
[scaling]
min_instances = 0
max_instances = 4
target_concurrency = 4
max_concurrency = 8
scaledown_window = "60s"
timeout = "300s"
""")
    assert spec.resources.gpu_memory == 2 * 1024**3
    assert spec.resources.gpu_compute == 25
    assert spec.scaling.scaledown_window == 60.0
    assert spec.snapshot is True


@pytest.mark.parametrize(("text", "field"), [
    ('handler = "app:X"', "name"),
    ('name = "Bad Name"\nhandler = "app:X"', "name"),
    ('name = "ok"\nhandler = "app.X"', "handler"),
    ('name = "ok"\nhandler = "app:X"\n[resources]\ngpu_memory = "lots"', "resources.gpu_memory"),
    ('name = "ok"\nhandler = "app:X"\n[resources]\ngpu_compute = 150', "resources.gpu_compute"),
    ('name = "ok"\nhandler = "app:X"\n[scaling]\ntimeout = "soon"', "scaling.timeout"),
    ('name = "ok"\nhandler = "app:X"\n[scaling]\nmin_instances = 5\nmax_instances = 2',
     "scaling.min_instances"),
    ('name = "ok"\nhandler = "app:X"\n[scaling]\ntarget_concurrency = 9\nmax_concurrency = 8',
     "scaling.target_concurrency"),
    ('name = "ok"\nhandler = "app:X"\ncolour = "blue"', "colour"),
    ('name = "ok"\nhandler = "app:X', "thaw.toml"),
])
def test_bad_spec_names_the_field(text: str, field: str) -> None:
    with pytest.raises(InvalidBundle) as info:
        parse_spec(text)
    assert info.value.field == field


def _tar(files: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


def test_bundle_checks() -> None:
    ok = b'name = "x"\nhandler = "app:X"\n'
    assert read_bundle(_tar({"thaw.toml": ok, "app.py": b""})).name == "x"
    with pytest.raises(InvalidBundle, match="no thaw.toml"):
        read_bundle(_tar({"app.py": b""}))
    with pytest.raises(InvalidBundle, match="unsafe path"):
        read_bundle(_tar({"thaw.toml": ok, "../evil.py": b""}))
    with pytest.raises(InvalidBundle, match="only files and folders"):
        read_bundle(_tar({"thaw.toml": ok}, symlink="link"))
    with pytest.raises(InvalidBundle, match="not a readable tar"):
        read_bundle(b"this is not a tarball")
    with pytest.raises(InvalidBundle, match="empty"):
        read_bundle(b"")


def test_units() -> None:
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size(0) == 0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("5m") == 300.0
    for bad in ("-1", "12 parsecs", ""):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_runtime_network_is_none_unless_egress_is_asked_for() -> None:
    base = 'name = "f"\nhandler = "app:F"\n'
    assert parse_spec(base).runtime.network == "none"
    assert parse_spec(base + '[runtime]\nnetwork = "egress"\n').runtime.network == "egress"
    with pytest.raises(InvalidBundle, match="runtime.network must be one of none, egress") as err:
        parse_spec(base + '[runtime]\nnetwork = "host"\n')
    assert err.value.field == "runtime.network"
