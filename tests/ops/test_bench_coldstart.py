"""`thaw bench coldstart --function`: on a tiny bundle the JSON holds fresh, restore and
warm figures with each kind's Server-Timing stages, and its ratios follow from its
numbers; and the 355M-parameter bench model generates the same tokens with and without
its key/value cache. Correctness only; speed is for the bench itself."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from click.testing import CliRunner

from tests.conftest import REPO
from thaw.bench.coldstart import _variant, run_coldstart_bench
from thaw.core.errors import InvalidArgument
from thaw.core.spec import parse_spec
from thaw.ops.bench import bench
from thaw.ops.services import LocalPlatform

LM = REPO / "bench" / "models" / "lm355m"


def _platform(home: Path, host_devices: str) -> LocalPlatform:
    return LocalPlatform(home, gateway_port=0, host_devices=host_devices)


def test_coldstart_reports_each_kind_with_its_stages() -> None:
    report = run_coldstart_bench(str(REPO / "examples" / "echo"), rounds=1,
                                 payload={"text": "hi"}, platform=_platform,
                                 warm_calls=2, goal=1.0)
    assert report["function"].endswith("examples/echo")
    assert len(report["fresh_samples_s"]) == len(report["restore_samples_s"]) == 1
    assert len(report["warm_samples_s"]) == 2
    assert report["speedup"] == round(report["fresh_s"] / report["restore_s"], 1)
    assert report["start_speedup"] == round(
        report["fresh_start_s"] / report["restore_start_s"], 1)
    assert report["goal_met"] == (report["start_speedup"] >= 1.0)
    assert report["restore_over_warm_s"] == pytest.approx(
        report["restore_s"] - report["warm_s"], abs=2e-4)
    for kind in ("fresh", "restore", "warm"):
        calls = report["calls"][kind]
        assert [c["total_s"] for c in calls] == report[f"{kind}_samples_s"]
        for call in calls:
            assert call["stages_s"], kind  # every kind answers Server-Timing
            staged = sum(v for k, v in call["stages_s"].items() if k != "total")
            assert call["stages_sum_s"] == pytest.approx(staged, abs=2e-4)
            assert call["unaccounted_s"] == pytest.approx(
                call["total_s"] - call["stages_sum_s"], abs=2e-4)
        assert report["last_server_timing_s"][kind] == calls[-1]["stages_s"]
        for call in calls:
            stages = call["stages_s"]
            started = sum(stages.get(k, 0.0) for k in (
                "queue", "launch", "import", "setup", "fetch", "template", "restore",
                "fork", "prefault"))
            assert call["start_s"] == pytest.approx(started, abs=2e-4), kind
    # A fresh start imports and runs setup(); a restore does neither.
    fresh = report["calls"]["fresh"][0]["stages_s"]
    assert fresh["import"] + fresh["setup"] <= report["fresh_start_s"] + 2e-4
    assert "setup" not in report["calls"]["restore"][0]["stages_s"]


def test_the_command_refuses_a_payload_that_is_not_json() -> None:
    result = CliRunner().invoke(bench, ["coldstart", "--function",
                                        str(REPO / "examples" / "echo"),
                                        "--payload", "{nope", "--json"])
    assert result.exit_code == 2
    assert "--payload" in result.output


def test_bad_counts_name_their_field() -> None:
    with pytest.raises(InvalidArgument) as rounds:
        run_coldstart_bench("examples/echo", rounds=0, platform=_platform)
    assert rounds.value.field == "rounds"
    with pytest.raises(InvalidArgument) as warm:
        run_coldstart_bench("examples/echo", warm_calls=0, platform=_platform)
    assert warm.value.field == "warm_calls"


def test_variants_set_the_window_and_the_snapshot(tmp_path: Path) -> None:
    folder = _variant(LM, tmp_path / "f", "lm-fresh", False, "0s")
    text = (folder / "thaw.toml").read_text()
    assert 'name = "lm-fresh"' in text and text.count("scaledown_window") == 1
    assert 'scaledown_window = "0s"' in text and "enabled = false" in text
    spec = parse_spec(text)
    assert spec.name == "lm-fresh"


def _small_model(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("lm355m_app", LM / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "lm355m_app", module)
    spec.loader.exec_module(module)
    for name, value in (("WIDTH", 32), ("HEADS", 4), ("LAYERS", 2), ("VOCAB", 300),
                        ("POSITIONS", 64)):
        monkeypatch.setattr(module, name, value)
    return module


def test_the_bench_model_is_seeded_and_its_cache_changes_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    app = _small_model(monkeypatch)
    first, second = app.LanguageModel(), app.LanguageModel()
    first.setup()
    second.setup()
    answer = first.predict(text="hello world")
    assert answer == {**second.predict(text="hello world"), "pid": answer["pid"]}
    assert len(answer["generated"]) == app.NEW_TOKENS
    # Greedy decoding without the cache: the whole sequence through the model each step.
    ids = list(b"hello world")
    with torch.inference_mode():
        for _ in range(app.NEW_TOKENS):
            caches: list[list[torch.Tensor]] = [[] for _ in range(app.LAYERS)]
            ids.append(int(first.model(torch.tensor([ids]), 0, caches).argmax()))
    assert answer["generated"] == ids[-app.NEW_TOKENS:]
    with pytest.raises(ValueError, match="tokens"):
        first.predict(tokens=[app.VOCAB])
    with pytest.raises(ValueError, match="text"):
        first.predict()


def test_the_bench_model_is_gpt2_medium_sized(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_spec((LM / "thaw.toml").read_text()).handler == "app:LanguageModel"
    spec = importlib.util.spec_from_file_location("lm355m_full", LM / "app.py")
    assert spec is not None and spec.loader is not None
    app = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "lm355m_full", app)
    spec.loader.exec_module(app)
    with torch.device("meta"):  # shapes only, no memory
        model = app.GPT()
    params = sum(p.numel() for p in model.parameters())
    assert params == 354_823_168  # GPT-2 medium: 1.42 GB of float32
