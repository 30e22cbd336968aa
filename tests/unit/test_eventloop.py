"""core.eventloop: a pipe handed to the loop is closed exactly once, under either loop."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from thaw.core.eventloop import read_pipe_file

uvloop = pytest.importorskip("uvloop")

LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


class _ProbedFile(io.FileIO):
    """Records, when it closes its descriptor, whether something else closed it first."""

    found_closed: list[bool]

    def close(self) -> None:
        if not self.closed and self.closefd:
            try:
                os.fstat(self.fileno())
                self.found_closed.append(False)
            except OSError:
                self.found_closed.append(True)
        super().close()


async def _read_to_eof_and_close(pipe_file: Callable[[int], Any]) -> int:
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), pipe_file(r))
    os.write(w, b"hello")
    os.close(w)
    assert await reader.read() == b"hello"
    transport.close()
    for _ in range(100):
        try:
            os.fstat(r)
        except OSError:
            return r
        await asyncio.sleep(0)
    raise AssertionError(f"descriptor {r} is still open after its transport closed")


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_the_transport_closes_the_pipe(loop_name: str) -> None:
    LOOPS[loop_name](_read_to_eof_and_close(read_pipe_file))


def test_under_uvloop_only_libuv_owns_the_number() -> None:
    async def main() -> None:
        r, w = os.pipe()
        try:
            assert read_pipe_file(r).raw.closefd is False  # type: ignore[attr-defined]
        finally:
            os.close(r)
            os.close(w)

    uvloop.run(main())


def test_under_asyncio_the_file_owns_the_number() -> None:
    async def main() -> None:
        r, w = os.pipe()
        os.close(w)
        with read_pipe_file(r) as pipe:
            assert pipe.raw.closefd is True  # type: ignore[attr-defined]

    asyncio.run(main())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_file_that_owns_the_number(loop_name: str) -> None:
    """The reason for read_pipe_file (MagicStack/uvloop#763): under uvloop a file object
    that owns the descriptor closes it again after libuv did, by then possibly another
    thread's file; under asyncio it is the only one that closes it."""
    found_closed: list[bool] = []

    def probed(fd: int) -> _ProbedFile:
        probe = _ProbedFile(fd, "rb")
        probe.found_closed = found_closed
        return probe

    LOOPS[loop_name](_read_to_eof_and_close(probed))
    assert found_closed == [loop_name == "uvloop"]
