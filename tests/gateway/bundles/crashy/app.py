"""Fixture: `/crash` kills the instance mid-call (the node answers 502); anything else
answers {"ok": true}."""

import os


class Crashy:
    def __call__(self, request):
        if request.path == "/crash":
            os._exit(3)
        return {"ok": True, "pid": os.getpid()}
