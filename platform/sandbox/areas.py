"""Tenant areas: where a tenant's instances may write on this node, owned by the uid
the agent gives that tenant.

Each tenant gets a uid (and a gid of the same number) from the configured range, kept
in `<home>/sandbox/uids.json` so a tenant keeps its uid across agent restarts, and three
folders owned by it, mode 0700: its sockets (under the run folder), its logs and its
build outputs. A sandbox binds exactly these into its root, writable; nothing else of
the node is writable there, and no other tenant's area is visible.

The agent reads and connects to what tenants write, so it never follows a tenant's
links: logs are opened with O_NOFOLLOW (`open_tenant_file`), a build's output is moved
out of the tenant's reach and checked before it is read (`seal_output`), and a socket
in a tenant's area must be answered by that tenant's uid (core.unixpeer)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from thaw.core.errors import InvalidArgument, ThawError

# Instance logs, sockets and build outputs of one tenant: the area's sub-folders.
AREA_FOLDERS = ("run", "logs", "builds")


@dataclass(frozen=True)
class TenantArea:
    """One tenant's uid and writable folders on this node."""

    tenant: str
    uid: int
    gid: int
    run: Path
    """Its instances' and templates' sockets (short: under the node's run folder)."""
    logs: Path
    builds: Path

    @property
    def writable(self) -> tuple[str, ...]:
        return (str(self.run), str(self.logs), str(self.builds))


def parse_uid_range(text: str) -> tuple[int, int]:
    """"FIRST-LAST" as two uids; InvalidArgument unless 0 < FIRST <= LAST < 2**31."""
    first, sep, last = text.partition("-")
    try:
        low, high = int(first), int(last)
    except ValueError:
        low = high = -1
    if not sep or not 0 < low <= high < 2**31:
        raise InvalidArgument(f"sandbox_uids must be FIRST-LAST (uids above 0), got {text!r}",
                              field="sandbox_uids")
    return low, high


# Host-wide record of which agent holds which sandbox uid: one file per uid naming its
# holder (the agent's home). A uid is one tenant's on the whole machine, even where
# several agents (or platforms) run on it with overlapping ranges. In /run: gone at boot,
# with every process that could still hold a uid.
CLAIMS_DIR = Path("/run/thaw/sandbox-uids")


class UidClaims:
    """Claims of sandbox uids on this machine (CLAIMS_DIR). A claim whose holder's home
    no longer exists (an agent of a platform that was removed) is taken over."""

    def __init__(self, folder: Path, holder: Path) -> None:
        self.folder = folder
        self.holder = str(holder.resolve())

    def claim(self, uid: int) -> bool:
        """Claim `uid` for this holder: True if it is (now) ours."""
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        path = self.folder / str(uid)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            try:
                holder = path.read_text()
            except OSError:
                return False
            if holder == self.holder:
                return True
            if holder and Path(holder).exists():
                return False
            # Its holder is gone: take the uid over.
            temp = path.with_name(f".{uid}.{uuid.uuid4().hex[:6]}")
            temp.write_text(self.holder)
            os.replace(temp, path)
            return path.read_text() == self.holder  # another agent may have won

        with os.fdopen(fd, "w") as handle:
            handle.write(self.holder)
        return True


