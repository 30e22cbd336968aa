"""Fixture: the thaw embedding contract only, like examples/embed without the model:
predict(texts=[...]) -> {"embeddings": [[float, ...], ...]} (4 dimensions, made from
each text's length and characters, so a test can check which vector is which)."""


class TextsEmbedder:
    def predict(self, texts=None):
        if not isinstance(texts, list):
            raise ValueError("'texts' must be a list of strings")
        return {"embeddings": [[float(len(t)), float(sum(map(ord, t)) % 97), 0.5, -1.0]
                               for t in texts]}
