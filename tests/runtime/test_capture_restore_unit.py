"""capture.py and restore.py in-process: attribute paths of unpicklable state, arena
layout, and capture -> restore round trips of generated object graphs."""

from __future__ import annotations

import dataclasses
import json
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thaw.snapshotter.runtime.capture import (
    OUT_OF_BAND_MIN_BYTES,
    capture,
    find_failing_path,
    pickle_handler,
)
from thaw.snapshotter.runtime.restore import RestoreError, restore_handler
from thaw.snapshotter.runtime.snapshot import SnapshotMeta


class Box:
    def __init__(self, **attributes: Any) -> None:
        self.__dict__.update(attributes)

    def __eq__(self, other: object) -> bool:
        return type(other) is Box and vars(self) == vars(other)


class Slotted:
    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner


@dataclasses.dataclass
class Settings:
    name: str
    extra: Any


def path_of(root: Any) -> str | None:
    culprit = find_failing_path(root)
    return None if culprit is None else culprit.path


def test_picklable_graph_has_no_failing_path() -> None:
    assert find_failing_path(Box(a=[1, {"b": (2, 3)}], c=Slotted(4))) is None


def test_path_descends_through_objects_lists_dicts_and_slots() -> None:
    lock = threading.Lock()
    assert path_of(Box(items=[1, 2, lock])) == "self.items[2]"
    assert path_of(Box(cfg={"retries": 3, "conn": lock})) == "self.cfg['conn']"
    assert path_of(Box(a=Box(b=Slotted(Box(c=lock))))) == "self.a.b.inner.c"
    assert path_of(Box(s=Settings("x", {1: [lock]}))) == "self.s.extra[1][0]"
    assert path_of(Box(t=(1, (2, lock)))) == "self.t[1][1]"


def test_path_stops_at_standard_library_objects() -> None:
    sock = socket.socket()
    try:
        culprit = find_failing_path(Box(client=Box(_sock=sock)))
        assert culprit is not None
        assert culprit.path == "self.client._sock"
        assert culprit.reason == "TypeError: cannot pickle 'socket' object"
    finally:
        sock.close()
    thread = threading.Thread(target=lambda: None)
    culprit = find_failing_path(Box(worker=thread))
    assert culprit is not None and culprit.path == "self.worker"
    assert culprit.reason.startswith("TypeError: cannot pickle 'Thread' object (")


def test_path_survives_reference_cycles() -> None:
    root = Box(name="root")
    vars(root)["child"] = Box(parent=root, gen=(i for i in range(2)))
    assert path_of(root) == "self.child.gen"


def test_path_names_module_members_as_attributes() -> None:
    torch = pytest.importorskip("torch")

    class Encoder(torch.nn.Module):  # type: ignore[name-defined]  # local: cannot pickle
        pass

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.add_module("encoder", torch.nn.Module())
    model.encoder.client = Box(lock=threading.Lock())
    assert path_of(Box(model=model)) == "self.model.encoder.client.lock"
    assert path_of(Box(model=Encoder())) == "self.model"


def test_large_bytes_are_stored_once_and_small_ones_inline() -> None:
    blob = b"x" * OUT_OF_BAND_MIN_BYTES
    data, layout = pickle_handler(Box(a=blob, b=[blob, blob], small=b"y" * 100))
    assert [entry.nbytes for entry in layout.entries] == [OUT_OF_BAND_MIN_BYTES]
    assert len(data) < 1000


def test_restore_refuses_cuda_storages_without_cuda(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    meta = capture(Box(t=torch.ones(4)), tmp_path, modules=[], timings={})
    record = meta.to_json()
    # As a CUDA build would have written it: the storage lives in the device arena.
    record["storages"][0].update(arena="device", device="cuda:0", offset=0)
    record["device_size"], record["host_size"] = record["host_size"], 0
    (tmp_path / "state.pickle").rename(tmp_path / "p")
    with pytest.raises(RestoreError, match="CUDA storages .* torch.cuda is not available"):
        restore_handler(SnapshotMeta.from_json(record), tmp_path / "p", None,
                        tmp_path / "host.arena")


def test_restore_without_the_host_arena_it_needs_fails(tmp_path: Path) -> None:
    meta = capture(Box(blob=b"z" * OUT_OF_BAND_MIN_BYTES), tmp_path, modules=[], timings={})
    with pytest.raises(RestoreError, match="none was given"):
        restore_handler(meta, tmp_path / "state.pickle", None, None)


def test_snapshot_json_round_trips(tmp_path: Path) -> None:
    meta = capture(Box(blob=b"z" * OUT_OF_BAND_MIN_BYTES), tmp_path, modules=["json"],
                   timings={"import": 0.5}, function_version="v1")
    assert SnapshotMeta.load(tmp_path / "snapshot.json") == meta
    written = json.loads((tmp_path / "snapshot.json").read_text())
    assert written["storages"][0] == {"index": 0, "arena": "host", "offset": 0,
                                      "nbytes": OUT_OF_BAND_MIN_BYTES, "kind": "buffer",
                                      "dtype": "uint8", "device": "cpu"}
    assert set(written["timings"]) == {"import", "capture"}


# --- generated round trips ------------------------------------------------------------

big_bytes = st.builds(lambda size, fill: bytes([fill]) * size,
                      st.integers(OUT_OF_BAND_MIN_BYTES, 3 * OUT_OF_BAND_MIN_BYTES),
                      st.integers(0, 255))
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
    st.binary(max_size=64), big_bytes, big_bytes.map(bytearray),
)
graphs = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
        st.builds(lambda a, b: Box(a=a, b=b), children, children),
    ),
    max_leaves=12,
)


def round_trip(obj: Any) -> Any:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        meta = capture(obj, out, modules=[], timings={})
        return restore_handler(meta, out / "state.pickle", out / "host.arena",
                               out / "device.arena").handler


@settings(max_examples=60, deadline=None)
@given(graphs)
def test_any_graph_round_trips(graph: Any) -> None:
    assert round_trip(Box(state=graph)) == Box(state=graph)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["float32", "int16", "uint8", "complex64"]),
                          st.integers(0, 40_000)), min_size=1, max_size=4))
def test_numpy_arrays_round_trip(specs: list[tuple[str, int]]) -> None:
    numpy = pytest.importorskip("numpy")
    arrays = [numpy.arange(n).astype(dtype) for dtype, n in specs]
    restored = round_trip(Box(arrays=arrays)).arrays
    for original, again in zip(arrays, restored, strict=True):
        assert again.dtype == original.dtype
        numpy.testing.assert_array_equal(again, original)
