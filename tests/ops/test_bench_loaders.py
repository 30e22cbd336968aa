"""`thaw bench loaders`: every loader is timed cold and warm or reported skipped with
its reason, every loader's bytes are checked, and the ratios follow from the figures
printed. Correctness only; speed is for the bench itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from thaw.bench import loader_peers, loaders
from thaw.bench.loader_peers import PEERS, Peer, gpt2_shapes, make_weights, touch
from thaw.core.errors import InvalidArgument, ThawError
from thaw.ops.bench import bench


def _check_report(report: dict, peers: list[str]) -> None:
    assert set(report["loaders"]) == set(peers) | {loaders.THAW}
    timed = []
    for name, entry in report["loaders"].items():
        if "skipped" in entry:
            assert name != loaders.THAW
            assert entry["skipped"], name
            continue
        for mode in ("cold", "warm", "held") if name == loaders.THAW else ("cold", "warm"):
            figure = entry[mode]
            assert figure["seconds"] == max(min(figure["samples_s"]), 1e-4)
            assert len(figure["samples_s"]) == report["rounds"]
            expected_gbps = report["bytes"] / figure["seconds"] / 1e9
            assert figure["gbps"] == pytest.approx(expected_gbps, abs=1e-3)
        if name != loaders.THAW:
            timed.append(name)
            for resident in entry["cold"]["resident_before"] + entry["warm"]["resident_before"]:
                assert 0.0 <= resident <= 1.0
            assert entry["warm"]["resident_before"] == [1.0] * report["rounds"]
    thaw = report["loaders"][loaders.THAW]
    assert set(report["ratio_to_best_peer"]) == {"cold", "warm", "held"}
    for mode in ("cold", "warm", "held"):
        assert set(thaw[mode]["stages_s"]) == {"fill_memfd_s", "map_views_touch_s",
                                               "disk_resident_before"}
        if not timed:
            assert report["ratio_to_best_peer"][mode] is None
            continue
        peer_mode = "warm" if mode == "held" else mode  # held is compared with warm
        best = min(timed, key=lambda n: report["loaders"][n][peer_mode]["seconds"])
        assert report["best_peer"][mode] == best
        ratio = report["loaders"][best][peer_mode]["seconds"] / thaw[mode]["seconds"]
        assert report["ratio_to_best_peer"][mode] == round(ratio, 3)
        assert report["goal_met"][mode] == (report["ratio_to_best_peer"][mode] >= 2.0)


def test_the_command_prints_every_loader_cold_and_warm_or_skipped(tmp_path: Path) -> None:
    result = CliRunner().invoke(bench, ["loaders", "--size", "2MB", "--rounds", "1",
                                        "--dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["rounds"] == 1 and report["goal"] == 2.0
    assert 1_500_000 < report["bytes"] < 2_500_000
    _check_report(report, [peer.name for peer in PEERS])
    assert list(tmp_path.iterdir()) == []  # the weights and chunks are cleaned up


def test_a_missing_or_failing_loader_is_reported_skipped(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(path: Path) -> loader_peers.Loaded:
        raise RuntimeError("no CPU support")

    peers = [Peer("safetensors_load_file", "safetensors", "safetensors", broken),
             Peer("torch_load_mmap", "not-a-package-here", "torch",
                  loader_peers._torch_load_mmap),
             PEERS[1]]
    monkeypatch.setattr(loaders, "PEERS", peers)
    report = loaders.run_loaders_bench(1_000_000, 1, folder=str(tmp_path))
    entries = report["loaders"]
    assert "failed on this machine" in entries["safetensors_load_file"]["skipped"]
    assert "no CPU support" in entries["safetensors_load_file"]["skipped"]
    assert "not installed" in entries["torch_load_mmap"]["skipped"]
    assert "cold" in entries["safetensors_safe_open"]
    assert set(report["best_peer"].values()) == {"safetensors_safe_open"}
    _check_report(report, [peer.name for peer in peers])


def test_a_loader_returning_other_bytes_is_not_timed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def corrupt(path: Path) -> loader_peers.Loaded:
        tensors, release = loader_peers._safetensors_load_file(path)
        next(iter(tensors.values())).view(-1)[0] += 1.0
        return tensors, release

    monkeypatch.setattr(loaders, "PEERS",
                        [Peer("safetensors_load_file", "safetensors", "safetensors", corrupt)])
    report = loaders.run_loaders_bench(1_000_000, 1, folder=str(tmp_path))
    assert "different bytes" in report["loaders"]["safetensors_load_file"]["skipped"]
    assert report["ratio_to_best_peer"] == {"cold": None, "warm": None, "held": None}


def test_bad_arguments_name_their_field() -> None:
    with pytest.raises(InvalidArgument) as size:
        loaders.run_loaders_bench(0)
    assert size.value.field == "size"
    with pytest.raises(InvalidArgument) as rounds:
        loaders.run_loaders_bench(1000, 0)
    assert rounds.value.field == "rounds"
    with pytest.raises(InvalidArgument) as only:
        loaders.run_loaders_bench(1000, only=["pickle"])
    assert only.value.field == "loaders"


def test_the_full_size_is_gpt2_medium() -> None:
    shapes = gpt2_shapes(1_400_000_000)
    params = 0
    for _, shape in shapes:
        count = 1
        for dim in shape:
            count *= dim
        params += count
    assert params == 354_823_168  # GPT-2 medium's count, the lm355m bench model's too
    assert sum(name.startswith("h.23.") for name, _ in shapes) == 12
    assert not any(name.startswith("h.24.") for name, _ in shapes)


def test_touch_sees_every_page_and_the_weights_are_seeded() -> None:
    first, second = make_weights(1_000_000), make_weights(1_000_000)
    assert all(torch.equal(first[name], second[name]) for name in first)
    before = touch(first)
    tensor = next(t for t in first.values() if t.numel() * 4 > 3 * loader_peers.PAGE)
    raw = tensor.view(-1).view(torch.uint8)
    raw[2 * loader_peers.PAGE] ^= 0xFF  # a byte on the third page
    assert touch(first) != before
    with pytest.raises(ThawError, match="different bytes"):
        loaders._check("x", touch(first), before)


def test_dropped_files_leave_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\1" * (1 << 20))
    loaders._fsync(path)
    path.read_bytes()
    before = loaders.resident_fraction([path])
    loaders.drop_from_cache([path])
    after = loaders.resident_fraction([path])
    assert 0.0 <= after <= before <= 1.0
