"""Node telemetry: per node CPU and RAM, per instance CPU and memory (psutil), per
device slice memory and, with a GPU, utilisation (pynvml, guarded so it never fails
without one), and the pinned tier's accounting and whether its memory is page-locked.
Sampled in a thread for heartbeats; exposed as Prometheus metrics on the agent's data
plane (/metrics)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from thaw.blobstore import PinnedUsage
from thaw.platform.devices import DeviceUsage
from thaw.proto import scheduler_pb2

# PinnedTierInfo.lock values; an older agent sends "" (shown as "locked unknown").
PINNED_LOCKED = "locked"
PINNED_NOT_LOCKED = "not locked"


@dataclass(frozen=True)
class InstanceSample:
    id: str
    function: str
    pid: int
    rss_bytes: int
    uss_bytes: int
    """Memory only this instance holds: what one more warm instance costs (CoW)."""
    cpu_percent: float


@dataclass(frozen=True)
class DeviceSample:
    id: str
    kind: str
    capacity_bytes: int
    used_bytes: int
    utilization_percent: float | None
    """GPU busy percentage from NVML; None on the host backend."""


@dataclass(frozen=True)
class SliceSample:
    """One instance's device slice, for the dashboard's packing map."""

    device_id: str
    instance_id: str
    function: str
    size_bytes: int


@dataclass(frozen=True)
class NodeSample:
    cpu_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    instances: tuple[InstanceSample, ...]
    devices: tuple[DeviceSample, ...]
    slices: tuple[SliceSample, ...] = ()


def _nvml_utilisation(count: int) -> list[float | None]:
    try:
        import pynvml  # from nvidia-ml-py
    except ImportError:
        return [None] * count
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return [None] * count
    try:
        out: list[float | None] = []
        for index in range(count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                out.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            except pynvml.NVMLError:
                out.append(None)
        return out
    finally:
        pynvml.nvmlShutdown()


def pinned_tier_info(usage: PinnedUsage, snapshot_keys: list[str]
                     ) -> scheduler_pb2.PinnedTierInfo:
    """The heartbeat's view of the pinned tier: its accounting, the snapshots it holds
    whole, and whether its memory is page-locked (and why not)."""
    return scheduler_pb2.PinnedTierInfo(
        capacity_bytes=usage.capacity, used_bytes=usage.used, chunks=usage.chunks,
        hits=usage.hits, misses=usage.misses, evictions=usage.evictions,
        snapshot_keys=snapshot_keys,
        lock=PINNED_LOCKED if usage.locked else PINNED_NOT_LOCKED,
        lock_refusal=usage.lock_refusal, dead_bytes=usage.dead)


class Telemetry:
    """Keeps psutil.Process handles so CPU percentages are over the last interval."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self.latest: NodeSample | None = None
        psutil.cpu_percent(None)  # prime the node-wide counter

    def sample(self, instances: list[tuple[str, str, int]], devices: list[DeviceUsage],
               slices: list[SliceSample] | None = None) -> NodeSample:
        """instances: (id, function, pid) of the instances running now."""
        with self._lock:
            samples = []
            live = set()
            for instance_id, function, pid in instances:
                if not pid:
                    continue
                live.add(pid)
                proc = self._procs.get(pid)
                try:
                    if proc is None:
                        proc = self._procs[pid] = psutil.Process(pid)
                        proc.cpu_percent(None)
                    mem = proc.memory_full_info()
                    samples.append(InstanceSample(instance_id, function, pid, mem.rss, mem.uss,
                                                  proc.cpu_percent(None)))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            for pid in list(self._procs):
                if pid not in live:
                    del self._procs[pid]
            gpus = [d for d in devices if d.gpu]
            utilisation = iter(_nvml_utilisation(len(gpus)))
            device_samples = tuple(
                DeviceSample(d.id, d.kind, d.capacity, d.used,
                             next(utilisation) if d.gpu else None)
                for d in devices)
            vm = psutil.virtual_memory()
            self.latest = NodeSample(psutil.cpu_percent(None), vm.total - vm.available,
                                     vm.total, tuple(samples), device_samples,
                                     tuple(slices or ()))
            return self.latest


class TelemetryCollector(Collector):
    """Prometheus view of the latest sample (thaw_ prefix, _bytes/_percent units)."""

    def __init__(self, telemetry: Telemetry, node_id: str) -> None:
        self.telemetry = telemetry
        self.node_id = node_id

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.telemetry.latest
        if s is None:
            return
        node = [self.node_id]
        cpu = GaugeMetricFamily("thaw_node_cpu_percent", "Node CPU use", labels=["node"])
        cpu.add_metric(node, s.cpu_percent)
        ram = GaugeMetricFamily("thaw_node_memory_used_bytes", "Node RAM in use",
                                labels=["node"])
        ram.add_metric(node, s.memory_used_bytes)
        dev_used = GaugeMetricFamily("thaw_device_memory_used_bytes",
                                     "Slice memory allocated per device",
                                     labels=["node", "device", "kind"])
        dev_cap = GaugeMetricFamily("thaw_device_memory_capacity_bytes",
                                    "Slice memory capacity per device",
                                    labels=["node", "device", "kind"])
        dev_util = GaugeMetricFamily("thaw_device_utilization_percent",
                                     "GPU busy percentage (NVML)", labels=["node", "device"])
        for d in s.devices:
            dev_used.add_metric([self.node_id, d.id, d.kind], d.used_bytes)
            dev_cap.add_metric([self.node_id, d.id, d.kind], d.capacity_bytes)
            if d.utilization_percent is not None:
                dev_util.add_metric([self.node_id, d.id], d.utilization_percent)
        rss = GaugeMetricFamily("thaw_instance_rss_bytes", "Instance resident memory",
                                labels=["node", "instance", "function"])
        uss = GaugeMetricFamily("thaw_instance_unique_bytes",
                                "Instance memory not shared with others (USS)",
                                labels=["node", "instance", "function"])
        icpu = GaugeMetricFamily("thaw_instance_cpu_percent", "Instance CPU use",
                                 labels=["node", "instance", "function"])
        for i in s.instances:
            labels = [self.node_id, i.id, i.function]
            rss.add_metric(labels, i.rss_bytes)
            uss.add_metric(labels, i.uss_bytes)
            icpu.add_metric(labels, i.cpu_percent)
        yield from (cpu, ram, dev_used, dev_cap, dev_util, rss, uss, icpu)
