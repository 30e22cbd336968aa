"""Fixture for stored invocations: counts its calls in a file the test names, can
wait on a gate file, sleep, or fail.

predict(count_file, started, gate, seconds, fail, value): appends a line to
`count_file` (so a test sees how often it ran), touches `started`, waits for `gate`
(bounded), sleeps `seconds`, raises if `fail`; answers how many calls the file counts.
"""

import os
import time

GATE_WAIT_SECONDS = 30.0


class Jobs:
    def predict(self, count_file="", started="", gate="", seconds=0.0, fail=False,
                value=None):
        calls = 0
        if count_file:
            with open(count_file, "a") as f:
                f.write(f"{os.getpid()}\n")
            with open(count_file) as f:
                calls = len(f.readlines())
        if started:
            open(started, "w").close()
        if gate:
            deadline = time.monotonic() + GATE_WAIT_SECONDS
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(float(seconds))
        if fail:
            raise RuntimeError("asked to fail")
        return {"calls": calls, "value": value}
