"""LoraEmbedding: nn.Embedding with adapters. A: (r, num_embeddings) is a lookup table, B: (dim, r)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as LF
from .base import LoraLayer
from .mixed_batch import mixed_grouped_update


class LoraEmbedding(LoraLayer):
    """nn.Embedding + adapters (A is a lookup table, as in PEFT and loralib)."""

    geometry = "embedding"
    peft_class = "Embedding"
    fan_in_fan_out = True  # the table is (num_embeddings, dim) = (d_in, d_out): DoRA's output units are columns

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = self.container("lora_embedding_A")
        self.lora_embedding_B = self.container("lora_embedding_B")

    def make_pair(self, name, r, bias=False):
        """lora_embedding_A (r x vocabulary) and lora_embedding_B (dim x r), PEFT's names."""
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, r))

    def pair(self, name):
        """The (A, B) parameters of adapter `name`."""
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def reset_pair(self, name, gaussian=False):
        """PEFT's initialisation for embeddings: A zero, B normal."""
        A, B = self.pair(name)  # PEFT: A zero, B normal
        nn.init.zeros_(A)
        nn.init.normal_(B)

    def lowrank(self, ids, name, A, B):
        """B A[:, ids]: A's columns looked up as an embedding, then B."""
        base = self.base_layer
        after_A = F.embedding(ids, A.T, padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        return after_A @ B.T

    def lowrank_update(self, ids, name, A, B, s):
        """s · B A[:, ids], times the base's `embed_scale` where it has one (Gemma's scaled embeddings)."""
        update = self.lowrank(ids, name, A, B) * s
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        return update if embed_scale is None else update * torch.as_tensor(embed_scale).to(update.dtype)

    def delta(self, A, B, s):
        """ΔW = s · (B A)ᵀ, shaped like the embedding table."""
        return LF.embedding_delta(A, B, s)

    mixed_update = staticmethod(mixed_grouped_update)
