"""The in-instance runtime: runs inside every function instance (DESIGN.md §3, §4).

It imports only the standard library (plus torch/NumPy when the function itself imported
them), so any Python >= 3.10 environment can run it from a read-only mount. All imports
inside the package are relative: it works under whatever name it is mounted as.

Entry point: `python -m thaw.snapshotter.runtime {fresh,build,template,restore} ...`.
The agent side uses the records re-exported here to talk to it; a handler may import
`HTTPError` and `InvalidInput` from here (errors.py) to answer with a status of its own,
and `Response` (response.py) to choose its answer's status, headers and content type.
"""

from .capture import CaptureError, capture
from .errors import HTTPError, InvalidInput
from .events import (
    Captured,
    Event,
    ExitCode,
    Failed,
    Ready,
    Spawned,
    SpawnRequest,
    Stage,
    StatusChannel,
    TemplateReady,
    event_to_line,
    parse_event,
)
from .handler import HandlerRef, Invoker, Request
from .inputs import Input
from .response import Response
from .restore import RestoreError, restore_handler
from .snapshot import Fingerprint, SnapshotMeta, StorageEntry

__all__ = [
    "CaptureError",
    "Captured",
    "Event",
    "ExitCode",
    "Failed",
    "Fingerprint",
    "HTTPError",
    "HandlerRef",
    "Input",
    "InvalidInput",
    "Invoker",
    "Ready",
    "Request",
    "Response",
    "RestoreError",
    "SnapshotMeta",
    "Spawned",
    "SpawnRequest",
    "Stage",
    "StatusChannel",
    "StorageEntry",
    "TemplateReady",
    "capture",
    "event_to_line",
    "parse_event",
    "restore_handler",
]
