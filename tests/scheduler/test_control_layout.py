"""The control plane's parts call each other one way only: each part imports only the
parts below it (and the shared state), none imports the ControlPlane facade, and no
scheduler module grows past 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SCHEDULER = Path(__file__).resolve().parents[2] / "scheduler"
# Bottom to top: a part may import only those listed before it.
PARTS = ["plane_state", "instances", "fleet", "tiers", "starts", "builds", "leasing",
         "reconcile"]


def _scheduler_imports(module: str) -> set[str]:
    tree = ast.parse((SCHEDULER / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("thaw.scheduler."):
                found.add(node.module.removeprefix("thaw.scheduler."))
            elif node.module == "thaw.scheduler":
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("thaw.scheduler.") for a in node.names
                         if a.name.startswith("thaw.scheduler."))
    return found


@pytest.mark.parametrize("part", PARTS)
def test_parts_import_only_downwards(part: str) -> None:
    imported = _scheduler_imports(part)
    assert "control" not in imported
    above = set(PARTS[PARTS.index(part):])
    assert not imported & above, f"{part} imports {sorted(imported & above)}"


def test_the_facade_composes_every_part() -> None:
    assert set(PARTS) <= _scheduler_imports("control")


def test_no_scheduler_module_is_over_600_lines() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in SCHEDULER.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 600} == {}
