"""A tiny GPT-style language model (random weights) behind OpenAI's API.

It generates characters one token at a time and streams them: call it through the
gateway's `/v1/chat/completions`, `/v1/completions` or `/v1/embeddings` with `model =
"tinylm"` (the official `openai` client works). The function gets the OpenAI request
body at that sub-path and answers with OpenAI's response objects; with `"stream":
true` it returns a generator of chunk objects, which the platform streams as SSE.

The weights are random (seeded, so every instance has the same model): the text is
noise, but the shapes, the token-by-token generation and the snapshot are real.
"""

import base64
import struct
import time
import uuid

import torch
from torch import nn

try:  # The runtime answers 400 for this error; without thaw around, a ValueError.
    from thaw.snapshotter.runtime.handler import InvalidInput as BadRequest
except ImportError:  # pragma: no cover
    BadRequest = ValueError

# Tokens: printable ASCII and newline, one character each, then end-of-sequence.
VOCAB = [chr(c) for c in range(32, 127)] + ["\n"]
TOKEN_OF = {ch: i for i, ch in enumerate(VOCAB)}
UNKNOWN = TOKEN_OF["?"]
EOS = len(VOCAB)
VOCAB_SIZE = len(VOCAB) + 1
CONTEXT = 256
MAX_TOKENS_LIMIT = 512
DEFAULT_MAX_TOKENS = 16

# Instances serve several requests in threads; one intra-op thread each keeps them
# from fighting over the cores.
torch.set_num_threads(1)


def encode(text):
    return [TOKEN_OF.get(ch, UNKNOWN) for ch in text]


class TinyGPT(nn.Module):
    def __init__(self, vocab=VOCAB_SIZE, width=64, heads=4, layers=2, context=CONTEXT):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def hidden(self, ids):
        length = ids.shape[1]
        x = self.tokens(ids) + self.positions(torch.arange(length))
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        return self.norm(self.blocks(x, mask=mask, is_causal=True))

    def forward(self, ids):
        return self.head(self.hidden(ids))


def _int(body, key, default, lo, hi):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"'{key}' must be an integer in [{lo}, {hi}]")
    return value


def _temperature(body):
    value = body.get("temperature", 1.0)
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        raise BadRequest("'temperature' must be a number in [0, 2]")
    return float(value)


def _chat_prompt(messages):
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    parts = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("each message needs a 'role'")
        content = message.get("content") or ""
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise BadRequest("a message's 'content' must be a string")
        parts.append(f"<{message['role']}>{content}\n")
    return "".join(parts) + "<assistant>"


class TinyLM:
    def setup(self):
        torch.manual_seed(0)
        self.model = TinyGPT().eval()
        self.parameter_count = sum(p.numel() for p in self.model.parameters())

    def generate(self, prompt, max_tokens, temperature, seed):
        """Yields (token text, finish_reason or None) one token at a time."""
        ids = encode(prompt)[-(CONTEXT - 1):] or [UNKNOWN]
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.inference_mode():
            for step in range(max_tokens):
                logits = self.model(torch.tensor([ids[-CONTEXT:]]))[0, -1]
                if temperature == 0:
                    token = int(torch.argmax(logits))
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                if token == EOS:
                    yield "", "stop"
                    return
                ids.append(token)
                yield VOCAB[token], ("length" if step == max_tokens - 1 else None)

    def __call__(self, request):
        body = request.json()
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        if request.path == "/v1/chat/completions":
            return self.chat(body)
        if request.path == "/v1/completions":
            return self.complete(body)
        if request.path == "/v1/embeddings":
            return self.embed(body)
        raise BadRequest("tinylm serves /v1/chat/completions, /v1/completions and "
                         f"/v1/embeddings, not {request.path or '/'!r}")

    def _options(self, body):
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise BadRequest("'seed' must be an integer")
        return (_int(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, MAX_TOKENS_LIMIT),
                _temperature(body), seed)

    def chat(self, body):
        prompt = _chat_prompt(body.get("messages"))
        max_tokens, temperature, seed = self._options(body)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body.get("model", "tinylm")}
        tokens = self.generate(prompt, max_tokens, temperature, seed)
        prompt_tokens = len(encode(prompt))
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return self._chat_stream(meta, tokens, prompt_tokens, usage)
        text, finish, count = "", "length", 0
        for piece, reason in tokens:
            text += piece
            count += bool(piece)
            finish = reason or finish
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish, "logprobs": None}],
                "usage": _usage(prompt_tokens, count)}

    def _chat_stream(self, meta, tokens, prompt_tokens, include_usage):
        chunk = {**meta, "object": "chat.completion.chunk"}
        yield {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}]}
        count = 0
        for piece, reason in tokens:
            count += bool(piece)
            delta = {"content": piece} if piece else {}
            yield {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
        if include_usage:
            yield {**chunk, "choices": [], "usage": _usage(prompt_tokens, count)}

    def complete(self, body):
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string")
        max_tokens, temperature, seed = self._options(body)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body.get("model", "tinylm"), "object": "text_completion"}
        tokens = self.generate(prompt, max_tokens, temperature, seed)
        if body.get("stream"):
            return ({**meta, "choices": [{"index": 0, "text": piece, "logprobs": None,
                                          "finish_reason": reason}]}
                    for piece, reason in tokens)
        text, finish, count = "", "length", 0
        for piece, reason in tokens:
            text += piece
            count += bool(piece)
            finish = reason or finish
        return {**meta, "choices": [{"index": 0, "text": text, "logprobs": None,
                                     "finish_reason": finish}],
                "usage": _usage(len(encode(prompt)), count)}

    def embed(self, body):
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("'input' must be a string or a non-empty list of strings")
        encoding = body.get("encoding_format") or "float"
        data, tokens = [], 0
        with torch.inference_mode():
            for index, text in enumerate(texts):
                ids = encode(text)[:CONTEXT] or [UNKNOWN]
                tokens += len(ids)
                vector = self.model.hidden(torch.tensor([ids]))[0].mean(dim=0)
                vector = (vector / vector.norm()).tolist()
                if encoding == "base64":
                    vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                data.append({"object": "embedding", "index": index, "embedding": vector})
        return {"object": "list", "data": data, "model": body.get("model", "tinylm"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
