"""The descriptor handover across the container boundary: a restored instance in a
container (forked in its template's container) gets its snapshot as sealed memfds and
its slice as a descriptor over the bind-mounted control socket, and nothing it sees
names a path of the node's snapshot store."""

from __future__ import annotations

import pytest

from tests.conftest import RunningPlatform
from tests.e2e.test_memfd_handover import check_restored_from_descriptors

pytestmark = pytest.mark.docker


def test_a_containers_weights_live_in_sealed_memfds(docker_platform: RunningPlatform) -> None:
    seen = check_restored_from_descriptors(docker_platform)
    assert seen["pid"] != 1  # forked inside its template's container
