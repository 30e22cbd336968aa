"""What the sync and async clients share beside HTTP: bundles packed and sent in
chunks, answers decoded, stored-invocation headers."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from thaw.client.errors import ThawError

# Deploys wait for the snapshot build; a large model's setup() can take minutes.
DEPLOY_TIMEOUT = 1800.0
# A result request is held by the gateway up to the wait it asked for (at most its
# sync_wait_seconds, 3600 at most): the client waits this much longer for the answer.
RESULT_GRACE = 30.0
RESULT_REQUEST_TIMEOUT = 3600.0 + RESULT_GRACE
ASYNC_HEADERS = {"Prefer": "respond-async"}
# At most the gateway's and scheduler's MAX_CHUNK_BYTES: one chunk, one request.
CHUNK_BYTES = 8 * 1024 * 1024
# Digests per "missing" question: at most the scheduler's MAX_DIGESTS_PER_CALL.
MISSING_BATCH = 1024


def stream_headers() -> dict[str, str]:
    return {"Accept": "text/event-stream"}


def wait_header(seconds: float | None) -> dict[str, str]:
    """Prefer: wait=N for a result request (none: the gateway's own wait limit)."""
    return {} if seconds is None else {"Prefer": f"wait={math.ceil(seconds)}"}


def result_timeout(seconds: float | None) -> float:
    return RESULT_REQUEST_TIMEOUT if seconds is None else seconds + RESULT_GRACE


def decoded(resp: httpx.Response) -> Any:
    """A function's answer: parsed JSON, else text for text/*, else the bytes."""
    kind = resp.headers.get("Content-Type", "")
    if "json" in kind:
        return resp.json()
    if kind.startswith("text/"):
        return resp.text
    return resp.content


def accepted_id(resp: httpx.Response) -> str:
    """The id of a call queued with Prefer: respond-async (202)."""
    if resp.status_code != 202:
        raise ThawError(f"the gateway ran the call instead of queueing it (answered "
                        f"{resp.status_code})", code="not_queued")
    return str(resp.json()["id"])


def pack(folder: Path, storage: Callable[[], dict[str, Any]]) -> bytes:
    """The bundle folder packed as `thaw deploy` packs it and checked (thaw.toml, the
    bundle limits) before anything is sent. Past the single-request cap it is packed
    under the tenant's max_bundle_bytes (`storage()` is GET /v1/storage)."""
    from thaw.core.bundle import limits_for
    from thaw.core.errors import BundleTooLarge, InvalidArgument
    from thaw.core.spec import pack_bundle, read_bundle

    if not (folder / "thaw.toml").is_file():
        raise InvalidArgument(f"{folder} has no thaw.toml (a bundle folder needs one)",
                              field="path")
    try:
        data = pack_bundle(str(folder))
        read_bundle(data)
        return data
    except BundleTooLarge:
        limits = limits_for(int(storage()["max_bundle_bytes"]))
        data = pack_bundle(str(folder), limits)
        read_bundle(data, limits)
        return data


@dataclass(frozen=True)
class Chunk:
    digest: str
    data: bytes


@dataclass
class ChunkedDeploy:
    """A bundle past the single-request cap, deployed as content-addressed chunks:
    ask which the tenant lacks (POST /v1/blobs/missing), send those (PUT
    /v1/blobs/{sha256}), then POST /v1/functions/chunked (docs/volumes.md)."""

    bundle: bytes
    force: bool
    wait: bool
    chunks: list[Chunk]
    missing: list[Chunk] = field(default_factory=list)

    @classmethod
    def of(cls, bundle: bytes, *, force: bool, wait: bool) -> ChunkedDeploy | None:
        from thaw.core.bundle import MAX_BUNDLE_BYTES

        if len(bundle) <= MAX_BUNDLE_BYTES:
            return None
        chunks = [Chunk(hashlib.sha256(bundle[i:i + CHUNK_BYTES]).hexdigest(),
                        bundle[i:i + CHUNK_BYTES])
                  for i in range(0, len(bundle), CHUNK_BYTES)]
        return cls(bundle, force, wait, chunks)

    def _unique(self) -> list[Chunk]:
        return list({c.digest: c for c in self.chunks}.values())

    def questions(self) -> Iterator[dict[str, list[str]]]:
        unique = self._unique()
        for start in range(0, len(unique), MISSING_BATCH):
            yield {"digests": [c.digest for c in unique[start:start + MISSING_BATCH]]}

    def lacking(self, answer: dict[str, Any]) -> None:
        wanted = set(answer["missing"])
        self.missing += [c for c in self._unique() if c.digest in wanted
                         and c not in self.missing]

    def commit(self) -> tuple[str, str, dict[str, Any]]:
        return "POST", "/v1/functions/chunked", {
            "params": {"wait": str(self.wait).lower(), "force": str(self.force).lower()},
            "json": {"chunks": [c.digest for c in self.chunks],
                     "sha256": hashlib.sha256(self.bundle).hexdigest(),
                     "size": len(self.bundle)},
            "timeout": DEPLOY_TIMEOUT}
