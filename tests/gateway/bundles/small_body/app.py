"""Fixture: a function whose request bodies are limited to 1 KiB (thaw.toml
[limits] max_body). Answers how many bytes reached it."""


class SmallBody:
    def __call__(self, request):
        return {"length": len(request.body)}
