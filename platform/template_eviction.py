"""Which idle templates to stop when templates take too much of the node's memory.

A template with no running instance (no child process: instances and builds are its
children) is idle; idle templates unused for at least `idle_seconds` are stopped least
recently used first while the templates' memory is over the budget or the node's
available memory is under its floor. A later restore of one starts it again: that
start is the `template` stage of its Server-Timing."""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class EvictionPolicy:
    """The agent's template_* settings (core/config_fields.py)."""

    budget_bytes: int = 0
    """Most memory (USS) the node's templates together may hold; 0: no budget."""
    min_available_bytes: int = 0
    """Stop idle templates while the node's available memory is under this; 0: never."""
    idle_seconds: float = 60.0
    """A template unused for less than this is never stopped (a restore may be about
    to fork from the template it was just given)."""

    @property
    def active(self) -> bool:
        return self.budget_bytes > 0 or self.min_available_bytes > 0


@dataclass(frozen=True)
class TemplateUse:
    """One running template as the policy sees it."""

    key: str
    last_used: float
    """When a restore or build last asked for it (monotonic seconds)."""
    idle: bool
    memory_bytes: int


@dataclass(frozen=True)
class TemplateMemory:
    """What /proc tells of a template's process."""

    idle: bool
    """No child process: no instance or build forked from it runs."""
    unique_bytes: int
    """USS: its pages no other process holds (not those shared with its zygote)."""


def template_memory(pid: int) -> TemplateMemory:
    """Blocking (reads /proc). A process that is gone reads as idle and empty."""
    try:
        process = psutil.Process(pid)
        return TemplateMemory(not process.children(), int(process.memory_full_info().uss))
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return TemplateMemory(True, 0)
    except psutil.AccessDenied:
        return TemplateMemory(False, 0)  # unknown: never taken for idle


def available_memory() -> int:
    return int(psutil.virtual_memory().available)


def choose_evictions(uses: list[TemplateUse], policy: EvictionPolicy, available: int,
                     now: float) -> list[tuple[str, str]]:
    """(template key, why) of the templates to stop, least recently used first."""
    total = sum(use.memory_bytes for use in uses)
    candidates = sorted((u for u in uses if u.idle and now - u.last_used >= policy.idle_seconds),
                        key=lambda u: u.last_used)
    chosen: list[tuple[str, str]] = []
    for use in candidates:
        if policy.budget_bytes and total > policy.budget_bytes:
            reason = "templates over their memory budget"
        elif policy.min_available_bytes and available < policy.min_available_bytes:
            reason = "node memory low"
        else:
            break
        chosen.append((use.key, reason))
        total -= use.memory_bytes
        available += use.memory_bytes
    return chosen
