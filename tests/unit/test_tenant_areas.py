"""Tenant areas: uids per tenant that last, folders owned by them, and the agent never
following what a tenant planted there (links, FIFOs, hard links, another's socket)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest

from thaw.core.errors import InvalidArgument, ThawError
from thaw.core.http1 import NodeClient, NodeConnectionError
from thaw.core.unixpeer import check_peer
from thaw.platform.sandbox.areas import (
    TenantAreas,
    UidClaims,
    open_tenant_file,
    parse_uid_range,
    seal_output,
)

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")


def areas(tmp_path: Path, owned: bool = False, uid_range: tuple[int, int] = (200000, 200002)
          ) -> TenantAreas:
    # Claims of its own: the machine's may hold these uids for platforms running now.
    return TenantAreas(home=tmp_path / "home", run_dir=tmp_path / "run",
                       uid_range=uid_range, owned=owned, claims_dir=tmp_path / "claims")


def test_each_tenant_keeps_its_own_uid_across_restarts(tmp_path: Path) -> None:
    first = areas(tmp_path)
    assert [first.uid("a"), first.uid("b"), first.uid("a")] == [200000, 200001, 200000]
    again = areas(tmp_path)
    assert again.uid("b") == 200001 and again.uid("c") == 200002
    with pytest.raises(ThawError, match="no free sandbox uid left in 200000-200002"):
        again.uid("d")


@pytest.mark.parametrize("text", ["0-10", "10-5", "abc", "5", "-1-3"])
def test_a_bad_uid_range_is_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="sandbox_uids"):
        parse_uid_range(text)


@as_root
def test_an_area_belongs_to_its_tenant_only(tmp_path: Path) -> None:
    made = areas(tmp_path, owned=True).area("acme")
    for folder in (made.run, made.logs, made.builds):
        info = folder.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (made.uid, made.gid, 0o700)
    assert made.writable == (str(made.run), str(made.logs), str(made.builds))


def test_the_agent_never_follows_a_planted_link_or_fifo(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("operator key")
    (tmp_path / "link.log").symlink_to(secret)
    with pytest.raises(OSError):
        open_tenant_file(str(tmp_path / "link.log"))
    with pytest.raises(OSError):
        open_tenant_file(str(tmp_path / "link.log"), os.O_WRONLY | os.O_APPEND)
    assert secret.read_text() == "operator key"
    os.mkfifo(tmp_path / "fifo.log")
    with pytest.raises(OSError, match="not a regular file"):
        open_tenant_file(str(tmp_path / "fifo.log"))
    (tmp_path / "plain.log").write_text("line\n")
    fd = open_tenant_file(str(tmp_path / "plain.log"))
    with open(fd, "rb") as handle:
        assert handle.read() == b"line\n"


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo"])
def test_a_build_output_with_anything_but_plain_files_is_refused(tmp_path: Path,
                                                                 plant: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text("operator key")
    out = tmp_path / "builds" / "b1"
    (out / "sub").mkdir(parents=True)
    (out / "snapshot.json").write_text("{}")
    planted = out / "sub" / "host.bin"
    if plant == "symlink":
        planted.symlink_to(secret)
    elif plant == "hardlink":
        os.link(secret, planted)
    else:
        os.mkfifo(planted)
    with pytest.raises(ThawError, match="not a plain file"):
        seal_output(out, tmp_path / "sealed")
    assert not out.exists()  # moved out of the tenant's reach either way


@as_root
def test_a_sealed_output_is_the_agents_and_out_of_reach(tmp_path: Path) -> None:
    out = tmp_path / "builds" / "b1"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "host.bin").write_bytes(b"x" * 10)
    for path in (out, out / "sub", out / "sub" / "host.bin"):
        os.chown(path, 200000, 200000)
    sealed = seal_output(out, tmp_path / "sealed")
    assert sealed == tmp_path / "sealed" / "b1" and not out.exists()
    for path in (sealed, sealed / "sub", sealed / "sub" / "host.bin"):
        assert path.stat().st_uid == os.geteuid()
    assert (sealed / "sub" / "host.bin").read_bytes() == b"x" * 10


@as_root
def test_a_socket_in_a_tenant_folder_must_be_answered_by_that_tenant() -> None:
    # Not under pytest's tmp folder: its root-only parent would keep the tenant out.
    folder = Path(tempfile.mkdtemp(prefix="thaw-peer-", dir="/dev/shm"))
    os.chmod(folder, 0o755)
    try:
        check_both_peers(folder / "run")
    finally:
        shutil.rmtree(folder)


def check_both_peers(folder: Path) -> None:
    folder.mkdir()
    os.chown(folder, 200000, 200000)
    planted = folder / "planted.sock"
    # A listener of another user (here root) behind a path in the tenant's folder.
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(planted))
    other.listen()
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(planted))
        with pytest.raises(ConnectionRefusedError, match="answered by uid 0"):
            check_peer(conn, str(planted))
    # The agent's data plane connects through the same check.
    with pytest.raises(NodeConnectionError, match="answered by uid 0"):
        asyncio.run(NodeClient().post_unix(str(planted), "/invoke", b"{}", {}))
    other.close()
    own = folder / "own.sock"
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the tenant's process
        try:
            os.setresgid(200000, 200000, 200000)
            os.setresuid(200000, 200000, 200000)
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(own))
            listener.listen()
            os.write(ready_w, b"1")
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(own))
            check_peer(conn, str(own))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)


def test_two_agents_on_one_machine_never_share_a_uid(tmp_path: Path) -> None:
    claims = tmp_path / "claims"
    first_home, second_home = tmp_path / "a", tmp_path / "b"
    first_home.mkdir()
    second_home.mkdir()
    first = UidClaims(claims, first_home)
    second = UidClaims(claims, second_home)
    assert first.claim(200000) and first.claim(200000)  # its own, again
    assert not second.claim(200000)
    assert second.claim(200001)
    # An agent whose home is gone (a removed platform) leaves its uids to others.
    shutil.rmtree(first_home)
    assert second.claim(200000)
    assert (claims / "200000").read_text() == str(second_home.resolve())


@as_root
def test_an_agent_allocates_around_uids_another_agent_holds(tmp_path: Path) -> None:
    claims = tmp_path / "claims"
    first = TenantAreas(home=tmp_path / "a", run_dir=tmp_path / "ra", uid_range=(200000, 200009),
                        owned=True, claims_dir=claims)
    second = TenantAreas(home=tmp_path / "b", run_dir=tmp_path / "rb",
                         uid_range=(200000, 200009), owned=True, claims_dir=claims)
    (tmp_path / "a").mkdir(exist_ok=True)
    (tmp_path / "b").mkdir(exist_ok=True)
    assert first.area("acme").uid == 200000
    assert second.area("globex").uid == 200001  # 200000 is the other agent's tenant's
    # Restarted, each keeps its own.
    again = TenantAreas(home=tmp_path / "a", run_dir=tmp_path / "ra",
                        uid_range=(200000, 200009), owned=True, claims_dir=claims)
    assert again.uid("acme") == 200000
