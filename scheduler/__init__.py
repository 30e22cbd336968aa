"""The control plane (DESIGN.md §8): `thaw scheduler`.

Layers, one way down: service.py, invocations_service.py, tenancy.py (gRPC edges) ->
control.py (the ControlPlane facade) -> its parts (leasing, reconcile, builds, starts,
tiers, fleet, instances; see control.py) -> plane_state.py (what they share) ->
store.py / versions.py / models.py / migrations (the metadata DB) and nodes.py (agent
clients and node views). The decisions are pure modules: placement.py (where a cold
start lands, what to evict), autoscale.py (how many instances), pressure.py
(memory-pressure levels); policy.py holds their settings, events.py the event log,
states.py the lifecycles and the one checked way to move along them. Nothing is
imported here, so the pure modules stay cheap to import.
"""
