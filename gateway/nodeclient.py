"""The gateway's client of node data planes: the invocation path's HTTP/1.1 client
(core/http1.py), shared with the node agent's hop to instances."""

from thaw.core.http1 import NodeAnswer, NodeClient, NodeConnectionError

__all__ = ["NodeAnswer", "NodeClient", "NodeConnectionError"]
