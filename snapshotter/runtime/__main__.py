"""`python -m thaw.snapshotter.runtime <mode> ...`: the process inside every instance.

Modes: fresh (import, setup, serve), build (import, setup, capture, exit), template
(import, then fork restored instances on request) and restore (import, then one restore
in this process, without forking: for functions whose imports make forking unsafe) and
zygote (import an environment's packages, then fork templates on request: zygote.py).
Progress goes out as status events on --status-fd (events.py); stdout and stderr are
the tenant's.

Snapshot data never comes by path: a template reads its snapshot.json from an inherited
descriptor (--snapshot-fd), and a restore, forked or not, gets everything as descriptors
with its spawn request on the --control socket (template.py's protocol).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from . import calllog
from .bounded import print_exception
from .capture import CaptureError, capture
from .events import (
    Captured,
    ExitCode,
    Failed,
    Ready,
    Spawned,
    SpawnRequest,
    Stage,
    StatusChannel,
    TemplateReady,
    describe_exception,
    event_to_line,
)
from .handler import (
    HandlerRef,
    Invoker,
    activate_bundle,
    create_handler,
    import_handler_class,
)
from .restore import restore_request
from .server import UnixHTTPServer, bind_server, serve_until_stopped
from .signature import refused_schema
from .template import SPAWN_READ_TIMEOUT_S, bind_control_socket, read_request, run_template
from .warmup import run_warmup
from .zygote import run_zygote


class StageFailed(Exception):
    """Ends a mode with a `failed` event and the stage's exit code."""

    def __init__(self, stage: Stage, reason: str, attribute_path: str | None = None) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason
        self.attribute_path = attribute_path
        # A refused capture still tells the handler's input schema (signature.py).
        self.input_schema = ""


@contextlib.contextmanager
def stage(name: Stage) -> Iterator[None]:
    """Attribute any failure inside to one stage. SystemExit counts: a tenant's setup()
    calling sys.exit() is a failed setup, not a clean exit."""
    try:
        yield
    except CaptureError as exc:
        where = f" at {exc.attribute_path}" if exc.attribute_path else ""
        print(
            f"thaw: cannot snapshot the handler{where}: {exc.reason}\n"
            "thaw: create such state in on_restore() (it runs after every restore)",
            file=sys.stderr,
        )
        raise StageFailed(name, exc.reason, exc.attribute_path) from exc
    except (Exception, SystemExit) as exc:
        print_exception()
        raise StageFailed(name, describe_exception(exc)) from exc


T = TypeVar("T")


def _timed(timings: dict[str, float], key: str, work: Callable[[], T]) -> T:
    started = time.perf_counter()
    result = work()
    timings[key] = time.perf_counter() - started
    return result


def _import_and_setup(ref: HandlerRef, timings: dict[str, float]) -> object:
    with stage(Stage.IMPORT):
        cls = _timed(timings, "import", lambda: import_handler_class(ref))
    with stage(Stage.SETUP):
        return _timed(timings, "setup", lambda: create_handler(cls))


def _bind(socket_path: str, invoker: Invoker) -> UnixHTTPServer:
    with stage(Stage.SERVE):
        return bind_server(socket_path, invoker)


def run_fresh(args: argparse.Namespace, ref: HandlerRef, status: StatusChannel) -> ExitCode:
    activate_bundle(ref)
    timings: dict[str, float] = {}
    handler = _import_and_setup(ref, timings)
    with stage(Stage.SETUP):
        invoker = Invoker(handler)
    server = _bind(args.socket, invoker)
    # Read here too: a function that is never built learns its schema from a start.
    schema = refused_schema(handler)
    serve_until_stopped(server, lambda: status.emit(Ready(os.getpid(), timings, schema)))
    return ExitCode.OK


def run_build(args: argparse.Namespace, ref: HandlerRef, status: StatusChannel) -> ExitCode:
    before = set(sys.modules)
    activate_bundle(ref)
    timings: dict[str, float] = {}
    handler = _import_and_setup(ref, timings)
    with stage(Stage.WARMUP):
        started = time.perf_counter()
        if run_warmup(handler, ref.bundle):
            timings["warmup"] = time.perf_counter() - started
    # sys.modules keeps insertion order: this is the order the function imported them
    # (the warm-up's lazy imports included, so templates import them ahead too).
    modules = [name for name in sys.modules if name not in before]
    try:
        with stage(Stage.CAPTURE):
            meta = capture(
                handler,
                Path(args.out),
                modules=modules,
                timings=timings,
                function_version=args.function_version,
            )
    except StageFailed as exc:
        exc.input_schema = refused_schema(handler)
        raise
    status.emit(Captured(timings, meta.host_size, meta.device_size))
    return ExitCode.OK


def run_template_mode(
    args: argparse.Namespace, ref: HandlerRef, status: StatusChannel
) -> ExitCode:
    activate_bundle(ref)
    # Only the template reads it: none of the tenant's subprocesses inherits it.
    os.set_inheritable(args.snapshot_fd, False)
    return run_template(args.snapshot_fd, args.control, status, lambda: import_handler_class(ref))


