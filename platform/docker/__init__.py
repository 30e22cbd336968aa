"""The docker runtime: instances run in hardened containers on the local engine
(DESIGN.md §7), behind the `Runtime` protocol (platform/runtime.py), so the agent
runs unchanged. Modules: spec (LaunchSpec -> the container's create arguments, pure),
containers (a container's host-side folders and links), lifecycle (DockerRuntime:
start, status events, exits, removal), spawn (restores inside a template's
container), pids (host pids and exit codes); the base image is built by
platform/images.py.

What runs where
    Every `launch` (modes fresh, build, template, restore) is a container of its own
    running the in-instance runtime, `python3 -m thaw.snapshotter.runtime`, from the
    repo's snapshotter/ folder mounted read-only at /opt/thaw/thaw/snapshotter (an empty
    `thaw` namespace, PYTHONPATH=/opt/thaw). A restore (`spawn`) is a process forked by
    its template *inside the template's container*: forking a warm zygote takes a few
    ms, while a new container costs about 0.3 s before Python even starts. The
    trade-off: the instances restored from one template share its container, so they
    share its cgroup (the memory and pids limits cover the template and all its
    instances; each instance still gets the agent's own RLIMIT_DATA, which works on
    host pids) and see each other's processes. The agent keys templates by code, not
    by function; with this runtime it also keys them by tenant
    (RuntimeCapabilities.template_per_tenant), so one container never holds two
    tenants' instances and the boundary between tenants, and between any of them
    and the host, stays a container. Fresh starts and builds get a container each.

Paths need no translation
    The LaunchSpec names host paths, each mount with its kind (runtime.Mount); each
    appears at the same path inside the container. The bundle folder is mounted read-
    only and the build output folder writable. Sockets and logs are not shared folders
    (a tenant could reach or replace another tenant's socket, or read its log): each
    container gets private host folders mounted at the socket folder's and the log
    folder's paths; on the host the agent's socket path is a symlink into the private
    folder and its log file a hard link to the one the container writes, so the agent
    connects and reads where it always does.

Snapshots go in as descriptors
    No snapshot file is mounted. A template's snapshot.json (its module list) is
    copied into its private status folder and opened by its shell on fd 4
    (`--snapshot-fd`); a restore's snapshot memfds and host slice travel as SCM_RIGHTS
    descriptors with the spawn request over the bind-mounted control socket (unix
    sockets pass descriptors across the container boundary), so a shared template
    serves snapshots of any of its functions without a file of theirs in sight.

Status events
    No descriptor can be inherited into a container: the runtime writes its JSON lines on
    fd 3, which `sh -c 'exec ... 3>/run/thaw/status/events'` opens on a FIFO in a
    private folder mounted read-only. The agent side holds a spare write end until the
    container's main process ends, so the stream ends exactly when a process's pipe
    would.

Host pids and exit codes
    `.pid` is the host pid of the container's main process (`State.Pid`), so the
    agent's pidfd watch, prlimit and signals work as for processes (runc makes that
    process a session leader, so killpg works too). A template reports a forked
    instance by its pid in the container's namespace; `spawn` finds the host pid by the
    NSpid line of /proc/<pid>/status of the template's children, and `child_exited`
    events on the template's stream are rewritten to it. The exit code of a
    container's main process comes from the engine's wait; a signal death (128+N
    there) reads -N, as subprocess reports it.

Hardening (every container)
    cap_drop ALL, no-new-privileges, read-only root with a tmpfs /tmp, pids and memory
    limits, network "none" (instances talk to the agent only over their mounted unix
    sockets), labels thaw.instance,
    thaw.node, thaw.agent, thaw.mode, thaw.agent_pid. A container is removed when its
    main process ends; `close()` removes any left; an agent starting on a node removes
    the containers of a dead agent of the same node.

Users
    Each container runs as a uid of its own (no two live containers share one, so none
    can signal or trace another even where it sees its pids) when the agent can still
    cap an instance's memory then: its RLIMIT_DATA (the agent's limit_memory, a prlimit) on a
    process of another uid needs CAP_SYS_RESOURCE. Where the agent lacks it (some
    sandboxed hosts, this project's CI among them) containers of the host backend run
    as the agent's uid instead, with no capabilities: in a private PID namespace there
    is nothing of another container's or the host's to signal or trace, and the
    per-instance memory limit keeps working. cuda containers (which share the host PID
    namespace, below) always get their own uid; there the memory limit is the
    container's cgroup only when the agent cannot prlimit.

Environments
    The base image (images.py) has python3 only. `env_site_packages` mounts host
    package folders (e.g. the agent's virtualenv) read-only at the same paths, after
    /opt/thaw on PYTHONPATH (their .pth files are not run); their C extensions load
    when the image's Python has the same minor version. A function with its own
    environment (LaunchSpec.python_env, built on the host by `run_tool`: the process
    runtime's sandboxed uv) gets that environment's site-packages there instead of
    `env_site_packages`, and a start refuses an environment made for another minor
    version than the image's (docs/environments.md, "Runtimes"). The image's Python,
    not the agent's, is what a snapshot's fingerprint names: `fingerprint()` says so
    to the agent, for environments too (capabilities.environments_on_own_python).

Image functions
    A function whose thaw.toml names `[runtime] image` (pinned: `repo:tag@sha256:<id>`,
    what `thaw deploy IMAGE` writes) runs every container of it (build, template,
    fresh) in that image, by id, instead of the base image: the tenant's packages come
    from the image, so the host folders of `env_site_packages` are neither mounted nor
    put on PYTHONPATH (they would shadow the image's site-packages). Its code still
    comes from the uploaded bundle (the copy the CLI took out of the image), mounted
    as for any function, so the agent's bundle, code digest and template bookkeeping
    stay one path. Everything else is the same: the runtime mounted at /opt/thaw,
    sockets and logs mounted, network "none", the same hardening. Nothing is pulled:
    the image must be on this node's engine (`docker load` it there), else the start
    fails saying so. The image needs `sh` and a `python3` >= 3.10.

CUDA
    GPUs are requested by a DeviceRequest when the device backend is cuda (the slice's
    GPU for a fresh instance, every GPU for a template, whose instances may get slices
    on any). Legacy CUDA IPC handles only open in a process that sees the exporter's
    (the agent's) PID namespace (DESIGN.md §6; platform/cuda/__init__.py), so cuda containers
    join the host PID namespace (`pid_mode="host"`). What that costs: an instance can
    list the host's processes; it still cannot signal or trace any (a uid of its own,
    no capabilities, no-new-privileges). With MPS, the daemon's pipe folder is mounted and
    the IPC namespace shared. The way out is VMM allocations exported as POSIX file
    descriptors and passed over the instance's socket; then this flag goes. The host
    backend never shares a namespace with the host.
"""

from thaw.platform.docker.containers import (
    ContainerProcess,
    ContainerRuntimeProcess,
    _Container,
)
from thaw.platform.docker.lifecycle import UID_BASE, UID_COUNT, DockerRuntime
from thaw.platform.docker.pids import can_limit_other_uids, exit_code_from_engine, host_pid_of
from thaw.platform.docker.spec import (
    BASE_MEMORY_BYTES,
    DEFAULT_MEMORY_BYTES,
    RUNTIME_MOUNT,
    ContainerLayout,
    ContainerSettings,
    container_kwargs,
    container_mounts,
)

__all__ = [
    "BASE_MEMORY_BYTES", "DEFAULT_MEMORY_BYTES", "RUNTIME_MOUNT", "UID_BASE", "UID_COUNT",
    "ContainerLayout", "ContainerProcess", "ContainerRuntimeProcess", "ContainerSettings",
    "DockerRuntime", "_Container", "can_limit_other_uids", "container_kwargs",
    "container_mounts", "exit_code_from_engine", "host_pid_of",
]
