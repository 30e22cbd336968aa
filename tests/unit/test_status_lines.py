"""An instance whose status stream breaks the protocol (a line past the reader's limit,
a line that is not a JSON object) is a failed start: it is killed and the agent gets an
InstanceFailed saying why, never an unexpected error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from thaw.core.errors import InstanceFailed
from thaw.platform.process import RuntimeProcess


async def running(tmp_path: Path, fed: bytes, limit: int = 1024) -> RuntimeProcess:
    proc = await asyncio.create_subprocess_exec("sleep", "30", start_new_session=True)
    reader = asyncio.StreamReader(limit=limit)
    reader.feed_data(fed)
    return RuntimeProcess(proc, reader, str(tmp_path / "i.log"))


@pytest.mark.parametrize(("fed", "reason"), [
    (b"x" * 4096 + b"\n", "status line too long"),
    (b"not json\n", "not a JSON object"),
    (b"[1, 2]\n", "not a JSON object"),
])
async def test_a_broken_status_line_fails_the_start_and_kills_it(
        tmp_path: Path, fed: bytes, reason: str) -> None:
    instance = await running(tmp_path, fed)
    with pytest.raises(InstanceFailed, match=reason):
        await instance.next_event(10)
    assert instance.proc.returncode is not None  # killed


async def test_a_good_status_line_reads_as_its_record(tmp_path: Path) -> None:
    instance = await running(tmp_path, b'{"event": "ready", "pid": 1}\n')
    assert await instance.next_event(10) == {"event": "ready", "pid": 1}
    await instance.kill()
