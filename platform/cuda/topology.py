"""Which GPUs share a PCIe link to host memory: the unit the activation budget counts
restores on (thaw.platform.activation) and that placement spreads them over.

A restore copies host memory to its GPU: from the root complex down through any PCIe
switches. GPUs behind one switch share that switch's uplink, so their restores share
its bandwidth; GPUs on different root ports do not. NVML gives the closest common
ancestor of every pair of GPUs (`CudaApi.topology`): a pair whose ancestor is a switch
or the board itself (up to NVML_TOPOLOGY_MULTIPLE) shares a link, and links are the
groups this relation joins (transitively: a switch above two switches is one uplink).
Without NVML, or for a pair it cannot place, GPUs are taken to have links of their own:
the budget then bounds restores per GPU, never less than what the hardware allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from thaw.platform.cuda.api import NVML_TOPOLOGY_MULTIPLE, CudaDeviceInfo, DeviceTopology


@dataclass(frozen=True, slots=True)
class PcieLink:
    """One link to host memory and the GPUs behind it."""

    id: str
    """"pcie-<PCI bus id of its first GPU>": stable across restarts and renumbering."""
    numa_node: int
    """The NUMA node of its GPUs' root (-1 unknown, or GPUs on several)."""
    devices: tuple[int, ...]
    """CUDA ordinals of its GPUs, ascending."""


def pcie_links(infos: Sequence[CudaDeviceInfo], topology: Sequence[DeviceTopology]
               ) -> list[PcieLink]:
    """Group the GPUs `infos` (CUDA ordinal order) into links by `topology` (the same
    order, or empty when unknown); the links in order of their first GPU."""
    count = len(infos)
    known = len(topology) == count and all(len(t.levels) == count for t in topology)
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if known:
        for i in range(count):
            for j in range(i + 1, count):
                level = topology[i].levels[j]
                if level is not None and level <= NVML_TOPOLOGY_MULTIPLE:
                    parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(count):
        groups.setdefault(root(i), []).append(i)
    links = []
    for members in sorted(groups.values()):
        numas = {topology[i].numa_node for i in members} if known else {-1}
        links.append(PcieLink(id=f"pcie-{normal_bus_id(infos[members[0]].pci_bus_id)}",
                              numa_node=numas.pop() if len(numas) == 1 else -1,
                              devices=tuple(members)))
    return links


def normal_bus_id(bus_id: str) -> str:
    """A PCI bus id as sysfs writes it ("0000:3b:00.0"): CUDA writes "0000:3B:00.0",
    NVML "00000000:3B:00.0"."""
    text = bus_id.strip().lower()
    domain_and_bus, _, device = text.rpartition(":")
    domain, _, bus = domain_and_bus.rpartition(":")
    if not domain or not _is_hex(domain):
        return text
    return f"{int(domain, 16):04x}:{bus}:{device}"


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True
