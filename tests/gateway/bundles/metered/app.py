"""Fixture for metering: sleeps {"seconds": s}, answers {"pad": "x" * n}, or fails."""

import time


class Metered:
    def predict(self, seconds=0.0, answer_bytes=0, fail=False, pad=""):
        time.sleep(float(seconds))
        if fail:
            raise RuntimeError("failing as asked")
        return {"pad": "x" * int(answer_bytes)}
