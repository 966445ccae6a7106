"""Exact prefix caching: the keys/values of prompts already prefilled, reused by prompts that start with the
same tokens under the same adapter (system prompts, few-shot headers, the earlier turns of a chat).

Prompts are cut into blocks of `BLOCK` tokens; each block boundary has a digest chained over (adapter, tokens so
far), so a lookup walks the new prompt's boundaries and takes the longest one some stored prompt shares, and
then checks the tokens themselves (a digest collision can never give another prompt's cache). Least-recently
used prompts are dropped beyond `max_bytes`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK = 16


def block_digests(adapter: str | None, ids: list[int]) -> list[bytes]:
    """Digest i covers the first (i + 1) * BLOCK tokens (whole blocks only) and the adapter."""
    h = hashlib.blake2b(repr(adapter).encode(), digest_size=16)
    out = []
    for i in range(len(ids) // BLOCK):
        h.update(torch.tensor(ids[i * BLOCK:(i + 1) * BLOCK], dtype=torch.int64).numpy().tobytes())
        out.append(h.copy().digest())
    return out


@dataclass
class Entry:
    adapter: str | None
    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, heads, tokens, head_dim)
    digests: list[bytes]
    nbytes: int


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.index: dict[bytes, int] = {}  # block digest -> the entry that has it
        self.nbytes = 0
        self.hits = self.misses = self.hit_tokens = 0
        self._next = 0

    def lookup(self, adapter: str | None, ids: list[int]):
        """(layers cut to the longest cached prefix, its length), at most len(ids) - 1 tokens (one is left to
        compute the next token's logits); (None, 0) when nothing matches."""
        digests = block_digests(adapter, ids[:-1])
        for i in range(len(digests) - 1, -1, -1):
            key = self.index.get(digests[i])
            m = (i + 1) * BLOCK
            if key is not None and self.entries[key].ids[:m] == ids[:m]:
                self.entries.move_to_end(key)
                self.hits += 1
                self.hit_tokens += m
                return [(k[:, :, :m], v[:, :, :m]) for k, v in self.entries[key].layers], m
        self.misses += 1
        return None, 0

    def insert(self, adapter: str | None, ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the keys/values of `ids` (whole blocks). The tensors are kept as they are, never written to."""
        digests = block_digests(adapter, ids)
        if not digests or self.max_bytes <= 0 or digests[-1] in self.index:
            return
        m = len(digests) * BLOCK
        kept = [(k[:, :, :m], v[:, :, :m]) for k, v in layers]
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kept)
        if nbytes > self.max_bytes:
            return
        key, self._next = self._next, self._next + 1
        self.entries[key] = Entry(adapter, list(ids[:m]), kept, digests, nbytes)
        for d in digests:
            self.index.setdefault(d, key)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self.evict_oldest()

    def evict_oldest(self) -> None:
        key, entry = self.entries.popitem(last=False)
        for d in entry.digests:
            if self.index.get(d) == key:
                del self.index[d]
        self.nbytes -= entry.nbytes

    def clear_adapter(self, adapter: str) -> None:
        """Forget every prompt prefilled under `adapter` (it was unloaded or replaced)."""
        for key in [k for k, e in self.entries.items() if e.adapter == adapter]:
            self.entries.move_to_end(key, last=False)
            self.evict_oldest()
