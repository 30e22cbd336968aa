"""Skip markers for the real-GPU tests: CuPy with a CUDA GPU, or torch with one."""

from __future__ import annotations

import pytest


def cupy_gpu_count() -> int:
    try:
        import cupy  # type: ignore[import-not-found]

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no CuPy, no driver, no GPU
        return 0


def torch_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


NEEDS_CUPY_GPU = [pytest.mark.gpu,
                  pytest.mark.skipif(cupy_gpu_count() == 0, reason="needs CuPy and a CUDA GPU")]
NEEDS_TORCH_GPU = [pytest.mark.gpu,
                   pytest.mark.skipif(not torch_gpu(), reason="needs a CUDA GPU (none in CI)")]
