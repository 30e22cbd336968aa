"""The node's image loader (platform/image_load.py) with an in-memory engine and
archive source: a missing image is fetched, checked and loaded once however many
starts ask at the same time, its temporary file removed; an archive of another image,
an engine that loads another id, or no archive at the scheduler are refused saying
so."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from tests.archives import bundle_layer, docker_archive
from thaw.core.errors import ImageNotOnNode, InstanceFailed, NotFound
from thaw.platform.image_load import ImageLoader


class FakeImage:
    def __init__(self, image_id: str) -> None:
        self.id = image_id


class FakeImages:
    def __init__(self, loads_as: str | None = None) -> None:
        self.held: set[str] = set()
        self.loaded: list[bytes] = []
        self.loads_as = loads_as

    def get(self, image_id: str) -> FakeImage:
        if image_id not in self.held:
            raise docker.errors.ImageNotFound(image_id)
        return FakeImage(image_id)

    def load(self, handle: Any) -> list[FakeImage]:
        data = handle.read()
        self.loaded.append(data)
        image_id = self.loads_as or self.expected
        self.held.add(image_id)
        return [FakeImage(image_id)]

    expected = ""


class FakeEngine:
    def __init__(self, loads_as: str | None = None) -> None:
        self.images = FakeImages(loads_as)


class FakeSource:
    def __init__(self, archives: dict[str, bytes]) -> None:
        self.archives = archives
        self.fetches = 0

    async def fetch(self, image_id: str) -> AsyncIterator[bytes]:
        self.fetches += 1
        if image_id not in self.archives:
            raise NotFound(f"no image archive {image_id}")
        data = self.archives[image_id]
        for start in range(0, len(data), 1000):
            await asyncio.sleep(0)
            yield data[start:start + 1000]

    async def close(self) -> None:
        pass


def loader(tmp_path: Path, archives: dict[str, bytes], engine: FakeEngine) -> ImageLoader:
    return ImageLoader(engine, FakeSource(archives), tmp_path / "loads")


def test_a_missing_image_is_loaded_once(tmp_path: Path) -> None:
    data, image_id = docker_archive([bundle_layer()])
    engine = FakeEngine()
    engine.images.expected = image_id
    load = loader(tmp_path, {image_id: data}, engine)

    async def starts() -> list[bool]:
        return list(await asyncio.gather(*(load.ensure(image_id, f"app@{image_id}", "n1")
                                           for _ in range(3))))

    assert sorted(asyncio.run(starts())) == [False, False, True]
    assert engine.images.loaded == [data]
    assert isinstance(load.source, FakeSource) and load.source.fetches == 1
    assert not list((tmp_path / "loads").iterdir())
    # Held now: nothing fetched again.
    assert asyncio.run(load.ensure(image_id, f"app@{image_id}", "n1")) is False
    assert load.source.fetches == 1


def test_no_archive_at_the_scheduler_is_image_not_on_node(tmp_path: Path) -> None:
    image_id = "sha256:" + "4" * 64
    load = loader(tmp_path, {}, FakeEngine())
    with pytest.raises(ImageNotOnNode, match=f"image app@{image_id} is not on node n1's "
                                             "docker engine"):
        asyncio.run(load.ensure(image_id, f"app@{image_id}", "n1"))
    assert not list((tmp_path / "loads").iterdir())


def test_an_archive_of_another_image_is_refused(tmp_path: Path) -> None:
    data, other = docker_archive([bundle_layer()], labels={"other": "1"})
    pinned = "sha256:" + "5" * 64
    engine = FakeEngine()
    load = loader(tmp_path, {pinned: data}, engine)
    with pytest.raises(InstanceFailed, match=f"the archive of image app@{pinned} holds "
                                             f"{other}, not the pinned id: refused"):
        asyncio.run(load.ensure(pinned, f"app@{pinned}", "n1"))
    assert engine.images.loaded == []  # never handed to the engine
    assert not list((tmp_path / "loads").iterdir())


def test_an_engine_loading_another_id_is_refused(tmp_path: Path) -> None:
    data, image_id = docker_archive([bundle_layer()])
    wrong = "sha256:" + "6" * 64
    load = loader(tmp_path, {image_id: data}, FakeEngine(loads_as=wrong))
    with pytest.raises(InstanceFailed, match=f"gave {wrong}, not the pinned {image_id}: "
                                             "refused"):
        asyncio.run(load.ensure(image_id, f"app@{image_id}", "n1"))
    assert not list((tmp_path / "loads").iterdir())


def test_a_malformed_image_id_is_refused(tmp_path: Path) -> None:
    load = loader(tmp_path, {}, FakeEngine())
    with pytest.raises(Exception, match="sha256:<64 lowercase hex>"):
        asyncio.run(load.ensure("sha256:nope", "app@sha256:nope", "n1"))


def test_the_agent_removes_loads_a_killed_agent_left(tmp_path: Path) -> None:
    from thaw.core.config import AgentConfig
    from thaw.platform.image_load import loader_for

    loads = tmp_path / "image-loads"
    loads.mkdir()
    (loads / ".load-0123456789abcdef-deadbeef.tar").write_bytes(b"half an archive")
    (loads / "kept.txt").write_text("not ours")
    load = loader_for(AgentConfig(home=tmp_path), FakeEngine(), tmp_path)
    assert load.tmp_dir == loads
    assert sorted(p.name for p in loads.iterdir()) == ["kept.txt"]
