"""`thaw chat MODEL`: an interactive chat in the terminal with a function behind the
OpenAI routes (`/v1/chat/completions`, gateway/openai_api.py; examples/tinylm is
one), its answers streamed token by token as they are generated (docs/chat.md).

The conversation's history is sent with every turn. Commands: `/reset` forgets the
history (the system message stays), `/system TEXT` sets the system message (an empty
TEXT removes it), `/exit` ends. Ctrl-D at the prompt ends too (status 0); Ctrl-C
stops an answer being streamed (the turn is dropped from the history) or clears the
line being typed.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import click

from thaw.client import Client
from thaw.client.sse import EventReader
from thaw.core.errors import ThawError

CHAT_PATH = "/v1/chat/completions"
HELP = ("/reset forgets the conversation, /system TEXT sets the system message, "
        "/exit ends (or Ctrl-D)")


@dataclass
class Conversation:
    """The messages sent with each turn: the system message, then the turns."""

    system: str = ""
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, pending: str) -> list[dict[str, str]]:
        first = [{"role": "system", "content": self.system}] if self.system else []
        return [*first, *self.turns, {"role": "user", "content": pending}]


def deltas(lines: Iterator[str]) -> Iterator[str]:
    """The content of each chunk of an OpenAI chat stream (SSE lines), in order."""
    reader = EventReader()
    for line in lines:
        payload = reader.feed(line)
        if reader.done or payload == "[DONE]":
            return
        if payload is None:
            continue
        chunk = json.loads(payload)
        if isinstance(chunk, dict) and "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise ThawError(f"the model failed midway: {message}")
        for choice in chunk.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                yield str(content)


class Chat:
    """One terminal session with `model`."""

    def __init__(self, client: Client, model: str, out: TextIO,
                 options: dict[str, Any]) -> None:
        self.client, self.model, self.out = client, model, out
        self.options = options
        self.conversation = Conversation()

    def turn(self, text: str) -> None:
        """Send `text` with the history; stream the answer to the terminal."""
        body = {"model": self.model, "stream": True, **self.options,
                "messages": self.conversation.messages(text)}
        answer: list[str] = []
        with self.client.stream("POST", CHAT_PATH, json=body,
                                headers={"Accept": "text/event-stream"}) as resp:
            for piece in deltas(resp.iter_lines()):
                answer.append(piece)
                self.out.write(piece)
                self.out.flush()
        self.out.write("\n")
        self.conversation.turns += [{"role": "user", "content": text},
                                    {"role": "assistant", "content": "".join(answer)}]

    def command(self, line: str) -> bool:
        """Run a /command; False when the session ends."""
        name, _, rest = line.partition(" ")
        if name == "/exit":
            return False
        if name == "/reset":
            self.conversation.turns.clear()
            self.say("(conversation reset)")
        elif name == "/system":
            self.conversation.system = rest.strip()
            self.say("(system message set)" if rest.strip() else "(system message removed)")
        else:
            self.say(f"unknown command {name}: {HELP}")
        return True

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run(self, read: Any = input) -> None:
        """The prompt loop until /exit or end of input."""
        self.say(f"chatting with {self.model}: {HELP}")
        while True:
            try:
                line = read("> ").strip()
            except EOFError:
                self.say("")
                return
            except KeyboardInterrupt:
                self.say("")  # the line typed so far is dropped
                continue
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            try:
                self.turn(line)
            except KeyboardInterrupt:
                self.say("\n(interrupted)")
            except ThawError as exc:
                self.say(f"\nerror: {exc}")


@click.command("chat")
@click.argument("model")
@click.option("--system", default="", help="The system message to start with.")
@click.option("--max-tokens", type=click.IntRange(1), default=None,
              help="The longest answer, in tokens (default: the model's).")
@click.option("--temperature", type=click.FloatRange(0, 2), default=None)
def chat(model: str, system: str, max_tokens: int | None,
         temperature: float | None) -> None:
    """Chat with MODEL (a function behind the OpenAI routes) in the terminal."""
    with contextlib.suppress(ImportError):  # absent on some platforms
        import readline  # noqa: F401 (line editing and history for input())
    options: dict[str, Any] = {}
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    if temperature is not None:
        options["temperature"] = temperature
    with Client(timeout=600.0) as client:
        session = Chat(client, model, sys.stdout, options)
        session.conversation.system = system
        session.run()
