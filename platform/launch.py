"""What the agent launches an instance with: the LaunchSpec of each kind of start,
built from the function's spec, and the node's environment that a snapshot is
checked against."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import resource
import sys
from dataclasses import replace
from pathlib import Path

from thaw.core.errors import InstanceFailed
from thaw.platform.devices import DeviceBackend
from thaw.platform.runtime import (
    BuildRequest,
    LaunchMode,
    LaunchSpec,
    Limits,
    RuntimeCapabilities,
    SandboxPolicy,
    SliceGrant,
    SnapshotFiles,
    SpawnRequest,
)
from thaw.platform.sandbox.areas import TenantArea
from thaw.proto import agent_pb2, manifest_pb2
from thaw.snapshotter.runtime.forksafe import NVML_CHECK_ENV
from thaw.snapshotter.runtime.gpuinfo import nvml_compute_capability
from thaw.snapshotter.runtime.secretenv import secret_names_env
from thaw.snapshotter.runtime.server import MEMORY_LIMIT_ENV

# Why a node without containers cannot run a function that names an image (thaw.toml
# [runtime] image): the process runtime has no image to run it in.
IMAGE_NEEDS_DOCKER = ("this node runs the process runtime; image functions need "
                      "THAW_RUNTIME=docker")
# Fingerprint fields an image function's image decides (its Python and packages). The
# spec pins the image by id and the snapshot was built in that very image, so these
# match by construction; the node's own values (its virtualenv's) say nothing of it.
IMAGE_ENVIRONMENT_FIELDS = ("python", "torch", "numpy")


def local_fingerprint(devices: DeviceBackend) -> dict[str, str]:
    """This node's environment as snapshot fingerprints record it: Python, torch and
    numpy versions, and the device backend's type, GPU model, driver and compute
    capability."""
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return ""

    model, driver = devices.gpu_info()
    return {"python": ".".join(map(str, sys.version_info[:3])), "torch": version("torch"),
            "numpy": version("numpy"), "device_type": devices.kind, "gpu_model": model,
            "driver": driver,
            # NVML's answer for the GPU the model names; no GPU, no architecture.
            "compute_capability": nvml_compute_capability() if model else ""}


def code_digest(bundle: Path) -> str:
    """SHA-256 over a bundle's files, thaw.toml excluded (names and settings differ
    between copies of one model; the code they import does not)."""
    h = hashlib.sha256()
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        rel = path.relative_to(bundle).as_posix()
        if rel == "thaw.toml" or "__pycache__" in rel:
            continue
        h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def instance_env(spec: agent_pb2.FunctionSpec, per_function: bool = True) -> dict[str, str]:
    """What the in-instance runtime reads from its environment (templates pass it on
    to the instances they fork, so a shared template gets no per-function names)."""
    env = {"THAW_FUNCTION": f"{spec.tenant}/{spec.name}",
           "THAW_FUNCTION_VERSION": spec.version} if per_function else {}
    if per_function:
        env.update(memory_env(spec))
    if spec.max_batch_size > 1:
        env["THAW_MAX_BATCH_SIZE"] = str(spec.max_batch_size)
        env["THAW_MAX_BATCH_WAIT_MS"] = f"{spec.max_batch_wait_ms:g}"
    return env


def memory_env(spec: agent_pb2.FunctionSpec) -> dict[str, str]:
    """The function's memory budget for the instance to cap itself with once ready
    (snapshotter/runtime/server.py: cap_own_memory)."""
    if spec.memory_limit_bytes <= 0:
        return {}
    return {MEMORY_LIMIT_ENV: str(spec.memory_limit_bytes)}


def image_fingerprint(local: dict[str, str], spec: agent_pb2.FunctionSpec,
                      manifest: manifest_pb2.SnapshotManifest) -> dict[str, str]:
    """What a restore of `spec` is checked against: this node's fingerprint, except
    for an image function, whose environment fields are its image's (see
    IMAGE_ENVIRONMENT_FIELDS); the device fields are the node's either way."""
    if not spec.image:
        return local
    return {**local, **{key: getattr(manifest.fingerprint, key)
                        for key in IMAGE_ENVIRONMENT_FIELDS}}


