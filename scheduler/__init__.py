"""The control plane (DESIGN.md §8): `thaw scheduler`.

Layers, one module each: service.py (gRPC edge) -> control.py (the control plane)
-> store.py / models.py / migrations (the metadata DB) and nodes.py (agent clients
and node views). The decisions are pure modules: placement.py (where a cold start
lands, what to evict), autoscale.py (how many instances), pressure.py (memory-pressure
levels); policy.py holds their settings, events.py the event log, states.py the
lifecycles. Nothing is imported here, so the pure modules stay cheap to import.
"""
