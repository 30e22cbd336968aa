"""The sandbox launcher: run as root, it walls one process off and execs it.

    python -I -S launcher.py PLAN PROGRAM ARG...

(PLAN: the plan, marshal-encoded then hex; the agent's own, see plan.py.)

In order: new mount, IPC (kept where MPS needs the host's), UTS and network
namespaces (the last holding only its own loopback, or connected to the outside by the
agent when the plan's network is "egress"); a fresh root on a tmpfs holding only the
plan's read-only binds (the system's and the Python environment's folders, the
function's bundle), its writable binds (the tenant's own area: sockets, logs, build
outputs), a minimal /dev, a private /tmp and /dev/shm, and a /proc mounted with
hidepid=invisible (other users' processes do not exist there); pivot_root into it;
rlimits; every capability dropped from the bounding set; the tenant's uid and gid (no
supplementary groups), which clears the rest; no_new_privs; a seccomp filter refusing
the calls in DENIED_SYSCALLS; then execve. The PID namespace stays the host's: the
agent tracks instances by host pid and a slice's CUDA IPC handle resolves only from
the exporting agent's PID namespace; distinct uids and hidepid keep tenants out of
each other's processes.

Standard library only, run with -I -S: it starts in milliseconds and imports nothing
that the tenant could influence. Hand-written with ctypes where Python has no wrapper
(unshare, mount, pivot_root, prctl) because a tool such as bubblewrap cannot switch to
an arbitrary uid without a user namespace, which would map the tenant to root outside;
the seccomp filter is compiled by libseccomp, not by hand."""

from __future__ import annotations

# Only modules that load in microseconds (no re, enum or typing): the launcher's own
# start is part of every fresh start.
import _socket
import ctypes
import errno
import fcntl
import marshal
import os
import resource
import stat
import struct
import sys

TYPE_CHECKING = False  # typing itself takes milliseconds to import
if TYPE_CHECKING:
    from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWCGROUP = 0x02000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
SIGKILL = 9  # the same number on every Linux architecture (no `signal` import: enum)
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

# Refused with EPERM inside every sandbox: reading or writing other processes' memory,
# loading kernels, BPF programs and perf counters, changing mounts, kernel keyrings,
# and making namespaces (a user namespace would give the tenant capabilities over it).
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kexec_load", "kexec_file_load",
    "bpf", "perf_event_open", "mount", "umount2", "pivot_root", "move_mount",
    "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "add_key",
    "request_key", "keyctl", "unshare", "setns", "userfaultfd", "init_module",
    "finit_module", "delete_module", "swapon", "swapoff", "reboot", "acct",
    "quotactl", "chroot", "personality",
)
# clone() with any of these flags is refused too; clone3 (whose flags are behind a
# pointer a filter cannot read) answers ENOSYS, so libc falls back to clone.
DENIED_CLONE_FLAGS = (CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET
                      | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP)
# "none": a network namespace holding only its own loopback; "egress": the same, then
# connected by the agent to the outside (network.py).
NETWORKS = ("none", "egress")
# Device nodes every sandbox gets (bound from the host's).
BASIC_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# Where the new root is assembled (a mount point in the launcher's own namespace).
STAGING = "/run/thaw-sandbox-root"
# Exit code of a launcher that could not build the sandbox (the agent reports its
# message from the instance's log).
EXIT_SETUP_FAILED = 125

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7


def _scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


class SandboxError(Exception):
    """A step of building the sandbox failed."""


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(code)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                       data.encode() if data else None), f"mount {source} on {target}")


