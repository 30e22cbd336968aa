"""Who answers on a unix socket. An instance's socket lies in its tenant's area, a
folder owned by the tenant's uid (platform/sandbox/areas.py), where the tenant could put
a link to another tenant's socket in its place: so a socket in a folder owned by
another user than us must be answered by a process of that very user (SO_PEERCRED),
or the connection is refused. Sockets in our own folders need no check."""

from __future__ import annotations

import os
import socket
import struct

_UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket."""
    _pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)


def check_peer(sock: socket.socket, path: str) -> None:
    """ConnectionRefusedError unless the peer's uid owns the folder of `path` (when
    that folder is not ours)."""
    owner = os.stat(os.path.dirname(path) or ".").st_uid
    if owner == os.geteuid():
        return
    uid = peer_uid(sock)
    if uid != owner:
        raise ConnectionRefusedError(
            f"{path} is answered by uid {uid}, not by the owner of its folder ({owner})")
