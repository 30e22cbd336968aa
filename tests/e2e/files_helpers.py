"""What the end-to-end file tests share: a platform of their own whose file URLs last
a few seconds (so an expiry is seen without a long wait), data: URIs, and downloads
with no API key."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.conftest import RunningPlatform, running
from thaw.ops.services import LocalPlatform


@contextmanager
def short_lived_files(tmp_path_factory: pytest.TempPathFactory, name: str,
                      ttl_seconds: int) -> Iterator[RunningPlatform]:
    """A LocalPlatform under a fresh folder `name` whose signed file URLs last
    `ttl_seconds`."""
    home = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as patch:
        # The gateway (a child process) reads its settings from the environment.
        patch.setenv("THAW_FILES_URL_TTL_SECONDS", str(ttl_seconds))
        with running(LocalPlatform(home, gateway_port=0, host_devices="1x2GiB")) as started:
            patch.delenv("THAW_FILES_URL_TTL_SECONDS")
            yield started


def data_uri(data: bytes, media: str = "text/plain") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def download(url: str) -> httpx.Response:
    return httpx.get(url, timeout=60)  # no API key: the signature is the permission


def until(check: Callable[[], object], what: str, seconds: float = 120) -> None:
    """Poll `check` until it is true; fail naming `what` after `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {seconds}s")
