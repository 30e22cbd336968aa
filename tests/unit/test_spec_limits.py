"""thaw.toml [limits]: a function's own request body limit, parsed with sizes, refused
with the key at fault when bad, absent = the gateway's limit."""

import json

import pytest

from thaw.core.errors import InvalidBundle
from thaw.core.spec import MAX_BODY_LIMIT_BYTES, FunctionSpec, Limits, parse_spec
from thaw.gateway.priority import knobs_of
from thaw.proto import scheduler_pb2

HEAD = 'name = "ok"\nhandler = "app:X"\n'


@pytest.mark.parametrize(("value", "expected"), [
    ('"8MiB"', 8 * 1024**2), ('"1KiB"', 1024), ("4096", 4096), ('"1.5KB"', 1500),
    ('"1GiB"', MAX_BODY_LIMIT_BYTES)])
def test_max_body_takes_sizes(value: str, expected: int) -> None:
    spec = parse_spec(HEAD + f"[limits]\nmax_body = {value}\n")
    assert spec.limits.max_body == expected


def test_absent_limits_mean_the_gateways() -> None:
    assert parse_spec(HEAD).limits == Limits(max_body=0)
    assert parse_spec(HEAD + "[limits]\n").limits.max_body == 0


@pytest.mark.parametrize(("limits", "field"), [
    ('max_body = "lots"', "limits.max_body"),
    ("max_body = 0", "limits.max_body"),
    ("max_body = -5", "limits.max_body"),
    ('max_body = "2GiB"', "limits.max_body"),
    ("max_body = true", "limits.max_body"),
    ("max_body = [1]", "limits.max_body"),
    ("max_bodyy = 10", "limits.max_bodyy"),
])
def test_a_bad_limit_names_its_key(limits: str, field: str) -> None:
    with pytest.raises(InvalidBundle) as info:
        parse_spec(HEAD + f"[limits]\n{limits}\n")
    assert info.value.field == field
    assert field in info.value.message


def test_limits_must_be_a_table() -> None:
    with pytest.raises(InvalidBundle) as info:
        parse_spec(HEAD + 'limits = "small"\n')
    assert info.value.field == "limits"


def test_the_limit_survives_storage_and_reaches_the_gateway() -> None:
    spec = parse_spec(HEAD + '[limits]\nmax_body = "2KiB"\n')
    stored = json.dumps(spec.to_dict())
    assert FunctionSpec.from_dict(json.loads(stored)) == spec
    # A spec stored before [limits] existed reads back with the gateway's limit.
    old = json.loads(stored)
    del old["limits"]
    assert FunctionSpec.from_dict(old).limits.max_body == 0

    fn = scheduler_pb2.FunctionInfo(tenant="t", name="ok", config_json=stored, priority=70)
    knobs = knobs_of(fn)
    assert (knobs.priority, knobs.max_body) == (70, 2048)
    unreadable = scheduler_pb2.FunctionInfo(tenant="t", name="ok", config_json="[1]")
    assert (knobs_of(unreadable).priority, knobs_of(unreadable).max_body) == (None, 0)
