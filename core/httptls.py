"""Mutual TLS for internal HTTP (the node's data plane, core/http1server.py and
core/http1.py): ssl contexts built once from a component's Identity (core/pki.py), and
the component a connection's certificate names.

The same rules as internal gRPC (core/grpcutil.py): only certificates of the platform's
CA are accepted, both ends present one, and a client checks the name of the component
it meant to reach (`thaw-agent`), whatever address it dialled. Which components may
call a server is the server's to say, per connection (`DATA_PLANE_CALLERS`).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

from thaw.core.pki import (
    GATEWAY,
    PKI_FOLDER,
    Identity,
    PkiPaths,
    common_name,
    component_of,
    load_identity,
)

# Only the gateway calls the data plane: invocations and function logs. The scheduler
# and other agents never do (they use the agent's gRPC port).
DATA_PLANE_CALLERS = frozenset({GATEWAY})


def _load_chain(context: ssl.SSLContext, identity: Identity) -> None:
    # ssl loads a certificate and key only from files: an anonymous memory file, so the
    # key (already in memory) is never written to a disk.
    fd = os.memfd_create("thaw-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, identity.cert + b"\n" + identity.key)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _base(purpose: ssl.Purpose, identity: Identity) -> ssl.SSLContext:
    # cadata: only the platform's CA is trusted, never the system's.
    context = ssl.create_default_context(purpose, cadata=identity.ca.decode("ascii"))
    context.minimum_version = ssl.TLSVersion.TLSv1_3  # both ends are ours
    _load_chain(context, identity)
    return context


def server_ssl_context(identity: Identity) -> ssl.SSLContext:
    """A listener's context: presents `identity`'s certificate and completes a
    handshake only with a client certificate from the platform's CA (CERT_REQUIRED);
    which component it is, is checked per connection (`peer_component`)."""
    context = _base(ssl.Purpose.CLIENT_AUTH, identity)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_ssl_context(identity: Identity) -> ssl.SSLContext:
    """A client's context: presents `identity`'s certificate and verifies the server's
    against the platform's CA and the name given as server_hostname at connect
    (`server_name(peer)`), not the address dialled."""
    context = _base(ssl.Purpose.SERVER_AUTH, identity)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_name(peer: str) -> str:
    """The name a client verifies on `peer`'s certificate (its SAN carries it)."""
    return common_name(peer)


def peer_component(transport: Any) -> str | None:
    """The component whose certificate the other end of `transport` presented; None
    without TLS, without a certificate or with a name that is no component's."""
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return component_of(str(value))
    return None


def local_client_context(home: Path, component: str = GATEWAY) -> ssl.SSLContext | None:
    """For tools beside a platform that `thaw up` started under `home` (benchmarks,
    tests): a client context presenting `component`'s certificate from `home`'s PKI;
    None when there is none (a platform under insecure_internal)."""
    paths = PkiPaths(home / PKI_FOLDER)
    if not paths.ca_cert.exists():
        return None
    return client_ssl_context(load_identity(component, paths.ca_cert, paths.cert(component),
                                            paths.key(component)))
