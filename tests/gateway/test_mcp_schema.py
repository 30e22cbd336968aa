"""Schemathesis on `/mcp` alone: what the OpenAPI document says of it holds for inputs
that fit it and inputs that do not (no server error, documented statuses and types)."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tests.conftest import RunningPlatform
from tests.gateway.test_openapi import CHECKS, EXAMPLES_PER_OPERATION


def test_mcp_route_keeps_to_its_document(platform: RunningPlatform) -> None:
    schema = schemathesis.openapi.from_url(f"{platform.url}/openapi.json")
    auth = {"Authorization": f"Bearer {platform.key}"}
    operation = schema["/mcp"]["POST"]
    failures: dict[str, str] = {}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=auth, checks=CHECKS)

        try:
            check()
        except Exception as exc:  # noqa: BLE001 - collected, reported below
            failures[mode.value] = str(exc)[:3000]
    assert not failures, failures
