"""A function's secrets in its instance's environment, and out of its snapshot.

The agent passes the values as environment variables (never on a command line) and
names them in SECRET_NAMES_ENV. Before a build captures its snapshot they leave the
environment: a snapshot is shared by every instance it restores into and outlives
the value, so only what restores it (its spawn request) brings them back, current.
A value setup() copied into the handler is the handler's state and is captured:
functions read secrets at call time or in on_restore.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SECRET_NAMES_ENV = "THAW_SECRET_NAMES"
"""Comma-separated names of the variables that hold the function's secrets."""


def secret_names_env(secrets: Mapping[str, str]) -> dict[str, str]:
    """The variable naming `secrets` (empty when there are none)."""
    return {SECRET_NAMES_ENV: ",".join(sorted(secrets))} if secrets else {}


def apply(env: Mapping[str, str], secrets: Mapping[str, str], *,
          before_capture: bool = False) -> None:
    """Put a spawn's or a build's variables, then its secrets, into os.environ; for a
    build (`before_capture`) with their names, for `forget`."""
    os.environ.update(env)
    os.environ.update(secrets)
    if before_capture:
        os.environ.update(secret_names_env(secrets))


def forget() -> list[str]:
    """Remove the secrets SECRET_NAMES_ENV names (and it) from os.environ; the names
    removed."""
    names = [n for n in os.environ.pop(SECRET_NAMES_ENV, "").split(",") if n]
    for name in names:
        os.environ.pop(name, None)
    return names
