"""Fixture: shows what reached the handler. `/bytes` answers the body reversed (raw
bytes both ways); anything else answers JSON describing the request."""

import os


class Probe:
    def __call__(self, request):
        if request.path == "/bytes":
            return bytes(reversed(request.body))
        return {"path": request.path, "headers": request.headers,
                "length": len(request.body), "pid": os.getpid(),
                "json": request.json() if request.headers.get("content-type", "").startswith(
                    "application/json") and request.body else None}
