"""`thaw bench placement`: how long one placement decision takes (DESIGN.md §8, §10).

The decision is the scheduler's pure `choose_node` over the candidate list the control
plane builds for a cold start: every ready node, with its free slice memory per
device, whether its pinned or disk tier holds the function's snapshot, its cold starts
in flight and the function's instances already there. The lists are built up front
for a synthetic cluster (seeded: the same figures each run) and only the decision is
timed, once per function per round.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from thaw.scheduler.placement import Candidate, choose_node

GiB = 1024**3
DEVICES_PER_NODE = 8
DEVICE_BYTES = 80 * GiB
# Slice sizes of the synthetic functions (0 = CPU-only), roughly as deployed.
SLICE_SIZES = (0, 1 * GiB, 2 * GiB, 4 * GiB, 8 * GiB, 16 * GiB, 40 * GiB)
# Nodes whose pinned / disk tier hold a given function's snapshot.
PINNED_HOLDERS = 2
DISK_HOLDERS = 6
ROUNDS = 5
SEED = 5


def _cluster(functions: int, nodes: int, rng: random.Random
             ) -> list[tuple[int, list[Candidate]]]:
    """Per function: (slice size, the candidate list a cold start of it sees)."""
    free = [[rng.randrange(0, DEVICE_BYTES + 1, GiB // 4) for _ in range(DEVICES_PER_NODE)]
            for _ in range(nodes)]
    starts = [rng.choice((0, 0, 0, 1, 2, 3)) for _ in range(nodes)]
    ids = [f"node-{n:04d}" for n in range(nodes)]
    out = []
    for _ in range(functions):
        need = rng.choice(SLICE_SIZES)
        holders = rng.sample(range(nodes), min(nodes, DISK_HOLDERS))
        pinned = set(holders[:PINNED_HOLDERS])
        on_disk = set(holders)
        candidates = [Candidate(node_id=ids[n], device_free=tuple(free[n]),
                                snapshot_pinned=n in pinned, snapshot_on_disk=n in on_disk,
                                starts_in_flight=starts[n],
                                same_function=rng.choice((0, 0, 0, 1)))
                      for n in range(nodes)]
        out.append((need, candidates))
    return out


def run_placement_bench(functions: int = 1000, nodes: int = 100) -> dict[str, Any]:
    """p50/p99 in milliseconds of one placement decision, over `functions` functions
    on a cluster of `nodes` nodes (ROUNDS decisions per function)."""
    if functions < 1 or nodes < 1:
        raise ValueError("functions and nodes must be at least 1")
    cluster = _cluster(functions, nodes, random.Random(SEED))
    for need, candidates in cluster[:50]:  # warm up the interpreter's caches
        choose_node(candidates, need)
    samples: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(ROUNDS):
        for need, candidates in cluster:
            began = clock()
            choose_node(candidates, need)
            samples.append(clock() - began)
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return {"functions": functions, "nodes": nodes,
            "p50_ms": round(statistics.median(samples) / 1e6, 4),
            "p99_ms": round(p99 / 1e6, 4)}


if __name__ == "__main__":
    import json

    print(json.dumps(run_placement_bench()))
