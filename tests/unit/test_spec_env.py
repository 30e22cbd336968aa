"""thaw.toml's secrets, [env] and [volumes]: what is accepted, and each refusal names
its key."""

from __future__ import annotations

import json

import pytest

from thaw.core.errors import InvalidBundle
from thaw.core.spec import FunctionSpec, VolumeMount, parse_spec

HEAD = 'name = "fn"\nhandler = "app:Model"\n'


def test_secrets_env_and_volumes_reach_the_spec_in_file_order() -> None:
    spec = parse_spec(HEAD + 'secrets = ["HF_TOKEN", "DB_URL"]\n'
                      '[env]\nHF_HOME = "/models/hf"\nMODE = "fast"\n'
                      '[volumes]\n"/models" = "weights"\n"/data/extra" = "extra"\n')
    assert spec.secrets == ("HF_TOKEN", "DB_URL")
    assert spec.env == (("HF_HOME", "/models/hf"), ("MODE", "fast"))
    assert spec.volumes == (VolumeMount("/models", "weights"),
                            VolumeMount("/data/extra", "extra"))
    assert FunctionSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_a_spec_stored_before_these_keys_reads_with_none() -> None:
    old = {"name": "fn", "handler": "app:Model"}
    spec = FunctionSpec.from_dict(old)
    assert (spec.secrets, spec.env, spec.volumes) == ((), (), ())


@pytest.mark.parametrize(("extra", "field", "words"), [
    ('secrets = ["THAW_KEY"]\n', "secrets", "reserved"),
    ('secrets = ["A", "A"]\n', "secrets", "twice"),
    ('secrets = ["1A"]\n', "secrets", "letters, digits"),
    ('[env]\nLD_PRELOAD = "/x.so"\n', "env", "reserved"),
    ('[env]\nPYTHONPATH = "/x"\n', "env", "reserved"),
    ('[env]\nA = 1\n', "env.A", "string"),
    ('[env]\nA = "' + "x" * 5000 + '"\n', "env.A", "4096"),
    ('secrets = ["A"]\n[env]\nA = "1"\n', "env.A", "secret"),
    ('[volumes]\n"/etc/models" = "w"\n', "volumes", "/etc"),
    ('[volumes]\n"/" = "w"\n', "volumes", "plain absolute path"),
    ('[volumes]\n"models" = "w"\n', "volumes", "absolute"),
    ('[volumes]\n"/m/../etc" = "w"\n', "volumes", "plain absolute path"),
    ('[volumes]\n"/m" = "Weights"\n', "volumes", "lower-case"),
    ('[volumes]\n"/m" = "a"\n"/m/b" = "b"\n', "volumes", "inside"),
])
def test_each_bad_value_is_refused_naming_its_key(extra: str, field: str,
                                                   words: str) -> None:
    with pytest.raises(InvalidBundle) as caught:
        parse_spec(HEAD + extra)
    assert caught.value.field == field
    assert words in str(caught.value)