def limit_memory(pid: int, extra_bytes: int) -> None:
    """Cap what the instance may allocate from now on: RLIMIT_DATA counts private
    writable memory (heap, anonymous and copy-on-write mappings), so the cap is what
    it holds after its restore plus the function's `resources.memory`. Past it,
    allocations fail with MemoryError and the runtime answers 5xx and exits (it is
    then replaced). Portable: needs no cgroup."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            data_kb = next(int(line.split()[1]) for line in handle
                           if line.startswith("VmData:"))
    except (OSError, StopIteration, ValueError):
        return
    limit = data_kb * 1024 + extra_bytes
    with contextlib.suppress(OSError):
        resource.prlimit(pid, resource.RLIMIT_DATA, (limit, limit))


def check_image(spec: agent_pb2.FunctionSpec, capabilities: RuntimeCapabilities) -> None:
    """An image function is refused on a node whose runtime runs no images."""
    if spec.image and not capabilities.runs_images:
        raise InstanceFailed(f"runtime: {IMAGE_NEEDS_DOCKER}")


def function_env(spec: agent_pb2.FunctionSpec) -> dict[str, str]:
    """The function's own variables (thaw.toml [env]); never a template's."""
    return dict(spec.env)


def function_secrets(spec: agent_pb2.FunctionSpec) -> dict[str, str]:
    """The function's secrets, as the scheduler filled them for this start or build;
    only ever in an instance's environment (never a template's, a command line, a
    sandbox plan or a log)."""
    return dict(spec.secrets)


def spawn_request_for(spec: agent_pb2.FunctionSpec, *, instance_id: str, socket: str,
                      log: str, fds: dict[str, int]) -> SpawnRequest:
    """What a template is asked to fork an instance of `spec` with: its memory budget
    and [env], and its secrets, all set in the child before on_restore runs."""
    return SpawnRequest(instance_id=instance_id, socket=socket, log=log, fds=fds,
                        env={**memory_env(spec), **function_env(spec)},
                        secrets=function_secrets(spec))


def template_build_request(spec: agent_pb2.FunctionSpec, *, out: str, log: str
                           ) -> BuildRequest:
    """What a template is asked to build `spec`'s snapshot with: its [env] and its
    secrets for setup(), the secrets gone before the capture."""
    return BuildRequest(out, log, spec.version, env=function_env(spec),
                        secrets=function_secrets(spec))


def _base(spec: agent_pb2.FunctionSpec, mode: LaunchMode, bundle: Path, log_path: str,
          instance_id: str, per_function: bool = True) -> LaunchSpec:
    env = instance_env(spec, per_function)
    if per_function:
        env.update(function_env(spec))
    return LaunchSpec(
        mode=mode, bundle=str(bundle), handler=spec.handler, log_path=log_path,
        instance_id=instance_id,
        function=f"{spec.tenant}/{spec.name}" if per_function else "",
        version=spec.version, env=env,
        secrets=function_secrets(spec) if per_function else {},
        limits=Limits(memory_bytes=spec.memory_limit_bytes), image=spec.image,
        cwd=str(bundle),
        sandbox=SandboxPolicy(network="egress" if spec.network == "egress" else "none"))


def fresh_spec(spec: agent_pb2.FunctionSpec, bundle: Path, *, instance_id: str,
               socket: str, log_path: str, grant: SliceGrant | None) -> LaunchSpec:
    """An instance that imports, runs setup() and serves on `socket`."""
    return replace(_base(spec, LaunchMode.FRESH, bundle, log_path, instance_id),
                   socket=socket, slice=grant)


def build_spec(spec: agent_pb2.FunctionSpec, bundle: Path, *, out: Path,
               log_path: str) -> LaunchSpec:
    """A build that runs setup() and writes a snapshot to `out` (the secrets named so
    that the runtime removes them before the capture)."""
    base = _base(spec, LaunchMode.BUILD, bundle, log_path, out.name)
    return replace(base, out=str(out),
                   env={**base.env, **secret_names_env(function_secrets(spec))})


def template_spec(spec: agent_pb2.FunctionSpec, bundle: Path, *, key: str,
                  snapshot_json: str, control: str, log_path: str) -> LaunchSpec:
    """A template that imports a snapshot's modules and forks restores on request;
    shared by every function of its code, so nothing per function. It runs with
    torch's NVML-based CUDA check, so a module-level torch.cuda.is_available() does
    not initialise CUDA (which would leave the template unable to fork)."""
    base = _base(spec, LaunchMode.TEMPLATE, bundle, log_path, f"template-{key[:16]}",
                 per_function=False)
    return replace(base, env={**base.env, NVML_CHECK_ENV: "1"},
                   snapshot=SnapshotFiles(snapshot_json), control=control)


def restore_spec(spec: agent_pb2.FunctionSpec, bundle: Path, *, instance_id: str,
                 control: str, log_path: str, grant: SliceGrant | None) -> LaunchSpec:
    """An instance that imports the function in a fresh interpreter and then takes one
    spawn request on `control`, restoring into itself without a fork: for snapshots
    whose template may not fork (its imports initialised CUDA). It gets the snapshot and
    its slice as descriptors with that request, exactly as a forked instance does."""
    return replace(_base(spec, LaunchMode.RESTORE, bundle, log_path, instance_id),
                   control=control, slice=grant)


def in_area(launch: LaunchSpec, area: TenantArea,
            capabilities: RuntimeCapabilities) -> LaunchSpec:
    """`launch` run as its tenant: under the tenant's uid and with only the tenant's
    area writable, where the runtime runs instances under tenant uids."""
    if not capabilities.uid_per_tenant:
        return launch
    return replace(launch, sandbox=replace(launch.sandbox, uid=area.uid, gid=area.gid,
                                           writable=area.writable))
