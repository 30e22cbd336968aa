"""examples/embed with its model on the GPU: `thaw doctor gpu` copies this module into a
copy of examples/embed and deploys it, so the snapshot has a device arena to restore
into the instance's slice."""

import torch
from app import Embedder as _HostEmbedder


class Embedder(_HostEmbedder):  # type: ignore[misc]
    def setup(self) -> None:
        super().setup()
        if torch.cuda.is_available():
            self.model.to("cuda")
