"""Streaming predictions with the real `replicate` client: a cog predictor whose
predict() returns ConcatenateIterator[str], deployed unchanged, streamed with
`Client.stream()` and `predictions.create(stream=True)` as server-sent events
(output, error, done), run() answering the list of its items, and a stream cancelled
mid-way (docs/cog.md, "Streaming")."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningPlatform
from tests.ops.test_cli import cli_env, thaw

replicate = pytest.importorskip("replicate")

MODEL = "dev/streamer"
PREDICTOR = '''import time

from cog import BasePredictor, ConcatenateIterator, Input


class Predictor(BasePredictor):
    def predict(self, words: int = Input(default=3, ge=1, le=50),
                pause: float = Input(default=0.0, ge=0.0, le=30.0),
                fail: bool = Input(default=False)) -> ConcatenateIterator[str]:
        for i in range(words):
            time.sleep(pause)
            yield f"w{i} "
        if fail:
            raise RuntimeError("asked to fail")
'''


def _deploy(platform: RunningPlatform, tmp_path: Path) -> None:
    folder = tmp_path / "streamer"
    folder.mkdir()
    (folder / "cog.yaml").write_text('predict: "predict.py:Predictor"\n'
                                     "concurrency:\n  max: 4\n")
    (folder / "predict.py").write_text(PREDICTOR)
    result = thaw(cli_env(tmp_path, platform.url, platform.key), "deploy", "--force",
                  str(folder))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_replicate_client_streams_a_cog_iterator(
        platform: RunningPlatform, tmp_path: Path) -> None:
    _deploy(platform, tmp_path)
    client = replicate.Client(api_token=platform.key, base_url=platform.url)

    events = list(client.stream(MODEL, input={"words": 3}))
    kinds = [e.event.value for e in events]
    assert kinds == ["output", "output", "output", "done"], events
    assert "".join(str(e) for e in events) == "w0 w1 w2 "

    # run() of an iterator predictor: the list of its items, as Replicate answers.
    assert client.run(MODEL, input={"words": 2}) == ["w0 ", "w1 "]

    made = client.predictions.create(model=MODEL, input={"words": 2}, stream=True)
    assert made.id.startswith("stream_") and made.urls["stream"].endswith("/stream")
    assert [str(e) for e in made.stream()] == ["w0 ", "w1 ", ""]
    got = client.predictions.get(made.id)
    assert got.status == "succeeded" and got.output == ["w0 ", "w1 "], got
    assert got.input == {"words": 2, "pause": 0.0, "fail": False}

    # The predictor raising mid-way: the items so far, then Replicate's error event,
    # which its client raises.
    seen: list[str] = []
    with pytest.raises(RuntimeError, match="asked to fail"):
        for e in client.stream(MODEL, input={"words": 2, "fail": True}):
            seen.append(str(e))
    assert seen == ["w0 ", "w1 "]


def test_stream_events_on_the_wire_and_cancel(platform: RunningPlatform,
                                              tmp_path: Path) -> None:
    _deploy(platform, tmp_path)
    headers = {"Authorization": f"Bearer {platform.key}"}
    with httpx.Client(base_url=platform.url, headers=headers, timeout=60) as http:
        made = http.post(f"/v1/models/{MODEL}/predictions",
                         json={"input": {"words": 2}, "stream": True})
        assert made.status_code == 201, made.text
        stream_url = made.json()["urls"]["stream"]
        got = http.get(stream_url)
        assert got.headers["content-type"].startswith("text/event-stream")
        assert got.text == ("event: output\nid: 0\ndata: w0 \n\n"
                            "event: output\nid: 1\ndata: w1 \n\n"
                            "event: done\nid: 2\ndata: {}\n\n")

        bad = http.post(f"/v1/models/{MODEL}/predictions",
                        json={"input": {}, "stream": "yes"})
        assert bad.status_code == 400 and bad.json()["field"] == "stream", bad.text
        unknown = http.get("/v1/predictions/stream_0123/stream")
        assert unknown.status_code == 404, unknown.text

        slow = http.post(f"/v1/models/{MODEL}/predictions",
                         json={"input": {"words": 20, "pause": 1.0}, "stream": True})
        pid = slow.json()["id"]
        cancelled = http.post(f"/v1/predictions/{pid}/cancel")
        assert cancelled.json()["status"] == "canceled", cancelled.text
        assert len(cancelled.json()["output"]) < 20
        ended = http.get(f"/v1/predictions/{pid}/stream")
        assert ended.text.endswith('event: done\nid: {}\ndata: {{"reason": "canceled"}}\n\n'
                                   .format(len(cancelled.json()["output"])))
