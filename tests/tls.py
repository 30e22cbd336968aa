"""Certificates for tests that start a service in-process or call one directly: the
platform's PKI under a home (what `thaw up` makes) and channels presenting one of its
components' certificates."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import grpc

from thaw.core.grpcutil import channel_credentials, channel_options, secure_channel
from thaw.core.pki import PKI_FOLDER, Identity, ensure_pki, load_identity


def platform_identity(home: Path, component: str) -> Identity:
    """`component`'s identity from the PKI under `home` (made there if missing)."""
    paths = ensure_pki(home / PKI_FOLDER)
    return load_identity(component, paths.ca_cert, paths.cert(component),
                         paths.key(component))


def aio_channel(address: str, home: Path, peer: str, as_component: str = "gateway"
                ) -> grpc.aio.Channel:
    """An asyncio channel to `peer` presenting `as_component`'s certificate."""
    return secure_channel(address, platform_identity(home, as_component), peer)


def sync_channel(address: str, home: Path, peer: str, as_component: str = "gateway"
                 ) -> grpc.Channel:
    """A blocking channel to `peer` presenting `as_component`'s certificate."""
    return grpc.secure_channel(address,
                               channel_credentials(platform_identity(home, as_component)),
                               options=channel_options(peer))



def every_method() -> list[tuple[str, bool]]:
    """("/package.Service/Method", streams its answer) for every method of every gRPC
    service thaw defines, from the generated descriptors of every module in
    thaw.proto: a new service is covered without a change here."""
    import thaw.proto

    modules = [importlib.import_module(f"thaw.proto.{m.name}")
               for m in pkgutil.iter_modules(thaw.proto.__path__) if m.name.endswith("_pb2")]
    out = []
    for module in modules:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                out.append((f"/{service.full_name}/{method.name}", method.server_streaming))
    return out


def client_streaming() -> frozenset[str]:
    """The methods of every_method whose request is a stream (callers send them a
    stream of one message)."""
    import thaw.proto

    modules = [importlib.import_module(f"thaw.proto.{m.name}")
               for m in pkgutil.iter_modules(thaw.proto.__path__) if m.name.endswith("_pb2")]
    return frozenset(f"/{service.full_name}/{method.name}" for module in modules
                     for service in module.DESCRIPTOR.services_by_name.values()
                     for method in service.methods if method.client_streaming)
