"""Multi-GPU placement by PCIe topology (platform/cuda/topology.py, CudaDevices): a fake
NVML describes 8 GPUs behind 4 PCIe switches over 2 NUMA nodes; concurrent restores
spread over the switches, full GPUs are skipped, each instance sees only its GPU, and
the activation budget is sized from the measured bandwidth."""

from __future__ import annotations

import asyncio
import ctypes
import sys
import threading
import types
from typing import Any

import pytest

from tests.unit.test_cuda_backend import FakeCudaRuntimeError, fake_cupy
from thaw.core.errors import OutOfMemory, ThawError
from thaw.platform.activation import (
    DEFAULT_RESTORES_PER_LINK,
    ActivationBudget,
    PlacesByLink,
    activation_budget,
    slice_link,
)
from thaw.platform.cuda import (
    NVML_TOPOLOGY_HOSTBRIDGE,
    NVML_TOPOLOGY_INTERNAL,
    NVML_TOPOLOGY_MULTIPLE,
    NVML_TOPOLOGY_SINGLE,
    NVML_TOPOLOGY_SYSTEM,
    CudaDeviceInfo,
    CudaDevices,
    CudaSlice,
    CupyCudaApi,
    DeviceTopology,
    InMemoryCudaApi,
    normal_bus_id,
    pcie_links,
)

KiB = 1024
PAGE = 4 * KiB
# An HGX-like node: GPU pairs behind four PCIe switches, two switches per socket.
SWITCHES = [0, 0, 1, 1, 2, 2, 3, 3]
NUMA_NODES = [0, 0, 0, 0, 1, 1, 1, 1]
LINKS = ["pcie-0000:01:00.0", "pcie-0000:03:00.0", "pcie-0000:05:00.0", "pcie-0000:07:00.0"]


def eight_gpus(total: int = 64 * KiB, **options: Any
               ) -> tuple[CudaDevices, InMemoryCudaApi, ActivationBudget]:
    api = InMemoryCudaApi([total] * 8, switches=SWITCHES, numa_nodes=NUMA_NODES,
                          mps=options.pop("mps", False),
                          h2d_gbps=options.pop("h2d_gbps", 25.0))
    budget = ActivationBudget(options.pop("per_link", 2))
    devices = CudaDevices(api, reserve_bytes=0, instance_overhead_bytes=0, granularity=PAGE,
                          activation=budget, **options)
    return devices, api, budget


def link_of(devices: CudaDevices, sl: CudaSlice) -> str:
    return next(link.id for link in devices.links
                if int(sl.device_id.removeprefix("cuda")) in link.devices)


# ---- topology ------------------------------------------------------------------------


def test_gpus_behind_one_switch_share_a_link_and_know_their_numa_node() -> None:
    devices, api, _ = eight_gpus()
    assert [(link.id, link.numa_node, link.devices) for link in devices.links] == [
        (LINKS[0], 0, (0, 1)), (LINKS[1], 0, (2, 3)),
        (LINKS[2], 1, (4, 5)), (LINKS[3], 1, (6, 7))]
    assert api.calls_named("topology") == [("topology",)]


def test_without_nvml_every_gpu_has_a_link_of_its_own() -> None:
    api = InMemoryCudaApi([64 * KiB] * 3)  # no switches given: NVML "missing"
    devices = CudaDevices(api, reserve_bytes=0, instance_overhead_bytes=0)
    assert [(link.devices, link.numa_node) for link in devices.links] == [
        ((0,), -1), ((1,), -1), ((2,), -1)]


def infos(count: int) -> list[CudaDeviceInfo]:
    return [CudaDeviceInfo(i, "GPU", f"00000000:{i + 0x1A:02X}:00.0", f"GPU-{i}", 1)
            for i in range(count)]


def test_switches_above_switches_join_and_root_ports_stay_apart() -> None:
    m, h, i = NVML_TOPOLOGY_MULTIPLE, NVML_TOPOLOGY_HOSTBRIDGE, NVML_TOPOLOGY_INTERNAL
    # 0-1 meet at a switch above two switches; 1-2 only at the host bridge; 2 and 3
    # cannot be placed by NVML: they are kept on links of their own.
    levels = [(i, m, h, h), (m, i, h, h), (h, h, i, None), (h, h, None, i)]
    topology = [DeviceTopology(0, row) for row in levels]
    links = pcie_links(infos(4), topology)
    assert [(link.id, link.devices, link.numa_node) for link in links] == [
        ("pcie-0000:1a:00.0", (0, 1), 0), ("pcie-0000:1c:00.0", (2,), 0),
        ("pcie-0000:1d:00.0", (3,), 0)]


