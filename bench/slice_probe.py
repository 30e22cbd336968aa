"""Look into a cuda slice from another process, as an instance would.

CUDA refuses to open an IPC handle in the process that exported it, so whoever holds a
`CudaDevices` (the GPU restore benchmark, `thaw doctor gpu`) checks a slice's contents
by handing its descriptor to a child process that opens it with the in-instance
runtime's `open_slice` and reports a digest of its bytes, how many are non-zero, and
optionally fills it with a byte (a tenant writing its memory).

`SubprocessSliceProbe` is that child (`python -m thaw.bench.slice_probe REQUEST`);
`InMemorySliceProbe` does the same against the in-memory CUDA fake for tests.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from thaw.core.errors import ThawError
from thaw.platform.cuda import CudaSliceDescriptor, InMemoryCudaApi

# A child's interpreter start, CuPy import and CUDA context creation: seconds, not
# minutes; a 2 GiB digest adds about one more.
PROBE_TIMEOUT_S = 120.0

# Slice bytes copied to host memory per step while hashing: bounded, whatever the slice.
READ_STEP = 256 << 20


@dataclass(frozen=True, slots=True)
class ProbeRequest:
    """What the child does with the slice, in this order: hash, count, fill."""

    digest_bytes: int = 0
    """SHA-256 of the slice's first this many bytes (0: none)."""
    count_nonzero: bool = False
    """Count the slice's non-zero bytes (all of it, padding included)."""
    fill: int | None = None
    """Then write this byte value over the whole slice."""


@dataclass(frozen=True, slots=True)
class ProbeReport:
    sha256: str
    """Of the first `digest_bytes` bytes; empty when none were asked."""
    nonzero: int
    """Non-zero bytes in the slice; -1 when not asked."""
    open_s: float
    """Seconds `open_slice` took in the child (CUDA context creation included)."""


class SliceProbe(Protocol):
    def __call__(self, descriptor: CudaSliceDescriptor, request: ProbeRequest
                 ) -> ProbeReport:
        """Open the slice elsewhere and do `request`; ThawError if it cannot."""
        ...


class SubprocessSliceProbe:
    """Runs the probe in a fresh interpreter: a real second process, as an instance is."""

    def __init__(self, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self._timeout = timeout_s

    def __call__(self, descriptor: CudaSliceDescriptor, request: ProbeRequest
                 ) -> ProbeReport:
        message = json.dumps({"slice": dict(descriptor), "request": asdict(request)})
        try:
            done = subprocess.run([sys.executable, "-m", "thaw.bench.slice_probe", message],
                                  capture_output=True, text=True, timeout=self._timeout)
        except subprocess.TimeoutExpired as exc:
            raise ThawError(f"the slice probe did not finish within {self._timeout:.0f}s"
                            ) from exc
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ThawError(f"the slice probe failed (exit {done.returncode}): {tail}")
        lines = done.stdout.strip().splitlines()
        try:
            found: dict[str, Any] = json.loads(lines[-1])
            return ProbeReport(sha256=str(found["sha256"]), nonzero=int(found["nonzero"]),
                               open_s=float(found["open_s"]))
        except (IndexError, ValueError, KeyError, TypeError) as exc:
            raise ThawError(f"the slice probe printed no report: {done.stdout[-200:]!r}"
                            ) from exc


class InMemorySliceProbe:
    """The probe against `InMemoryCudaApi`: opens the handle through the fake, as a
    second process would through the driver."""

    def __init__(self, api: InMemoryCudaApi) -> None:
        self._api = api

    def __call__(self, descriptor: CudaSliceDescriptor, request: ProbeRequest
                 ) -> ProbeReport:
        started = time.perf_counter()
        ptr = self._api.open_handle(bytes.fromhex(descriptor["ipc_handle"]))
        open_s = time.perf_counter() - started
        size = descriptor["size"]  # what open_slice views, as in the real child
        sha = (hashlib.sha256(self._api.read(ptr, 0, request.digest_bytes)).hexdigest()
               if request.digest_bytes else "")
        nonzero = -1
        if request.count_nonzero:
            whole = self._api.read(ptr, 0, size)
            nonzero = len(whole) - whole.count(0)
        if request.fill is not None:
            self._api.write(ptr, 0, bytes([request.fill]) * size)
        return ProbeReport(sha256=sha, nonzero=nonzero, open_s=open_s)


def _probe_here(descriptor: dict[str, Any], request: ProbeRequest) -> ProbeReport:
    """The child's side: needs CuPy and a GPU."""
    import cupy  # type: ignore[import-not-found, unused-ignore]

    from thaw.platform.cuda_copy import open_slice

    started = time.perf_counter()
    opened = open_slice(**descriptor)
    open_s = time.perf_counter() - started
    whole = opened.array()
    sha = ""
    if request.digest_bytes:
        digest = hashlib.sha256()
        for at in range(0, request.digest_bytes, READ_STEP):
            digest.update(whole[at:min(at + READ_STEP, request.digest_bytes)].get().tobytes())
        sha = digest.hexdigest()
    nonzero = int(cupy.count_nonzero(whole)) if request.count_nonzero else -1
    if request.fill is not None:
        whole.fill(request.fill)
        cupy.cuda.runtime.deviceSynchronize()
    return ProbeReport(sha256=sha, nonzero=nonzero, open_s=open_s)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m thaw.bench.slice_probe REQUEST_JSON", file=sys.stderr)
        return 2
    message = json.loads(argv[0])
    report = _probe_here(message["slice"], ProbeRequest(**message["request"]))
    print(json.dumps(asdict(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
