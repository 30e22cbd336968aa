"""How `thaw doctor gpu` runs its checks and assembles its one JSON document.

The checks (ops/doctor_checks.py for the GPU itself, ops/doctor_platform.py for a local
platform on it) run one after another, each in a thread of its own with its own time
limit, all within one budget (8 minutes by default: the bound a whole run must stay
under on one H100).
A check is a function of injected pieces returning its figures, or raising CheckFailed
with the figures it got and why it failed; this module only runs them and assembles the
document:

    {"ok": false, "error": "", "environment": {...}, "missing": [...],
     "budget_s": 480, "elapsed_s": 301.2,
     "checks": {"driver_fingerprint": {"ok": true, ..., "error": "", "seconds": 0.1}, ...}}

Exit codes: 0 every check passed, 1 one failed (or could not run, and says why), 2 there
is no CUDA device to check (no CuPy, no driver or no GPU: "no CUDA device: ..." in the
document and on stderr).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from thaw.core.errors import ThawError

# The bound a whole run must stay under on one H100; every check shares it.
DEFAULT_BUDGET_S = 480.0

# Kept out of the checks' share of the budget for closing the plan (stopping the local
# platform: a second or two normally, ops/doctor_platform.py STOP_TIMEOUT_S at most).
CLOSE_RESERVE_S = 45.0

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_DEVICE = 2
"""No CUDA device to check: also click's bad-usage code, but a usage error prints no JSON."""

NO_CUDA_DEVICE = "no CUDA device"


class CheckFailed(Exception):
    """A check ran and found something wrong: `message` says what, `figures` are what it
    measured before (they go into its section)."""

    def __init__(self, message: str, **figures: Any) -> None:
        super().__init__(message)
        self.message = message
        self.figures = figures


@dataclass(frozen=True)
class Check:
    name: str
    """Its section's key in the document."""
    timeout_s: float
    """How long it may take (less if the run's budget has less left)."""
    run: Callable[[], dict[str, Any]]
    """Its figures; raises CheckFailed (or anything else) when it fails."""


@dataclass
class CheckPlan:
    """The checks of a run, and what to give back once they are done (or abandoned)."""

    checks: Sequence[Check]
    close: Callable[[], None] = lambda: None


@dataclass
class Diagnosis:
    """A finished run: the document to print and the exit code."""

    document: dict[str, Any]
    exit_code: int
    error: str = ""
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_checks(checks: Sequence[Check], budget_s: float,
               clock: Callable[[], float] = time.monotonic) -> dict[str, dict[str, Any]]:
    """Each check's section, in order. A check gets min(its timeout, what the budget has
    left); one that overruns is reported as timed out and left behind (its thread is a
    daemon: whatever it holds goes when the process exits) while the next one starts;
    once the budget is spent the rest are reported as not run."""
    started = clock()
    sections: dict[str, dict[str, Any]] = {}
    for check in checks:
        left = budget_s - (clock() - started)
        if left <= 0:
            sections[check.name] = {"ok": False, "error": f"not run: the run's budget of "
                                                          f"{budget_s:.0f}s was spent"}
            continue
        sections[check.name] = _run_one(check, min(check.timeout_s, left), clock)
    return sections


def _run_one(check: Check, limit: float, clock: Callable[[], float]) -> dict[str, Any]:
    box: dict[str, dict[str, Any]] = {}

    def target() -> None:
        try:
            figures = check.run()
            box["section"] = {**figures, "ok": True, "error": ""}
        except CheckFailed as exc:
            box["section"] = {**exc.figures, "ok": False, "error": exc.message}
        except ThawError as exc:
            box["section"] = {"ok": False, "error": exc.message}
        except Exception as exc:  # a check's own bug must not hide the others' results
            box["section"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    started = clock()
    thread = threading.Thread(target=target, name=f"doctor-{check.name}", daemon=True)
    thread.start()
    thread.join(limit)
    seconds = round(clock() - started, 3)
    if thread.is_alive() or "section" not in box:
        return {"ok": False, "error": f"timed out after {limit:.0f}s", "seconds": seconds}
    return {**box["section"], "seconds": seconds}


def diagnose(environment: dict[str, Any], missing: Sequence[str], no_device: str,
             plan: Callable[[], CheckPlan], check_names: Sequence[str],
             budget_s: float = DEFAULT_BUDGET_S, reserve_s: float = CLOSE_RESERVE_S,
             spent_s: float = 0.0,
             clock: Callable[[], float] = time.monotonic) -> Diagnosis:
    """Run the checks of `plan()` (made only when there is a device) within `budget_s`
    less `reserve_s` and what was `spent_s` before (probing the machine), close the
    plan, and assemble the document. `no_device` non-empty: nothing runs, every check
    in `check_names` says why, exit 2."""
    started = clock() - spent_s
    if no_device:
        error = f"{NO_CUDA_DEVICE}: {no_device}"
        sections = {name: {"ok": False, "error": f"not run: {error}"} for name in check_names}
        code = EXIT_NO_DEVICE
    else:
        error = ""
        made = plan()
        try:
            sections = run_checks(made.checks,
                                  max(1.0, budget_s - reserve_s - spent_s), clock)
        finally:
            made.close()
        code = EXIT_OK if all(s["ok"] for s in sections.values()) else EXIT_FAILED
    document = {
        "ok": code == EXIT_OK,
        "error": error,
        "environment": environment,
        "missing": list(missing),
        "budget_s": budget_s,
        "elapsed_s": round(clock() - started, 3),
        "checks": sections,
    }
    return Diagnosis(document, code, error, sections)
