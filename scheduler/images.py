"""Image archives (`docker save`) of image functions, content-addressed on the
scheduler's disk by their image id, and the gRPC service over them.

An upload is streamed to a temporary file beside the store (never held in memory),
bounded by the size it declared and the most it may be; then the archive is read
(core/image_archive.py: its one image, the config hashed against the digest the
manifest names) and kept only when its image id is the one the upload claimed. So
a stored `<hex>.tar` always holds image `sha256:<hex>`, and a node that loads it gets
the image its function is pinned to (the node checks the loaded id again). An
archive already stored is kept as it is; the new copy is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import grpc
import structlog

from thaw.core.errors import InvalidArgument, NotFound, ThawError
from thaw.core.grpcutil import encode_error, servicer_method, status_for
from thaw.core.image_archive import image_hex, read_image
from thaw.core.units import format_size
from thaw.proto import images_pb2, images_pb2_grpc

log = structlog.get_logger()

# A node reads a stored archive in pieces of this size (gRPC messages stay far below
# the 4 MiB default limit).
FETCH_PIECE_BYTES = 1024 * 1024


class ArchiveTooLarge(InvalidArgument):
    """An image archive past the most its upload may be; the message names the limit."""


class ImageStore:
    """`<root>/<hex>.tar`: the archive of image sha256:<hex>, checked before kept;
    `<root>/owners/<hex>/<tenant>`: the tenants that uploaded it. One copy serves
    every tenant, but a tenant learns only of the archives it uploaded itself (an
    image id says nothing of another tenant's images)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "owners").mkdir(parents=True, exist_ok=True)

    def path(self, image_id: str) -> Path:
        return self.root / f"{image_hex(image_id)}.tar"

    def _owner(self, image_id: str, tenant: str) -> Path:
        return self.root / "owners" / image_hex(image_id) / tenant

    def size(self, image_id: str, tenant: str) -> int | None:
        """The stored archive's bytes, if `tenant` uploaded it; None else."""
        if not tenant or "/" in tenant or tenant.startswith("."):
            raise InvalidArgument(f"not a tenant: {tenant!r}", field="tenant")
        if not self._owner(image_id, tenant).exists():
            return None
        try:
            return self.path(image_id).stat().st_size
        except FileNotFoundError:
            return None

    def own(self, image_id: str, tenant: str) -> None:
        """Record that `tenant` uploaded the (stored) archive of `image_id`."""
        if not tenant or "/" in tenant or tenant.startswith("."):
            raise InvalidArgument(f"not a tenant: {tenant!r}", field="tenant")
        owner = self._owner(image_id, tenant)
        owner.parent.mkdir(exist_ok=True)
        owner.touch()

    def open(self, image_id: str) -> IO[bytes]:
        try:
            return open(self.path(image_id), "rb")
        except FileNotFoundError as exc:
            raise NotFound(f"no image archive {image_id} on the scheduler (upload it with "
                           "`thaw deploy image.tar`)", field="image_id") from exc

    def new_upload(self) -> tuple[IO[bytes], Path]:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-", suffix=".tar")
        return os.fdopen(fd, "wb"), Path(tmp)

    def commit(self, tmp: Path, image_id: str) -> bool:
        """Check the uploaded file holds `image_id` and keep it; False when that
        archive was stored already (the upload is dropped). Blocking: a thread's."""
        try:
            held = read_image(tmp).image_id
            if held != image_id:
                raise InvalidArgument(f"the archive holds image {held}, not the {image_id} "
                                      "it was uploaded as", field="image_id")
            target = self.path(image_id)
            if target.exists():
                return False
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def remove(self, image_id: str) -> bool:
        try:
            self.path(image_id).unlink()
            return True
        except FileNotFoundError:
            return False


async def receive(store: ImageStore, pieces: AsyncIterator[images_pb2.ImageUploadPiece]
                  ) -> images_pb2.ImageStored:
    """An upload stream into the store: the first piece's header, every piece's data
    written off the event loop, the bounds checked as the bytes arrive."""
    handle, tmp = await asyncio.to_thread(store.new_upload)
    image_id, tenant, declared, limit, received = "", "", 0, 0, 0
    try:
        with handle:
            async for piece in pieces:
                if not image_id:
                    image_id, tenant = piece.image_id, piece.tenant
                    declared, limit = piece.size, piece.max_bytes
                    image_hex(image_id)
                    if limit and declared > limit:
                        raise too_large(limit)
                received += len(piece.data)
                if (limit and received > limit) or received > declared:
                    raise too_large(limit) if limit and received > limit else \
                        InvalidArgument(f"the archive is longer than the {declared} bytes "
                                        "its upload declared", field="archive")
                if piece.data:
                    await asyncio.to_thread(handle.write, piece.data)
        if not image_id:
            raise InvalidArgument("an upload names its image id", field="image_id")
        if received != declared:
            raise InvalidArgument(f"the archive ended after {received} of the {declared} "
                                  "bytes its upload declared", field="archive")
        stored = await asyncio.to_thread(store.commit, tmp, image_id)
        await asyncio.to_thread(store.own, image_id, tenant)
    finally:
        await asyncio.to_thread(_unlink, tmp)
    log.info("image archive stored" if stored else "image archive already stored",
             image_id=image_id, bytes=received)
    return images_pb2.ImageStored(image_id=image_id, size=received, existed=not stored)


def too_large(limit: int) -> ArchiveTooLarge:
    return ArchiveTooLarge(f"the image archive is larger than {format_size(limit)} (the "
                           "gateway's max_image_archive_bytes)", field="archive")


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class ImagesService(images_pb2_grpc.ImagesServicer):
    """Upload and Lookup for the gateway, Fetch for agents (core/pki.py CALLERS)."""

    def __init__(self, store: ImageStore) -> None:
        self.store = store

    @servicer_method
    async def Upload(self, request_iterator: AsyncIterator[images_pb2.ImageUploadPiece],
                     context: grpc.aio.ServicerContext) -> images_pb2.ImageStored:
        return await receive(self.store, request_iterator)

    @servicer_method
    async def Lookup(self, request: images_pb2.ImageRequest,
                     context: grpc.aio.ServicerContext) -> images_pb2.ImageInfo:
        size = await asyncio.to_thread(self.store.size, request.image_id, request.tenant)
        return images_pb2.ImageInfo(image_id=request.image_id, size=size or 0,
                                    stored=size is not None)

    async def Fetch(self, request: images_pb2.ImageRequest,
                    context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[images_pb2.ImagePiece]:
        try:
            handle = await asyncio.to_thread(self.store.open, request.image_id)
        except ThawError as exc:
            await context.abort(status_for(exc), encode_error(exc))
            return
        with handle:
            while piece := await asyncio.to_thread(handle.read, FETCH_PIECE_BYTES):
                yield images_pb2.ImagePiece(data=piece)


__all__ = ["ArchiveTooLarge", "ImageStore", "ImagesService", "receive"]
