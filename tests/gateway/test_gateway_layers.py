"""The gateway's imports go one way: no cycles among its modules, and the invocation
path (edge, admission, dispatch, relay, the fast lane) never reaches the stored
invocations' subpackage, which is built on it."""

from __future__ import annotations

import ast
from pathlib import Path

import thaw.gateway

ROOT = Path(thaw.gateway.__file__).parent
PATH_MODULES = ("request", "admit", "dispatch", "relay", "lane", "state", "priority",
                "fnconfig")
STORED = "thaw.gateway.stored"


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(["thaw.gateway", *parts])] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the gateway modules it imports (anywhere in it, functions too); the
    package itself is not counted for `from thaw.gateway import x` of a submodule."""
    found = modules()
    graph: dict[str, set[str]] = {name: set() for name in found}
    for name, path in found.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = subs if all(s in found for s in subs) else [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name].update(t for t in targets if t in found and t != name)
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles_inside_the_gateway() -> None:
    graph = import_graph()
    # The package's __init__ imports the app: every module is "under" it, not a cycle.
    graph["thaw.gateway"] = set()
    cycles = sorted(name for name in graph if name in reachable(graph, name))
    assert cycles == []


def test_the_invocation_path_never_imports_stored_invocations() -> None:
    graph = import_graph()
    graph["thaw.gateway"] = set()
    for module in PATH_MODULES:
        reached = reachable(graph, f"thaw.gateway.{module}")
        assert not {m for m in reached if m == STORED or m.startswith(STORED + ".")}, module


def test_routes_are_listed_not_loaded_by_name() -> None:
    source = (ROOT / "routes.py").read_text()
    assert "importlib" not in source and "import_module" not in source
    from thaw.gateway import routes

    assert all(hasattr(f, "add_routes") and isinstance(f.OPENAPI_PATHS, dict)
               for f in routes.FEATURES)


def test_a_deliberate_back_import_is_caught() -> None:
    """The check above is no tautology: a path module importing the stored package
    is found."""
    graph = import_graph()
    graph["thaw.gateway"] = set()
    graph["thaw.gateway.relay"] = graph["thaw.gateway.relay"] | {
        "thaw.gateway.stored.submit"}
    assert STORED + ".submit" in reachable(graph, "thaw.gateway.relay")
    assert "thaw.gateway.relay" in reachable(graph, "thaw.gateway.relay")  # a cycle now