def load_libseccomp() -> Any:
    """libseccomp (Debian's libseccomp2), by its soname; SandboxError when absent."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as exc:
        raise SandboxError(f"libseccomp is not installed ({exc}); install libseccomp2") from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def load_seccomp(lib: Any) -> None:
    """Install the filter: DENIED_SYSCALLS and namespace-making clones answer EPERM,
    clone3 ENOSYS, everything else is allowed. Needs no_new_privs first."""
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SandboxError("seccomp_init failed")
    try:
        deny = _scmp_act_errno(errno.EPERM)
        for name in DENIED_SYSCALLS:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                continue  # not a call on this architecture
            _check(-lib.seccomp_rule_add_array(ctx, deny, number, 0, None), f"seccomp {name}")
        clone = lib.seccomp_syscall_resolve_name(b"clone")
        if clone >= 0:
            # clone's flags are its first argument on x86_64 and aarch64 alike.
            for flag in _bits(DENIED_CLONE_FLAGS):
                cmp = (_ArgCmp * 1)(_ArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag))
                _check(-lib.seccomp_rule_add_array(ctx, deny, clone, 1, cmp),
                       "seccomp clone")
        clone3 = lib.seccomp_syscall_resolve_name(b"clone3")
        if clone3 >= 0:
            _check(-lib.seccomp_rule_add_array(ctx, _scmp_act_errno(errno.ENOSYS), clone3,
                                               0, None), "seccomp clone3")
        _check(-lib.seccomp_load(ctx), "seccomp_load")
    finally:
        lib.seccomp_release(ctx)


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask & (1 << i)]


def _make_target(target: str, like: str) -> None:
    """An empty file or folder at `target` for `like` to be bound over."""
    if os.path.isdir(like):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            with open(target, "w"):
                pass


def _bind(root: str, source: str, *, read_only: bool, dest: str | None = None,
          device: bool = False) -> None:
    """Bind `source` at the same path (or `dest`) under `root`. A top-level symlink
    (merged /usr's /bin -> usr/bin) is recreated as the same link."""
    target = root + (dest or source)
    if os.path.islink(source) and os.path.dirname(source.rstrip("/")) == "/":
        if not os.path.lexists(target):
            os.symlink(os.readlink(source), target)
        return
    _make_target(target, source)
    _mount(source, target, None, MS_BIND | MS_REC)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (0 if device else MS_NODEV)
    if read_only:
        flags |= MS_RDONLY
    _mount(None, target, None, flags)


def _loopback_up() -> None:
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))
    finally:
        sock.close()


def _write(path: str, text: str, mode: int = 0o644) -> None:
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, mode)


def build_root(plan: dict[str, Any]) -> str:
    """The new root under STAGING, assembled as the plan says; returns its path."""
    root = STAGING
    os.makedirs(root, exist_ok=True)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m")
    dev = root + "/dev"
    os.makedirs(dev)
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name in BASIC_DEVICES:
        if os.path.exists("/dev/" + name):
            _bind(root, "/dev/" + name, read_only=False, device=True)
    for path in plan.get("devices", []):
        if os.path.exists(path) and stat.S_ISCHR(os.stat(path).st_mode):
            _bind(root, path, read_only=False, device=True)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    tmp_opts = f"mode=1777,size={int(plan['tmp_bytes'])}"
    for private in ("/dev/shm", "/tmp"):
        os.makedirs(root + private, exist_ok=True)
        _mount("tmpfs", root + private, "tmpfs", MS_NOSUID | MS_NODEV, tmp_opts)
    os.makedirs(root + "/proc", exist_ok=True)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
           "hidepid=invisible")
    # After /tmp: a bind under /tmp (a data directory there) lands on the private one.
    for path in plan["read_only"]:
        if os.path.lexists(path):
            _bind(root, path, read_only=True)
    for path in plan["writable"]:
        _bind(root, path, read_only=False)
    for source, inside in plan.get("volumes", []):
        _bind(root, source, read_only=True, dest=inside)
    etc = root + "/etc"
    os.makedirs(etc, exist_ok=True)
    for path in plan.get("etc", []):
        if os.path.isfile(path) or os.path.isdir(path):
            _bind(root, path, read_only=True)
    uid, gid = int(plan["uid"]), int(plan["gid"])
    _write(etc + "/passwd", f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
                            f"thaw:x:{uid}:{gid}:thaw instance:/tmp:/usr/sbin/nologin\n")
    _write(etc + "/group", f"root:x:0:\nthaw:x:{gid}:\n")
    _write(etc + "/hostname", "thaw\n")
    if plan.get("resolv"):
        _write(etc + "/resolv.conf", str(plan["resolv"]))
    return root


