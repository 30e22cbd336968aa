"""The current step of each snapshot build running on this node ("resolving the
environment", "running setup()", "storing the snapshot" ...), with its progress where
the step has a measure. The agent's heartbeats carry them to the scheduler, which shows
them on the version while it builds (docs/environments.md, "Build steps").

Recording a step is a dictionary write and never waits on anything: the build goes on
whatever happens to the report. Progress of one step is kept at most every
`min_interval` seconds (a step reporting per chunk or per package costs nothing more);
a new step, and the end of one (progress 1), are always kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from thaw.proto import scheduler_pb2

# A step's progress is recorded at most this often (seconds).
MIN_PROGRESS_INTERVAL = 0.25
# How often a build's install step counts the packages installed so far (seconds).
INSTALL_COUNT_SECONDS = 0.5
# Steps are one line of text at most this long (a resolver's message goes to the logs).
MAX_STEP_CHARS = 200

class StepReporter(Protocol):
    def __call__(self, text: str, progress: float | None = None) -> bool: ...


BuildKey = tuple[str, str, str]
"""A build: tenant, function name, version (as a FunctionSpec names it)."""


@dataclass(frozen=True)
class Step:
    text: str
    progress: float | None
    at: float
    """When it was recorded (the clock of NodeBuildSteps)."""


def step_text(text: str) -> str:
    """One line of at most MAX_STEP_CHARS characters."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_STEP_CHARS else line[:MAX_STEP_CHARS - 1] + "…"


class NodeBuildSteps:
    """The latest step of every build running here, throttled per build."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 min_interval: float = MIN_PROGRESS_INTERVAL) -> None:
        self.clock = clock
        self.min_interval = min_interval
        self._steps: dict[BuildKey, Step] = {}

    def set(self, key: BuildKey, text: str, progress: float | None = None) -> bool:
        """Record `key`'s current step; False when it was dropped (the same step's
        progress again within min_interval)."""
        text = step_text(text)
        if progress is not None:
            progress = min(1.0, max(0.0, progress))
        now = self.clock()
        last = self._steps.get(key)
        if (last is not None and last.text == text and progress is not None
                and progress < 1.0 and now - last.at < self.min_interval):
            return False
        self._steps[key] = Step(text, progress, now)
        return True

    def reporter(self, key: BuildKey) -> StepReporter:
        """`set` bound to one build."""

        def report(text: str, progress: float | None = None) -> bool:
            return self.set(key, text, progress)

        return report

    def end(self, key: BuildKey) -> None:
        """The build is over (done or failed): it has no step any more."""
        self._steps.pop(key, None)

    def get(self, key: BuildKey) -> Step | None:
        return self._steps.get(key)

    def messages(self) -> list[scheduler_pb2.BuildStep]:
        """Every running build's step, as a heartbeat carries them."""
        return [scheduler_pb2.BuildStep(tenant=tenant, name=name,
                                        version=int(version) if version.isdigit() else 0,
                                        step=step.text, progress=step.progress)
                for (tenant, name, version), step in list(self._steps.items())]


class StepLines:
    """A build's progress lines (an environment's resolve and install): each goes to
    `log` and becomes the build's current step; `measure` sets how far that step is
    without a line (a count of packages installed is no log line)."""

    def __init__(self, log: Callable[[str], None], report: StepReporter) -> None:
        self.log = log
        self.report = report
        self.line = ""

    def __call__(self, line: str) -> None:
        self.line = line
        self.log(line)
        self.report(line)

    def measure(self, fraction: float) -> None:
        self.report(self.line, fraction)


def installed_count(env_dir: Path) -> int:
    """Packages installed so far into the virtualenv at `env_dir` (their .dist-info
    folders; blocking)."""
    return sum(1 for site in env_dir.glob("lib/python*/site-packages")
               for entry in os.scandir(site) if entry.name.endswith(".dist-info"))


@contextlib.asynccontextmanager
async def counting_installs(progress: Callable[[str], None], env_dir: Path, total: int
                            ) -> AsyncIterator[None]:
    """While the body installs `total` packages into `env_dir`, the build's step (where
    `progress` is one: StepLines) measures how many are in, every
    INSTALL_COUNT_SECONDS; a failed count is skipped, never the build's failure."""
    if not isinstance(progress, StepLines) or total <= 0:
        yield
        return

    async def count() -> None:
        while True:
            await asyncio.sleep(INSTALL_COUNT_SECONDS)
            with contextlib.suppress(OSError):
                done = await asyncio.to_thread(installed_count, env_dir)
                progress.measure(min(done, total) / total)

    task = asyncio.create_task(count())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
