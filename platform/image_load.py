"""An image function's image, loaded into this node's engine from the archive
`thaw deploy image.tar` stored at the scheduler (scheduler/images.py).

The docker runtime asks for it when it would start a container of an image its
engine lacks (a build, a template, a fresh start): the archive is streamed from the
scheduler into a temporary file in the agent's home, read again here (its config
must hash to the pinned id: core/image_archive.py), `docker load`ed off the event
loop, and the temporary file removed. The engine's answer is checked too: an
archive that loads as another image is refused, so a container never runs anything
but the image its function is pinned to. Concurrent starts of one image share one
load; nothing is pulled from a registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import grpc
import structlog

from thaw.core.config import AgentConfig
from thaw.core.errors import ImageNotOnNode, InstanceFailed, NotFound, ThawError
from thaw.core.grpcutil import decode_error, secure_channel
from thaw.core.image_archive import image_hex, read_image
from thaw.core.pki import AGENT, SCHEDULER, internal_identity
from thaw.proto import images_pb2, images_pb2_grpc

log = structlog.get_logger()

# An archive of several GiB streams for minutes; past this the fetch is given up.
FETCH_TIMEOUT_SECONDS = 3600.0


class ArchiveSource(Protocol):
    """Where archives come from: the scheduler, or a test's stand-in."""

    def fetch(self, image_id: str) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class SchedulerArchives:
    """Archives from the scheduler's Images service, over the agent's mutual TLS
    (a channel of its own, opened at the first fetch)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._channel: grpc.aio.Channel | None = None

    async def fetch(self, image_id: str) -> AsyncIterator[bytes]:
        if self._channel is None:
            tls = internal_identity(self.config, AGENT)
            self._channel = secure_channel(self.config.scheduler_address, tls, SCHEDULER)
        stub = images_pb2_grpc.ImagesStub(self._channel)
        rpc = stub.Fetch(images_pb2.ImageRequest(image_id=image_id),
                         timeout=FETCH_TIMEOUT_SECONDS)
        try:
            async for piece in rpc:
                yield piece.data
        except grpc.RpcError as exc:
            raise decode_error(exc) from exc
        finally:
            rpc.cancel()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class ImageLoader:
    """Loads missing images into one engine (`client`, a docker.DockerClient) from an
    ArchiveSource. `run` runs a blocking call off the event loop (the runtime's own
    bounded pool)."""

    def __init__(self, client: Any, source: ArchiveSource, tmp_dir: Path,
                 run: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        self.client = client
        self.source = source
        self.tmp_dir = tmp_dir
        self._run = run
        self._loads: dict[str, asyncio.Lock] = {}

    async def _blocking(self, call: Callable[[], Any]) -> Any:
        if self._run is not None:
            return await self._run(call)
        return await asyncio.to_thread(call)

    def has(self, image_id: str) -> bool:
        """Whether the engine has the image (blocking)."""
        import docker.errors

        try:
            self.client.images.get(image_id)
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.DockerException as exc:
            raise InstanceFailed(f"docker engine: {exc}") from exc
        return True

    async def ensure(self, image_id: str, reference: str, node_id: str) -> bool:
        """Load `image_id` unless the engine has it; True when it was loaded. Raises
        ImageNotOnNode when the scheduler has no archive of it (the image was never
        uploaded), InstanceFailed when the archive is not that image."""
        image_hex(image_id)
        lock = self._loads.setdefault(image_id, asyncio.Lock())
        async with lock:
            if await self._blocking(lambda: self.has(image_id)):
                return False
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.tmp_dir / f".load-{image_hex(image_id)[:16]}-{uuid.uuid4().hex[:8]}.tar"
            try:
                size = await self._download(image_id, reference, node_id, tmp)
                await asyncio.to_thread(self._check_archive, tmp, image_id, reference)
                await self._blocking(lambda: self._load(tmp, image_id, reference))
            finally:
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread(tmp.unlink)
            log.info("image loaded from the scheduler's archive", image=reference,
                     node=node_id, bytes=size)
            return True

    async def _download(self, image_id: str, reference: str, node_id: str,
                        tmp: Path) -> int:
        size = 0
        with open(tmp, "wb") as handle:
            try:
                async for piece in self.source.fetch(image_id):
                    await asyncio.to_thread(handle.write, piece)
                    size += len(piece)
            except NotFound as exc:
                raise ImageNotOnNode(
                    f"image {reference} is not on node {node_id}'s docker engine "
                    "(nothing is pulled: `docker load` it there)") from exc
            except ThawError as exc:
                raise InstanceFailed(f"fetching image {reference}'s archive from the "
                                     f"scheduler: {exc.message}") from exc
        return size

    @staticmethod
    def _check_archive(tmp: Path, image_id: str, reference: str) -> None:
        try:
            held = read_image(tmp).image_id
        except ThawError as exc:
            raise InstanceFailed(f"the archive of image {reference} is not loadable: "
                                 f"{exc.message}") from exc
        if held != image_id:
            raise InstanceFailed(f"the archive of image {reference} holds {held}, not the "
                                 "pinned id: refused")

    def _load(self, tmp: Path, image_id: str, reference: str) -> None:
        import docker.errors

        try:
            with open(tmp, "rb") as handle:
                loaded = self.client.images.load(handle)
        except docker.errors.DockerException as exc:
            raise InstanceFailed(f"docker load of image {reference}: {exc}") from exc
        ids = {str(image.id) for image in loaded}
        if image_id not in ids:
            raise InstanceFailed(
                f"docker load of image {reference}'s archive gave "
                f"{', '.join(sorted(ids)) or 'no image'}, not the pinned {image_id}: "
                "refused")

    async def close(self) -> None:
        await self.source.close()


def loader_for(config: AgentConfig, client: Any, home: Path,
               run: Callable[[Callable[[], Any]], Any] | None = None) -> ImageLoader:
    """The agent's loader: archives from its scheduler, temporary files under `home`
    (those a killed agent left there are removed: only this node's agent loads)."""
    loader = ImageLoader(client, SchedulerArchives(config), home / "image-loads", run)
    for leftover in loader.tmp_dir.glob(".load-*.tar"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    return loader


__all__ = ["ArchiveSource", "ImageLoader", "SchedulerArchives", "loader_for"]
