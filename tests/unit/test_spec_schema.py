"""thaw.toml has one schema: the pydantic models of core/spec.py. Their JSON Schema is
the file under docs/ (regenerated with `python -m thaw.core.spec`), and it agrees with
the models on every thaw.toml in the repository (good and deliberately bad) and on the
bad values the issue found (non-finite durations, huge counts and sizes, a name ending
in a newline)."""

from __future__ import annotations

from pathlib import Path

import jsonschema_rs
import pytest
import tomllib

from tests.conftest import REPO
from thaw.core.errors import InvalidBundle
from thaw.core.spec import parse_spec, schema_text, thaw_toml_schema

SCHEMA_FILE = REPO / "docs" / "thaw-toml.schema.json"
HEAD = 'name = "ok"\nhandler = "app:X"\n'
EVERY_TOML = sorted(p for p in REPO.rglob("thaw.toml")
                    if ".venv" not in p.parts and ".thaw" not in p.parts)


def test_the_published_schema_is_the_models() -> None:
    assert SCHEMA_FILE.read_text() == schema_text(), (
        "docs/thaw-toml.schema.json is stale: .venv/bin/python -m thaw.core.spec "
        "> docs/thaw-toml.schema.json")


@pytest.mark.parametrize("path", EVERY_TOML, ids=lambda p: str(p.relative_to(REPO)))
def test_both_judge_every_thaw_toml_in_the_repository_alike(path: Path) -> None:
    text = path.read_text()
    if "[runtime]" in text and "image" in text and "@sha256:" not in text:
        pytest.skip("an image named by tag: thaw deploy pins it before validation")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        with pytest.raises(InvalidBundle, match="not valid TOML"):
            parse_spec(text)
        return
    by_schema = jsonschema_rs.validator_for(thaw_toml_schema()).is_valid(doc)
    try:
        parse_spec(text)
    except InvalidBundle as exc:
        assert not by_schema, f"the JSON Schema accepts what the models refuse: {exc}"
    else:
        assert by_schema


@pytest.mark.parametrize(("body", "field"), [
    ("[scaling]\ntimeout = nan", "scaling.timeout"),
    ("[scaling]\ntimeout = inf", "scaling.timeout"),
    ("[scaling]\ntimeout = 0", "scaling.timeout"),
    ("[scaling]\ntimeout = 86401", "scaling.timeout"),
    ("[scaling]\nscaledown_window = inf", "scaling.scaledown_window"),
    ("[scaling]\nscaledown_window = -1", "scaling.scaledown_window"),
    ("[scaling]\nmin_instances = 1000\nmax_instances = 1000", "scaling.min_instances"),
    ("[scaling]\nmax_instances = 1001", "scaling.max_instances"),
    ('[resources]\ngpu_memory = "1000TiB"', "resources.gpu_memory"),
    ('[resources]\nmemory = 1e300', "resources.memory"),
    ("[resources]\ngpu_memory = nan", "resources.gpu_memory"),
    ("[batching]\nmax_batch_wait_ms = nan", "batching.max_batch_wait_ms"),
    ("[snapshot]\nenabled = 1", "snapshot.enabled"),
    ('[runtime]\nimage = "python:3.11"', "runtime.image"),
])
def test_bad_values_are_refused_by_both_with_the_key(body: str, field: str) -> None:
    doc = tomllib.loads(HEAD + body)
    with pytest.raises(InvalidBundle) as caught:
        parse_spec(HEAD + body)
    assert caught.value.field == field, caught.value.message
    assert field in caught.value.message
    if "nan" not in body and "1e300" not in body and '"' not in body:
        # JSON has no NaN or infinity; the bounds of a size written with a unit and
        # a pinned image's form are the models' checks only.
        assert not jsonschema_rs.validator_for(thaw_toml_schema()).is_valid(doc)


@pytest.mark.parametrize("name", ["abc\n", "Abc", "-abc", "a" * 64, "", "a b", "é"])
def test_names_are_exactly_the_pattern(name: str) -> None:
    text = f'name = {name!r}\nhandler = "app:X"\n'.replace("'", '"')
    with pytest.raises(InvalidBundle) as caught:
        parse_spec(text)
    assert caught.value.field == "name"
    assert not jsonschema_rs.validator_for(thaw_toml_schema()).is_valid(
        {"name": name, "handler": "app:X"})


def test_sizes_and_durations_keep_their_forms() -> None:
    spec = parse_spec(HEAD + '[resources]\ngpu_memory = "1.5GiB"\nmemory = 4096\n'
                      '[scaling]\ntimeout = "500ms"\nscaledown_window = 0\n')
    assert spec.resources.gpu_memory == int(1.5 * 1024**3)
    assert spec.resources.memory == 4096
    assert (spec.scaling.timeout, spec.scaling.scaledown_window) == (0.5, 0.0)
