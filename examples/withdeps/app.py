"""A function with its own dependency: `humanize` (pinned in requirements.txt), which
the platform's base environment does not have. It answers byte counts in words and
the humanize version it runs with.

    thaw invoke withdeps -d '{"sizes": [1000000, 123456789]}'
"""

import humanize


class Sizes:
    def setup(self):
        self.version = humanize.__version__

    def predict(self, sizes: list[int] = [1024]) -> dict:  # noqa: B006 (JSON Schema default)
        return {"sizes": [humanize.naturalsize(n, binary=True) for n in sizes],
                "humanize": self.version}