def run_restore(args: argparse.Namespace, ref: HandlerRef, status: StatusChannel) -> ExitCode:
    """Import, then take one spawn request on --control (announced as a template is)
    and restore into this very process: the same request and descriptors as a forked
    restore, no fork."""
    activate_bundle(ref)
    timings: dict[str, float] = {}
    with stage(Stage.IMPORT):
        _timed(timings, "import", lambda: import_handler_class(ref))
    with stage(Stage.SERVE):
        listener = bind_control_socket(args.control)
    status.emit(TemplateReady(os.getpid(), dict(timings)))
    conn = _one_request(listener, args.control)
    try:
        with stage(Stage.SPAWN):
            conn.settimeout(SPAWN_READ_TIMEOUT_S)
            request = read_request(conn)
            if not isinstance(request, SpawnRequest):
                raise ValueError("a restore-mode instance takes one spawn request")
            conn.settimeout(None)
            conn.sendall(event_to_line(Spawned(os.getpid())))
        with stage(Stage.RESTORE):
            restored = restore_request(request)
            invoker = Invoker(restored.handler)
        timings.update(restored.timings)
        server = _bind(request.socket, invoker)
    except StageFailed as exc:
        with contextlib.suppress(OSError):
            conn.sendall(event_to_line(Failed(exc.stage, exc.reason)))
        conn.close()
        raise

    def announce() -> None:
        ready = Ready(os.getpid(), timings)
        with contextlib.suppress(OSError):
            conn.sendall(event_to_line(ready))
        conn.close()
        status.emit(ready)

    serve_until_stopped(server, announce)
    return ExitCode.OK


def _one_request(listener: socket.socket, path: str) -> socket.socket:
    """The one control connection a restore-mode instance takes; the socket goes
    right after, so nothing else can ask it for anything."""
    try:
        conn, _ = listener.accept()
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
    return conn


_MODES: dict[str, Callable[[argparse.Namespace, HandlerRef, StatusChannel], ExitCode]] = {
    "fresh": run_fresh,
    "build": run_build,
    "template": run_template_mode,
    "restore": run_restore,
}

# Options holding paths: made absolute before the runtime changes into the bundle.
_PATH_OPTIONS = ("bundle", "socket", "out", "control")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m thaw.snapshotter.runtime")
    modes = parser.add_subparsers(dest="mode", required=True)

    def add_mode(name: str, help_text: str) -> argparse.ArgumentParser:
        mode = modes.add_parser(name, help=help_text)
        mode.add_argument("--bundle", required=True, help="the function's bundle folder")
        mode.add_argument("--handler", required=True, help="module:Class")
        mode.add_argument(
            "--status-fd", type=int, default=None,
            help="inherited fd for JSON-line status events (default: stderr)",
        )
        return mode

    fresh = add_mode("fresh", "import, setup() and serve")
    fresh.add_argument("--socket", required=True, help="unix socket to serve on")

    build = add_mode("build", "import, setup() and write a snapshot")
    build.add_argument("--out", required=True, help="folder for the snapshot files")
    build.add_argument("--function-version", default=None)

    template = add_mode("template", "pre-import, then fork restored instances on request")
    template.add_argument("--snapshot-fd", type=int, required=True,
                          help="inherited descriptor of the snapshot's snapshot.json")
    template.add_argument("--control", required=True, help="unix socket for spawn requests")

    restore = add_mode("restore", "import, then restore one spawn request in this process")
    restore.add_argument("--control", required=True,
                         help="unix socket for the one spawn request (and its descriptors)")

    # No bundle: a zygote serves every bundle of its environment and imports none.
    zygote = modes.add_parser("zygote", help="import packages, then fork templates on request")
    zygote.add_argument("--snapshot-fd", type=int, required=True,
                        help="inherited descriptor of a JSON object listing the modules")
    zygote.add_argument("--control", required=True, help="unix socket for template requests")
    zygote.add_argument("--status-fd", type=int, default=None,
                        help="inherited fd for JSON-line status events (default: stderr)")
    return parser


def _status_channel(args: argparse.Namespace) -> StatusChannel:
    return (
        StatusChannel.for_fd(args.status_fd)
        if args.status_fd is not None
        else StatusChannel.to_stderr()
    )


def run_zygote_mode(args: argparse.Namespace) -> int:
    """The zygote: no bundle, no handler; its templates find theirs per request."""
    faulthandler.enable()
    sys.argv = sys.argv[:1]
    calllog.install()
    os.set_inheritable(args.snapshot_fd, False)
    status = _status_channel(args)
    try:
        code = run_zygote(args.snapshot_fd, args.control, status)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    if code != ExitCode.OK:
        os._exit(code)
    return int(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in _PATH_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            setattr(args, name, os.path.abspath(value))
    if args.mode == "zygote":
        return run_zygote_mode(args)
    try:
        ref = HandlerRef.parse(args.bundle, args.handler)
    except ValueError as exc:
        parser.error(str(exc))  # exits with ExitCode.USAGE
    # A segfault in tenant code leaves a traceback in the instance's log, which the
    # agent quotes in the error its caller gets.
    faulthandler.enable()
    # The tenant's code sees a bare command line, not ours (some libraries parse argv).
    sys.argv = sys.argv[:1]
    # Before the function's imports: what they print during a call is the call's.
    calllog.install()
    status = _status_channel(args)
    try:
        code = _MODES[args.mode](args, ref, status)
    except StageFailed as exc:
        status.emit(Failed(exc.stage, exc.reason, exc.attribute_path, exc.input_schema))
        code = exc.stage.exit_code
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    if args.mode == "build" or code != ExitCode.OK:
        # Nothing of the tenant's is worth waiting for now: a non-daemon thread started
        # by setup() would otherwise keep a finished build (or a failed start) alive.
        os._exit(code)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
