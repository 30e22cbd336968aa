"""The smallest function: answers with what it was sent. No dependencies."""

import os
import time


class Echo:
    def setup(self):
        self.started = time.time()
        self.setup_pid = os.getpid()

    def __call__(self, request):
        body = request.json() if request.body else None
        return {"echo": body, "path": request.path, "setup_pid": self.setup_pid,
                "pid": os.getpid()}
