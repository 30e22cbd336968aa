"""Node telemetry carries each device's slices (the dashboard's packing map)."""

from __future__ import annotations

from thaw.platform.devices import DeviceUsage
from thaw.platform.server import telemetry_message
from thaw.platform.telemetry import SliceSample, Telemetry


def test_slices_reach_the_heartbeat_message_in_order() -> None:
    slices = [SliceSample("host0", "inst_a", "dev/embed", 512 << 20),
              SliceSample("host0", "inst_b", "acme/tiny", 128 << 20),
              SliceSample("host1", "inst_c", "dev/embed", 512 << 20)]
    sample = Telemetry().sample([], [DeviceUsage("host0", "host", 4 << 30, 640 << 20),
                                     DeviceUsage("host1", "host", 4 << 30, 512 << 20)], slices)
    message = telemetry_message(sample)
    assert [(s.device_id, s.instance_id, s.function, s.size_bytes) for s in message.slices] == [
        ("host0", "inst_a", "dev/embed", 512 << 20), ("host0", "inst_b", "acme/tiny", 128 << 20),
        ("host1", "inst_c", "dev/embed", 512 << 20)]
    assert [(d.id, d.used_bytes) for d in message.devices] == [("host0", 640 << 20),
                                                                ("host1", 512 << 20)]


def test_a_node_without_slices_reports_none() -> None:
    assert list(telemetry_message(Telemetry().sample([], [])).slices) == []
