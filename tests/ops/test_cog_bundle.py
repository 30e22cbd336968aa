"""A cog folder as a bundle: thaw.toml written into a copy, never the user's folder
(ops/cog_bundle.py, docs/cog.md)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from thaw.ops.cog_bundle import (
    COG_GPU_MEMORY,
    as_bundle,
    build_notes,
    function_name,
    handler_of,
)


def _cog(folder: Path, yaml_text: str = 'predict: "predict.py:Predictor"\n') -> Path:
    folder.mkdir()
    (folder / "cog.yaml").write_text(yaml_text)
    (folder / "predict.py").write_text("class Predictor: ...\n")
    return folder


def test_a_cog_folder_packs_as_a_copy_with_thaw_toml(tmp_path: Path) -> None:
    folder = _cog(tmp_path / "My_Model.v2")
    with as_bundle(folder, None) as packed:
        assert packed != folder
        # One prediction at a time per instance unless concurrency.max says more, as cog.
        assert (packed / "thaw.toml").read_text() == (
            'name = "my-model-v2"\nhandler = "predict:Predictor"\n\n'
            "[scaling]\ntarget_concurrency = 1\nmax_concurrency = 1\n")
        assert (packed / "predict.py").read_text() == "class Predictor: ...\n"
    assert not (folder / "thaw.toml").exists()
    with as_bundle(folder, "other") as packed:
        assert 'name = "other"' in (packed / "thaw.toml").read_text()


def test_a_thaw_bundle_is_packed_as_it_is(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "thaw.toml").write_text('name = "b"\nhandler = "app:H"\n')
    with as_bundle(folder, None) as packed:
        assert packed == folder
    with pytest.raises(click.UsageError, match="--name"), as_bundle(folder, "x"):
        pass


def test_cog_yaml_predict_and_names_are_checked(tmp_path: Path) -> None:
    assert handler_of('predict: "models/run.py:Runner"') == "models.run:Runner"
    for bad in ("build: {}", 'predict: "../x.py:P"', 'predict: "x:P"', "predict: ["):
        with pytest.raises(click.UsageError, match="cog.yaml"):
            handler_of(bad)
    with pytest.raises(click.UsageError, match="--name"):
        function_name(tmp_path / "___", None)
    with pytest.raises(click.UsageError, match="--name 'Bad'"):
        function_name(tmp_path, "Bad")


def test_gpu_true_asks_a_slice_and_says_its_size(tmp_path: Path) -> None:
    import tomllib

    from thaw.core.spec import parse_spec

    folder = _cog(tmp_path / "g", 'build:\n  gpu: true\nconcurrency:\n  max: 3\n'
                                  'predict: "predict.py:Predictor"\n')
    assert f"asks a {COG_GPU_MEMORY} GPU slice" in build_notes(folder)
    assert build_notes(_cog(tmp_path / "c")) == ""
    with as_bundle(folder, None) as packed:
        text = (packed / "thaw.toml").read_text()
    doc = tomllib.loads(text)
    assert doc["resources"] == {"gpu_memory": COG_GPU_MEMORY}
    assert doc["scaling"] == {"target_concurrency": 3, "max_concurrency": 3}
    spec = parse_spec(text)
    assert spec.resources.gpu_memory == 16 * 1024**3
    assert spec.scaling.max_concurrency == 3
    with as_bundle(_cog(tmp_path / "cpu", 'build:\n  gpu: false\n'
                                          'predict: "predict.py:Predictor"\n'), None) as cpu:
        assert "[resources]" not in (cpu / "thaw.toml").read_text()


def test_bad_gpu_and_concurrency_are_refused(tmp_path: Path) -> None:
    for i, bad in enumerate(("build:\n  gpu: yes-please\n", "concurrency:\n  max: 0\n",
                             "concurrency:\n  max: two\n", "concurrency: 4\n")):
        folder = _cog(tmp_path / f"b{i}", bad + 'predict: "predict.py:Predictor"\n')
        with pytest.raises(click.UsageError, match="cog.yaml"), as_bundle(folder, None):
            pass


def test_python_packages_need_no_cog_of_their_own(tmp_path: Path) -> None:
    # The platform adds its own cog to such an environment (environments_provided.py).
    lacking = _cog(tmp_path / "p", 'build:\n  python_packages: ["numpy==2.0"]\n'
                                   'predict: "predict.py:Predictor"\n')
    assert build_notes(lacking) == ""
