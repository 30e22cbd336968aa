"""Fixture: blocks on a file the test creates, so the test controls ordering.

predict(gate, n, marker, fail_at, crash_at): a generator. Item 0 comes at once; the
rest only after `gate` exists (bounded wait), 10 ms apart. `marker` is written in
`finally` with how many items were produced (so a test sees the generator closed
early). `fail_at` raises at that item, `crash_at` kills the instance there.
predict(gate, sync=True, started=path): no stream; touches `started` (if given) and
answers once the gate exists.
"""

import os
import time

GATE_WAIT_SECONDS = 30.0


def wait_for(gate):
    deadline = time.monotonic() + GATE_WAIT_SECONDS
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} never opened")
        time.sleep(0.005)


class Gated:
    def predict(self, gate, n=3, marker="", fail_at=-1, crash_at=-1, sync=False, started=""):
        if sync:
            if started:
                open(started, "w").close()
            wait_for(gate)
            return {"opened": gate}
        return self._items(gate, n, marker, fail_at, crash_at)

    def _items(self, gate, n, marker, fail_at, crash_at):
        produced = 0
        try:
            produced += 1
            yield {"i": 0}
            wait_for(gate)
            for i in range(1, n):
                if i == fail_at:
                    raise RuntimeError(f"failed at {i}")
                if i == crash_at:
                    os._exit(3)
                produced += 1
                yield {"i": i}
                time.sleep(0.01)
        finally:
            if marker:
                with open(marker + ".tmp", "w") as f:
                    f.write(str(produced))
                os.replace(marker + ".tmp", marker)
