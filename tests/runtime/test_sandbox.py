"""The sandbox launcher, for real (as root): a program run through it has the tenant's
uid and nothing else, sees only its own processes, its binds and a private /tmp, has
no capabilities, no_new_privs and the seccomp filter, no route to the host's network,
and rlimits. Each property is checked from inside by a probe."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thaw.platform.runtime import LaunchMode, LaunchSpec, SandboxPolicy
from thaw.platform.sandbox.launcher import DENIED_SYSCALLS, EXIT_SETUP_FAILED
from thaw.platform.sandbox.plan import SandboxSettings, build_plan, launcher_command

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0, reason="kernel sandboxes need root")]

UID = 200901
OTHER_UID = 200902

PROBE = textwrap.dedent('''
    import ctypes, errno, json, os, resource, socket, sys
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}
    def call(name, *args):
        ctypes.set_errno(0)
        result = getattr(libc, name)(*args)
        return ctypes.get_errno() if result == -1 else 0
    out["ids"] = [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()]
    out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    out["self"] = os.getpid()
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    out["status"] = {k: status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd",
                                                     "CapAmb", "NoNewPrivs", "Seccomp")}
    out["root"] = sorted(os.listdir("/"))
    out["hostname"] = socket.gethostname()
    target = int(sys.argv[1])
    out["ptrace"] = call("ptrace", 16, target, 0, 0)          # PTRACE_ATTACH
    iov = (ctypes.c_char * 8)()
    out["unshare"] = call("unshare", 0x10000000)               # CLONE_NEWUSER
    out["mount"] = call("mount", b"none", b"/tmp", b"tmpfs", 0, None)
    out["keyctl"] = call("syscall", 250, 0, 0, 0, 0)            # keyctl on x86_64
    out["bpf"] = call("syscall", 321, 0, 0, 0)
    out["perf_event_open"] = call("syscall", 298, 0, 0, -1, -1, 0)
    out["process_vm_readv"] = call("syscall", 310, target, 0, 0, 0, 0, 0)
    out["kill"] = call("kill", target, 0)
    try:
        open("/usr/thaw-probe", "w")
        out["write_usr"] = 0
    except OSError as exc:
        out["write_usr"] = exc.errno
    try:
        open(sys.argv[2] + "/secret").read()
        out["read_outside"] = 0
    except OSError as exc:
        out["read_outside"] = exc.errno
    with open(sys.argv[3] + "/written", "w") as handle:
        handle.write("ok")
    out["tmp"] = sorted(os.listdir("/tmp"))
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[4])), timeout=2).close()
        out["connect"] = 0
    except OSError as exc:
        out["connect"] = exc.errno or -1
    out["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)
    out["nproc"] = resource.getrlimit(resource.RLIMIT_NPROC)
    out["environ"] = sorted(os.environ)
    print(json.dumps(out))
''')


@pytest.fixture()
def places(tmp_path: Path) -> Iterator[dict[str, Path]]:
    outside = tmp_path / "data"
    outside.mkdir()
    (outside / "secret").write_text("operator key")
    area = tmp_path / "area"
    area.mkdir()
    os.chown(area, UID, UID)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "probe.py").write_text(PROBE)
    os.chmod(tmp_path, 0o755)
    yield {"outside": outside, "area": area, "bundle": bundle}


def sandboxed(spec: LaunchSpec, program: list[str], settings: SandboxSettings,
              **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "THAW_VISIBLE": "1"}
    plan = build_plan(spec, settings, sys.executable, env)
    return subprocess.run(launcher_command(plan, program), capture_output=True, text=True,
                          env=env, timeout=60, **kwargs)


def spec_for(places: dict[str, Path], uid: int = UID) -> LaunchSpec:
    return LaunchSpec(mode=LaunchMode.FRESH, bundle=str(places["bundle"]), handler="",
                      log_path="", instance_id="probe",
                      sandbox=SandboxPolicy(uid=uid, gid=uid,
                                            writable=(str(places["area"]),)))


def test_a_sandboxed_program_has_only_what_its_plan_gives(places: dict[str, Path]) -> None:
    neighbour = subprocess.Popen(["sleep", "60"])
    marker = Path("/tmp") / f"thaw-sandbox-marker-{os.getpid()}"
    marker.write_text("host")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        settings = SandboxSettings(max_processes=512, max_open_files=1024)
        result = sandboxed(spec_for(places), [
            sys.executable, str(places["bundle"] / "probe.py"), str(neighbour.pid),
            str(places["outside"]), str(places["area"]), str(listener.getsockname()[1])],
            settings)
    finally:
        neighbour.kill()
        listener.close()
        marker.unlink()
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    plan: dict[str, Any] = build_plan(spec_for(places), settings, sys.executable, {})
    assert seen["ids"] == [UID, UID, UID, UID, []]
    # hidepid=invisible: the probe sees itself and no process of another user.
    assert seen["pids"] == [seen["self"]]
    assert seen["status"]["CapEff"] == seen["status"]["CapPrm"] == "0" * 16
    assert seen["status"]["CapBnd"] == seen["status"]["CapAmb"] == "0" * 16
    assert seen["status"]["NoNewPrivs"] == "1"
    assert seen["status"]["Seccomp"] == "2"
    assert seen["hostname"] == "thaw"
    for call in ("ptrace", "unshare", "mount", "keyctl", "bpf", "perf_event_open",
                 "process_vm_readv", "kill"):
        assert seen[call] == 1, (call, seen[call])  # EPERM
    assert seen["write_usr"] == 30  # EROFS
    assert seen["read_outside"] == 2  # ENOENT: the data folder is not in its root
    assert (places["area"] / "written").read_text() == "ok"
    # Private: only the folders leading to its binds, none of the host's /tmp.
    assert set(seen["tmp"]) <= {Path(p).parts[2] for p in plan["read_only"]
                                + plan["writable"] if p.startswith("/tmp/")}
    assert marker.name not in seen["tmp"]
    assert seen["connect"] in (101, 111)  # its own network namespace: nothing listens
    assert seen["nofile"] == [1024, 1024]
    assert seen["nproc"] == [512, 512]
    assert "THAW_VISIBLE" in seen["environ"]
    assert set(seen["environ"]) <= {"LC_CTYPE", "PATH", "THAW_VISIBLE"}
    bound = {Path(p).parts[1] for p in [*plan["read_only"], *plan["writable"]]}
    assert set(seen["root"]) <= bound | {"dev", "etc", "proc", "tmp"}


def test_the_filter_names_every_call_the_sandbox_refuses() -> None:
    for name in ("ptrace", "process_vm_readv", "process_vm_writev", "kexec_load", "bpf",
                 "perf_event_open", "mount", "keyctl", "add_key", "request_key"):
        assert name in DENIED_SYSCALLS


def test_two_tenants_cannot_signal_or_read_each_other(places: dict[str, Path],
                                                      tmp_path: Path) -> None:
    other_area = tmp_path / "other"
    other_area.mkdir()
    os.chown(other_area, OTHER_UID, OTHER_UID)
    victim = subprocess.Popen(launcher_command(
        build_plan(LaunchSpec(mode=LaunchMode.FRESH, bundle="", handler="", log_path="",
                              instance_id="victim",
                              sandbox=SandboxPolicy(uid=OTHER_UID, gid=OTHER_UID,
                                                    writable=(str(other_area),))),
                   SandboxSettings(), sys.executable, {}),
        ["/bin/sleep", "60"]), env={"SECRET_OF_OTHER": "x"})
    try:
        code = textwrap.dedent(f'''
            import os, errno
            try:
                os.kill({victim.pid}, 9)
                print("killed")
            except OSError as exc:
                print(exc.errno)
            for path in ("/proc/{victim.pid}/environ", "/proc/{victim.pid}/mem"):
                try:
                    open(path, "rb").read(1)
                    print("read")
                except OSError as exc:
                    print(exc.errno)
        ''')
        result = sandboxed(spec_for(places), [sys.executable, "-c", code], SandboxSettings())
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["1", "2", "2"]  # EPERM, then no such file
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_the_launcher_refuses_to_run_a_tenant_as_root(places: dict[str, Path]) -> None:
    as_root = sandboxed(spec_for(places, uid=UID), ["/bin/true"], SandboxSettings())
    assert as_root.returncode == 0, as_root.stderr
    plan = build_plan(spec_for(places), SandboxSettings(), sys.executable, {})
    zero = subprocess.run(launcher_command({**plan, "uid": 0, "gid": 0}, ["/bin/true"]),
                          capture_output=True, text=True, timeout=60)
    assert zero.returncode == EXIT_SETUP_FAILED
    assert "refusing to run a sandbox as uid 0" in zero.stderr


def test_the_launcher_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from thaw.platform.sandbox import launcher

    monkeypatch.setattr(launcher.os, "geteuid", lambda: 65534)
    with pytest.raises(launcher.SandboxError, match="must run as root"):
        launcher.enter({"uid": UID, "gid": UID})


def test_a_plan_without_a_tenant_uid_is_refused(places: dict[str, Path]) -> None:
    from thaw.core.errors import InstanceFailed

    spec = LaunchSpec(mode=LaunchMode.FRESH, bundle="", handler="", log_path="",
                      instance_id="x")
    with pytest.raises(InstanceFailed, match="needs the tenant's uid"):
        build_plan(spec, SandboxSettings(), sys.executable, {})


def test_a_cuda_node_with_mps_binds_the_pipe_folder_and_keeps_the_ipc_namespace(
        places: dict[str, Path]) -> None:
    plain = build_plan(spec_for(places), SandboxSettings(), sys.executable, {})
    assert plain["share_ipc"] is False and plain["devices"] == []
    mps = build_plan(spec_for(places), SandboxSettings(gpus=True,
                                                        mps_pipe_directory="/tmp/nvidia-mps"),
                     sys.executable, {"LD_LIBRARY_PATH": "/usr/local/cuda/lib64"})
    assert mps["share_ipc"] is True
    assert mps["writable"] == [str(places["area"]), "/tmp/nvidia-mps"]
    assert "/usr/local/cuda/lib64" in mps["read_only"]
    assert mps["network"] == "none" and mps["resolv"] == ""
