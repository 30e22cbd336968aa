"""`thaw node ls` notes each full or read-only data directory of a node under its table
(the node's storage conditions, GET /v1/nodes)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.ops.test_node_ls_pinned import node, node_ls


def with_conditions(node_id: str, *conditions: dict[str, Any]) -> dict[str, Any]:
    return {**node(node_id, {"lock": "locked"}), "conditions": list(conditions)}


def test_node_ls_notes_full_and_read_only_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    output = node_ls(monkeypatch, [
        with_conditions("a"),
        with_conditions("b", {"type": "disk_full", "path": "/var/lib/thaw/agent/b",
                              "message": "3.0 MiB free of 1.0 GiB"},
                        {"type": "read_only", "path": "/dev/shm/thaw-1",
                         "message": "mounted read-only"}),
        node("old", {"lock": "locked"}),  # a gateway that does not send conditions
    ])
    lines = output.splitlines()
    assert ("b: /var/lib/thaw/agent/b is disk-full (3.0 MiB free of 1.0 GiB): builds and "
            "chunk writes refused (507)") in lines
    assert ("b: /dev/shm/thaw-1 is read-only (mounted read-only): builds and chunk writes "
            "refused (507)") in lines
    assert not any(line.startswith(("a:", "old:")) for line in lines)