def test_a_link_over_two_numa_nodes_names_none() -> None:
    i = NVML_TOPOLOGY_INTERNAL
    topology = [DeviceTopology(0, (i, 10)), DeviceTopology(1, (10, i))]
    [link] = pcie_links(infos(2), topology)
    assert link.numa_node == -1


def test_a_topology_of_the_wrong_shape_counts_as_unknown() -> None:
    links = pcie_links(infos(2), [DeviceTopology(0, (0,))])
    assert [link.devices for link in links] == [(0,), (1,)]


@pytest.mark.parametrize(("given", "expected"), [
    ("00000000:3B:00.0", "0000:3b:00.0"), ("0000:3B:00.0", "0000:3b:00.0"),
    ("0000:3b:00.0", "0000:3b:00.0"), ("3b:00.0", "3b:00.0"), ("junk", "junk")])
def test_bus_ids_are_written_as_sysfs_does(given: str, expected: str) -> None:
    assert normal_bus_id(given) == expected


# ---- placement -------------------------------------------------------------------------


def test_concurrent_restores_spread_over_the_switches() -> None:
    devices, _, budget = eight_gpus()
    slices = [devices.allocate(8 * KiB, f"fn{n}", restore=True) for n in range(4)]
    assert isinstance(slices[0], CudaSlice)
    assert sorted(link_of(devices, sl) for sl in slices) == LINKS
    assert [budget.load(link) for link in LINKS] == [1, 1, 1, 1]
    # Every link has one restore now: the fifth goes by best fit (a GPU already used).
    fifth = devices.allocate(8 * KiB, "fn5", restore=True)
    assert fifth.device_id in {sl.device_id for sl in slices}
    assert sum(budget.load(link) for link in LINKS) == 5


