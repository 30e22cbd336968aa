"""The Volumes gRPC service (proto/volumes.proto): chunks, volumes, storage quotas and
bundles deployed from chunks. The gateway calls it with the caller's tenant; agents
call GetBlob to materialise a volume's manifest."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import grpc

from thaw.core.bundle import limits_for
from thaw.core.errors import InvalidArgument, ThawError
from thaw.core.grpcutil import encode_error, servicer_method, status_for
from thaw.proto import scheduler_pb2, volumes_pb2, volumes_pb2_grpc
from thaw.scheduler.blobs import (
    MAX_DIGESTS_PER_CALL,
    Blobs,
    StorageUsage,
    check_bundle_size,
    check_digest,
)
from thaw.scheduler.control import ControlPlane
from thaw.scheduler.service import function_info
from thaw.scheduler.volumes import Volume, VolumeFile, Volumes

# A chunk goes to an agent in pieces of this size (as bundles do).
BLOB_PIECE_BYTES = 1024 * 1024


def volume_info(v: Volume) -> volumes_pb2.VolumeInfo:
    return volumes_pb2.VolumeInfo(tenant=v.tenant, name=v.name,
                                  manifest_digest=v.manifest_digest, size=v.size,
                                  files=v.files, created_at=v.created_at,
                                  updated_at=v.updated_at)


def file_message(f: VolumeFile) -> volumes_pb2.VolumeFile:
    return volumes_pb2.VolumeFile(path=f.path, size=f.size, mode=f.mode, chunks=f.chunks)


def storage_info(u: StorageUsage) -> volumes_pb2.StorageInfo:
    return volumes_pb2.StorageInfo(tenant=u.tenant, stored_bytes=u.stored_bytes,
                                   max_storage_bytes=u.max_storage_bytes,
                                   max_bundle_bytes=u.max_bundle_bytes)


def _limit(value: int) -> int | None:
    return None if value < 0 else value


class VolumesService(volumes_pb2_grpc.VolumesServicer):
    def __init__(self, blobs: Blobs, volumes: Volumes, control: ControlPlane) -> None:
        self.blobs = blobs
        self.store = blobs.store
        self.volumes = volumes
        self.control = control

    @servicer_method
    async def MissingBlobs(self, request: volumes_pb2.MissingBlobsRequest,
                           context: grpc.aio.ServicerContext
                           ) -> volumes_pb2.MissingBlobsResponse:
        missing = await asyncio.to_thread(self.blobs.missing, request.tenant,
                                          list(request.digests))
        return volumes_pb2.MissingBlobsResponse(digests=missing)

    @servicer_method
    async def PutBlob(self, request: volumes_pb2.PutBlobRequest,
                      context: grpc.aio.ServicerContext) -> volumes_pb2.PutBlobResponse:
        stored, total = await asyncio.to_thread(self.blobs.put, request.tenant,
                                                request.digest, request.data)
        return volumes_pb2.PutBlobResponse(digest=request.digest, size=len(request.data),
                                           stored=stored, stored_bytes=total)

    async def GetBlob(self, request: volumes_pb2.GetBlobRequest,
                      context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[volumes_pb2.BlobPiece]:
        try:
            data = await asyncio.to_thread(self.blobs.read, request.tenant, request.digest)
        except ThawError as exc:
            await context.abort(status_for(exc), encode_error(exc))
            return
        for start in range(0, len(data), BLOB_PIECE_BYTES):
            yield volumes_pb2.BlobPiece(data=data[start:start + BLOB_PIECE_BYTES])

    @servicer_method
    async def CreateVolume(self, request: volumes_pb2.VolumeRequest,
                           context: grpc.aio.ServicerContext) -> volumes_pb2.VolumeInfo:
        made = await asyncio.to_thread(self.volumes.create, request.tenant, request.name)
        return volume_info(made)

    @servicer_method
    async def ListVolumes(self, request: volumes_pb2.ListVolumesRequest,
                          context: grpc.aio.ServicerContext
                          ) -> volumes_pb2.ListVolumesResponse:
        found = await asyncio.to_thread(self.volumes.all, request.tenant)
        return volumes_pb2.ListVolumesResponse(volumes=[volume_info(v) for v in found])

    @servicer_method
    async def GetVolume(self, request: volumes_pb2.VolumeRequest,
                        context: grpc.aio.ServicerContext) -> volumes_pb2.VolumeDetail:
        volume = await asyncio.to_thread(self.volumes.get, request.tenant, request.name)
        files = await asyncio.to_thread(self.volumes.manifest, request.tenant,
                                        volume.manifest_digest)
        return volumes_pb2.VolumeDetail(info=volume_info(volume),
                                        files=[file_message(f) for f in files])

    @servicer_method
    async def CommitVolume(self, request: volumes_pb2.CommitVolumeRequest,
                           context: grpc.aio.ServicerContext) -> volumes_pb2.VolumeInfo:
        files = [VolumeFile(f.path, f.size, f.mode, tuple(f.chunks)) for f in request.files]
        made = await asyncio.to_thread(self.volumes.commit, request.tenant, request.name,
                                       files)
        return volume_info(made)

    @servicer_method
    async def DeleteVolume(self, request: volumes_pb2.VolumeRequest,
                           context: grpc.aio.ServicerContext) -> volumes_pb2.VolumeInfo:
        gone = await asyncio.to_thread(self.volumes.delete, request.tenant, request.name)
        return volume_info(gone)

    @servicer_method
    async def GetManifest(self, request: volumes_pb2.ManifestRequest,
                          context: grpc.aio.ServicerContext) -> volumes_pb2.VolumeDetail:
        files = await asyncio.to_thread(self.volumes.manifest, request.tenant,
                                        check_digest(request.digest))
        return volumes_pb2.VolumeDetail(files=[file_message(f) for f in files])

    @servicer_method
    async def GetStorage(self, request: volumes_pb2.StorageRequest,
                         context: grpc.aio.ServicerContext) -> volumes_pb2.StorageInfo:
        return storage_info(await asyncio.to_thread(self.blobs.usage, request.tenant))

    @servicer_method
    async def SetStorageQuota(self, request: volumes_pb2.SetStorageQuotaRequest,
                              context: grpc.aio.ServicerContext) -> volumes_pb2.StorageInfo:
        usage = await asyncio.to_thread(self.blobs.set_quota, request.tenant,
                                        _limit(request.max_storage_bytes),
                                        _limit(request.max_bundle_bytes))
        return storage_info(usage)

    @servicer_method
    async def CreateFunctionFromBlobs(self, request: volumes_pb2.CreateFunctionFromBlobsRequest,
                                      context: grpc.aio.ServicerContext
                                      ) -> scheduler_pb2.FunctionInfo:
        bundle = await asyncio.to_thread(self.reassemble, request)
        # Read under the tenant's limits: past the default, as large as its quota.
        deployed = await self.control.builds.deploy(request.tenant, bundle, request.wait,
                                                    request.force, limits_for(len(bundle)))
        # Its chunks are kept for a redeploy within the grace, then collected.
        await asyncio.to_thread(self.volumes.collect_chunks, request.tenant)
        info = await function_info(self.control, deployed.function)
        info.unchanged = deployed.unchanged
        return info

    def reassemble(self, request: volumes_pb2.CreateFunctionFromBlobsRequest) -> bytes:
        """The bundle's bytes from the tenant's chunks, within its max_bundle_bytes and
        checked against its sha256."""
        check_digest(request.sha256, "sha256")
        if not request.chunks or len(request.chunks) > MAX_DIGESTS_PER_CALL:
            raise InvalidArgument(f"a chunked bundle names 1 to {MAX_DIGESTS_PER_CALL} "
                                  "chunks", field="chunks")
        check_bundle_size(self.store, request.tenant, request.size)
        sizes = self.blobs.held(request.tenant, request.chunks)
        check_bundle_size(self.store, request.tenant,
                          sum(sizes.get(d, 0) for d in request.chunks))
        parts, whole = [], hashlib.sha256()
        for digest in request.chunks:
            parts.append(self.blobs.read(request.tenant, check_digest(digest, "chunks")))
            whole.update(parts[-1])
        if whole.hexdigest() != request.sha256 or sum(map(len, parts)) != request.size:
            raise InvalidArgument("the chunks do not reassemble into a bundle of that size "
                                  "and sha256", field="sha256")
        return b"".join(parts)