def enter_root(root: str) -> None:
    """pivot_root into `root`, the old root detached; the new root is read-only."""
    os.chdir(root)
    machine = os.uname().machine
    number = SYS_PIVOT_ROOT.get(machine)
    if number is None:
        raise SandboxError(f"no pivot_root number known for {machine}")
    _check(_libc.syscall(number, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def drop_privileges(uid: int, gid: int, parent: int) -> None:
    """Every capability out of the bounding set, the tenant's ids (no groups), the
    parent-death signal again (a credential change clears it), no_new_privs."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise SandboxError("the uid did not change")
    _libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        raise SandboxError("the agent exited while the sandbox was being built")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def _await_egress(sync: int) -> None:
    """Tell the agent the network namespace exists; wait until it has connected it
    (network.py, slirp4netns) and says go."""
    os.write(sync, b"n")
    if os.read(sync, 1) != b"g":
        raise SandboxError("the agent did not connect the sandbox's network")
    os.close(sync)


def enter(plan: dict[str, Any]) -> None:
    """Everything but the execve."""
    if os.geteuid() != 0:
        raise SandboxError("the sandbox launcher must run as root (set sandbox = off "
                           "to run instances unsandboxed, for development only)")
    uid, gid = int(plan["uid"]), int(plan["gid"])
    if uid <= 0 or gid <= 0:
        raise SandboxError(f"refusing to run a sandbox as uid {uid} gid {gid}")
    parent = os.getppid()
    seccomp = load_libseccomp()
    network = plan.get("network", "none")
    if network not in NETWORKS:
        raise SandboxError(f"unknown network {network!r}")
    # An MPS client talks to its daemon through the host's IPC namespace.
    ipc = 0 if plan.get("share_ipc") else CLONE_NEWIPC
    _check(_libc.unshare(CLONE_NEWNS | ipc | CLONE_NEWUTS | CLONE_NEWNET), "unshare")
    if network == "egress":
        _await_egress(int(plan["sync_fd"]))
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = build_root(plan)
    _loopback_up()
    _check(_libc.sethostname(b"thaw", 4), "sethostname")
    enter_root(root)
    for name, value in (("RLIMIT_NPROC", plan["max_processes"]),
                        ("RLIMIT_NOFILE", plan["max_open_files"])):
        which = getattr(resource, name)
        # Never above the hard limit the agent itself has (raising it needs
        # CAP_SYS_RESOURCE, which a container may not grant the agent).
        hard = resource.getrlimit(which)[1]
        limit = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
        resource.setrlimit(which, (limit, limit))
    drop_privileges(uid, gid, parent)
    load_seccomp(seccomp)
    os.chdir(plan.get("workdir") or "/tmp")


def decode_plan(text: str) -> dict[str, Any]:
    """The plan from its argument (plan.py: encode_plan). marshal, not json: json
    imports re, which would double the launcher's start; the plan is the agent's own."""
    plan = marshal.loads(bytes.fromhex(text))
    if not isinstance(plan, dict):
        raise ValueError("the sandbox plan is not a mapping")
    return plan


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        sys.stderr.write("usage: launcher.py PLAN PROGRAM [ARG...]\n")
        return 2
    try:
        enter(decode_plan(argv[1]))
        os.execv(argv[2], argv[2:])
    except (SandboxError, OSError, ValueError, KeyError, EOFError, TypeError) as exc:
        sys.stderr.write(f"thaw sandbox: {exc}\n")
        sys.stderr.flush()
    return EXIT_SETUP_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv))
