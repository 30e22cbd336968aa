"""Random weights of a set size, from a fixed seed, on the GPU (on the CPU without one):
what `thaw doctor gpu` restores into slices.

Each call answers a checksum of the weights as they are now and the one `setup()`
computed, where they live, and how much of them torch's own allocator holds: restored
into a slice, the weights are views of the slice's memory, so torch allocated none of
them.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Rows of this many float32 values; one tensor per 64 MiB, like a model's layers.
WIDTH = 4096
ROWS_PER_TENSOR = 4096
# Size and seed, written beside this module by `thaw doctor gpu` (64 MiB, seed 0 without).
SETTINGS = Path(__file__).resolve().parent / "doctor_settings.json"


def checksum(tensors: Sequence[torch.Tensor]) -> str:
    """Exact and cheap on the device: a position-weighted sum of the raw 32-bit words
    (no float rounding, so one flipped bit changes it)."""
    total = 0
    for index, tensor in enumerate(tensors, start=1):
        words = tensor.detach().reshape(-1).view(torch.int32).to(torch.int64)
        total += index * int(words.sum().item())
    return str(total)


class Weights:
    def setup(self) -> None:
        settings = json.loads(SETTINGS.read_text()) if SETTINGS.exists() else {}
        nbytes = int(settings.get("weight_bytes", 64 << 20))
        seed = int(settings.get("seed", 0))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        generator = torch.Generator(device=device).manual_seed(seed)
        rows = max(1, nbytes // (4 * WIDTH))
        self.weights: list[torch.Tensor] = []
        while rows > 0:
            take = min(rows, ROWS_PER_TENSOR)
            self.weights.append(torch.randn(take, WIDTH, generator=generator,
                                            device=device))
            rows -= take
        self.setup_checksum = checksum(self.weights)
        self.setup_pid = os.getpid()

    def predict(self, x: float = 1.0) -> dict[str, Any]:
        device = self.weights[0].device
        probe = torch.full((WIDTH,), float(x), device=device)
        # Computing with the weights proves the memory behind them is usable, not only
        # readable.
        output = float(sum(float((w @ probe).sum()) for w in self.weights[:2]))
        try:
            allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        except RuntimeError:  # an allocator without statistics: cannot say
            allocated = -1
        return {
            "checksum": checksum(self.weights),
            "setup_checksum": self.setup_checksum,
            "device": str(device),
            "weight_bytes": sum(w.numel() * w.element_size() for w in self.weights),
            "torch_allocated_bytes": int(allocated),
            "output": output,
            "pid": os.getpid(),
            "setup_pid": self.setup_pid,
        }
