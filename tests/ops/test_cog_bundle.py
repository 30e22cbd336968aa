"""A cog folder as a bundle: thaw.toml written into a copy, never the user's folder
(ops/cog_bundle.py, docs/cog.md)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from thaw.ops.cog_bundle import as_bundle, build_notes, function_name, handler_of


def _cog(folder: Path, yaml_text: str = 'predict: "predict.py:Predictor"\n') -> Path:
    folder.mkdir()
    (folder / "cog.yaml").write_text(yaml_text)
    (folder / "predict.py").write_text("class Predictor: ...\n")
    return folder


def test_a_cog_folder_packs_as_a_copy_with_thaw_toml(tmp_path: Path) -> None:
    folder = _cog(tmp_path / "My_Model.v2")
    with as_bundle(folder, None) as packed:
        assert packed != folder
        assert (packed / "thaw.toml").read_text() == (
            'name = "my-model-v2"\nhandler = "predict:Predictor"\n')
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


def test_gpu_true_is_reported_not_sized(tmp_path: Path) -> None:
    folder = _cog(tmp_path / "g", 'build:\n  gpu: true\npredict: "predict.py:Predictor"\n')
    assert "no GPU slice" in build_notes(folder)
    assert build_notes(_cog(tmp_path / "c")) == ""


def test_python_packages_without_cog_are_reported(tmp_path: Path) -> None:
    lacking = _cog(tmp_path / "p", 'build:\n  python_packages: ["numpy==2.0"]\n'
                                   'predict: "predict.py:Predictor"\n')
    assert 'list "cog" there too' in build_notes(lacking)
    listed = _cog(tmp_path / "q", 'build:\n  python_packages: ["cog==0.23.1", "numpy"]\n'
                                  'predict: "predict.py:Predictor"\n')
    assert build_notes(listed) == ""
    cogger = _cog(tmp_path / "r", 'build:\n  python_packages: ["cogs-extra"]\n'
                                  'predict: "predict.py:Predictor"\n')
    assert 'list "cog" there too' in build_notes(cogger)
