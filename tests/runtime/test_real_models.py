"""Round trips of real Hugging Face objects from the installed all-MiniLM-L6-v2: its fast
tokenizer (Rust state behind a Python wrapper) and the whole SentenceTransformer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import Client, Processes, build, start_fresh, start_template, wait_ready

pytestmark = pytest.mark.slow

SENTENCES = ["A snapshot restore is a cold start.", "Tokenizers hold Rust state.", ""]


def call(socket_path: str, payload: Any) -> Any:
    client = Client(socket_path)
    try:
        response = client.invoke(payload)
        assert response.status == 200, response.body
        return response.json()
    finally:
        client.close()


def fresh_and_restored(processes: Processes, bundle: str, out: Path) -> tuple[str, str]:
    """Socket paths of a fresh instance and of one forked from a template."""
    fresh, fresh_socket = start_fresh(processes, bundle)  # runs alongside the build
    snapshot = build(processes, bundle, out)
    template = start_template(processes, snapshot)
    instance = template.spawn(processes)
    wait_ready(fresh)
    return fresh_socket, instance.socket


def test_tokenizer_restores_equal_to_fresh(processes: Processes, tmp_path: Path) -> None:
    fresh, restored = fresh_and_restored(processes, "tokenizer_rt", tmp_path / "snapshot")
    expected = call(fresh, {"texts": SENTENCES})
    assert expected["is_fast"] and expected["backend"] == "tokenizers"  # the Rust tokenizer
    assert call(restored, {"texts": SENTENCES}) == expected


def test_sentence_transformer_restores_equal_to_fresh(
    processes: Processes, tmp_path: Path
) -> None:
    fresh, restored = fresh_and_restored(processes, "minilm_rt", tmp_path / "snapshot")
    expected = call(fresh, {"sentences": SENTENCES})["embeddings"]
    again = call(restored, {"sentences": SENTENCES})["embeddings"]
    assert len(again) == len(SENTENCES) and len(again[0]) == 384
    for row, expected_row in zip(again, expected, strict=True):
        assert row == pytest.approx(expected_row, abs=1e-6)