class TenantAreas:
    """Gives each tenant a uid from `uid_range` and its folders. With `owned` false (an
    unsandboxed runtime) the folders stay the agent's own and uids are only names; with
    `owned`, every uid is also claimed machine-wide (UidClaims), so no two agents on one
    machine give a uid to two tenants."""

    def __init__(self, *, home: Path, run_dir: Path, uid_range: tuple[int, int],
                 owned: bool, claims_dir: Path = CLAIMS_DIR) -> None:
        self.home = home
        self.run_dir = run_dir
        self.uid_range = uid_range
        self.owned = owned
        self._file = home / "sandbox" / "uids.json"
        self._lock = threading.Lock()
        self._claims = UidClaims(claims_dir, home) if owned else None
        self._uids: dict[str, int] = self._load()
        self._made: dict[str, TenantArea] = {}

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self._file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ThawError(f"cannot read the tenant uid table {self._file}: {exc}") from exc
        low, high = self.uid_range
        kept = {str(k): int(v) for k, v in data.items()
                if isinstance(v, int) and low <= v <= high}
        if self._claims is not None:
            # A uid another agent took meanwhile is given up: its tenant gets a new one
            # (and its area is made that uid's) on first use.
            kept = {k: v for k, v in kept.items() if self._claims.claim(v)}
        return kept

    def uid(self, tenant: str) -> int:
        """The tenant's uid, allocated (and written down) on first use."""
        with self._lock:
            known = self._uids.get(tenant)
            if known is not None:
                return known
            low, high = self.uid_range
            taken = set(self._uids.values())
            free = next((u for u in range(low, high + 1) if u not in taken
                         and (self._claims is None or self._claims.claim(u))), None)
            if free is None:
                raise ThawError(f"no free sandbox uid left in {low}-{high} "
                                f"({len(taken)} tenants on this node)")
            self._uids[tenant] = free
            self._save()
            return free

    def _save(self) -> None:
        self._file.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self._file.parent, 0o700)
        temp = self._file.with_suffix(f".{uuid.uuid4().hex[:6]}")
        temp.write_text(json.dumps(self._uids, sort_keys=True))
        os.replace(temp, self._file)

    def area(self, tenant: str) -> TenantArea:
        """The tenant's area, its folders made (and owned by its uid) on first use."""
        made = self._made.get(tenant)
        if made is not None:
            return made
        uid = self.uid(tenant)
        area = TenantArea(tenant, uid, uid, run=self.run_dir / str(uid),
                          logs=self.home / "logs" / str(uid),
                          builds=self.home / "builds" / str(uid))
        for folder in (area.run, area.logs, area.builds):
            folder.mkdir(parents=True, exist_ok=True)
            if self.owned:
                os.chown(folder, uid, uid)
            os.chmod(folder, 0o700)
        self._made[tenant] = area
        return area

    def uid_of(self, tenant: str) -> int | None:
        """The tenant's uid if it has one, without allocating."""
        return self._uids.get(tenant)


def open_tenant_file(path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """Open a file a tenant can write to without following a link it planted there,
    and refuse anything but a regular file (a FIFO would block the reader forever)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seal_output(out: Path, sealed_dir: Path) -> Path:
    """Move a build's output folder out of its tenant's reach (into `sealed_dir`, the
    agent's own), make every entry the agent's and read-only, and refuse anything but
    plain folders and files with one link: the agent then reads only what the build
    wrote, never a file a link would point it to. Returns the new path."""
    sealed_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(sealed_dir, 0o700)
    target = sealed_dir / out.name
    os.rename(out, target)
    me, group = os.geteuid(), os.getegid()
    # Each folder becomes the agent's before it is listed (os.walk lists a folder after
    # its parent's entries are handled): nothing can be added to it after the listing.
    os.lchown(target, me, group)
    os.chmod(target, 0o700)
    for current, dirs, files in os.walk(target, followlinks=False):
        for name in (*dirs, *files):
            path = os.path.join(current, name)
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode):
                pass
            elif not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise ThawError(f"the build wrote {os.path.relpath(path, target)!r}, "
                                f"which is not a plain file")
            os.lchown(path, me, group)
            os.chmod(path, 0o700 if stat.S_ISDIR(info.st_mode) else 0o600)
    return target


def remove_quietly(path: Path) -> None:
    import shutil

    with contextlib.suppress(OSError):
        shutil.rmtree(path)


def make_readable(folder: Path) -> None:
    """Give others read (and directory search) permission: instances run under uids
    that are not the agent's, and a bundle may have been packed with owner-only modes."""
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files, ""]:
            path = os.path.join(root, name) if name else root
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue
            if stat.S_ISLNK(mode):
                continue
            want = mode | stat.S_IROTH | stat.S_IRGRP
            if stat.S_ISDIR(mode):
                want |= stat.S_IXOTH | stat.S_IXGRP
            if want != mode:
                with contextlib.suppress(OSError):
                    os.chmod(path, stat.S_IMODE(want))
