"""What `thaw deploy` shows while the platform builds: the build's current step (the
function's `build_step` and `build_progress`, docs/environments.md "Build steps"),
read by polling the function beside the deploy request that waits for the build."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from thaw.client.retry import RetryPolicy
from thaw.core.errors import ThawError
from thaw.ops.client import Client

# How often the function is read while its build runs (seconds).
POLL_SECONDS = 0.5


def step_line(doc: dict[str, Any]) -> str | None:
    """The step of the build `doc` (a function's JSON) shows, in words; None when no
    build is running."""
    latest = doc.get("latest_build") or {}
    step = str(doc.get("build_step") or latest.get("build_step") or "")
    if not step:
        return None
    progress = doc.get("build_progress")
    if progress is None:
        progress = latest.get("build_progress")
    version = latest.get("version")
    head = f"building v{version}: " if version else "building: "
    return head + step + (f" ({progress * 100:.0f}%)" if progress is not None else "")


def function_name(bundle: bytes) -> str | None:
    """The function's name from its bundle's thaw.toml; None if it cannot be read
    (the deploy itself says what is wrong)."""
    from thaw.core.bundle import limits_for
    from thaw.core.spec import read_bundle

    try:
        return read_bundle(bundle, limits_for(len(bundle))).name
    except (ThawError, ValueError, OSError):
        return None


class BuildWatch:
    """Polls function `name` (or the one `bundle` names) in a thread and calls
    `on_step` with each new step line until stopped. Any failure to read it is
    skipped: the deploy request itself reports how the build ended."""

    def __init__(self, on_step: Callable[[str], None], *, name: str | None = None,
                 bundle: bytes | None = None, interval: float = POLL_SECONDS,
                 client: Callable[[], Client] = Client) -> None:
        self.on_step = on_step
        self.name = name
        self.bundle = bundle
        self.interval = interval
        self.client = client
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.seen: list[str] = []
        """Every step line shown, in order."""

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="build-watch",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        name = self.name
        if name is None and self.bundle is not None:
            name = function_name(self.bundle)
        if not name:
            return
        with self.client() as client:
            while not self._stop.wait(self.interval):
                try:
                    doc = client.request("GET", f"/v1/functions/{name}",
                                         retry=RetryPolicy(attempts=1)).json()
                except Exception:  # noqa: BLE001 - not there yet, or a blip: again
                    continue
                line = step_line(doc)
                if line is not None and (not self.seen or self.seen[-1] != line):
                    self.seen.append(line)
                    self.on_step(line)