def test_restores_placed_at_the_same_moment_from_threads_take_every_switch() -> None:
    devices, _, budget = eight_gpus()
    barrier = threading.Barrier(4)
    placed: list[CudaSlice] = []

    def start(n: int) -> None:
        barrier.wait()
        placed.append(devices.allocate(8 * KiB, f"fn{n}", restore=True))

    threads = [threading.Thread(target=start, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(link_of(devices, sl) for sl in placed) == LINKS
    assert [budget.load(link) for link in LINKS] == [1, 1, 1, 1]


def test_placement_follows_the_restores_in_flight() -> None:
    devices, _, budget = eight_gpus()
    busy = devices.allocate(8 * KiB, "busy", restore=True)
    assert link_of(devices, busy) == LINKS[0]  # all idle: best fit, lowest index

    async def admitted_then_next() -> CudaSlice:
        async with budget.admit(busy) as waited:
            assert waited == 0.0
            assert budget.load(LINKS[0]) == 1  # the hold became its admission
            nxt = devices.allocate(8 * KiB, "next", restore=True)
        return nxt

    nxt = asyncio.run(admitted_then_next())
    assert link_of(devices, nxt) == LINKS[1]
    assert budget.load(LINKS[0]) == 0
    # With no restore in flight there, LINKS[0]'s half-used GPU is the best fit again.
    devices.release(nxt.id)
    assert devices.allocate(8 * KiB, "again", restore=True).device_id == busy.device_id


def test_a_start_that_is_not_a_restore_counts_on_no_link() -> None:
    devices, _, budget = eight_gpus()
    devices.allocate(8 * KiB, "fresh")
    assert [budget.load(link) for link in LINKS] == [0, 0, 0, 0]


def test_a_full_gpu_is_skipped_even_on_the_idlest_link() -> None:
    devices, _, budget = eight_gpus(total=16 * KiB)
    for n, link in enumerate(LINKS[1:]):
        budget.hold(link, f"elsewhere{n}")  # restores in flight on the other links
    devices.allocate(16 * KiB, "fills-cuda0")
    sl = devices.allocate(8 * KiB, "a", restore=True)
    assert sl.device_id == "cuda1"  # the idle link's other GPU, not the full cuda0
    devices.allocate(8 * KiB, "b")  # cuda1 has 8 KiB left: LINKS[0] is full now
    other = devices.allocate(16 * KiB, "c", restore=True)
    assert link_of(devices, other) != LINKS[0]


def test_a_released_or_failed_slice_stops_counting() -> None:
    devices, api, budget = eight_gpus()
    sl = devices.allocate(8 * KiB, "a", restore=True)
    devices.release(sl.id)
    assert budget.load(LINKS[0]) == 0
    api.fail_next("ipc_handle", ThawError("fake: export failed"))
    with pytest.raises(ThawError, match="export failed"):
        devices.allocate(8 * KiB, "b", restore=True)
    assert [budget.load(link) for link in LINKS] == [0, 0, 0, 0]


def test_a_refusal_moves_the_hold_to_the_gpu_that_takes_the_slice() -> None:
    devices, api, budget = eight_gpus(total=32 * KiB)
    api.malloc(0, 28 * KiB)  # cuda0 is taken behind the books' back
    sl = devices.allocate(16 * KiB, "a", restore=True)
    assert sl.device_id == "cuda1"  # same link (still the idlest), the driver said no
    assert budget.load(LINKS[0]) == 1 and sum(budget.load(li) for li in LINKS) == 1


def test_no_room_anywhere_is_out_of_memory_with_no_hold_left() -> None:
    devices, _, budget = eight_gpus(total=8 * KiB)
    with pytest.raises(OutOfMemory):
        devices.allocate(16 * KiB, "big", restore=True)
    assert sum(budget.load(link) for link in LINKS) == 0


# ---- what each instance gets -------------------------------------------------------------


def test_each_instance_sees_only_its_gpu_as_ordinal_zero() -> None:
    devices, _, _ = eight_gpus()
    slices = [devices.allocate(8 * KiB, f"fn{n}", restore=True) for n in range(3)]
    for sl in slices:
        assert isinstance(sl, CudaSlice)
        assert sl.instance_env() == {"CUDA_VISIBLE_DEVICES": sl.device_uuid}
        descriptor = sl.descriptor()
        assert descriptor["device_index"] == 0
        assert descriptor["pci_bus_id"] == sl.pci_bus_id
        assert slice_link(sl) == sl.pcie_link == link_of(devices, sl)
    assert len({sl.device_uuid for sl in slices}) == 3
    assert {sl.numa_node for sl in slices} == {0, 1}


def test_mps_adds_the_compute_share_to_the_instance_environment() -> None:
    with_mps, _, _ = eight_gpus(mps=True)
    sl = with_mps.allocate(8 * KiB, "fn", compute_percent=25)
    assert sl.instance_env() == {"CUDA_VISIBLE_DEVICES": sl.device_uuid,
                                 "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"}
    assert with_mps.compute_shares_enforced()
    without, _, _ = eight_gpus(mps=False)
    plain = without.allocate(8 * KiB, "fn", compute_percent=25)
    assert plain.instance_env() == {"CUDA_VISIBLE_DEVICES": plain.device_uuid}
    assert not without.compute_shares_enforced()


# ---- sizing the budget --------------------------------------------------------------------


@pytest.mark.parametrize(("gbps", "configured", "expected"), [
    (25.0, 0, 4), (53.0, 0, 8), (53.0, 3, 3)])
def test_the_budget_is_derived_from_the_measured_bandwidth_unless_configured(
        gbps: float, configured: int, expected: int) -> None:
    devices, api, budget = eight_gpus(h2d_gbps=gbps)
    assert isinstance(devices, PlacesByLink)
    assert activation_budget(devices, configured) is budget
    assert budget.per_link == expected
    measured = api.calls_named("h2d_gbps")
    assert [call[1] for call in measured] == ([] if configured else [0, 2, 4, 6])


def test_a_failed_measurement_falls_back_to_the_default() -> None:
    devices, api, budget = eight_gpus()
    for _ in LINKS:
        api.fail_next("h2d_gbps", ThawError("fake: no pinned memory"))
    assert devices.measure_h2d_gbps() is None
    assert activation_budget(devices).per_link == DEFAULT_RESTORES_PER_LINK


# ---- threads -------------------------------------------------------------------------------


def test_allocation_from_many_threads_keeps_the_books() -> None:
    devices, _, budget = eight_gpus(total=64 * KiB)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        try:
            barrier.wait()
            for round_ in range(10):
                sl = devices.allocate(4 * KiB, f"w{n}-{round_}", restore=True)
                devices.release(sl.id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [u.used for u in devices.usage()] == [0] * 8
    assert sum(budget.load(link) for link in LINKS) == 0


# ---- the real adapter over stand-in CuPy and pynvml modules --------------------------------

BUSES = ["0000:1A:00.0", "0000:1B:00.0", "0000:3D:00.0", "0000:3E:00.0"]


class NVMLError(Exception):
    pass


def fake_nvml(levels: dict[frozenset[int], int], numa: dict[int, int] | None) -> Any:
    """pynvml with a GPU per bus in BUSES: common ancestors from `levels` (a missing pair
    raises NVMLError, as NOT_SUPPORTED does); NUMA nodes from `numa`, or no such call."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = NVMLError  # type: ignore[attr-defined]
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByPciBusId = BUSES.index  # type: ignore[attr-defined]

    def ancestor(a: int, b: int) -> int:
        found = levels.get(frozenset((a, b)))
        if found is None:
            raise NVMLError("Not Supported")
        return found

    nvml.nvmlDeviceGetTopologyCommonAncestor = ancestor  # type: ignore[attr-defined]
    if numa is not None:
        nvml.nvmlDeviceGetNumaNodeId = numa.__getitem__  # type: ignore[attr-defined]
    return nvml


def test_the_cupy_adapter_reads_the_topology_from_nvml(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(
        lambda: 4, deviceGetPCIBusId=BUSES.__getitem__))
    single, system = NVML_TOPOLOGY_SINGLE, NVML_TOPOLOGY_SYSTEM
    levels = {frozenset((0, 1)): single, frozenset((2, 3)): single,
              frozenset((0, 2)): system, frozenset((0, 3)): system,
              frozenset((1, 2)): system}  # (1, 3): NVML cannot say
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(levels, {0: 0, 1: 0, 2: 1, 3: 1}))
    topology = CupyCudaApi().topology()
    assert [t.numa_node for t in topology] == [0, 0, 1, 1]
    assert topology[0].levels == (NVML_TOPOLOGY_INTERNAL, single, system, system)
    assert topology[1].levels == (single, NVML_TOPOLOGY_INTERNAL, system, None)
    links = pcie_links([CudaDeviceInfo(i, "GPU", bus, f"GPU-{i}", 1)
                        for i, bus in enumerate(BUSES)], topology)
    assert [(link.id, link.devices, link.numa_node) for link in links] == [
        ("pcie-0000:1a:00.0", (0, 1), 0), ("pcie-0000:3d:00.0", (2, 3), 1)]


def test_without_nvml_numa_calls_or_nvml_the_adapter_says_unknown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Bus ids no machine has: the kernel's numa_node file is not there either.
    buses = ["0000:ff:1f.6", "0000:ff:1f.7"]
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(
        lambda: 2, deviceGetPCIBusId=buses.__getitem__))
    nvml = fake_nvml({frozenset((0, 1)): NVML_TOPOLOGY_SINGLE}, numa=None)
    nvml.nvmlDeviceGetHandleByPciBusId = buses.index
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert [t.numa_node for t in CupyCudaApi().topology()] == [-1, -1]
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no pynvml at all
    assert CupyCudaApi().topology() == []


def test_the_cupy_adapter_times_copies_from_page_locked_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    host = ctypes.create_string_buffer(64 * KiB)
    calls: list[tuple[Any, ...]] = []

    def record(name: str, result: Any = None) -> Any:
        def call(*args: Any) -> Any:
            calls.append((name, *args))
            return result
        return call

    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(
        lambda: 2, hostAlloc=record("hostAlloc", ctypes.addressof(host)),
        malloc=record("malloc", 0xD000), streamCreateWithFlags=record("stream", 5),
        memcpyAsync=record("memcpy"), streamSynchronize=record("sync"),
        streamDestroy=record("destroy"), free=record("free"), freeHost=record("freeHost")))
    gbps = CupyCudaApi().h2d_gbps(1, 64 * KiB)
    assert gbps > 0
    assert calls[0] == ("hostAlloc", 64 * KiB, 0)
    copies = [c for c in calls if c[0] == "memcpy"]
    assert len(copies) == 3 and copies[0][1:] == (0xD000, ctypes.addressof(host), 64 * KiB,
                                                  1, 5)
    assert [c[0] for c in calls[-3:]] == ["destroy", "free", "freeHost"]
    assert host.raw[:4] == b"\x01" * 4  # the source was touched before timing


def test_a_failed_measurement_gives_everything_back(monkeypatch: pytest.MonkeyPatch) -> None:
    host = ctypes.create_string_buffer(4 * KiB)
    freed: list[str] = []

    def fail(*args: Any) -> None:
        raise FakeCudaRuntimeError(700)

    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(
        lambda: 1, hostAlloc=lambda *a: ctypes.addressof(host), malloc=lambda n: 0xD000,
        streamCreateWithFlags=lambda flags: 5, memcpyAsync=fail,
        streamDestroy=lambda s: freed.append("stream"), free=lambda p: freed.append("device"),
        freeHost=lambda p: freed.append("host")))
    with pytest.raises(ThawError, match="measuring host-to-device copies"):
        CupyCudaApi().h2d_gbps(0, 4 * KiB)
    assert freed == ["stream", "device", "host"]
