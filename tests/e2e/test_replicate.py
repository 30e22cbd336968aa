"""The real `replicate` client against thaw: `Client(api_token, base_url).run()` and
`predictions.create/get/cancel` on a cog predictor deployed unchanged (docs/cog.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import RunningPlatform
from tests.e2e.test_cog import NAME, _deploy

replicate = pytest.importorskip("replicate")
from replicate.exceptions import ModelError, ReplicateError  # noqa: E402

MODEL = f"dev/{NAME}"


def test_the_replicate_client_runs_and_manages_predictions(
        platform: RunningPlatform, tmp_path: Path) -> None:
    _deploy(platform, tmp_path)
    client = replicate.Client(api_token=platform.key, base_url=platform.url)

    # run(): Prefer: wait, the finished prediction's output.
    assert client.run(MODEL, input={"text": "hey"}) == "HEY HEY!"
    assert client.run(MODEL, input={"text": "ab", "times": 3, "mode": "lower"}) == (
        "ab ab ab!")

    # A constraint the gateway checks: Replicate's 422 with the field.
    with pytest.raises(ReplicateError) as refused:
        client.run(MODEL, input={"text": "hey", "times": 99})
    assert refused.value.status == 422 and "times" in str(refused.value.detail)

    # create() without wait is async, as on Replicate: stored, then polled.
    made = client.predictions.create(model=MODEL, input={"text": "async"})
    assert made.status in ("starting", "processing") and made.id.startswith("inv_")
    made.wait()
    assert made.status == "succeeded" and made.output == "ASYNC ASYNC!"
    got = client.predictions.get(made.id)
    assert got.output == "ASYNC ASYNC!" and got.input["times"] == 2
    assert got.metrics is not None and got.metrics["predict_time"] >= 0

    slow = client.predictions.create(model=MODEL, input={"text": "slow", "sleep": 10})
    cancelled = client.predictions.cancel(slow.id)
    assert cancelled.status == "canceled"
    assert client.predictions.get(slow.id).status == "canceled"

    # A predictor that raises: run() raises Replicate's ModelError with its message.
    with pytest.raises(ModelError):
        client.run(MODEL, input={"text": "boom", "note": "raise"})

    # Another tenant's model is not found.
    with pytest.raises(ReplicateError) as missing:
        client.run(f"other/{NAME}", input={"text": "hi"})
    assert missing.value.status == 404
