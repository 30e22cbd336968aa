"""The weights `thaw bench loaders` restores, and the loaders a user would pick instead of
thaw: each writes its own format once and loads it back as a dict of CPU tensors.

A loader returns `(tensors, release)`: the tensors may be lazy (a file mapping), so the
bench touches every page of them inside the timing (`touch`), the same for every loader;
`release` frees what the loader holds and is called outside the timing.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAGE = 4096

# GPT-2 medium: 24 blocks of width 1024, a 50257-token vocabulary, 1024 positions:
# 354.8M float32 parameters, 1.42 GB.
_FULL = (1024, 50257, 1024)
# Below this size the shapes shrink (width 64) so CI can run the bench in a second.
_SMALL_BELOW = 300_000_000
_SMALL = (64, 1000, 64)

Tensors = dict[str, Any]
Loaded = tuple[Tensors, Callable[[], None]]


@dataclass(frozen=True)
class Peer:
    """One loader beside thaw: the package it needs, the file it reads, how it loads."""

    name: str
    package: str
    fmt: str
    load: Callable[[Path], Loaded]


def gpt2_shapes(size_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """GPT-2-like parameter names and shapes whose float32 total is about `size_bytes`
    (at least one block)."""
    width, vocab, positions = _FULL if size_bytes >= _SMALL_BELOW else _SMALL
    head = [("wte.weight", (vocab, width)), ("wpe.weight", (positions, width)),
            ("ln_f.weight", (width,)), ("ln_f.bias", (width,))]
    block = [("ln_1.weight", (width,)), ("ln_1.bias", (width,)),
             ("attn.c_attn.weight", (width, 3 * width)), ("attn.c_attn.bias", (3 * width,)),
             ("attn.c_proj.weight", (width, width)), ("attn.c_proj.bias", (width,)),
             ("ln_2.weight", (width,)), ("ln_2.bias", (width,)),
             ("mlp.c_fc.weight", (width, 4 * width)), ("mlp.c_fc.bias", (4 * width,)),
             ("mlp.c_proj.weight", (4 * width, width)), ("mlp.c_proj.bias", (width,))]

    def nbytes(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
        total = 0
        for _, shape in shapes:
            count = 1
            for dim in shape:
                count *= dim
            total += 4 * count
        return total

    blocks = max(1, round((size_bytes - nbytes(head)) / nbytes(block)))
    return head + [(f"h.{i}.{name}", shape) for i in range(blocks) for name, shape in block]


def make_weights(size_bytes: int, seed: int = 0) -> Tensors:
    """Random float32 weights (normal, std 0.02) from a fixed seed."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * 0.02
            for name, shape in gpt2_shapes(size_bytes)}


def touch(tensors: Tensors) -> int:
    """Read one byte of every page of every tensor (and its last byte), so a lazily
    mapped tensor is read into memory; returns their sum, the same for every loader that
    produced the same bytes."""
    import torch

    total = 0
    for tensor in tensors.values():
        flat = tensor.reshape(-1).view(torch.uint8)
        total += int(flat[::PAGE].sum(dtype=torch.int64)) + int(flat[-1])
    return total


def write_formats(tensors: Tensors, folder: Path, formats: set[str]) -> dict[str, Path]:
    """Write `tensors` once in each requested format; returns each format's file."""
    import torch

    paths: dict[str, Path] = {}
    if "safetensors" in formats:
        from safetensors.torch import save_file

        paths["safetensors"] = folder / "model.safetensors"
        save_file(tensors, str(paths["safetensors"]))
    if "torch" in formats:
        paths["torch"] = folder / "model.pt"
        torch.save(tensors, paths["torch"])
    if "tensorizer" in formats:
        from tensorizer import TensorSerializer

        paths["tensorizer"] = folder / "model.tensors"
        serializer = TensorSerializer(str(paths["tensorizer"]))
        serializer.write_state_dict(tensors)
        serializer.close()
    for path in paths.values():
        _sync(path)
    return paths


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _nothing() -> None:
    return None


def _safetensors_load_file(path: Path) -> Loaded:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu"), _nothing


def _safetensors_safe_open(path: Path) -> Loaded:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, _nothing  # noqa: SIM118


def _torch_load_mmap(path: Path) -> Loaded:
    import torch

    return torch.load(path, mmap=True, weights_only=True), _nothing


def _tensorizer(path: Path) -> Loaded:
    from tensorizer import TensorDeserializer

    deserializer = TensorDeserializer(str(path), device="cpu", lazy_load=False)
    tensors = dict(deserializer.items())
    return tensors, deserializer.close


def _runai(path: Path) -> Loaded:
    # The streamer yields tensors over its own reused read buffer: keeping them means
    # copying each one out, as its documentation tells users to.
    from runai_model_streamer import SafetensorsStreamer

    with SafetensorsStreamer() as streamer:
        streamer.stream_file(str(path))
        return {name: tensor.clone() for name, tensor in streamer.get_tensors()}, _nothing


def _fastsafetensors(path: Path) -> Loaded:
    # Its tensors live in the loader's buffer: kept open until `release`, not copied.
    from fastsafetensors import fastsafe_open

    handle = fastsafe_open(filenames=[str(path)], nogds=True, device="cpu",
                           debug_log=False)
    opened = handle.__enter__()
    tensors = {name: opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118

    def release() -> None:
        tensors.clear()
        handle.__exit__(None, None, None)

    return tensors, release


PEERS = [
    Peer("safetensors_load_file", "safetensors", "safetensors", _safetensors_load_file),
    Peer("safetensors_safe_open", "safetensors", "safetensors", _safetensors_safe_open),
    Peer("torch_load_mmap", "torch", "torch", _torch_load_mmap),
    Peer("tensorizer", "tensorizer", "tensorizer", _tensorizer),
    Peer("runai_model_streamer", "runai-model-streamer", "safetensors", _runai),
    Peer("fastsafetensors", "fastsafetensors", "safetensors", _fastsafetensors),
]


def installed_version(package: str) -> str | None:
    """The installed version of `package`, or None where it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
