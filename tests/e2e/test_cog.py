"""A cog predictor end to end: a folder with cog.yaml and predict.py (the real `cog`
package, no thaw.toml) deployed by `thaw deploy`, then called with cog's
{"input": {...}} at /fn/{tenant}/{name}/predictions, sync and async (docs/cog.md)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tests.conftest import FIXTURES, RunningPlatform
from tests.ops.test_cli import cli_env, thaw

NAME = "cog-predictor"


def _deploy(platform: RunningPlatform, tmp_path: Path) -> None:
    folder = tmp_path / "cog_predictor"
    shutil.copytree(FIXTURES / "cog_predictor", folder,
                    ignore=shutil.ignore_patterns("__pycache__"))
    result = thaw(cli_env(tmp_path, platform.url, platform.key), "deploy", "--force",
                  str(folder))
    assert result.returncode == 0, result.stderr
    # The user's folder is left as it was: thaw.toml went into the packed copy only.
    assert not (folder / "thaw.toml").exists()


def _poll(platform: RunningPlatform, pid: str, until: set[str]) -> dict[str, object]:
    for _ in range(600):
        got = platform.http.get(f"/v1/predictions/{pid}")
        assert got.status_code == 200, got.text
        body: dict[str, object] = got.json()
        if body["status"] in until:
            return body
        time.sleep(0.1)
    raise AssertionError(f"prediction {pid} never reached {until}")


def test_cog_predictor_deploys_and_answers_predictions(
        platform: RunningPlatform, tmp_path: Path) -> None:
    _deploy(platform, tmp_path)
    url = f"/fn/dev/{NAME}/predictions"

    ok = platform.http.post(url, json={"input": {"text": "hi"}})
    assert ok.status_code == 200, ok.text
    body = ok.json()
    # setup() ran; Input defaults applied (times=2, mode=upper, no note).
    assert body["status"] == "succeeded" and body["output"] == "HI HI!", body
    assert body["error"] is None and body["input"]["times"] == 2
    assert body["metrics"]["predict_time"] >= 0
    assert body["created_at"] and body["completed_at"] and body["urls"]["get"]

    given = platform.http.post(url, json={"input": {"text": "ab", "times": 3,
                                                    "mode": "lower", "note": "?"}})
    assert given.json()["output"] == "ab ab ab!?", given.text

    for wrong, field in (({"text": "hi", "times": 9}, "input.times"),
                         ({"text": "HI"}, "input.text"),
                         ({"text": "hi", "mode": "sideways"}, "input.mode"),
                         ({"times": 1}, "input.text")):
        refused = platform.http.post(url, json={"input": wrong})
        assert refused.status_code == 422, refused.text
        problem = refused.json()
        assert problem["status"] == 422 and problem["field"] == field, problem
        assert problem["invalid_fields"][0]["field"] == field
    stray = platform.http.post(url, json={"text": "hi"})
    assert stray.status_code == 400 and stray.json()["field"] == "text", stray.text

    submitted = platform.http.post(url, json={"input": {"text": "later"}},
                                   headers={"Prefer": "respond-async"})
    assert submitted.status_code == 202, submitted.text
    pid = submitted.json()["id"]
    assert submitted.json()["status"] in ("starting", "processing")
    done = _poll(platform, pid, {"succeeded", "failed"})
    assert done["status"] == "succeeded" and done["output"] == "LATER LATER!", done
    assert done["input"] == {"text": "later", "times": 2, "mode": "upper", "sleep": 0.0,
                             "note": None}

    slow = platform.http.post(url, json={"input": {"text": "slow", "sleep": 10}},
                              headers={"Prefer": "respond-async"})
    assert slow.status_code == 202, slow.text
    slow_id = slow.json()["id"]
    cancelled = platform.http.post(f"/v1/predictions/{slow_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "canceled", cancelled.json()
    assert _poll(platform, slow_id, {"canceled"})["output"] is None

    # Another tenant's function, and an unknown prediction: 404 in the problem form.
    other = platform.http.post(f"/fn/other/{NAME}/predictions", json={"input": {}})
    assert other.status_code == 404 and other.json()["status"] == 404
    assert platform.http.get("/v1/predictions/inv_nope").status_code == 404
