"""thaw: a serverless GPU function platform whose cold start is a snapshot restore.

What a function's code imports from here: `Input` (a parameter's constraints and
description), `InvalidInput` (answered 422 naming the field), `HTTPError` (a status
and detail of the handler's choosing) and `Response` (status, headers and content
type of an answer); docs/function-api.md, docs/errors.md.

Each name is read from thaw.snapshotter.runtime on first use (PEP 562): importing
`thaw.core` or starting an instance imports nothing more for this module, and the
runtime stays importable as `thaw.snapshotter.runtime` where only that package is
mounted. This file is the `thaw` package itself (pyproject.toml maps it); it lives
under snapshotter/ so that every place the runtime's folder is visible sees it too.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from thaw.snapshotter.runtime import HTTPError, Input, InvalidInput, Response

# An editable install finds thaw's namespace folders (thaw.platform, thaw.proto, ...)
# through an entry its import hook puts on sys.path, which a namespace package's path
# includes: this package's path keeps it. Wheels, images and per-function
# environments have their folders beside this file, and no such entry.
__path__ = [*__path__, *(entry for entry in sys.path
                         if entry.startswith("__editable__") and entry.endswith("__path_hook__"))]

# Public name -> the module of the runtime it lives in.
_PUBLIC = {
    "HTTPError": "thaw.snapshotter.runtime.errors",
    "Input": "thaw.snapshotter.runtime.inputs",
    "InvalidInput": "thaw.snapshotter.runtime.errors",
    "Response": "thaw.snapshotter.runtime.response",
}

__all__ = ["HTTPError", "Input", "InvalidInput", "Response"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'thaw' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
