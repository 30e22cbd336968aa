"""The real `cog` package's Input() read like thaw's own: constraints, descriptions,
defaults, and cog's rule that Input() without a default on a non-Optional type is
required (docs/cog.md)."""

from __future__ import annotations

import pytest

from thaw.snapshotter.runtime.handler import InvalidInput, Invoker, Request, create_handler
from thaw.snapshotter.runtime.signature import handler_schema, predict_of, signature_schema

cog = pytest.importorskip("cog")


class Predictor(cog.BasePredictor):  # type: ignore[misc]
    def setup(self) -> None:
        self.calls = 0

    def predict(self, text: str = cog.Input(description="Words", regex="^[a-z]+$",
                                            max_length=8),
                n: int = cog.Input(default=2, ge=1, le=5),
                mode: str = cog.Input(default="a", choices=["a", "b"]),
                note: str | None = cog.Input(description="Optional")) -> str:
        self.calls += 1
        return f"{text * n}{mode}{note or ''}"


def test_cog_inputs_become_the_schema() -> None:
    schema = signature_schema(Predictor().predict)
    assert schema is not None
    assert schema["required"] == ["text"]
    props = schema["properties"]
    assert props["text"] == {"type": "string", "description": "Words", "maxLength": 8,
                             "pattern": "^[a-z]+$"}
    assert props["n"] == {"type": "integer", "minimum": 1, "maximum": 5, "default": 2}
    assert props["mode"] == {"type": "string", "enum": ["a", "b"], "default": "a"}
    assert props["note"]["default"] is None and props["note"]["description"] == "Optional"


def test_a_cog_predictor_runs_setup_once_and_gets_its_defaults() -> None:
    handler = create_handler(Predictor)
    invoker = Invoker(handler)
    reply = invoker.invoke(Request("POST", "", "", {}, b'{"text": "ab"}'))
    assert getattr(reply, "body", None) == b'"ababa"'
    assert handler.calls == 1  # type: ignore[attr-defined]
    with pytest.raises(InvalidInput, match="text"):
        invoker.invoke(Request("POST", "", "", {}, b'{"n": 1}'))


class Runner(cog.BaseRunner):  # type: ignore[misc]
    """cog's newer form: run() in place of predict()."""

    def run(self, prompt: str = cog.Input(description="Prompt"),
            n: int = cog.Input(default=3, ge=1)) -> str:
        return prompt * n


def test_a_cog_runner_is_called_through_run() -> None:
    handler = create_handler(Runner)
    schema = handler_schema(handler)
    assert '"prompt"' in schema and '"default": 3' in schema and '"minimum": 1' in schema
    reply = Invoker(handler).invoke(Request("POST", "", "", {}, b'{"prompt": "x"}'))
    assert getattr(reply, "body", None) == b'"xxx"'
    # A predict()-defining class still runs predict(), not cog's bridge.
    assert predict_of(create_handler(Predictor)).__name__ == "predict"
