"""An index of the fleet for placement, so that a cold start's decision does not visit
every node (DESIGN.md §8).

For each count of cold starts in flight, the free slice memory of every device of the
nodes that may take a start (ready, below memory EMERGENCY), sorted; and per snapshot
key, the nodes whose pinned tier holds it. Nodes report their changes (NodeView's
watched fields, its slice ledger, pin/unpin, the pressure tracker's levels) by id;
the index re-enters only those nodes, on the next question. Its answers are the ones
choose_node gives over every node: tests compare the two on random clusters.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Container, Mapping

from thaw.scheduler.nodes import DOCKER_RUNTIME, NodeView
from thaw.scheduler.pressure import PressureLevel
from thaw.scheduler.states import NodeState


class PlacementIndex:
    def __init__(self, nodes: Mapping[str, NodeView],
                 level: Callable[[str], PressureLevel]) -> None:
        self._nodes = nodes
        self._level = level
        self._dirty: set[str] = set()
        self._entered: dict[str, tuple[int, tuple[int, ...], frozenset[str]]] = {}
        """Node id -> (starts in flight, distinct free sizes, pinned keys) as indexed."""
        self._by_starts: dict[int, list[tuple[int, str]]] = {}
        """Starts in flight -> (free bytes of a device, node id), ascending."""
        self._pinned: dict[str, set[str]] = {}
        """Snapshot key -> ids of the indexed nodes whose pinned tier holds it."""

    def touch(self, node_id: str) -> None:
        """Something placement reads about the node changed: re-enter it."""
        self._dirty.add(node_id)

    def _refresh(self) -> None:
        for node_id in self._dirty:
            self._leave(node_id)
            node = self._nodes.get(node_id)
            if (node is None or node.state is not NodeState.READY
                    or self._level(node_id) >= PressureLevel.EMERGENCY):
                continue
            starts, sizes = node.starts_in_flight, tuple(sorted(set(node.free_sorted())))
            keys = node.pinned_keys()
            row = self._by_starts.setdefault(starts, [])
            for free in sizes:
                insort(row, (free, node_id))
            for key in keys:
                self._pinned.setdefault(key, set()).add(node_id)
            self._entered[node_id] = (starts, sizes, keys)
        self._dirty.clear()

    def _leave(self, node_id: str) -> None:
        entered = self._entered.pop(node_id, None)
        if entered is None:
            return
        starts, sizes, keys = entered
        row = self._by_starts[starts]
        for free in sizes:
            del row[bisect_left(row, (free, node_id))]
        if not row:
            del self._by_starts[starts]
        for key in keys:
            holders = self._pinned[key]
            holders.discard(node_id)
            if not holders:
                del self._pinned[key]

    def pinned_on(self, key: str) -> set[str]:
        """Ids of the nodes that may take a start and whose pinned tier holds `key`."""
        self._refresh()
        return set(self._pinned.get(key, ()))

    def best(self, need: int, skip: Container[str], same_function: Mapping[str, int],
             image: str = "") -> str | None:
        """The node, not in `skip`, that choose_node ranks first among the nodes that
        may take a start and hold no copy of the snapshot: fewest starts in flight,
        then least memory left over on a device that fits `need`, then fewest
        instances of the function (`same_function`), then node id. With an `image`,
        docker nodes only. None when the slice fits on none."""
        self._refresh()
        for starts in sorted(self._by_starts):
            row = self._by_starts[starts]
            found: tuple[int, int, str] | None = None
            for i in range(bisect_left(row, (need, "")), len(row)):
                free, node_id = row[i]
                if found is not None and free > found[0]:
                    break  # every node from here leaves more over
                if node_id in skip or (image and self._nodes[node_id].runtime
                                       != DOCKER_RUNTIME):
                    continue
                rank = (free, same_function.get(node_id, 0), node_id)
                if found is None or rank < found:
                    found = rank
                    if rank[1] == 0:
                        break  # the rest leave as much over, with higher ids
            if found is not None:
                return found[2]
        return None
