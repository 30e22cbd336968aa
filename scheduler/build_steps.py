"""The current step of each snapshot build this scheduler runs, as the building node's
heartbeats report it (platform/build_steps.py), shown on the version while it builds.

Held in memory only, and only for builds this scheduler started: a step is begun with
the build and dropped when the build ends (done, failed or cancelled), so a heartbeat
that arrives late cannot bring a finished build's step back. A restarted scheduler
knows no step until a build it runs reports one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from thaw.proto import scheduler_pb2

# The step of a build no node has reported on yet.
WAITING = "waiting for a node to build on"

StepKey = tuple[str, str, int]
"""A build: tenant, function name, version."""


@dataclass(frozen=True)
class BuildStep:
    text: str
    progress: float | None
    node_id: str
    """The node that reported it ("" for a step the scheduler set)."""


class BuildSteps:
    def __init__(self) -> None:
        self._steps: dict[StepKey, BuildStep] = {}

    def begin(self, key: StepKey) -> None:
        """A build of `key` starts here: its steps are kept from now on."""
        self._steps[key] = BuildStep(WAITING, None, "")

    def set(self, key: StepKey, text: str, node_id: str = "") -> None:
        """A step the scheduler itself takes (preparing the template); ignored for a
        build not running here."""
        if key in self._steps:
            self._steps[key] = BuildStep(text, None, node_id)

    def end(self, key: StepKey) -> None:
        self._steps.pop(key, None)

    def take(self, node_id: str, reported: Iterable[scheduler_pb2.BuildStep]) -> None:
        """A heartbeat's steps; those of builds not running here are ignored."""
        for step in reported:
            key = (step.tenant, step.name, step.version)
            if key in self._steps and step.step:
                progress = step.progress if step.HasField("progress") else None
                self._steps[key] = BuildStep(step.step, progress, node_id)

    def get(self, key: StepKey) -> BuildStep | None:
        return self._steps.get(key)

    def fill(self, info: scheduler_pb2.VersionInfo, tenant: str, name: str) -> None:
        """Set `info`'s build_step and build_progress while its version builds here
        (a version's first build, or its snapshot built again)."""
        step = self._steps.get((tenant, name, info.version))
        if step is None:
            return
        info.build_step = step.text
        if step.progress is not None:
            info.build_progress = step.progress
