"""The warm-up a build runs after setup() and before the capture.

What a function does on its first call only (lazy imports, one-time initialisation,
autotuning, caches filled on first use) is then already done in the snapshot, so a
restored instance's first call costs what a warm call costs. Two ways to ask for it:
a `warmup(self)` method on the handler, and `[snapshot] warmup = {...}` in the bundle's
thaw.toml, one input body predict() is called with (as a POST /invoke would call it).
Both run when both are given: the method first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomllib

from .handler import Invoker, Request, Stream

SPEC_FILE = "thaw.toml"


class WarmupConfigError(ValueError):
    """The bundle's `[snapshot] warmup` cannot be used (the reason says why)."""


def warmup_input(bundle: Path) -> dict[str, Any] | None:
    """The bundle's `[snapshot] warmup` input body, or None when it sets none. The
    deploy already checked thaw.toml; this re-reads the one table the build needs."""
    path = bundle / SPEC_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise WarmupConfigError(f"{SPEC_FILE} is not valid TOML: {exc}") from None
    snapshot = data.get("snapshot")
    if not isinstance(snapshot, dict) or "warmup" not in snapshot:
        return None
    body = snapshot["warmup"]
    if not isinstance(body, dict):
        raise WarmupConfigError("snapshot.warmup must be a table of predict()'s inputs")
    return body


def run_warmup(handler: object, bundle: Path) -> bool:
    """Warm the handler up; True when anything ran. Whatever the tenant's code raises
    propagates (the build fails at stage `warmup`)."""
    ran = False
    method = getattr(handler, "warmup", None)
    if callable(method):
        method()
        ran = True
    body = warmup_input(bundle)
    if body is not None:
        invoker = Invoker(handler)
        if invoker.any_method:
            raise WarmupConfigError("snapshot.warmup is an input for predict(), "
                                    "but the handler only defines __call__()")
        reply = invoker.invoke(Request("POST", "", "", {"content-type": "application/json"},
                                       json.dumps(body).encode()))
        if isinstance(reply, Stream):
            # A generator's work happens as its items are read: read them all.
            for _ in reply.items:
                pass
        ran = True
    return ran
