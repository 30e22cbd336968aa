"""The OpenAI-compatible routes with the official `openai` client (issue 6, item 4):
examples/tinylm serves chat/completions, completions and embeddings natively; a
function with only predict(texts=...) gets /v1/embeddings translated."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import EXAMPLES, RunningPlatform
from tests.gateway.conftest import BUNDLES, deploy_once
from thaw.gateway.openai_api import _openai_event

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


@pytest.fixture(scope="module")
def client(platform: RunningPlatform) -> Iterator[openai.OpenAI]:
    deploy_once(platform, EXAMPLES / "tinylm")
    with openai.OpenAI(base_url=f"{platform.url}/v1", api_key=platform.key, max_retries=0,
                       timeout=60) as c:
        yield c


def test_models_are_the_tenants_functions(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert "tinylm" in ids
    model = client.models.retrieve("tinylm")
    assert model.id == "tinylm" and model.owned_by == "dev"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tinylm", messages=MESSAGES,
                                           max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "tinylm"
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("length", "stop")
    assert reply.usage is not None and reply.usage.completion_tokens == len(
        choice.message.content or "") <= 12


def test_chat_stream_is_the_same_text_token_by_token(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tinylm", messages=MESSAGES,
                                           max_tokens=20, temperature=0)
    stream = client.chat.completions.create(
        model="tinylm", messages=MESSAGES, max_tokens=20, temperature=0,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    text = whole.choices[0].message.content or ""
    assert "".join(pieces) == text
    # One chunk per token (plus the role chunk): it streamed, it was not one blob.
    assert sum(1 for p in pieces if p) == len(text)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(text)


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tinylm", prompt="Once upon", max_tokens=8,
                                      temperature=0)
    assert whole.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tinylm", prompt="Once upon", max_tokens=8, temperature=0, stream=True))
    assert streamed == whole.choices[0].text


def test_native_embeddings(client: openai.OpenAI) -> None:
    # Unasked, the client requests base64 and decodes it itself; floats on request.
    for reply in (client.embeddings.create(model="tinylm", input=["hello", "world"]),
                  client.embeddings.create(model="tinylm", input=["hello", "world"],
                                           encoding_format="float")):
        assert [d.index for d in reply.data] == [0, 1]
        for d in reply.data:
            assert len(d.embedding) == 64
            assert math.isclose(math.sqrt(sum(x * x for x in d.embedding)), 1.0, rel_tol=1e-4)
        assert reply.usage.prompt_tokens == 10


def test_embeddings_translated_for_a_texts_function(platform: RunningPlatform,
                                                    client: openai.OpenAI) -> None:
    name = deploy_once(platform, BUNDLES / "texts_embed")
    for _ in range(2):  # the first call finds out the contract, the second remembers it
        reply = client.embeddings.create(model=name, input=["ab", "xyz"])
        assert [d.embedding for d in reply.data] == [
            [2.0, float((97 + 98) % 97), 0.5, -1.0],
            [3.0, float((120 + 121 + 122) % 97), 0.5, -1.0]]
        assert reply.model == name
    floats = client.embeddings.create(model=name, input="hello", encoding_format="float")
    assert floats.data[0].embedding[0] == 5.0
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=name, input="hi", dimensions=8)


def test_openai_errors(platform: RunningPlatform, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="not-deployed", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tinylm", messages=MESSAGES,
                                       max_tokens=100_000)
    assert "max_tokens" in str(bad.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{platform.url}/v1", api_key="thaw_nope",
                      max_retries=0).models.list()
    no_model = platform.http.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert no_model.status_code == 400 and no_model.json()["error"]["field"] == "model"
    not_json = platform.http.post("/v1/embeddings", content=b"{nope")
    assert not_json.status_code == 400


def test_stream_ends_become_openais() -> None:
    assert _openai_event("done", "{}") == b"data: [DONE]\n\n"
    assert _openai_event(None, '{"a":1}') == b'data: {"a":1}\n\n'
    error = _openai_event("error", '{"error":{"code":"handler_error","message":"boom"}}')
    assert error == b'data: {"error":{"code":"handler_error","message":"boom"}}\n\n'


@pytest.mark.slow
def test_examples_embed_through_openai_embeddings(platform: RunningPlatform,
                                                  client: openai.OpenAI,
                                                  tmp_path: Path) -> None:
    # Under a name of its own, so tests/e2e's deploys of "embed" are not new versions
    # of this one.
    folder = tmp_path / "embed"
    shutil.copytree(EXAMPLES / "embed", folder, ignore=shutil.ignore_patterns("__pycache__"))
    toml = folder / "thaw.toml"
    toml.write_text(toml.read_text().replace('name = "embed"', 'name = "gw-embed"'))
    resp = platform.deploy(folder)
    assert resp.status_code == 201 and resp.json()["state"] == "ready", resp.text
    reply = client.embeddings.create(model="gw-embed", input=["a snapshot restore", "hello"])
    native = platform.invoke("gw-embed", {"texts": ["a snapshot restore", "hello"]}).json()
    assert len(reply.data) == 2 and len(reply.data[0].embedding) == 384
    for ours, theirs in zip(reply.data, native["embeddings"], strict=True):
        # base64 float32 on the wire: equal to float32 precision.
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)
                   for a, b in zip(ours.embedding, theirs, strict=True))
