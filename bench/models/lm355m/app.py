"""A GPT-2-medium-shaped language model (355M parameters, 1.42 GB of float32 weights)
with random weights from a fixed seed, for `thaw bench coldstart --function
bench/models/lm355m`: the cold start of a real model size, with nothing to download.

Torch only. Text is tokenised as bytes (one token per UTF-8 byte); the answer is the
8 tokens generated greedily after it with a key/value cache (meaningless, the weights
being random, but the same on every start). POST {"text": "..."} or {"tokens": [ints]}.
"""

import os
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

WIDTH = 1024
HEADS = 16
LAYERS = 24
VOCAB = 50257
POSITIONS = 1024
NEW_TOKENS = 8
SEED = 0


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, 4 * WIDTH)
        self.out = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor]) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(WIDTH, dim=2)
        q, k, v = (t.view(batch, length, HEADS, WIDTH // HEADS).transpose(1, 2)
                   for t in (q, k, v))
        if cache:  # one new token: it attends to every earlier one
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        cache[:] = [k, v]
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, WIDTH))
        out: torch.Tensor = x + self.out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))
        return out


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.wpe = nn.Embedding(POSITIONS, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(WIDTH)

    def forward(self, tokens: torch.Tensor, start: int,
                caches: list[list[torch.Tensor]]) -> torch.Tensor:
        positions = torch.arange(start, start + tokens.shape[1])
        x = self.wte(tokens) + self.wpe(positions)
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block(x, cache)
        logits: torch.Tensor = self.ln_f(x[:, -1]) @ self.wte.weight.T  # tied output embedding
        return logits


class LanguageModel:
    def setup(self) -> None:
        torch.manual_seed(SEED)
        self.model = GPT().eval()
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.setup_pid = os.getpid()

    def predict(self, text: str | None = None,
                tokens: list[int] | None = None) -> dict[str, Any]:
        if tokens is None:
            if not isinstance(text, str) or not text:
                raise ValueError("send 'text' (a non-empty string) or 'tokens'")
            tokens = list(text.encode())
        if (not isinstance(tokens, list) or not tokens
                or not all(isinstance(t, int) and 0 <= t < VOCAB for t in tokens)):
            raise ValueError(f"'tokens' must be a non-empty list of ints in [0, {VOCAB})")
        tokens = tokens[-(POSITIONS - NEW_TOKENS):]
        # Each block's keys and values so far.
        caches: list[list[torch.Tensor]] = [[] for _ in range(LAYERS)]
        step = torch.tensor([tokens])
        start, generated = 0, []
        with torch.inference_mode():
            for _ in range(NEW_TOKENS):
                nxt = self.model(step, start, caches).argmax(dim=-1, keepdim=True)
                start += step.shape[1]
                step = nxt
                generated.append(int(nxt))
        return {"generated": generated, "parameters": self.parameters,
                "setup_pid": self.setup_pid, "pid": os.getpid()}
