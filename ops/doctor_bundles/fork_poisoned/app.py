"""A function whose module initialises CUDA when it is imported, as some libraries do.

A template that pre-imports it holds a CUDA context, which a forked child cannot use:
the platform must start its instances as fresh interpreters instead of forking them,
and must never quarantine its snapshot for it. `thaw doctor gpu` deploys it and calls
it cold.
"""

import os
from typing import Any

import torch

INITIALISED_AT_IMPORT = False
if torch.cuda.is_available():  # asks NVML in a template: initialises nothing yet
    torch.cuda.current_device()  # this does
    INITIALISED_AT_IMPORT = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]


class ForkPoisoned:
    def setup(self) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.values = torch.arange(1024, dtype=torch.float32, device=device)
        self.setup_pid = os.getpid()

    def predict(self) -> dict[str, Any]:
        return {
            "initialised_at_import": INITIALISED_AT_IMPORT,
            "sum": float(self.values.sum()),
            "device": str(self.values.device),
            "pid": os.getpid(),
            "setup_pid": self.setup_pid,
        }
