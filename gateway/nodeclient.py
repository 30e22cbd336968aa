"""The gateway's client of node data planes: the invocation path's HTTP/1.1 client
(core/http1.py), shared with the node agent's hop to instances, speaking mutual TLS
to the agents (core/httptls.py) with the gateway's certificate."""

from __future__ import annotations

from thaw.core.http1 import CONNECT_TIMEOUT_SECONDS, NodeAnswer, NodeClient, NodeConnectionError
from thaw.core.httptls import client_ssl_context, server_name
from thaw.core.pki import AGENT, Identity

__all__ = ["NodeAnswer", "NodeClient", "NodeConnectionError", "node_client"]


def node_client(tls: Identity | None,
                connect_timeout: float = CONNECT_TIMEOUT_SECONDS) -> NodeClient:
    """A client of the agents' data planes presenting `tls` (the gateway's identity)
    and accepting only an agent's certificate from the platform's CA, over https://
    data URLs; `tls` None: plaintext http://, the development opt-out. The ssl context
    is made here once; every kept connection shares it."""
    if tls is None:
        return NodeClient(connect_timeout)
    return NodeClient(connect_timeout, tls=client_ssl_context(tls),
                      server_hostname=server_name(AGENT))
