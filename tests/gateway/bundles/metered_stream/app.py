"""Fixture for metering a stream: yields n items of `size` characters."""


class Items:
    def predict(self, n=1, size=10):
        for i in range(int(n)):
            yield {"i": i, "pad": "s" * int(size)}
