"""A typed function: its signature is its API (docs/function-api.md).

The gateway checks every call against the schema read from `predict()` (422 naming the
input at fault), so the same function answers curl, `thaw.client`, and Replicate's
client on its predictions route (README, "One function, every client").
"""

from thaw import Input


class Greeter:
    def setup(self):
        self.greeting = "Hello"

    def predict(self,
                name: str = Input(description="Who to greet", min_length=1, max_length=100),
                times: int = Input(default=1, ge=1, le=5, description="How many times")) -> str:
        return " ".join([f"{self.greeting}, {name}!"] * times)
