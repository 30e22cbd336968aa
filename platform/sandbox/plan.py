"""What a sandboxed instance's root holds, and the command line that builds it.

The plan is computed by the agent from the instance's LaunchSpec and handed to the
launcher (launcher.py, run as root) as one JSON argument: read-only binds (the system's
folders, the instances' Python environment and the thaw runtime package, the function's
bundle), writable binds (the tenant's area), device nodes, the uid and gid, the size of
the private /tmp, rlimits and the network mode."""

from __future__ import annotations

import functools
import glob
import json
import marshal
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from thaw.core.errors import InstanceFailed, ThawError
from thaw.platform.runtime import LaunchSpec
from thaw.platform.sandbox.network import EGRESS_DNS

LAUNCHER = str(Path(__file__).with_name("launcher.py"))
# The system's folders of programs and shared libraries; top-level symlinks among them
# (merged /usr) are recreated as links.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Files of /etc a Python program and its libraries read (the dynamic linker's cache,
# time zone, TLS roots, name resolution for egress), never the host's users or secrets.
ETC_PATHS = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
             "/etc/ssl", "/etc/ca-certificates", "/etc/pki", "/etc/resolv.conf",
             "/etc/hosts", "/etc/nsswitch.conf", "/etc/os-release", "/etc/alternatives",
             "/etc/mime.types")
# GPU device nodes a sandbox on a CUDA node gets (the driver's control, UVM and each GPU).
GPU_DEVICE_GLOBS = ("/dev/nvidia*", "/dev/nvidia-caps/*", "/dev/dri/*")
_PROBE = ("import json, sys\n"
          "paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]\n"
          "try:\n"
          "    import thaw.snapshotter as s\n"
          "    paths += list(s.__path__)\n"
          "except ImportError:\n"
          "    pass\n"
          "print(json.dumps(paths))\n")


@dataclass(frozen=True)
class SandboxSettings:
    """How the process runtime walls instances off (core/config_fields.py: sandbox_*)."""

    uid_range: tuple[int, int] = (200000, 265535)
    tmp_bytes: int = 1 << 30
    """Size of the private /tmp (and of /dev/shm): tmpfs, counted as the instance's memory."""
    max_processes: int = 4096
    """RLIMIT_NPROC: processes and threads of the tenant's uid on this node."""
    max_open_files: int = 65536
    read_only_paths: tuple[str, ...] = ()
    """Host folders the operator adds to every sandbox, read-only (model caches)."""
    gpus: bool = False
    """Bind the GPU device nodes (a cuda node)."""
    mps_pipe_directory: str = ""
    """A running MPS daemon's pipe folder (cuda nodes with MPS): bound writable and the
    host's IPC namespace kept, as MPS clients need both."""


@functools.lru_cache(maxsize=8)
def python_paths(python: str) -> tuple[str, ...]:
    """The folders an interpreter needs to run the thaw runtime: its prefixes (the
    virtualenv and the installation it was made from) and where thaw.snapshotter is
    (an editable install keeps it outside the virtualenv)."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        import thaw.snapshotter as ours

        found = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                 *ours.__path__]
    else:
        try:
            out = subprocess.run([python, "-c", _PROBE], check=True, capture_output=True,
                                 text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise ThawError(f"cannot ask {python} where its environment is: {exc}") from exc
        found = [str(p) for p in json.loads(out)]
    real = {os.path.realpath(python)}
    paths = sorted({os.path.realpath(p) for p in found} | {os.path.dirname(p) for p in real})
    return tuple(p for p in paths if not _under_system(p))


def _under_system(path: str) -> bool:
    return any(path == root or path.startswith(root + "/") for root in SYSTEM_PATHS)


def _library_paths(env: Mapping[str, str]) -> list[str]:
    return [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p and os.path.isabs(p)]


def build_plan(spec: LaunchSpec, settings: SandboxSettings, python: str,
               env: Mapping[str, str]) -> dict[str, object]:
    """The launcher's plan for `spec`; InstanceFailed when the spec names no uid."""
    policy = spec.sandbox
    if policy.uid <= 0 or policy.gid <= 0:
        raise InstanceFailed("a sandboxed launch needs the tenant's uid and gid "
                             "(LaunchSpec.sandbox.uid/gid)")
    # A function's own environment is named by its paths, never probed: running its
    # interpreter outside the sandbox would run the .pth files its packages carry.
    interpreter = (list(spec.python_env.paths) if spec.python_env is not None
                   else list(python_paths(python)))
    read_only = [*SYSTEM_PATHS, *interpreter, *settings.read_only_paths,
                 *_library_paths(env)]
    if spec.bundle:
        read_only.append(spec.bundle)
    devices: list[str] = []
    if settings.gpus:
        for pattern in GPU_DEVICE_GLOBS:
            devices += sorted(glob.glob(pattern))
    egress = policy.network == "egress"
    etc = [p for p in ETC_PATHS if not (egress and p == "/etc/resolv.conf")]
    writable = list(policy.writable)
    if settings.mps_pipe_directory:
        writable.append(settings.mps_pipe_directory)
    return {"uid": policy.uid, "gid": policy.gid, "read_only": _unique(read_only),
            "writable": _unique(writable), "etc": etc,
            "share_ipc": bool(settings.mps_pipe_directory),
            # Names resolve through slirp4netns's forwarder (the node's resolver may
            # listen on its loopback, which the sandbox cannot reach).
            "resolv": f"nameserver {EGRESS_DNS}\n" if egress else "",
            "devices": devices, "tmp_bytes": settings.tmp_bytes,
            "max_processes": settings.max_processes,
            "max_open_files": settings.max_open_files, "network": policy.network,
            "workdir": spec.workdir,
            # Model volumes: (host folder, path inside), bound read-only.
            "volumes": [[host, inside] for host, inside in spec.volumes]}


def _unique(paths: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(paths))


def encode_plan(plan: Mapping[str, object]) -> str:
    """The plan as the launcher's argument: marshal (which the launcher reads without
    importing anything), as hex."""
    return marshal.dumps(dict(plan)).hex()


def launcher_command(plan: Mapping[str, object], program: Sequence[str]) -> list[str]:
    """The command that runs `program` in the sandbox `plan` describes: the launcher
    under the agent's own interpreter, isolated (-I -S: no site, no environment)."""
    return [sys.executable, "-I", "-S", LAUNCHER, encode_plan(plan), *program]

